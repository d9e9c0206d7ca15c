"""The documentation a user reads: every relative link of every markdown file resolves (its
anchor too), and every `fasttricks` command shown in a fenced block names a command that exists
and only options that command takes (its --help lists them)."""

import re
import shlex
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fasttricks.cli import app

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _markdown_files() -> list[Path]:
    tracked = subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    files = [ROOT / f for f in tracked] or sorted(ROOT.glob("**/*.md"))
    return [f for f in files if f.is_file() and ".venv" not in f.parts]


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+\s+(.+)$", path.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def _without_code(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


@pytest.mark.parametrize("md", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(md):
    broken = []
    for target in LINK.findall(_without_code(md.read_text())):
        if re.match(r"^[a-z]+:", target):
            continue  # a web address
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists() or anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    assert not broken, f"{md.relative_to(ROOT)}: {broken}"


def _fenced_commands() -> list[tuple[str, str]]:
    """(file, command line) for each `fasttricks ...` line in a fenced block, continuations joined."""
    found = []
    for md in _markdown_files():
        for block in re.findall(r"```[a-z]*\n(.*?)```", md.read_text(), flags=re.S):
            joined = re.sub(r"\\\n\s*", " ", block)
            for line in joined.splitlines():
                line = line.split("  #")[0].strip()
                if line.startswith("fasttricks "):
                    found.append((str(md.relative_to(ROOT)), line.removeprefix("fasttricks ").strip()))
                elif "-m fasttricks " in line:  # torchrun, srun
                    found.append((str(md.relative_to(ROOT)), line.split("-m fasttricks ", 1)[1].strip()))
    return found


@pytest.mark.parametrize("where, command", _fenced_commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_documented_command_exists_with_the_options_it_shows(where, command):
    words = shlex.split(command.replace("$", "X"))
    names = [w for w in words[:2] if not w.startswith("-")]
    path = names[:2] if names[:1] == ["brainscore"] else names[:1]
    result = CliRunner().invoke(app, [*path, "--help"], terminal_width=200)
    assert result.exit_code == 0, f"{where}: `fasttricks {' '.join(path)}` is not a command"
    options = {w.split("=")[0] for w in words if w.startswith("--")}
    unknown = [o for o in options if o not in result.output]
    assert not unknown, f"{where}: `fasttricks {' '.join(path)}` takes no {unknown}"


def _help(path: list[str]) -> str:
    result = CliRunner().invoke(app, [*path, "--help"], terminal_width=200)
    return result.output if result.exit_code == 0 else ""


def test_every_option_a_command_page_names_is_in_that_commands_help():
    """docs/commands.md explains behaviour and links to --help for the options: an option it names
    is one the command takes (or one of another command its paragraph names)."""
    text = (ROOT / "docs" / "commands.md").read_text()
    sections = {s.split("\n", 1)[0].strip(): s for s in re.split(r"^## ", text, flags=re.M)[1:]}
    commands = [name for name in sections if _help([name])]
    assert {"build-beton", "verify-beton", "train", "eval", "fixres", "average", "ablate", "status", "plot",
            "recipes", "make-toy", "show-augs"} <= set(commands)
    unknown = []
    for name, section in sections.items():
        for flag in sorted(set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", _without_code(section)))):
            owners = [[c] for c in commands if c == name or f"`{c}" in section]
            if name == "brainscore":  # a group: its subcommands take the options
                owners += [["brainscore", sub] for sub in ("export", "activations", "score", "follow", "fetch")]
            if not any(flag in _help(owner) for owner in owners):
                unknown.append(f"{name}: {flag}")
    assert not unknown, unknown
