"""The README runs as written.

Every command of every fenced ``bash`` block and every fenced ``python`` block of README.md
runs, in README order, in a scratch copy of the project root (its git-tracked files), with
the project's venv first on PATH, offline, in bash. Each must exit 0. The model files a
reader would have (``model.pt2``, ``weights.pt`` with ``mypkg/nets.py``, ``model.keras``,
``model.onnx``) are made first, small, the way a reader makes them (``readme_models.py``);
the quickstart's undefined ``MyNet`` gets a small definition in front of it, and a check
behind it that every result it holds is ``ok`` (``CHECK_PY``).

Only the commands in ``SKIPPED`` are not run, each with its reason; a README command that is
neither run nor listed, or a listed one the README no longer has, fails the module.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from readme_models import MYNET_PY
from scratchrun import PROJECT, VENV_BIN, Ran, copy_project, run_bash, user_env

pytestmark = pytest.mark.slow

README = PROJECT / "README.md"
MAKEFILE = PROJECT / "Makefile"
MODELS_SCRIPT = Path(__file__).resolve().parent / "readme_models.py"

#: README commands that are not run here: {command prefix: reason}. Nothing else is skipped.
SKIPPED: dict[str, str] = {
    "make demo": "creates .venv and pip-installs (network); its recipe's command "
                 "`portable-models demo --out dist/demo` is the README's own next command and runs "
                 "(test_make_demo_recipe_is_run)",
    "make test": "creates .venv and pip-installs (network), then runs the whole suite, this test "
                 "included",
}

#: fenced blocks that hold no command to run: {language: reason}
NOT_COMMANDS: dict[str, str] = {
    "yaml": "a CI snippet around a placeholder train.py; the runnable workflow "
            "examples/.github/workflows/parity.yml runs in test_ci_example.py",
    "": "the bundle layout, not code",
}

#: appended to each Python block: what the reader takes the block to promise, checked. The
#: quickstart ends with ``report = pm.verify(...)`` and looks at nothing; a verify that fails
#: must not pass here unseen. Every portable_models result the block holds (a bundle, a
#: verify report) must be ``ok``.
CHECK_PY = """

# --- appended by tests/e2e/test_readme.py ---
for _name, _value in list(globals().items()):
    if type(_value).__module__.startswith("portable_models") and hasattr(_value, "ok"):
        _table = _value.report() if callable(getattr(_value, "report", None)) else _value
        assert _value.ok, f"{_name} is not ok:\\n{_table}"
        print(f"[test_readme] {_name}: ok")
"""

#: fenced blocks whose commands run here
RUN_LANGUAGES = ("bash", "python")

_FENCE = re.compile(r"^```([\w+-]*)\s*$")


@dataclass(frozen=True)
class Step:
    index: int
    language: str  # "bash" or "python"
    line: int  # in README.md, 1-based
    text: str  # a bash command, or a whole Python block

    @property
    def command(self) -> str:
        """What runs in bash."""
        return f"python {self.script_name}" if self.language == "python" else self.text

    @property
    def script_name(self) -> str:
        return f"readme_block_l{self.line}.py"

    @property
    def id(self) -> str:
        what = f"python-block-L{self.line}" if self.language == "python" else " ".join(self.text.split())
        return f"{self.index:02d} {what[:130]}"


def fenced_blocks(text: str) -> list[tuple[str, int, str]]:
    """(language, line of the first body line, body) of each top-level fenced block."""
    blocks: list[tuple[str, int, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        start = i + 1
        j = start
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        if j == len(lines):
            raise AssertionError(f"README.md line {i + 1}: fenced block never closed")
        blocks.append((m.group(1), start + 1, "\n".join(lines[start:j])))
        i = j + 1
    return blocks


def strip_comment(line: str) -> str:
    """``line`` without a trailing shell comment: a ``#`` that starts a word, outside quotes."""
    quote: str | None = None
    escaped = False
    for i, ch in enumerate(line):
        if escaped:
            escaped = False
        elif ch == "\\" and quote != "'":
            escaped = True
        elif quote is not None:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def shell_commands(body: str) -> list[tuple[int, str]]:
    """(offset of the first line, command) of each logical command in a bash block: lines
    ending in a backslash joined as bash joins them, comments and blank lines dropped."""
    out: list[tuple[int, str]] = []
    buf: str | None = None
    first = 0
    for n, raw in enumerate(body.splitlines()):
        if buf is None:
            buf, first = "", n
        if raw.endswith("\\") and not raw.endswith("\\\\"):
            buf += raw[:-1]
            continue
        command = strip_comment(buf + raw).strip()
        buf = None
        if command:
            out.append((first, command))
    if buf:
        out.append((first, strip_comment(buf).strip()))
    return out


def readme_steps(text: str | None = None) -> list[Step]:
    steps: list[Step] = []
    for language, line, body in fenced_blocks(README.read_text() if text is None else text):
        if language == "python":
            steps.append(Step(len(steps), "python", line, body))
        elif language == "bash":
            for offset, command in shell_commands(body):
                steps.append(Step(len(steps), "bash", line + offset, command))
    return steps


