"""The ``grootl`` command: its usage lists every subcommand, each answers --help, bad names are clear."""

from __future__ import annotations

from importlib.metadata import version

import pytest

import grootl
from grootl.cli import COMMANDS, main


def test_usage_lists_every_command(capsys):
    assert main([]) == 0
    usage = capsys.readouterr().out
    for name, (_, help_) in COMMANDS.items():
        assert f"  {name}" in usage and help_ in usage


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_answers_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    assert f"grootl {name}" in capsys.readouterr().out


def test_unknown_command_is_named(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("grootl: unknown command 'trian'") and "train" in err


def test_version_is_the_installed_one(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"grootl {grootl.__version__}" == f"grootl {version('grootl')}"
