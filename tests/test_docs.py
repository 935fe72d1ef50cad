"""The documentation stays true: the site builds in strict mode, every shell command in the guides and the
README either runs here (offline, CPU) or is marked with the reason it cannot, and then still parses
against the real command line (options, configs, make targets, scripts); every public class and function
of the documented packages has a docstring."""

from __future__ import annotations

import importlib
import inspect
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from frozenlm.cli import EXTRA_COMMANDS, run

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# A bash block whose preceding line is `<!-- docs: needs <reason> -->` is parse-checked only; `<!-- docs:
# slow <reason> -->` is executed by `make test-slow` (and parse-checked by `make test`).
MARK = re.compile(r"<!--\s*docs:\s*(needs|slow)\b(.*?)-->")
BLOCK = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
API_PACKAGES = ("frozenlm.llm", "frozenlm.models", "frozenlm.tasks", "frozenlm.data", "frozenlm.analysis")


def blocks() -> list[tuple[str, str, str]]:
    """``(where, mark, text)`` of every bash block: mark is "", "needs" or "slow"."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in BLOCK.finditer(text):
            before = text[: match.start()].rstrip().splitlines()
            mark = MARK.search(before[-1]) if before else None
            line = text[: match.start()].count("\n") + 1
            found.append((f"{page.relative_to(REPO)}:{line}", mark.group(1) if mark else "", match.group(1)))
    return found


def commands(text: str) -> list[list[str]]:
    """The commands of a bash block as argument lists: continuations joined, comments and blank lines
    dropped, leading ``VAR=value`` assignments removed."""
    joined = re.sub(r"\\\n\s*", " ", text)
    result = []
    for line in joined.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        words = shlex.split(line, comments=True)
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
            words = words[1:]
        if words:
            result.append(words)
    return result


BLOCKS = blocks()


def test_every_block_is_run_or_says_why_not():
    assert BLOCKS, "no bash blocks found"
    for where, mark, text in BLOCKS:
        if mark:
            continue
        for words in commands(text):
            assert words[0] in ("frozenlm", "python", "make"), f"{where}: mark the block `<!-- docs: needs ... -->`: {words}"


def check_parses(words: list[str], where: str, capsys) -> None:
    """A documented command against the real command line, without running it."""
    words = [w for w in words if w != "..."]  # "more arguments", a documentation ellipsis
    if "frozenlm" in words:  # also under srun / torchrun
        args = words[words.index("frozenlm") + 1 :]
        for word in args:
            if re.match(r"(configs|benchmarks|notebooks|docs)/\S+\.(yaml|py|ipynb|md)$", word):
                assert (REPO / word).is_file(), f"{where}: {word} does not exist"
        if args and args[0] in EXTRA_COMMANDS:
            with pytest.raises(SystemExit) as exit_info:
                run([args[0], "--help"])
            assert exit_info.value.code == 0
            help_text = capsys.readouterr().out
            for option in (a.split("=")[0] for a in args[1:] if a.startswith("--")):
                assert option in help_text, f"{where}: frozenlm {args[0]} has no option {option}"
            return
        with pytest.raises(SystemExit) as exit_info:
            run([*args, "--print_config"])
        assert exit_info.value.code == 0, f"{where}: {' '.join(words)}\n{capsys.readouterr().err[-2000:]}"
        capsys.readouterr()
    elif words[0] == "make":
        dry = subprocess.run(["make", "-n", *words[1:]], cwd=REPO, capture_output=True, text=True)
        assert dry.returncode == 0, f"{where}: {' '.join(words)}: {dry.stderr}"
    elif words[0] == "python" and words[1].endswith(".py"):
        script = REPO / words[1]
        assert script.is_file(), f"{where}: {words[1]} does not exist"
        help_run = subprocess.run([sys.executable, str(script), "--help"], cwd=REPO, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
        assert help_run.returncode == 0, f"{where}: {words[1]} --help: {help_run.stderr[-1000:]}"
        for option in (a.split("=")[0] for a in words[2:] if a.startswith("--")):
            assert option in help_run.stdout, f"{where}: {words[1]} has no option {option}"


@pytest.mark.parametrize(("where", "mark", "text"), BLOCKS, ids=[b[0] for b in BLOCKS])
def test_documented_commands_parse(where, mark, text, capsys):
    for words in commands(text):
        check_parses(words, where, capsys)


RUNNABLE = [pytest.param(where, text, id=where, marks=[pytest.mark.slow] if mark == "slow" else [])
            for where, mark, text in BLOCKS if mark != "needs"]  # fmt: skip


@pytest.mark.parametrize(("where", "text"), RUNNABLE)
def test_runnable_blocks_run(where, text, tmp_path):
    """Unmarked blocks run in `make test`, `slow` ones in `make test-slow`, each from a scratch folder holding
    the repository's configs, benchmarks, tests and notebooks, offline."""
    for name in ("configs", "benchmarks", "tests", "notebooks", "docs", "Makefile", "pyproject.toml", "constraints.txt"):
        (tmp_path / name).symlink_to(REPO / name)
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parents[1])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", text], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=1800)  # fmt: skip
    assert result.returncode == 0, f"{where}:\n{text}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"


