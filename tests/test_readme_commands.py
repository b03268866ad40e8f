"""Every shell command in README.md and docs/*.md works as typed after the README's set-up.

The commands are read from the fenced ```bash / ```sh / ```console blocks, whatever the
documents say at the time: comments and output lines are skipped, `\\` continuations joined,
`NAME="..."` lines define the `$NAME` used after them, and `<placeholders>` (a run directory, a
checkpoint) become a plain word. The fast tier composes the config of every Hydra command
(`train.py`, `evaluate.py`, `caption.py`, also behind `torchrun`/`srun`), each job of a `-m`
sweep included, as `--cfg job` would. The slow tier runs each command as far as it can go
without data or a long job: each entry point once with `--cfg job`, `--help` for the other
Python commands, `make -n`, `bash -n`; and the cheap ones (`python train.py debug=fast`) for real.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import CONF, ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}
PLACEHOLDER = re.compile(r"<[^<>\s][^<>]*>")
VARIABLE = re.compile(r"\$\{([A-Za-z_]\w*)\}|\$([A-Za-z_]\w*)")
ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=")
CHEAP = [["train.py", "debug=fast"]]  # run for real in the slow tier (under a minute)


@dataclass
class Command:
    where: str  # file:line, for the failure message
    text: str  # as written, continuations joined
    argv: list[str]  # after variables and placeholders, without leading VAR=value
    env: dict[str, str] = field(default_factory=dict)

    @property
    def python(self) -> list[str] | None:
        """The arguments after `python` (or a wrapper's script: torchrun, srun), else None."""
        argv = self.argv
        if argv[0] in ("torchrun", "srun"):
            script = next((i for i, a in enumerate(argv) if a.endswith(".py")), None)
            return argv[script:] if script is not None else None
        if Path(argv[0]).name in ("python", "python3"):
            return argv[1:]
        return None

    @property
    def hydra_script(self) -> str | None:
        args = self.python
        if args and args[0].endswith(".py") and args[0] in hydra_scripts():
            return args[0]
        return None


def hydra_scripts() -> dict[str, str]:
    """Entry points in the repository root that use @hydra.main, with their config name."""
    out = {}
    for path in ROOT.glob("*.py"):
        m = re.search(r"@hydra\.main\([^)]*config_name=\"(\w+)\"", path.read_text())
        if m:
            out[path.name] = m.group(1)
    return out


def shell_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(language, first line number, lines) of each fenced block."""
    blocks, current = [], None
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            if current is None:
                current = (line.strip()[3:].strip().lower(), n + 1, [])
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current[2].append(line)
    return [b for b in blocks if b[0] in SHELL_BLOCKS]


def expand(line: str, variables: dict[str, str]) -> str:
    """`$NAME` / `${NAME}` of the block's own variables (Hydra's `${oc.env:X}` is not one)."""
    return VARIABLE.sub(lambda m: variables.get(m[1] or m[2], m[0]), line)


def commands_in(path: Path, root: Path = ROOT) -> list[Command]:
    out = []
    for lang, first, lines in shell_blocks(path.read_text()):
        variables: dict[str, str] = {}
        joined: list[tuple[int, str]] = []
        for n, line in enumerate(lines, first):
            if joined and joined[-1][1].endswith("\\"):
                joined[-1] = (joined[-1][0], joined[-1][1][:-1] + " " + line.strip())
            else:
                joined.append((n, line.strip()))
        for n, line in joined:
            if lang == "console":  # `$ command` lines; the rest is what it printed
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            if not line or line.startswith("#"):
                continue
            where = f"{path.relative_to(root)}:{n}"
            words = shlex.split(line, comments=True)
            if len(words) == 1 and ASSIGNMENT.match(words[0]):  # E512="experiment=..."
                name, value = words[0].split("=", 1)
                variables[name] = value
                continue
            expanded = PLACEHOLDER.sub("PLACEHOLDER", expand(line, variables))
            argv = shlex.split(expanded, comments=True)
            env = {}
            while argv and ASSIGNMENT.match(argv[0]):
                name, value = argv.pop(0).split("=", 1)
                env[name] = value
            if argv:
                out.append(Command(where, line, argv, env))
    return out


def all_commands() -> list[Command]:
    return [c for doc in DOCS for c in commands_in(doc)]


def compose_jobs(script: str, args: list[str]) -> int:
    """Compose the config of every job the command line would run (as `--cfg job` does for
    one); returns how many. Raises what Hydra raises for a bad command line."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from captioning.cli import paths_as_override

    args = [*args, "--cfg", "job"]  # as the slow tier runs it: flags after the overrides
    if script == "caption.py":
        args = paths_as_override(args)  # what caption.py does before Hydra parses
    parsed = get_args_parser().parse_args(args)
    config_name = parsed.config_name or hydra_scripts()[script]
    jobs = [parsed.overrides]
    if parsed.multirun:
        overrides = OverridesParser.create().parse_overrides(parsed.overrides)
        jobs = [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
    for job in jobs:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            compose(config_name=config_name, overrides=job, return_hydra_config=True)
    GlobalHydra.instance().clear()
    return len(jobs)


def describe(c: Command) -> str:
    return f"{c.where}: {c.text}"


# -- the extraction itself ----------------------------------------------------------------------
def test_commands_are_read_as_a_shell_would(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(
        'text\n```bash\n# a comment\nE="experiment=flickr8k seed=1"\n'
        "OMP_NUM_THREADS=1 python train.py $E \\\n    hydra.run.dir=<run dir>   # why\n"
        "```\n```python\nprint('not shell')\n```\n"
        '```console\n$ make test ARGS="-x"\nall passed\n```\n'
    )
    first, second = commands_in(doc, root=tmp_path)
    assert first.argv == [
        "python", "train.py", "experiment=flickr8k", "seed=1", "hydra.run.dir=PLACEHOLDER"
    ]  # fmt: skip
    assert first.env == {"OMP_NUM_THREADS": "1"} and first.where == "doc.md:5"
    assert first.hydra_script == "train.py" and first.python[0] == "train.py"
    assert second.argv == ["make", "test", "ARGS=-x"]


def test_the_documents_have_commands():
    commands = all_commands()
    scripts = {c.hydra_script for c in commands}
    assert {"train.py", "evaluate.py", "caption.py"} <= scripts, scripts
    assert any(c.argv[0] == "make" for c in commands)


# -- fast: every Hydra command composes -------------------------------------------------------
@pytest.mark.parametrize(
    "command", [c for c in all_commands() if c.hydra_script], ids=lambda c: c.where
)
def test_hydra_command_composes(command):
    try:
        assert compose_jobs(command.hydra_script, command.python[1:]) >= 1
    except Exception as e:
        pytest.fail(f"{describe(command)}\n  does not parse: {type(e).__name__}: {e}")


# -- slow: run each command as far as it goes -------------------------------------------------
def shell_env(cache: Path) -> dict[str, str]:
    """The environment after `source .venv/bin/activate`, with data and W&B kept in tmp."""
    venv_bin = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        "VIRTUAL_ENV": str(Path(venv_bin).parent),
        "CAPTIONING_CACHE": str(cache),
        "WANDB_MODE": "offline",
        "PYTHONUNBUFFERED": "1",
    }


def run(argv: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check(
    command: Command, env: dict[str, str], started: set[str]
) -> subprocess.CompletedProcess | None:
    """Run `command` as far as it goes without data or a long job; None if nothing to run.

    A Hydra entry point starts once (`started`): its first command with `--cfg job` shows the
    real command line works; the fast tier composes every one of its commands.
    """
    env = {**env, **command.env}
    args = command.python
    if command.hydra_script:
        if "-m" in args or "--multirun" in args or command.hydra_script in started:
            return None  # Hydra refuses --cfg with -m; each job is composed in the fast tier
        started.add(command.hydra_script)
        return run([sys.executable, *args, "--cfg", "job"], env)
    if args and args[0] == "-m":
        return run([sys.executable, *args, "--help"], env)
    if args and args[0].endswith(".py"):
        source = (ROOT / args[0]).read_text()
        if "argparse" in source:  # values given before --help are still checked
            return run([sys.executable, *args, "--help"], env)
        return run([sys.executable, "-m", "py_compile", args[0]], env)
    if command.argv[0] == "make":
        return run(["make", "-n", *command.argv[1:]], env)
    return run(["bash", "-n", "-c", command.text], env)


@pytest.mark.slow
def test_every_documented_command_runs_as_far_as_it_can(data_cache):
    env = shell_env(data_cache)
    failures, seen, started = [], set(), set()
    for command in all_commands():
        key = (tuple(command.argv), tuple(sorted(command.env.items())))
        if key in seen:
            continue
        seen.add(key)
        proc = check(command, env, started)
        if proc is not None and proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
            failures.append(f"{describe(command)}\n    " + "\n    ".join(tail))
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_the_cheap_commands_run_for_real(data_cache, tmp_path):
    env = shell_env(data_cache)
    cheap = [c for c in all_commands() if c.python in CHEAP]
    assert cheap, f"the documents no longer show any of {CHEAP}"
    for command in cheap:
        run_dir = tmp_path / command.where.replace("/", "_").replace(":", "_")
        proc = run(
            [sys.executable, *command.python, f"hydra.run.dir={run_dir}"],
            {**env, **command.env},
            timeout=600,
        )
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{describe(command)}\n{out[-3000:]}"
        assert f"done: run directory {run_dir}" in proc.stdout
        assert (run_dir / "test_metrics.json").is_file()
