"""Shared fixtures: every backend runs the same suite.

The ``backend`` fixture yields each (backend, device) pair this machine can run: the
portable backend everywhere, ``cpu`` (numba) on the CPU, ``triton`` on CUDA, or on the CPU
through the Triton interpreter when no GPU is present (small shapes only: it is slow).
"""

import inspect
import os
import zlib

import torch

if not torch.cuda.is_available():
    # Must be set before triton is imported: it decides how @triton.jit compiles.
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU the triton backend times several plans per pass the first time it meets a
# shape (compiling each): the suite's hundreds of shapes would spend its time there. Off
# (as read at import, for spawned processes too); the autotuner's own tests turn it on.
os.environ["BATCHNORM_TRITON_CONFIG"] = ",".join(
    filter(None, [os.environ.get("BATCHNORM_TRITON_CONFIG"), "autotune=0"]))

from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402

from batchnorm import backends  # noqa: E402

CUDA = torch.cuda.is_available()


class _FileLock:
    """An exclusive lock on a file, shared by every process that opens the same path."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        import fcntl
        self.file = open(self.path, "a")  # closed, and so unlocked, in __exit__
        fcntl.flock(self.file, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        self.file.close()  # releases the lock


if os.environ.get("PYTEST_XDIST_WORKER") and "cpu" in backends.available():
    # `make test` compiles the kernels first, but a test may still meet a variant it did
    # not (a strided or mixed-dtype buffer, say); two workers saving two variants of one
    # kernel at once could leave numba's cache index naming the wrong file.
    import tempfile

    from batchnorm.backends import cpu_compile
    if cpu_compile._save_under_lock_possible():
        cpu_compile.lock_cache_saves(_FileLock(os.path.join(
            tempfile.gettempdir(), f"batchnorm-numba-cache-{os.getuid()}.lock")))


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


@pytest.fixture(autouse=True)
def seeded_global_generator(request):
    """Seed torch's global generator from the test's id: a test that draws from it gets
    the same data whatever ran before it in its process (xdist deals tests to workers in
    an order that varies from run to run)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def gen(request):
    """A torch.Generator seeded from the test's id: fresh data for every case, and the
    same data when a failing case is rerun."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


# ---------------------------------------------------------------------------------------
# Helpers shared by the test files (import with ``from conftest import ...``).

LAYOUTS = ("contiguous", "channels_last", "strided")


def make_input(shape, layout, dtype, device, generator=None, mean=0.0, std=1.0):
    """``(leaf, x)``: random data of ``shape`` laid out as ``layout``.

    ``x`` is what the layer sees; ``leaf`` (requires_grad) is where its gradient lands,
    ``x`` itself or the larger tensor it is a view of. Each channel gets its own offset
    and scale, so that statistics differ between channels.
    - channels_last: channels innermost (memory_format for 4-D/5-D, (N, L, C)ᵀ for 3-D);
    - strided: every other element of a twice-longer last dimension, or every other row
      for 2-D (not dense).
    """
    c = shape[1]
    per_channel = [1, c] + [1] * (len(shape) - 2)
    offsets = torch.randn(per_channel, generator=generator, dtype=torch.float64) * 2 + mean
    scales = torch.rand(per_channel, generator=generator, dtype=torch.float64) * 2 + 0.5
    if layout == "strided":
        if len(shape) == 2:  # every other row: the channel dim must stay whole
            base_shape, pick = [2 * shape[0], c], (slice(None, None, 2),)
        else:
            base_shape, pick = list(shape[:-1]) + [2 * shape[-1]], (..., slice(None, None, 2))
        base = torch.randn(base_shape, generator=generator, dtype=torch.float64)
        leaf = (base * scales * std + offsets).to(dtype).to(device).requires_grad_()
        return leaf, leaf[pick]
    data = (torch.randn(shape, generator=generator, dtype=torch.float64) * scales * std + offsets)
    data = data.to(dtype).to(device)
    if layout == "contiguous":
        return data.requires_grad_(), data
    if layout != "channels_last":
        raise ValueError(layout)
    if len(shape) == 4:
        leaf = data.contiguous(memory_format=torch.channels_last)
    elif len(shape) == 5:
        leaf = data.contiguous(memory_format=torch.channels_last_3d)
    elif len(shape) == 3:
        leaf = data.transpose(1, 2).contiguous().transpose(1, 2)
    else:
        raise ValueError(f"no channels-last layout for a {len(shape)}-D input")
    leaf = leaf.detach().requires_grad_()
    return leaf, leaf


def np64(t):
    """A tensor as a NumPy float64 array (None stays None)."""
    return None if t is None else t.detach().cpu().double().numpy()


# torch added BatchNorm's keyword-only `bias` after 2.11 (the GPU machine's version).
TORCH_HAS_BIAS_KWARG = "bias" in inspect.signature(torch.nn.BatchNorm2d.__init__).parameters


def torch_batchnorm(cls, num_features, **kwargs):
    """``cls(num_features, **kwargs)`` for a torch.nn batch-norm class, with ``bias=False``
    emulated on torch versions without the keyword (the layer then has no bias, as the
    keyword would make it)."""
    if TORCH_HAS_BIAS_KWARG:
        return cls(num_features, **kwargs)
    bias = kwargs.pop("bias", True)  # (not even bias=True: the keyword is unknown there)
    module = cls(num_features, **kwargs)
    if module.affine and not bias:
        module.register_parameter("bias", None)
    return module
