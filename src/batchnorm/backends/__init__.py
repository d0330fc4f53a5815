"""Backend selection: which module computes the four primitives for a given tensor.

Every backend module exposes the same four functions as :mod:`.portable` (``stats``,
``normalize``, ``backward_reduce``, ``backward_elementwise``) with the same conventions,
plus ``supports(x) -> bool``: whether it can compute on this kernel view (device, dtype)
and is expected to be faster there than the portable path, and ``DEVICES``: the device
types it can compute on at all (None: any).

A backend may also offer whole passes, which ops looks up with ``getattr`` and uses where
present (the cpu and triton backends do; the portable one does not), each returning None
(or False) for a call it does not take, which ops then computes from the primitives:

- ``batch_norm_forward(x, weight, bias, residual, running_mean, running_var, eps,
  activation, slope, update, channels_last, need_stats) -> (y, mean, var, updated,
  saved)``: the forward on the input as given, with the C-sized math of
  ``ops._forward_by_primitives`` inside (see ``ops._forward``);
- ``batch_norm_backward(dy, x, weight, bias, residual, mean, var, eps, training,
  activation, slope, need_sums, need_dx, want_dresidual, channels_last, saved) -> (dx,
  Σdz, Σdz·x̂, dresidual)``: the backward of such a forward, with the C-sized math of
  ``ops.backward_by_primitives`` inside (see ``ops._fused_backward``);
- ``update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count,
  momentum) -> bool``: ``ops.update_running_stats`` in one call.

``BATCHNORM_BACKEND=portable|cpu|triton`` (read at import) or :func:`using` forces one
backend for every call; a forced backend that cannot handle a tensor raises rather than
silently falling back, so that tests and benchmarks measure what they name.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from types import ModuleType

from torch import Tensor

from . import portable

NAMES = ("portable", "cpu", "triton")

# What force() chose, the using() blocks open now (entry order) and, read on every call,
# the backend in force: the last block's, else force()'s.
_chosen: str | None = None
_open: list[tuple[object, str | None, int]] = []  # (token, name, thread id)
_lock = threading.Lock()
_forced: str | None = None
_loaded: dict[str, ModuleType | None] = {"portable": portable}
_load_errors: dict[str, str] = {}


def _load(name: str) -> ModuleType | None:
    """Import a backend on first use; None when its requirements (numba, triton) are missing."""
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(f"{__name__}.{name}")
        except ImportError as e:
            _loaded[name] = None
            _load_errors[name] = str(e)
    return _loaded[name]


def available() -> list[str]:
    """Names of the backends that import on this machine."""
    return [n for n in NAMES if _load(n) is not None]


def get(name: str) -> ModuleType:
    if not isinstance(name, str):
        raise TypeError(f"a batchnorm backend is named by a string, one of {NAMES}; got "
                        f"{type(name).__name__} {name!r}")
    if name not in NAMES:
        raise ValueError(f"unknown batchnorm backend {name!r}; expected one of {NAMES}")
    mod = _load(name)
    if mod is None:
        raise RuntimeError(f"batchnorm backend {name!r} is not available: {_load_errors[name]}")
    return mod


def force(name: str | None) -> None:
    """Force one backend for every call (None: choose automatically)."""
    global _chosen
    if name is not None:
        get(name)
    with _lock:
        _chosen = name
        _refresh()


@contextlib.contextmanager
def using(name: str | None):
    """Force ``name`` (as :func:`force`) inside a ``with`` block.

    The choice is process-wide, as :func:`force`'s (autograd may run a backward on its
    own threads). Blocks open in several threads at once: the one entered last holds, and
    on leaving, each restores what the blocks still open (or :func:`force`) chose."""
    if name is not None:
        get(name)
    block = (object(), name, threading.get_ident())  # compares equal only to itself
    with _lock:
        _open.append(block)
        _refresh()
    try:
        yield
    finally:
        with _lock:
            if block in _open:  # (a fork child drops other threads' blocks: see below)
                _open.remove(block)
            _refresh()


def _refresh() -> None:
    global _forced
    _forced = _open[-1][1] if _open else _chosen


def _after_fork_in_child() -> None:
    """A fork child has the forking thread alone: a lock another thread held at the fork
    would never be released (using() and force() waited forever), and that thread's open
    using() blocks would never close (its backend stayed forced), so both go."""
    global _lock
    _lock = threading.Lock()
    me = threading.get_ident()
    _open[:] = [block for block in _open if block[2] == me]
    _refresh()


os.register_at_fork(after_in_child=_after_fork_in_child)


def forced() -> str | None:
    return _forced


_DEVICE_BACKENDS = {"cpu": "cpu", "cuda": "triton"}


def for_device(device) -> ModuleType | None:
    """The backend that owns C-sized helpers (such as a one-call running update) for a
    device: the forced one, else numba's on the CPU and Triton's on CUDA; None if it does
    not import."""
    name = _forced or _DEVICE_BACKENDS.get(device.type)
    return _load(name) if name is not None else None


def select(x: Tensor) -> ModuleType:
    """The backend for this kernel view: the forced one, else the first that supports it."""
    forced = _forced  # read once: another thread's using() may change it meanwhile
    if forced is not None:
        mod = _loaded[forced]
        if mod.DEVICES is not None and x.device.type not in mod.DEVICES:
            # a kernel handed another device's address would crash or read garbage
            raise RuntimeError(
                f"the forced batchnorm backend {forced!r} (BATCHNORM_BACKEND or "
                f"backends.using) computes on {' or '.join(mod.DEVICES)} tensors, not "
                f"{x.device.type}; force another backend, or none to choose by device")
        return mod
    # is_cuda / is_cpu: reading x.device builds a Python object, which shows on small inputs
    if x.is_cuda:
        mod = _load("triton")
        if mod is not None and mod.supports(x):
            return mod
    elif x.is_cpu:
        mod = _load("cpu")
        if mod is not None and mod.supports(x):
            return mod
    return portable


try:
    force(os.environ.get("BATCHNORM_BACKEND") or None)
except (ValueError, RuntimeError) as error:  # (with the variable's name: import runs this)
    raise type(error)(f"BATCHNORM_BACKEND={os.environ['BATCHNORM_BACKEND']!r}: {error}; set "
                      f"another or unset it") from None
