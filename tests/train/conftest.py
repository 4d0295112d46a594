"""The uninterrupted reference run the exact-resume tests compare against (made once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train.helpers import REFERENCE, cli


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    cli(*REFERENCE, "--run-dir", str(run_dir))
    return run_dir
