"""The cardiac-copilot entry point dispatches subcommands lazily."""

import subprocess
import sys

from cardiac_copilot_ros import cli


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("simulate", "dataset", "train", "evaluate", "export", "demo", "bench"):
        assert name in out


def test_unknown_command_is_an_error():
    proc = subprocess.run([sys.executable, "-m", "cardiac_copilot_ros", "frobnicate"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr


def test_help_does_not_import_torch_or_rclpy():
    code = ("import sys; from cardiac_copilot_ros import cli; cli.main(['--help']); "
            "print('torch' in sys.modules, 'rclpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False False")
