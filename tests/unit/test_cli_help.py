"""`replicad --help` is complete (issue 7): every command has a help text and an example,
and every example is a command line its command accepts (parsed by click itself)."""

import re
import shlex

import pytest

from replicad.cli.examples import walk
from replicad.cli.main import cli

LEAVES = sorted(walk(cli), key=lambda pc: pc[0])


def example_of(cmd) -> str:
    text = ((cmd.help or "") + "\n" + (cmd.epilog or "")).replace("\\\n", " ")  # continuation lines
    m = re.search(r"Examples?[^:\n]*:\s*\n\s*(replicad [^\n]*)", text)
    return m.group(1).split("#")[0].strip() if m else ""


@pytest.mark.parametrize("path,cmd", LEAVES, ids=[p for p, _ in LEAVES])
def test_every_command_has_help_and_an_example_that_parses(path, cmd):
    assert cmd.help and len(cmd.help.strip()) > 20, f"{path}: no help"
    example = example_of(cmd)
    assert example, f"{path}: no example in its --help"
    words = shlex.split(example)
    assert " ".join(words[1:1 + len(path.split())]) == path, f"{path}: the example runs another command: {example}"
    with cmd.make_context(path, words[1 + len(path.split()):]):  # raises on a bad option or a missing argument
        pass
