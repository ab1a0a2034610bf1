"""The `lmtrain` entry point."""

import subprocess
import sys

from lmtrain.cli import SUBCOMMANDS, main


def test_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


def test_unknown_subcommand_suggests(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "'train'" in err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "lmtrain", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("lmtrain ")
