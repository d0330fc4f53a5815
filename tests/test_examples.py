"""examples/train.py runs as the README shows: one process, and 2 gloo ranks with --sync-bn."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train.py"


def _accuracy(out: str) -> float:
    found = re.findall(r"test accuracy ([0-9.]+)", out)
    assert found, out[-2000:]
    return float(found[-1])


def test_train_single_process():
    out = subprocess.run([sys.executable, str(SCRIPT), "--epochs", "2"], capture_output=True,
                         text=True, timeout=300, check=True).stdout
    # Two epochs of the small CNN reach well above chance (10%) on the digits.
    assert _accuracy(out) > 0.5


@pytest.mark.timeout(300)
def test_train_two_ranks_sync_bn():
    # --standalone: torchrun picks a free port itself (tests may run beside each other)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", str(SCRIPT), "--sync-bn", "--epochs", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _accuracy(proc.stdout) > 0.3
