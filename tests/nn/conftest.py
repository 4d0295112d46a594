"""Compiled flex NA functions count against a per-process limit: tests that compile many shapes
start and end with none."""

import pytest

from stylenat.nn import flex


@pytest.fixture
def fresh_flex():
    flex.reset_flex_graphs()
    yield
    flex.reset_flex_graphs()
