"""The triton backend's direct launches (``backends/triton/_launch.py``), without a GPU.

A compiled kernel reused for a launch must be the one Triton's JIT would pick, and must be
handed what the JIT would hand it: checked against Triton's own specialization function
and, in a process of its own, against a stand-in CUDA driver whose launcher records its
arguments (``fake_cuda_launches.py``).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from batchnorm import backends

if "triton" not in backends.available():
    pytest.skip("triton is not installed", allow_module_level=True)

from batchnorm.backends.triton import _launch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def test_key_separates_what_triton_specializes():
    """Two arguments with the same key get the same specialization from Triton's JIT."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.nvidia.compiler import CUDABackend
    except ImportError as e:
        pytest.skip(f"this triton has no native_specialize_impl to compare with: {e}")
    ints = [0, 1, 2, 15, 16, 17, 32, 48, -1, -16, -17, 2**31 - 16, 2**31 - 1, 2**31,
            2**31 + 16, -2**31, -2**31 - 1, -2**31 - 16, 2**32, 2**63 - 1, 2**63 - 16, 2**63,
            2**63 + 16]
    base = torch.zeros(64, dtype=torch.float64)
    tensors = [base.view(dtype)[k:] for dtype in (torch.float32, torch.bfloat16, torch.float16)
               for k in (0, 1, 2, 4, 8)] + [base, base[1:], base[2:]]
    values = ints + [0.0, 1.0, 0.5, 1e30, True, False] + tensors
    by_key = {}
    for v in values:
        spec = native_specialize_impl(CUDABackend, v, False, True, True)
        by_key.setdefault(_launch._arg_key(v), set()).add(repr(spec))
    mixed = {k: s for k, s in by_key.items() if len(s) > 1}
    assert not mixed, mixed
    assert len(by_key) >= 10  # the keys do separate (dtypes, alignments, ints)


def test_direct_launch_hands_the_launcher_what_the_jit_does(tmp_path):
    """Every launch site, through a stand-in CUDA driver: the direct launches reach the
    launcher with the same compiled kernel, grid, stream and arguments as kernel[grid]."""
    out = tmp_path / "launches.json"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "fake_cuda_launches.py"),
                           str(out)], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip() or proc.stderr.strip()[-500:])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    records = json.loads(out.read_text())
    assert len(records) >= 10
    for i, (direct, jit) in records.items():
        assert direct, f"call {i} launched nothing"
        assert direct == jit, f"call {i}"