def test_the_site_builds_in_strict_mode(tmp_path):
    """A broken link, a snippet whose result file is missing, or a docstring that does not render fails."""
    pytest.importorskip("mkdocs")
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                           cwd=REPO, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})  # fmt: skip
    assert build.returncode == 0, build.stderr[-4000:]
    assert (tmp_path / "site" / "api" / "tasks" / "index.html").is_file()


def public_objects():
    for package in API_PACKAGES:
        module = importlib.import_module(package)
        for name in getattr(module, "__all__", []):
            yield f"{package}.{name}", getattr(module, name)


def test_every_public_class_and_function_has_a_docstring():
    missing = []
    for name, obj in public_objects():
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if not (obj.__doc__ or "").strip():
            missing.append(name)
        if inspect.isclass(obj):  # its own public methods
            for method_name, method in vars(obj).items():
                if method_name.startswith("_") or not inspect.isfunction(method):
                    continue
                if not (method.__doc__ or "").strip() and not _overrides(obj, method_name):
                    missing.append(f"{name}.{method_name}")
    assert not missing, f"no docstring: {missing}"


def _overrides(cls, name: str) -> bool:
    """Whether ``name`` overrides a documented method of a base class (Lightning hooks, nn.Module.forward)."""
    return any((getattr(base, name, None).__doc__ or "").strip() for base in cls.__mro__[1:] if hasattr(base, name))


def test_every_error_type_a_user_can_fix_is_in_troubleshooting():
    """Each :class:`FrozenLMError` subclass (an error the console script prints as one line) has a row."""
    import pkgutil

    import frozenlm
    from frozenlm.errors import FrozenLMError

    for module in pkgutil.walk_packages(frozenlm.__path__, "frozenlm."):
        importlib.import_module(module.name)

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    page = (REPO / "docs" / "troubleshooting.md").read_text()
    missing = sorted({cls.__name__ for cls in subclasses(FrozenLMError) if f"`{cls.__name__}" not in page})
    assert not missing, f"add these errors to docs/troubleshooting.md: {missing}"


CLI_HELP = REPO / "docs" / "cli"  # each command's --help as docs/cli.md shows it (`make cli-help` rewrites them)


# Printed in a fresh process that imports only the console script, as a user's `frozenlm <command> --help` is:
# the trainer commands' help lists the callback classes imported so far, which in a test session depends on
# the tests that ran before.
_HELP_SCRIPT = """
import contextlib, io, json, sys
from frozenlm.cli import COMMANDS, run
sys.argv = ["frozenlm"]
texts = {}
for name in ["frozenlm", *COMMANDS]:
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            run(([] if name == "frozenlm" else [name]) + ["--help"])
    except SystemExit as exit_:
        assert exit_.code == 0, name
    texts[name] = printed.getvalue()
print(json.dumps(texts))
"""


def cli_help_texts() -> dict[str, str]:
    """`frozenlm --help` and every command's `--help`, as the console script prints them at 100 columns."""
    import json

    env = {**os.environ, "COLUMNS": "100", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", _HELP_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def write_cli_help() -> None:
    """Rewrite docs/cli/*.txt from the command line as it is now (`make cli-help`)."""
    CLI_HELP.mkdir(exist_ok=True)
    for name, text in cli_help_texts().items():
        (CLI_HELP / f"{name}.txt").write_text(text)


def test_the_cli_page_shows_every_commands_current_help():
    """docs/cli.md includes each command's --help from docs/cli/, and those files are what the CLI prints now."""
    page = (REPO / "docs" / "cli.md").read_text()
    stale = []
    for name, text in cli_help_texts().items():
        assert f'--8<-- "cli/{name}.txt"' in page, f"docs/cli.md does not show `frozenlm {name} --help`"
        path = CLI_HELP / f"{name}.txt"
        if not path.is_file() or path.read_text() != text:
            stale.append(name)
    assert not stale, f"docs/cli/ is stale for {stale}: run `make cli-help`"


def test_every_extra_is_named_in_the_readme_and_getting_started():
    """pyproject's optional-dependencies, each said in the install sections (and installed by `make install`)."""
    section = (REPO / "pyproject.toml").read_text().split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    extras = re.findall(r"^([a-z0-9_-]+) = \[", section, re.M)  # tomllib is Python 3.11+; the project takes 3.10
    assert extras, "no optional-dependencies found in pyproject.toml"
    makefile = re.search(r"^EXTRAS \?= (\S+)", (REPO / "Makefile").read_text(), re.M).group(1).split(",")
    assert sorted(makefile) == sorted(extras), f"Makefile EXTRAS {makefile} vs pyproject {sorted(extras)}"
    for page in ("README.md", "docs/getting_started.md"):
        install = (REPO / page).read_text().split("## Install", 1)[1].split("\n## ", 1)[0]
        missing = [name for name in extras if f"`{name}`" not in install]
        assert not missing, f"{page}'s Install section does not name the extras {missing}"
