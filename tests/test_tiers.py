"""The test tiers: one guard per tier in conftest, skips that --require-real turns into failures,
and a CI that runs the README's test command with its switches set."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import REAL_TIERS, require

ROOT = Path(__file__).resolve().parent.parent


def test_a_missing_prerequisite_skips_or_fails() -> None:
    quick, ci = False, True
    require("kvm", quick, None)  # present: nothing happens
    require("kvm", ci, None)
    with pytest.raises(pytest.skip.Exception, match="needs a usable /dev/kvm"):
        require("kvm", quick, "needs a usable /dev/kvm")
    for tier in REAL_TIERS:
        with pytest.raises(pytest.fail.Exception, match="--require-real: needs it"):
            require(tier, ci, "needs it")
    # Kernel measurements need a memory cgroup, which some hosts cannot give: always a skip.
    with pytest.raises(pytest.skip.Exception):
        require("kmem", ci, "needs a per-VM memory cgroup")


def test_markers_are_registered() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    for tier in (*REAL_TIERS, "kmem", "slow"):
        assert re.search(rf'^    "{tier}(\(\w+\))?: ', text, re.M), tier
    assert "--strict-markers" in text


def test_ci_runs_the_readme_test_command_with_the_switches() -> None:
    readme = (ROOT / "README.md").read_text()
    (command,) = re.findall(r"bash scripts/setup.sh --tests && (.+?)\s+#", readme)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-1] == command
    assert "export MEMSLOTS_RUN_SLOW=1" in ci
    kvm = ci.index("if [ -e /dev/kvm ]; then")
    assert ci[kvm + 1].strip() == "export MEMSLOTS_REQUIRE_REAL=1"
    assert "MEMSLOTS_REQUIRE_REAL" in readme and "MEMSLOTS_RUN_SLOW" in readme


def test_skip_guards_live_in_conftest_only() -> None:
    """No test module defines a skip condition of its own (dynamic skips inside a test, for
    host configurations found only by trying, excepted)."""
    for path in (ROOT / "tests").rglob("*.py"):
        if path.name in ("conftest.py", "test_tiers.py"):
            continue
        text = path.read_text()
        assert "mark.skipif" not in text, path
        assert "kvm_available" not in text or path.name == "test_kvm_vm.py", path
