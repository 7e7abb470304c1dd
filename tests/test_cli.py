"""The ``grootl`` command: its usage lists every subcommand, each answers --help in plain text, bad names are clear."""

from __future__ import annotations

import re
from importlib.metadata import version

import pytest

import grootl
from grootl.cli import COMMANDS, command_doc, help_text, main

RST = re.compile(r"``|:\w+:`|`\w")  # literals, roles, interpreted text


def test_help_text_is_a_docstrings_plain_first_paragraph():
    doc = """``grootl thing``: run :func:`grootl.tree.tree_scan` on ``x``
    and :mod:`~grootl.tree` over `y`.

    Details that stay out of the help."""
    assert help_text(doc) == "Run grootl.tree.tree_scan on x and grootl.tree over y."
    assert help_text(None) == ""


def test_usage_lists_every_command(capsys):
    assert main([]) == 0
    usage = capsys.readouterr().out
    assert not RST.search(usage), usage
    for name in COMMANDS:
        summary = help_text(command_doc(name))
        assert summary[:1].isupper() and not RST.search(summary), summary
        assert f"  {name:<14} {summary}\n" in usage


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_help_is_plain_and_matches_the_usage(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: grootl {name}") and not RST.search(out), out
    description = out.split("\n\n")[1]  # argparse: usage, blank line, description
    assert " ".join(description.split()) == help_text(command_doc(name))


def test_unknown_command_is_named(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("grootl: unknown command 'trian'") and "train" in err


def test_version_is_the_installed_one(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"grootl {grootl.__version__}" == f"grootl {version('grootl')}"
