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
