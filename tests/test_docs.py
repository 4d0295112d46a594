"""The README and docs/*.md stay true: their Python blocks run, their relative links resolve, and the
README's quick start is what CI runs.

A ```python block runs on its own (fresh globals) in a scratch folder that holds ``runs/demo``, a
one-step run of the tiny preset (random-ish weights: the snippets' shapes and calls are what is
checked, not their images). A block that cannot run here (it needs a trained or downloaded model,
or takes minutes) is marked by the line just above its fence: ``<!-- not run: why -->``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"<!-- not run: (\S.*?) -->")
FENCE = re.compile(r"^```(\w*)\s*$")


def _blocks(text: str):
    """(language, first line number, code, the line above the opening fence) of each fenced block."""
    lines, i = text.split("\n"), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m and m.group(1):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            yield m.group(1), i + 2, "\n".join(lines[i + 1:end]), lines[i - 1] if i else ""
            i = end
        i += 1


SNIPPETS = [(page, line, code, above) for page in PAGES for lang, line, code, above in _blocks(page.read_text()) if lang == "python"]


def test_skipped_blocks_say_why():
    for page in PAGES:
        for _, line, _, above in _blocks(page.read_text()):
            if "not run" in above:
                assert NOT_RUN.fullmatch(above.strip()), f"{page.name}:{line}: write <!-- not run: REASON -->"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A folder with runs/demo: one training step of the tiny preset, as the quick start's run is made."""
    from stylenat.cli import main

    work = tmp_path_factory.mktemp("docs")
    assert main(["train", "--preset", "tiny", "--data", "demo", "--steps", "1", "--sample-every", "1000",
                 "--grid", "2,2", "--run-dir", str(work / "runs" / "demo")]) == 0
    return work


@pytest.mark.parametrize("page, line, code, above", SNIPPETS,
                         ids=[f"{p.relative_to(ROOT)}:{n}" for p, n, _, _ in SNIPPETS])
def test_python_blocks_run(page, line, code, above, request, monkeypatch):
    if (m := NOT_RUN.fullmatch(above.strip())):
        pytest.skip(f"marked not run: {m.group(1)}")
    monkeypatch.chdir(request.getfixturevalue("scratch"))
    exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec"), {"__name__": "__docs__"})


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # code is not links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    assert [p.name for p in PAGES[1:] if f"](docs/{p.name}" not in readme] == []


def test_the_quick_start_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    block = next(code for lang, _, code, _ in _blocks(section) if lang == "bash")
    ci = (ROOT / ".ci" / "run").read_text().split("\n")
    for command in block.split("\n"):
        assert command in ci, f"the README's quick start runs {command!r}, .ci/run does not"