def skip_reason(step: Step) -> str | None:
    for prefix, reason in SKIPPED.items():
        if step.language == "bash" and (step.text == prefix or step.text.startswith(prefix + " ")):
            return reason
    return None


STEPS = readme_steps()


# ---------------------------------------------------------------- the extraction itself


def test_extraction_joins_continuations_and_strips_comments_outside_quotes() -> None:
    body = ('a --x 1   # a comment\n'
            'b "# not a comment" \'#\' c#d  # comment\n'
            '\n# a whole-line comment\n'
            'c one \\\n    two \\\n    three\n')
    assert shell_commands(body) == [(0, "a --x 1"), (1, "b \"# not a comment\" '#' c#d"),
                                    (4, "c one     two     three")]
    text = "x\n```bash\nmake demo   # go\n```\n\n```python\nprint(1)\n```\n"
    steps = readme_steps(text)
    assert [(s.language, s.line, s.text) for s in steps] == [("bash", 3, "make demo"),
                                                             ("python", 7, "print(1)")]


def test_every_fenced_block_is_run_or_known() -> None:
    """A new ```sh or ```console block cannot slip past this test unrun."""
    for language, line, _ in fenced_blocks(README.read_text()):
        assert language in RUN_LANGUAGES or language in NOT_COMMANDS, (
            f"README.md line {line}: fenced block ```{language} is neither run by this test nor "
            f"listed in NOT_COMMANDS with a reason")
    assert any(s.language == "python" for s in STEPS), "the Python quickstart is gone from README.md"
    assert sum(s.language == "bash" for s in STEPS) >= 5


def test_skip_list_is_not_stale() -> None:
    for prefix in SKIPPED:
        assert any(skip_reason(s) is not None and s.text.startswith(prefix) for s in STEPS), (
            f"SKIPPED lists {prefix!r}, which README.md no longer has: remove it")


def test_make_demo_recipe_is_run() -> None:
    """``make demo`` is skipped (it installs); the command its recipe runs is run here instead,
    as one of the README's own commands."""
    recipe: list[str] = []
    lines = MAKEFILE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"^demo\s*:", line))
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip().lstrip("@-").replace("$(BIN)/", ""))
    assert recipe, "no recipe under `demo:` in the Makefile"
    run = {s.text for s in STEPS if skip_reason(s) is None}
    for command in recipe:
        assert command in run, f"`make demo` runs `{command}`, which no README command runs"


# ---------------------------------------------------------------- running it


def _make_reader_files(root: Path, env: dict[str, str]) -> None:
    for kind in ("torch", "keras"):
        r = subprocess.run([str(VENV_BIN / "python"), str(MODELS_SCRIPT), kind, str(root)], cwd=root,
                           env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"making the {kind} reader files failed:\n{r.stdout[-3000:]}{r.stderr[-3000:]}"
    for name in ("model.pt2", "weights.pt", "mypkg/nets.py", "model.keras", "model.onnx"):
        assert (root / name).is_file(), name


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Ran]:
    """Every README command that is not skipped, run once, in order, in one scratch root; a
    failure does not stop the later commands (each test reports its own command)."""
    root = copy_project(tmp_path_factory.mktemp("readme") / "project")
    # ``--class mypkg.nets:TinyNet``: the reader's own package in the working directory, found
    # from there as `python -m` would (no PYTHONPATH: the README does not set one)
    env = user_env()
    _make_reader_files(root, env)
    results: dict[int, Ran] = {}
    for step in STEPS:
        if skip_reason(step) is not None:
            continue
        if step.language == "python":
            (root / step.script_name).write_text(MYNET_PY + step.text + "\n" + CHECK_PY)
        results[step.index] = ran = run_bash(step.command, root, env)
        print(f"{step.id}: exit {ran.returncode}, {ran.seconds:.1f} s")
    return results


@pytest.mark.parametrize("step", STEPS, ids=[s.id for s in STEPS])
def test_readme_command(step: Step, readme_run: dict[int, Ran]) -> None:
    reason = skip_reason(step)
    if reason is not None:
        pytest.skip(reason)
    ran = readme_run[step.index]
    if ran.returncode != 0:
        earlier = [f"  {s.id} (exit {readme_run[s.index].returncode})" for s in STEPS[:step.index]
                   if s.index in readme_run and readme_run[s.index].returncode != 0]
        pytest.fail(f"README.md line {step.line} ({step.language}) exits {ran.returncode}, not 0\n"
                    + ("earlier README commands that failed too:\n" + "\n".join(earlier) + "\n"
                       if earlier else "")
                    + ran.describe(), pytrace=False)


def test_every_readme_command_was_run_or_skipped(readme_run: dict[int, Ran]) -> None:
    for step in STEPS:
        ran = step.index in readme_run
        skipped = skip_reason(step) is not None
        assert ran != skipped, f"{step.id}: run={ran}, skipped={skipped}"
