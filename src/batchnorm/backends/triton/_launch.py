"""Kernel launches with less host time than ``kernel[grid](...)``.

Triton's ``JITFunction.run`` binds the arguments, specializes each one, builds a cache key
and looks the compiled kernel up on every launch: about 13.5 µs of Python a launch on the
2-core CPU machine (Triton 3.9, measured through a stand-in CUDA driver whose launcher does
nothing), against 0.6 µs for handing the compiled kernel's launcher its arguments. A
small batch norm's step is four to six launches, and on small inputs the host time is the step.

:func:`launch` keys each kernel's compiled form on what Triton specializes a runtime
argument on (a tensor's dtype and 16-byte alignment; an integer's equality to 1,
divisibility by 16 and width; nothing for floats), or finer (a plain int keys by its
value), the constexprs, ``num_warps`` and the device. A key seen for the first time goes
through ``kernel[grid]`` (which compiles and launches, and returns the compiled kernel,
kept for the key); later launches call that kernel's launcher as ``JITFunction.run``
does (Triton >= 3.3: every argument, constexprs included, in signature order, on the
current device's current stream), with each tensor handed over as its address. The
launcher takes an int for a pointer as it is, where for a tensor it calls ``data_ptr()``
and asks the CUDA driver whether the address is device memory (``cuPointerGetAttribute``,
Triton 3.6 and 3.9 alike): a driver call per tensor of every launch, and a kernel has up
to a dozen. The key computes the address anyway (its alignment), and tells CUDA tensors
from others, so that a CPU tensor handed to a kernel still goes through ``kernel[grid]``,
whose launcher refuses it. A launch hook (a profiler) or the interpreter sends every
launch through ``kernel[grid]``.
"""

from __future__ import annotations

import os
from operator import itemgetter

import torch
from torch import Tensor

try:
    from triton import knobs
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime.driver import driver
except ImportError:  # a Triton without these: every launch through kernel[grid]
    knobs = CompiledKernel = driver = None

# Off: every launch through kernel[grid] (to compare, or should a Triton version change the
# launcher's calling convention); always off for the interpreter, and on ROCm, where Triton
# also specializes pointers on their range (the key below knows NVIDIA's distinctions
# only). Read at import.
DIRECT = (os.environ.get("BATCHNORM_TRITON_DIRECT_LAUNCH", "1") != "0"
          and os.environ.get("TRITON_INTERPRET") != "1" and knobs is not None
          and getattr(torch.version, "hip", None) is None)

_I32_MIN, _I32_END, _U64_MIN = -(1 << 31), 1 << 31, 1 << 63


def _keys_and_values(args) -> tuple[list, list]:
    """Each argument's part of the key, and what the launcher is handed for it (a tensor's
    address, else the argument): one loop, as cheap as the key alone (2.0 µs for a
    launch's 12 arguments on the 2-core CPU machine, either way).

    The keys make at least the distinctions triton's native_specialize_impl makes
    (checked in the tests). A plain int is its own key, finer than Triton's (== 1, % 16,
    width) and cheaper to make: a launch's ints come from the shape, so a shape's
    launches hit."""
    keys, values = [], []
    for a in args:
        t = type(a)
        if t is int:
            keys.append(a)
        elif t is float:
            keys.append(float)
        elif isinstance(a, Tensor):
            address = a.data_ptr()
            keys.append((a.dtype, not address % 16, a.is_cuda))
            values.append(address)
            continue
        elif isinstance(a, bool):
            keys.append(bool)
        elif isinstance(a, int):
            keys.append((a == 1, not a % 16, _I32_MIN <= a < _I32_END, a >= _U64_MIN))
        else:
            keys.append(t)
        values.append(a)
    return keys, values


def _arg_key(a):
    """One argument's part of the key (see :func:`_keys_and_values`)."""
    return _keys_and_values((a,))[0][0]


def _inert(hook) -> bool:
    # None up to Triton 3.6 or so; later an always-present HookChain, empty unless a
    # profiler added to it (launch_metadata then only feeds the hooks)
    return hook is None or getattr(hook, "calls", None) == []


class _Kernel:
    """One @triton.jit function's compiled forms, by specialization key."""

    def __init__(self, fn):
        self.fn = fn
        self.constexprs = tuple(p.name for p in fn.params if p.is_constexpr)
        if any(p.is_constexpr for p in fn.params[:len(fn.params) - len(self.constexprs)]):
            raise TypeError(f"{fn.__name__}: launch() needs the constexpr parameters last")
        # their values in signature order, as a tuple, from launch()'s keyword arguments
        # (itemgetter of one name gives the value itself)
        get = itemgetter(*self.constexprs) if self.constexprs else lambda _: ()
        self.constexpr_values = get if len(self.constexprs) != 1 else lambda kw: (get(kw),)
        self.compiled: dict = {}


_KERNELS: dict = {}  # by id(fn): hashing a JITFunction hashes its source, ~0.7 µs


def launch(fn, grid: tuple, *args, num_warps: int, **constexprs) -> None:
    """``fn[grid](*args, num_warps=num_warps, **constexprs)``, faster after the first time;
    ``args`` are the runtime arguments in signature order (they all precede the
    constexprs in this backend's kernels), ``constexprs`` every constexpr by name."""
    if not DIRECT or not (_inert(getattr(knobs.runtime, "launch_enter_hook", None))
                          and _inert(getattr(knobs.runtime, "launch_exit_hook", None))):
        fn[grid](*args, num_warps=num_warps, **constexprs)
        return
    kernel = _KERNELS.get(id(fn))
    if kernel is None:
        kernel = _KERNELS[id(fn)] = _Kernel(fn)
    values = kernel.constexpr_values(constexprs)
    active = driver.active
    device = active.get_current_device()
    keys, handed = _keys_and_values(args)
    key = (device, num_warps, values, *keys)
    compiled = kernel.compiled.get(key)
    if compiled is None:
        compiled = fn[grid](*args, num_warps=num_warps, **constexprs)
        if isinstance(compiled, CompiledKernel):
            if len(kernel.compiled) > 1024:
                kernel.compiled.clear()
            kernel.compiled[key] = compiled
        return
    stream = active.get_current_stream(device)
    compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                 stream, compiled.function, compiled.packed_metadata, None, None, None,
                 *handed, *values)
