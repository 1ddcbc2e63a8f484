"""docs/cli.md stays true: every `replicad …` command it names exists, and every option it
shows is one that command accepts (checked against the real click command tree)."""

import re
import shlex
from pathlib import Path

import click
import pytest

from replicad.cli.main import cli

DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
GLOBAL = {"--config", "--socket", "-C", "--computer-name", "-o", "--output", "--help", "-h"}


def spans() -> list[str]:
    text = DOC.read_text()
    found = re.findall(r"`(replicad [^`]+)`", text)
    for block in re.findall(r"```\n(.*?)```", text, re.S):  # the code blocks' command lines
        found += [line.split("#")[0].strip() for line in block.splitlines() if line.startswith("replicad ")]
    return sorted(set(found))


def resolve(words: list[str]) -> tuple[click.Command, list[str]]:
    cmd, rest = cli, words[1:]
    while isinstance(cmd, click.Group) and rest and rest[0] in cmd.commands:
        cmd, rest = cmd.commands[rest[0]], rest[1:]
    return cmd, rest


@pytest.mark.parametrize("span", spans())
def test_every_command_in_the_cli_doc_exists_with_its_options(span):
    words = shlex.split(span.replace("…", "").replace("[", " ").replace("]", " ").replace("|", " "))
    cmd, rest = resolve(words)
    assert not isinstance(cmd, click.Group), f"`{span}` names no command"
    accepted = {o for p in cmd.params for o in getattr(p, "opts", []) + getattr(p, "secondary_opts", [])}
    for w in rest:
        if w.startswith("-") and w not in ("-",):
            assert w.split("=")[0] in accepted | GLOBAL, f"`{span}`: {w} is not an option of that command"


def test_the_doc_covers_the_article_cmdlets():
    text = DOC.read_text()
    for cmdlet in ("Set-VMReplicationServer", "New-VMReplicationAuthorizationEntry", "Enable-VMReplication",
                   "Start-VMInitialReplication", "Measure-VMReplication", "Start-VMFailover", "Stop-VMFailover",
                   "Complete-VMFailover", "Suspend-VMReplication", "Resume-VMReplication", "Remove-VMReplication",
                   "Import-VMInitialReplication", "Reset-VMReplicationStatistics", "Test-VMReplicationConnection"):
        assert cmdlet in text, cmdlet
