import subprocess
import sys


def test_demo_prints_the_seed_numbers():
    out = subprocess.run([sys.executable, "-m", "batchnorm", "demo"], capture_output=True,
                         text=True, check=True).stdout
    assert "4.7958" in out
    assert "mean                     = (25 + 23·1) / 24 = 2" in out
    assert "Σ(x − 2)² / 24 = 23" in out
    assert "Traceback" not in out


def test_help_is_plain_text(capsys):
    import pytest

    from batchnorm import cli
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "The batchnorm command (also python -m batchnorm)." in out and "``" not in out


def test_demo_prints_where_it_is_told_and_leaves_print_options_alone():
    """A probe found it printing to the sys.stdout of import time (a redirect caught
    nothing) and setting 4-decimal print options for the whole process."""
    import contextlib
    import io

    import torch

    from batchnorm import cli
    before = repr(torch.tensor([1e-6]))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(["demo"]) == 0
    assert "4.7958" in buf.getvalue()
    assert repr(torch.tensor([1e-6])) == before


def test_a_closed_pipe_ends_the_command_quietly():
    """`batchnorm demo | head -1`: no BrokenPipeError traceback."""
    proc = subprocess.run(f"{sys.executable} -m batchnorm demo | head -1", shell=True,
                          capture_output=True, text=True, check=True)
    assert proc.stdout.startswith("batchnorm demo") and "Traceback" not in proc.stderr


def test_demo_runs_where_stdout_cannot_encode_its_symbols():
    """Under an ASCII encoding the demo's x̂ and rules ended in a UnicodeEncodeError."""
    import os
    env = dict(os.environ, PYTHONIOENCODING="ascii")
    proc = subprocess.run([sys.executable, "-m", "batchnorm", "demo"], capture_output=True,
                          env=env, check=True)
    assert b"4.7958" in proc.stdout and b"Traceback" not in proc.stderr
