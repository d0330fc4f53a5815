"""Shared fixtures: every backend runs the same suite.

The ``backend`` fixture yields each (backend, device) pair this machine can run: the
portable backend everywhere, ``cpu`` (numba) on the CPU, ``triton`` on CUDA, or on the CPU
through the Triton interpreter when no GPU is present (small shapes only: it is slow).
"""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is imported: it decides how @triton.jit compiles.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402

from batchnorm import backends  # noqa: E402

CUDA = torch.cuda.is_available()


@dataclass(frozen=True)
class BackendCase:
    name: str
    device: str

    @property
    def interpreted(self) -> bool:
        """Triton kernels run through the (slow) interpreter on the CPU."""
        return self.name == "triton" and self.device == "cpu"


def backend_cases() -> list[BackendCase]:
    cases = []
    for name in backends.available():
        if name == "portable":
            devices = ["cpu", "cuda"] if CUDA else ["cpu"]
        elif name == "cpu":
            devices = ["cpu"]
        else:  # triton
            devices = ["cuda"] if CUDA else ["cpu"]
        cases += [BackendCase(name, d) for d in devices]
    return cases


@pytest.fixture(params=backend_cases(), ids=lambda c: f"{c.name}-{c.device}")
def backend(request):
    """Force one backend for the test, and tell it which device to put tensors on."""
    with backends.using(request.param.name):
        yield request.param
