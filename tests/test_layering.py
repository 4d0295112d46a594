"""The package's layers, checked on the source: no module imports a layer above its own.

nn <- models <- data <- metrics <- {sampling, editing, projection, attention maps}, train <- app <- cli,
with the base modules (errors, _config, _system) below everything. Lazy imports inside functions
count too: they run back up the layers just the same. The package root imports up to models, and
lazily its named entry points above (``stylenat.project``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import stylenat

ROOT = Path(stylenat.__file__).parent

# group -> rank; a module may import its own group and any group of a lower rank.
RANK = {"base": 0, "nn": 1, "models": 2, "data": 2, "metrics": 3, "sampling": 4, "train": 4, "app": 5, "cli": 6}
GROUP_OF_TOP = {
    "_system": "base", "errors": "base", "_config": "base", "_download": "base", "_size": "base",
    "nn": "nn", "models": "models", "registry": "models", "hub": "models", "data": "data", "metrics": "metrics",
    "sampling": "sampling", "export": "sampling", "attention_maps": "sampling", "editing": "sampling", "projection": "sampling",
    "train": "train", "app": "app", "cli": "cli", "__main__": "cli",
}
# Modules above models that the package root re-exports lazily (PEP 562 __getattr__).
ROOT_ENTRY_POINTS = {"stylenat.projection"}


def _group(module: str) -> str:
    """The group of a dotted module name under stylenat ("stylenat.train.loop" -> "train")."""
    parts = module.split(".")
    if parts == ["stylenat"]:
        return "package"
    return GROUP_OF_TOP[parts[1]]


def _imports(path: Path, module: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "stylenat"}
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{module}: use absolute imports (the layering check reads them)"
            if (node.module or "").split(".")[0] == "stylenat":
                found.add(node.module)
    return found


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield path, ".".join(parts)


def test_every_top_level_module_has_a_layer():
    tops = {p.name.removesuffix(".py") for p in ROOT.iterdir() if (p.suffix == ".py" or p.is_dir()) and p.name != "__pycache__"}
    tops.discard("__init__")
    assert tops <= set(GROUP_OF_TOP), f"give these a layer in the test: {sorted(tops - set(GROUP_OF_TOP))}"


def test_no_import_runs_back_up_the_layers():
    violations = []
    for path, module in _modules():
        group = _group(module)
        for target in _imports(path, module):
            target_group = _group(target)
            if target_group == "package":
                if group != "cli":  # the root holds only __version__ and load(); below the CLI, import the layer
                    violations.append(f"{module} imports the package root (import the layer it needs instead)")
                continue
            if group == "package":
                if RANK[target_group] > RANK["models"] and target not in ROOT_ENTRY_POINTS:
                    violations.append(f"stylenat/__init__ imports {target}")
                continue
            if target_group != group and RANK[target_group] >= RANK[group]:
                violations.append(f"{module} ({group}) imports {target} ({target_group})")
    assert not violations, "\n".join(violations)
