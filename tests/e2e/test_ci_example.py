"""The GitHub Actions example runs as written.

The ``run:`` steps of the workflow's Linux job (``examples/.github/workflows/parity.yml``)
run literally, in order, in a scratch folder holding a copy of ``examples/`` and the files
the steps name (``constraints.txt``), each with ``bash --noprofile --norc -eo pipefail`` as
GitHub runs ``shell: bash``. The install step (the one that runs ``pip install``) is the only
one replaced: by the project's venv first on PATH. Every step must exit 0, and the JUnit
file the verify step writes must hold tests, all passed.
"""

from __future__ import annotations

import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml  # PyYAML: pinned in constraints.txt (executorch, transformers and others need it)
from scratchrun import PROJECT, Ran, run_bash, user_env

pytestmark = pytest.mark.slow

WORKFLOW = PROJECT / "examples" / ".github" / "workflows" / "parity.yml"
#: step keys this emulation honours; a step with another key fails the test rather than run
#: differently from GitHub
STEP_KEYS = {"name", "run", "uses", "with", "if", "env", "working-directory", "shell"}
#: GitHub's ``shell: bash`` (and what an ubuntu step without ``shell`` gets, plus pipefail)
BASH_FLAGS = ("-eo", "pipefail")


def linux_job() -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(name, job, workflow) of the workflow's one job that runs on Linux."""
    workflow = yaml.safe_load(WORKFLOW.read_text())
    linux = [(name, job) for name, job in workflow["jobs"].items()
             if str(job.get("runs-on", "")).startswith("ubuntu")]
    assert len(linux) == 1, f"expected one ubuntu job in {WORKFLOW.name}, found {[n for n, _ in linux]}"
    return linux[0][0], linux[0][1], workflow


def is_install(step: dict[str, Any]) -> bool:
    return bool(re.search(r"\bpip3?\s+install\b", step.get("run", "")))


def test_linux_job_shape() -> None:
    """What the emulation below relies on: one install step, run steps it can run as GitHub does."""
    name, job, workflow = linux_job()
    assert name == "export"
    steps = job["steps"]
    runs = [s for s in steps if "run" in s]
    assert len([s for s in runs if is_install(s)]) == 1, "expected exactly one install (pip install) step"
    install = next(s for s in runs if is_install(s))["run"]
    assert "-c constraints.txt" in install and (PROJECT / "constraints.txt").is_file()
    for s in steps:
        assert set(s) <= STEP_KEYS, f"step {s.get('name') or s.get('uses')}: keys {set(s) - STEP_KEYS} not emulated"
        assert s.get("shell", "bash") == "bash"
        if "run" in s:
            assert "${{" not in s["run"], f"step {s.get('name')}: GitHub expressions are not emulated"
            assert s.get("if", "always()") in ("always()", "success()"), f"step {s.get('name')}: if: not emulated"
    for where in (workflow, job):
        assert "defaults" not in where and "container" not in where and "services" not in where
    assert any(re.search(r"--format junit\s*>\s*\S+\.xml", s["run"]) for s in runs)


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Ran]]:
    _, job, workflow = linux_job()
    root = tmp_path_factory.mktemp("ci") / "repo"
    shutil.copytree(PROJECT / "examples", root / "examples")
    shutil.copy2(PROJECT / "constraints.txt", root / "constraints.txt")  # the install step's -c file
    env = user_env()
    env.update({"CI": "true", "GITHUB_ACTIONS": "true", "GITHUB_WORKSPACE": str(root)})
    env.update({k: str(v) for k, v in (workflow.get("env") or {}).items()})
    env.update({k: str(v) for k, v in (job.get("env") or {}).items()})
    ran: list[Ran] = []
    for step in job["steps"]:
        if "run" not in step or is_install(step):  # uses: actions/...; the install: the venv on PATH
            continue
        step_env = dict(env, **{k: str(v) for k, v in (step.get("env") or {}).items()})
        cwd = root / step.get("working-directory", ".")
        ran.append(run_bash(step["run"], cwd, step_env, flags=BASH_FLAGS))
        if ran[-1].returncode != 0:  # GitHub stops the job here (the later steps are if: always() uploads)
            break
    return root, ran


def test_linux_job_steps_exit_0(ci_run: tuple[Path, list[Ran]]) -> None:
    _, job, _ = linux_job()
    expected = [s["run"] for s in job["steps"] if "run" in s and not is_install(s)]
    _, ran = ci_run
    for r in ran:
        if r.returncode != 0:
            pytest.fail(f"workflow step failed\n{r.describe()}", pytrace=False)
    assert [r.command for r in ran] == expected


def test_linux_job_junit_all_passed(ci_run: tuple[Path, list[Ran]]) -> None:
    root, ran = ci_run
    if any(r.returncode != 0 for r in ran):
        pytest.fail("a workflow step failed (see test_linux_job_steps_exit_0)", pytrace=False)
    verify = next(r.command for r in ran if "--format junit" in r.command)
    m = re.search(r">\s*(\S+\.xml)", verify)
    assert m is not None, verify
    junit = root / m.group(1)
    assert junit.is_file(), f"{verify!r} wrote no {m.group(1)}"
    tree = ET.parse(junit).getroot()
    suites = [tree] if tree.tag == "testsuite" else list(tree.iter("testsuite"))
    assert suites, f"{junit.name}: no <testsuite>"
    totals = {k: sum(int(s.get(k, "0")) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    cases = list(tree.iter("testcase"))
    bad = [c.get("name") for c in cases if c.find("failure") is not None or c.find("error") is not None]
    skipped = [c.get("name") for c in cases if c.find("skipped") is not None]
    text = junit.read_text()[-3000:]
    assert totals["tests"] > 0 and len(cases) == totals["tests"], f"{totals}, {len(cases)} <testcase>\n{text}"
    assert totals["failures"] == totals["errors"] == 0 and not bad, f"{totals}, failed: {bad}\n{text}"
    assert totals["skipped"] == 0 and not skipped, f"not every test passed: skipped {skipped}\n{text}"
