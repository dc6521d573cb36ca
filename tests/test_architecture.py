"""The documents say what the code is: DESIGN's layer list is the import-linter contract, and the
README's package tree lists every module."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _contract_layers() -> list[list[str]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts = config["tool"]["importlinter"]["contracts"]
    (layers,) = [c["layers"] for c in contracts if c["type"] == "layers"]
    # The contract lists top first; DESIGN lists bottom first.
    return [sorted(x.strip() for x in layer.split("|")) for layer in reversed(layers)]


def _design_layers() -> list[list[str]]:
    text = (ROOT / "docs" / "DESIGN.md").read_text()
    section = text.split("## Layers (bottom to top)", 1)[1].split("\n## ", 1)[0]
    layers = []
    for line in section.splitlines():
        m = re.match(r"^\d+\. \*\*(.+?)\*\*", line)
        if m:
            layers.append(sorted(re.findall(r"`([a-z_]+)`", m.group(1))))
    return layers


def test_design_lists_the_contracts_layers() -> None:
    assert _design_layers() == _contract_layers()


def test_every_top_level_module_is_in_a_layer() -> None:
    names = {p.stem for p in (ROOT / "memslots").iterdir() if p.suffix == ".py"}
    names |= {p.name for p in (ROOT / "memslots").iterdir() if (p / "__init__.py").exists()}
    names.discard("__init__")
    assert names == {n for layer in _contract_layers() for n in layer}


def test_readme_tree_is_the_package_tree() -> None:
    text = (ROOT / "README.md").read_text()
    tree = text.split("```text\nmemslots/\n", 1)[1].split("```", 1)[0]
    listed: set[str] = set()
    stack: list[str] = []
    for line in tree.splitlines():
        m = re.match(r"^( +)(\S+)", line)
        assert m, line
        depth = len(m.group(1)) // 2 - 1
        stack = stack[:depth]
        name = m.group(2)
        if name.endswith("/"):
            stack.append(name.rstrip("/"))
            listed.add("/".join(stack) + "/")
        else:
            listed.add("/".join([*stack, name]))
    actual: set[str] = set()
    for path in (ROOT / "memslots").rglob("*.py"):
        rel = path.relative_to(ROOT / "memslots")
        if path.name != "__init__.py":
            actual.add(str(rel))
        elif rel.parent != Path("."):
            actual.add(f"{rel.parent}/")
    assert listed == actual


def test_nothing_in_the_product_imports_the_test_tooling() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts = config["tool"]["importlinter"]["contracts"]
    (sources,) = [
        c["source_modules"]
        for c in contracts
        if c["type"] == "forbidden" and c["forbidden_modules"] == ["memslots.testing"]
    ]
    product = {n for layer in _contract_layers() for n in layer} - {"testing"}
    assert {s.removeprefix("memslots.") for s in sources} == product
