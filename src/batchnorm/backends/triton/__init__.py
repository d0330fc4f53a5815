"""The Triton backend: the four primitives of ``portable.py`` as GPU kernels.

* ``stats`` and ``backward_reduce`` are two-stage reductions (``_reduce.py``): many
  programs per channel write partials to ``[P, C]`` buffers, a small kernel merges them in
  a fixed order. Deterministic, no atomics.
* ``normalize`` and ``backward_elementwise`` are one fused elementwise pass each
  (``_elementwise.py``), with the residual and the activation (and, in backward, the
  activation's derivative recomputed from x) folded in.
* Launch grids come from shapes only, and nothing here reads a device value on the host:
  a training step stays capturable in a CUDA graph. (The one synchronization is the
  autotuner's, the first time a shape is met; never during a capture.)
* Small inputs are host-bound, so the whole passes (``batch_norm_forward`` /
  ``batch_norm_backward``, which ops calls) do the C-sized math inside the kernels, read
  tensors as given by address, and launch through ``_launch.launch``, which calls a
  compiled kernel's launcher directly once Triton's JIT has picked it.

The primitives accept the kernel views of ``portable.py``: ``(N, C, L)`` or ``(M, C)``,
contiguous. Tiles, warps and grids are plans (``_plans.py``): defaults in :data:`CONFIG`
(``BATCHNORM_TRITON_CONFIG="reduce_tile=8192,autotune=0"`` overrides them at import;
``benchmarks/triton_dev.py`` times variants by editing it), and, on a GPU, the fastest of a
few candidates around them per shape, timed the first time a shape is met.

On a machine without a GPU, ``TRITON_INTERPRET=1`` (set before triton is imported) runs
the same kernels on CPU tensors through Triton's NumPy interpreter; ``supports`` then
accepts CPU tensors, for tests.
"""

from __future__ import annotations

import os
import threading
from contextlib import nullcontext, suppress

import torch
import triton  # noqa: F401  (ImportError here marks the backend unavailable)
from torch import Tensor

from ..portable import acc_dtype, mean_dtype, running_mean_dtype
from . import _elementwise, _plans, _reduce
from ._activation import CODES, split_float, split_holds
from ._launch import launch
from ._plans import CONFIG  # noqa: F401  (public: batchnorm.backends.triton.CONFIG)
from ._plans import Geometry, cdiv, geometry, merge_launch, np2
from ._reduce import STATS_PLANES

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Read once, as triton itself does at import: whether kernels are interpreted on the CPU.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = ("cuda", "cpu") if _INTERPRET else ("cuda",)


def supports(x: Tensor) -> bool:
    """CUDA tensors of a floating dtype; CPU ones too under ``TRITON_INTERPRET=1``."""
    if x.dtype not in _DTYPES:
        return False
    return x.is_cuda or (_INTERPRET and x.device.type == "cpu")


_NO_GUARD = nullcontext()


def _device_guard(x: Tensor):
    """Make x's GPU the current device while the launches of a pass are made (Triton
    launches on the current device's current stream). Nothing to do when it already is,
    the usual case: ``torch.cuda.device``'s constructor, enter and exit are a few µs of
    host time a pass, which small inputs spend per step."""
    if not x.is_cuda:
        return _NO_GUARD
    index = x.get_device()
    return _NO_GUARD if index == torch.cuda.current_device() else torch.cuda.device(index)


# --------------------------------------------------------------------------------------
# Arguments


def _check_view(x: Tensor) -> None:
    if x.dim() not in (2, 3) or not x.is_contiguous():
        raise ValueError(
            f"the triton backend takes (N, C, L) or (M, C) contiguous kernel views, got shape "
            f"{tuple(x.shape)} with strides {x.stride()}")


def _activation_args(activation: str, slope: float):
    if activation not in CODES:
        raise ValueError(f"unknown activation {activation!r}; expected one of {tuple(CODES)}")
    hi, lo = split_float(slope)
    return CODES[activation], hi, lo


def _eps_reaches_kernels(x: Tensor, eps: float) -> bool:
    """eps reaches float64 kernels as a float32 pair (:func:`split_float`), which loses a
    value under float32's normal range or over its largest (an eps of 1e-50 became 0):
    ops then takes the primitives' path, whose invstd is torch's."""
    return x.dtype != torch.float64 or split_holds(eps)


def _dummy(t: Tensor | None, like: Tensor) -> Tensor:
    # A pointer the kernel never reads (its HAS_* flag is off).
    return like if t is None else t


def _check_same(name: str, t: Tensor | None, x: Tensor) -> Tensor | None:
    if t is None:
        return None
    if t.shape != x.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, the kernel view {tuple(x.shape)}")
    return t.contiguous()


def _dense(x: Tensor, channels_last: bool) -> Tensor:
    """An input as given, in a layout the kernels read by address: ``ops`` hands
    channels-last inputs dense (``portable.is_channels_last``), the rest may need a copy."""
    return x if channels_last else x.contiguous()


def _laid_out_as(name: str, t: Tensor | None, x: Tensor) -> Tensor | None:
    """dy or the residual with x's strides (a copy in its own dtype where they differ)."""
    if t is None:
        return None
    if t.shape != x.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, the input {tuple(x.shape)}")
    return t if t.stride() == x.stride() else torch.empty_like(x, dtype=t.dtype).copy_(t)


def _per_channel(t: Tensor, acc: torch.dtype) -> Tensor:
    return t.to(acc).contiguous()


def _unit_stride(t: Tensor | None) -> Tensor | None:
    """A per-channel tensor (weight, bias, saved statistics) as the kernels index it."""
    return t if t is None or t.is_contiguous() else t.contiguous()


# --------------------------------------------------------------------------------------
# Launches: tensors laid out as the geometry says, per-channel vectors ready; no checks.
# A plan (``_plans``) is each launch's tiles, warps and grid.


def _launch_stats_partials(x: Tensor, g: Geometry, plan: dict, part: Tensor) -> None:
    """Stage 1 of the statistics into ``part`` (its ``STATS_PLANES`` planes of [P, C])."""
    p, c = plan["P"], g.c
    if g.cl:
        launch(_reduce.stats_partial_mc, plan["grid"],
               x, part, g.n, c, plan["rows"], plan["ncb"], p * c,
               BLOCK_M=plan["BLOCK_M"], BLOCK_C=plan["BLOCK_C"], STAGES=plan["stages"],
               UNROLL=plan["unroll"], I64=plan["I64"], num_warps=plan["warps"])
    else:
        launch(_reduce.stats_partial_ncl, plan["grid"],
               x, part, g.n, c, g.l, plan["rows"], plan["cols"], plan["p_l"], p * c,
               BLOCK_N=plan["BLOCK_N"], BLOCK_L=plan["BLOCK_L"], STAGES=plan["stages"],
               I64=plan["I64"], num_warps=plan["warps"])


def _launch_stats_fused(x, g, plan, part, counters, finalize_args, count, eps_hi, eps_lo,
                        b_hi, b_lo, m_hi, m_lo, flags) -> None:
    """Stage 1 of the statistics with ``stats_finalize``'s work done by the last program
    of each channel block (``finalize_args``: its tensors from mean to
    num_batches_tracked; ``flags`` its constexprs)."""
    p, c = plan["P"], g.c
    tail = (p, p * c, count, eps_hi, eps_lo, b_hi, b_lo, m_hi, m_lo)
    common = dict(STAGES=plan["stages"], I64=plan["I64"], MERGE_P=plan["merge_p"],
                  num_warps=plan["warps"], **flags)
    if g.cl:
        _launch_merging(counters, _reduce.stats_fused_mc, plan["grid"], x, part, counters,
                        *finalize_args, g.n, c, plan["rows"], plan["ncb"], *tail,
                        BLOCK_M=plan["BLOCK_M"], BLOCK_C=plan["BLOCK_C"],
                        UNROLL=plan["unroll"], **common)
    else:
        _launch_merging(counters, _reduce.stats_fused_ncl, plan["grid"], x, part, counters,
                        *finalize_args, g.n, c, g.l, plan["rows"], plan["cols"], plan["p_l"],
                        *tail, BLOCK_N=plan["BLOCK_N"], BLOCK_L=plan["BLOCK_L"], **common)


def _launch_stats_merge(x: Tensor, g: Geometry, plan: dict, part: Tensor, mean: Tensor,
                        m2: Tensor) -> None:
    p, c = plan["P"], g.c
    grid, tile = merge_launch(c, p)
    launch(_reduce.stats_merge, grid, x, part, mean, m2, p, c, plan["shift_stride"], p * c,
           **tile)


def _launch_normalize(x, y, g, residual, mean_k, invstd, weight, bias_k, act, hi, lo,
                      plan=None):
    """The normalize pass; with ``plan`` None, the plan chosen for the shape (the choice
    times this same launch with each candidate plan: it only writes y)."""
    if plan is None:
        plan = _plans.chosen("normalize", g, x) or _plans.choose(
            "normalize", g, x, lambda p: _launch_normalize(
                x, y, g, residual, mean_k, invstd, weight, bias_k, act, hi, lo, p))
    launch(_elementwise.normalize_kernel, plan["grid"],
           x, y, _dummy(residual, x), mean_k, invstd, _dummy(weight, mean_k),
           _dummy(bias_k, mean_k), plan["R"], plan["K"], plan["C"], hi, lo, CL=plan["CL"],
           ACT=act, HAS_W=weight is not None, HAS_B=bias_k is not None,
           HAS_RES=residual is not None, BLOCK_R=plan["BLOCK_R"], BLOCK_K=plan["BLOCK_K"],
           I64=plan["I64"], num_warps=plan["warps"])


def _launch_normalize_running(x, y, g, residual, running_mean, running_var, weight, bias,
                              eps, act, hi, lo, plan=None):
    """Evaluation's normalize straight from the running statistics, in one launch where
    :func:`_reduce.prepare` then :func:`_launch_normalize` take two; ``plan`` as there
    (the shape's normalize plan serves both)."""
    if plan is None:
        plan = _plans.chosen("normalize", g, x) or _plans.choose(
            "normalize", g, x, lambda p: _launch_normalize_running(
                x, y, g, residual, running_mean, running_var, weight, bias, eps, act, hi, lo,
                p))
    eps_hi, eps_lo = split_float(eps)
    launch(_elementwise.normalize_running_kernel, plan["grid"],
           x, y, _dummy(residual, x), running_mean, running_var,
           _dummy(weight, running_mean), _dummy(bias, running_mean), plan["R"], plan["K"],
           plan["C"], hi, lo, eps_hi, eps_lo, CL=plan["CL"], ACT=act,
           HAS_W=weight is not None, HAS_B=bias is not None, HAS_RES=residual is not None,
           F64=acc_dtype(x.dtype) == torch.float64, BLOCK_R=plan["BLOCK_R"],
           BLOCK_K=plan["BLOCK_K"], I64=plan["I64"], num_warps=plan["warps"])


def _launch_backward_partials(dy, x, g, plan, part, mean_k, invstd, weight, bias_k,
                              residual, act, hi, lo, merged=None) -> None:
    """Stage 1 of the backward reduction into ``part`` (Σdz and Σdz·x̂ planes of [P, C]);
    with ``merged`` (the counters, then ``sum_partials_centred``'s shift and three
    outputs) the last program of each channel block does that merge too."""
    p, c = plan["P"], g.c
    flags = dict(ACT=act, HAS_W=weight is not None, HAS_B=bias_k is not None,
                 HAS_RES=residual is not None and act != 0, STAGES=plan["stages"],
                 I64=plan["I64"], num_warps=plan["warps"])
    common = (dy, x, _dummy(residual, x), mean_k, invstd, _dummy(weight, mean_k),
              _dummy(bias_k, mean_k), part)
    if merged is None:
        if g.cl:
            launch(_reduce.backward_partial_mc, plan["grid"], *common, g.n, c, plan["rows"],
                   plan["ncb"], p * c, hi, lo, BLOCK_M=plan["BLOCK_M"],
                   BLOCK_C=plan["BLOCK_C"], UNROLL=plan["unroll"], **flags)
        else:
            launch(_reduce.backward_partial_ncl, plan["grid"], *common, g.n, c, g.l,
                   plan["rows"], plan["cols"], plan["p_l"], p * c, hi, lo,
                   BLOCK_N=plan["BLOCK_N"], BLOCK_L=plan["BLOCK_L"], **flags)
        return
    counters = merged[0]
    flags["MERGE_P"] = plan["merge_p"]
    if g.cl:
        _launch_merging(counters, _reduce.backward_fused_mc, plan["grid"], *common, *merged,
                        g.n, c, plan["rows"], plan["ncb"], p, p * c, hi, lo,
                        BLOCK_M=plan["BLOCK_M"], BLOCK_C=plan["BLOCK_C"],
                        UNROLL=plan["unroll"], **flags)
    else:
        _launch_merging(counters, _reduce.backward_fused_ncl, plan["grid"], *common, *merged,
                        g.n, c, g.l, plan["rows"], plan["cols"], plan["p_l"], p, p * c, hi,
                        lo, BLOCK_N=plan["BLOCK_N"], BLOCK_L=plan["BLOCK_L"], **flags)


def _launch_sum_partials(g: Geometry, plan: dict, part: Tensor, sdz: Tensor,
                         sdzx: Tensor) -> None:
    p, c = plan["P"], g.c
    grid, tile = merge_launch(c, p)
    launch(_reduce.sum_partials, grid, part, sdz, sdzx, p, c, p * c, **tile)


def _launch_backward_elementwise(dy, x, g, dx, dres, mean_k, invstd, weight, bias_k,
                                 residual, sum_dz, sum_dz_xhat, count, act, hi, lo,
                                 plan=None) -> None:
    """The backward elementwise pass; ``plan`` as in :func:`_launch_normalize` (it only
    writes dx and dres)."""
    if plan is None:
        plan = _plans.chosen("backward_elementwise", g, x) or _plans.choose(
            "backward_elementwise", g, x, lambda p: _launch_backward_elementwise(
                dy, x, g, dx, dres, mean_k, invstd, weight, bias_k, residual, sum_dz,
                sum_dz_xhat, count, act, hi, lo, p))
    train = sum_dz is not None
    launch(_elementwise.backward_kernel, plan["grid"],
           dy, x, _dummy(residual, x), mean_k, invstd, _dummy(weight, mean_k),
           _dummy(bias_k, mean_k), sum_dz if train else mean_k,
           sum_dz_xhat if train else mean_k, dx, _dummy(dres, dx), int(count), plan["R"],
           plan["K"], plan["C"], hi, lo, CL=plan["CL"], ACT=act, HAS_W=weight is not None,
           HAS_B=bias_k is not None, HAS_RES=residual is not None and act != 0, TRAIN=train,
           WANT_DRES=dres is not None, BLOCK_R=plan["BLOCK_R"], BLOCK_K=plan["BLOCK_K"],
           I64=plan["I64"], num_warps=plan["warps"])


# The fused reductions' tickets: one int32 counter per channel block, 0 between launches
# (the last program of a block puts it back), one buffer per device and stream, since
# launches on one stream run one after the other (under the interpreter a launch runs on
# the calling thread: one buffer per thread).
_COUNTERS: dict = {}


def _capturing(x: Tensor) -> bool:
    """A CUDA graph is being captured on the current stream of x's device."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _merge_counters(x: Tensor, g: Geometry, plan: dict) -> Tensor | None:
    """Counters for a stage-1 launch of ``plan`` that merges its own partials, or None
    where the plan says not (``merge_p`` 0).

    During a CUDA graph capture, a buffer of the graph's own, zeroed by a node of the
    graph before the launch: the cached ones would be the graph's memory, and a replay
    could run beside an eager launch on another stream. The capture thus runs the kernels
    the eager steps before it loaded (the merges apart would be new ones, and loading a
    module during a capture fails on drivers before CUDA 12.3), with the eager step's bits."""
    if not plan["merge_p"]:
        return None
    blocks = plan["ncb"] if g.cl else g.c
    if _capturing(x):
        return torch.zeros(max(blocks, 1), dtype=torch.int32, device=x.device)
    if x.is_cuda:
        index = x.get_device()
        key = (index, torch._C._cuda_getCurrentRawStream(index))
    else:
        key = x.device.type, threading.get_ident()
    counters = _COUNTERS.get(key)
    if counters is None or counters.numel() < blocks:
        if len(_COUNTERS) > 64:
            _COUNTERS.clear()
        counters = _COUNTERS[key] = (_lasting_counters if x.is_cuda else torch.zeros)(
            max(blocks, 1024), dtype=torch.int32, device=x.device)
    return counters


def _lasting_counters(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Zeroed counters for the cache, allocated on a thread of their own. Under
    torch.compile's CUDA graphs (``mode="reduce-overhead"``) the calling thread's
    allocations may go to the graphs' private pool, while a function warms up; a later
    recording rewinds that pool to a checkpoint and would take back a block allocated
    after it, which the cache still holds: graph tensors and the tickets would share
    memory (a merge run early or never: wrong statistics). The block is recorded as used
    by the current stream, where the launches run, so that once the cache lets it go
    nothing reuses it before they are done."""
    made: list = []

    def allocate() -> None:
        try:
            made.append(torch.empty(numel, dtype=dtype, device=device))
        except BaseException as e:  # noqa: BLE001  (raised again on the calling thread)
            made.append(e)

    worker = threading.Thread(target=allocate, name="batchnorm-counters")
    worker.start()
    worker.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    counters = made[0]
    if counters.is_cuda:
        # The allocator gave the block on that thread's stream, the device's default one:
        # work queued there on memory just freed may still run, so the launches' stream
        # waits for it (the allocator only orders a block on the stream it was allocated
        # on)
        stream, default = torch.cuda.current_stream(device), torch.cuda.default_stream(device)
        if stream != default:
            stream.wait_stream(default)
        counters.record_stream(stream)
    return counters.zero_()


def _launch_merging(counters: Tensor, fn, grid, *args, **kwargs) -> None:
    """``launch`` of a kernel that takes tickets on ``counters``, which are put back to 0
    if it raises: the interpreter runs the programs one by one, so an exception (a
    KeyboardInterrupt, say) may come after some took their tickets, and a counter left
    above 0 would make a later launch's merge run early, or never, without an error. (On
    a GPU a launch that fails runs no program; zeroing is harmless.)"""
    try:
        launch(fn, grid, *args, **kwargs)
    except BaseException:
        with suppress(Exception):
            counters.zero_()
        raise


def _launch_prepare(mean, var, weight, bias, out, c, eps, copies=None) -> None:
    """:func:`_reduce.prepare` into ``out`` (where the four rows start); with ``copies``
    (evaluation: the mean and var ``batch_norm_forward`` returns) those written too."""
    eps_hi, eps_lo = split_float(eps)
    copy = copies is not None
    mean_out, var_out = copies if copy else (out, out)
    launch(_reduce.prepare, (cdiv(c, 128),),
           mean, var, _dummy(weight, out), _dummy(bias, out), out, mean_out, var_out, c,
           eps_hi, eps_lo,
           HAS_W=weight is not None, HAS_B=bias is not None, F64=out.dtype == torch.float64,
           COPY=copy, BLOCK_C=128, num_warps=4)


# The reductions' plans decide the size of their partials, so they are chosen before
# those are allocated, by timing stage 1 and its plain merge into scratch buffers.


def _timing_counters(x: Tensor, g: Geometry):
    """``counters()``: the autotuner's counters for the timed runs of the merges in stage
    1 (each run leaves them at 0), made at the first call (the untimed run that compiles a
    candidate) and let go with the tuning (not cached: the steps' cache would keep a
    block that torch.compile's CUDA graphs may take back, see :func:`_lasting_counters`)."""
    made: list = []

    def counters() -> Tensor:
        if not made:
            made.append(torch.zeros(max(g.c, 1), dtype=torch.int32, device=x.device))
        return made[0]
    return counters


def _stats_plan(x: Tensor, g: Geometry) -> dict:
    plan = _plans.chosen("stats", g, x)
    if plan is not None:
        return plan

    acc, counters = acc_dtype(x.dtype), _timing_counters(x, g)

    def run(plan):
        part = torch.empty(STATS_PLANES * plan["P"] * g.c, dtype=acc, device=x.device)
        mean = torch.empty(g.c, dtype=mean_dtype(x), device=x.device)
        if plan["merge_p"]:  # the kernel the step runs: the merge by the last programs
            scratch = torch.empty(5 * g.c, dtype=acc, device=x.device)  # var, the 4 rows
            finalize_args = (mean, scratch, scratch[g.c:], mean, mean, mean, mean, mean)
            flags = {"HAS_W": False, "HAS_B": False, "F64": acc == torch.float64,
                     "UPDATE": False, "HAS_NBT": False}
            _launch_stats_fused(x, g, plan, part, counters(), finalize_args, g.n * g.l,
                                *split_float(1e-5), 0.0, 0.0, 0.0, 0.0, flags)
            return
        _launch_stats_partials(x, g, plan, part)
        _launch_stats_merge(x, g, plan, part, mean, torch.empty_like(part[:g.c]))
    return _plans.choose("stats", g, x, run)


def _backward_reduce_plan(dy, x, g, mean_k, invstd, weight, bias_k, residual, act, hi,
                          lo) -> dict:
    plan = _plans.chosen("backward_reduce", g, x)
    if plan is not None:
        return plan

    acc, counters = acc_dtype(x.dtype), _timing_counters(x, g)

    def run(plan):
        part = torch.empty(2 * plan["P"] * g.c, dtype=acc, device=x.device)
        if plan["merge_p"]:  # the kernel the step runs: the merge by the last programs
            sums = torch.empty(3 * g.c, dtype=acc, device=x.device).split(g.c)
            # (the shift row: any C values of the acc dtype serve for timing, mean_k here)
            _launch_backward_partials(dy, x, g, plan, part, mean_k, invstd, weight, bias_k,
                                      residual, act, hi, lo, (counters(), mean_k, *sums))
            return
        _launch_backward_partials(dy, x, g, plan, part, mean_k, invstd, weight, bias_k,
                                  residual, act, hi, lo)
        _launch_sum_partials(g, plan, part, torch.empty_like(part[:g.c]),
                             torch.empty_like(part[:g.c]))
    return _plans.choose("backward_reduce", g, x, run)


# --------------------------------------------------------------------------------------
# The four primitives, on kernel views


def stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel ``mean`` (in ``portable.mean_dtype``, float64) and ``m2`` (acc dtype);
    see ``_reduce.py`` for the numerics."""
    _check_view(x)
    c = x.shape[1]
    acc = acc_dtype(x.dtype)
    mean = torch.empty(c, dtype=mean_dtype(x), device=x.device)
    m2 = torch.empty(c, dtype=acc, device=x.device)
    if x.numel() == 0:
        return mean.zero_(), m2.zero_()
    g = geometry(x.shape, False)
    with _device_guard(x):
        plan = _stats_plan(x, g)
        part = torch.empty(STATS_PLANES * plan["P"] * c, dtype=acc, device=x.device)
        _launch_stats_partials(x, g, plan, part)
        _launch_stats_merge(x, g, plan, part, mean, m2)
    return mean, m2


def normalize(x, mean, invstd, weight, bias, residual, activation: str, slope: float) -> Tensor:
    """``y = act(weight * (x - mean) * invstd + bias + residual)``, in x's dtype."""
    _check_view(x)
    residual = _check_same("residual", residual, x)
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    act, hi, lo = _activation_args(activation, slope)
    acc = acc_dtype(x.dtype)
    with _device_guard(x):
        _launch_normalize(x, y, geometry(x.shape, False), residual, _per_channel(mean, acc),
                          _per_channel(invstd, acc), _unit_stride(weight), _unit_stride(bias),
                          act, hi, lo)
    return y


def backward_reduce(dy, x, mean, invstd, weight, bias, residual, activation: str, slope: float):
    """Per-channel ``(Σ dz, Σ dz·x̂)`` in the acc dtype."""
    _check_view(x)
    dy = _check_same("dy", dy, x)
    residual = _check_same("residual", residual, x)
    c = x.shape[1]
    acc = acc_dtype(x.dtype)
    sdz = torch.empty(c, dtype=acc, device=x.device)
    sdzx = torch.empty(c, dtype=acc, device=x.device)
    if x.numel() == 0:
        return sdz.zero_(), sdzx.zero_()
    act, hi, lo = _activation_args(activation, slope)
    g = geometry(x.shape, False)
    args = (_per_channel(mean, acc), _per_channel(invstd, acc), _unit_stride(weight),
            _unit_stride(bias), residual, act, hi, lo)
    with _device_guard(x):
        plan = _backward_reduce_plan(dy, x, g, *args)
        part = torch.empty(2 * plan["P"] * c, dtype=acc, device=x.device)
        _launch_backward_partials(dy, x, g, plan, part, *args)
        _launch_sum_partials(g, plan, part, sdz, sdzx)
    return sdz, sdzx


def backward_elementwise(
    dy, x, mean, invstd, weight, bias, residual, sum_dz, sum_dz_xhat, count: int,
    activation: str, slope: float, want_dresidual: bool,
):
    """``dx`` (and ``dresidual = dz`` when asked); see the derivation in ``_elementwise.py``."""
    _check_view(x)
    dy = _check_same("dy", dy, x)
    residual = _check_same("residual", residual, x)
    dx = torch.empty_like(x)
    dres = None
    if want_dresidual:
        dres = torch.empty_like(x, dtype=residual.dtype if residual is not None else x.dtype)
    if x.numel() == 0:
        return dx, dres
    act, hi, lo = _activation_args(activation, slope)
    acc = acc_dtype(x.dtype)
    if sum_dz is not None:
        sum_dz, sum_dz_xhat = _per_channel(sum_dz, acc), _per_channel(sum_dz_xhat, acc)
    with _device_guard(x):
        _launch_backward_elementwise(
            dy, x, geometry(x.shape, False), dx, dres, _per_channel(mean, acc),
            _per_channel(invstd, acc), _unit_stride(weight), _unit_stride(bias), residual,
            sum_dz, sum_dz_xhat, count, act, hi, lo)
    return dx, dres


# --------------------------------------------------------------------------------------
# Whole passes (the hooks ops calls): the C-sized math inside the kernels, tensors as given


def batch_norm_forward(x, weight, bias, residual, running_mean, running_var, eps,
                       activation, slope, update=None, channels_last=False,
                       need_stats=True):
    """The ``batch_norm_forward`` hook (see ``backends/__init__.py``): ``(y, mean, var,
    updated, saved)``.

    Training, three launches: the statistics' stage 1; stage 2 with the C-sized math ops
    would do with a dozen torch kernels (var, invstd, the float64-mean centring) and, with
    a fixed momentum, the running update (``updated`` True; otherwise ops launches
    :func:`update_running_stats`); normalize. Two where the plan allows stage 1 to merge
    its own partials (``plan["merge_p"]``, :func:`_reduce.stats_fused_mc`). Evaluation,
    two: the coefficients from the running statistics (:func:`_reduce.prepare`),
    normalize; one without ``need_stats`` (the caller uses y alone: mean, var and saved
    come back None), which normalizes straight from the running statistics. ``saved`` is
    the four [C] rows (mean_k, invstd, bias_k, shift), contiguous in this order in one
    buffer, which :func:`batch_norm_backward` takes back instead of recomputing them. None (ops then
    takes its own path) for empty inputs, for what ``supports`` declines, and in
    evaluation for strided running buffers or ones on another device.
    x comes as the caller has it ((N, C, *), channels-last when ``channels_last``); y
    goes back in its shape and memory format.
    """
    if x.numel() == 0 or not supports(x) or not _eps_reaches_kernels(x, eps):
        return None
    if running_mean is not None and not all(
            t.is_contiguous() and t.device == x.device for t in (running_mean, running_var)):
        return None
    x = _dense(x, channels_last)
    g = geometry(x.shape, channels_last)
    residual = _laid_out_as("residual", residual, x)
    weight, bias = _unit_stride(weight), _unit_stride(bias)
    act, hi, lo = _activation_args(activation, slope)
    c, acc, device = g.c, acc_dtype(x.dtype), x.device
    updated = False
    with _device_guard(x):
        # a wider running mean (portable.running_mean_dtype) takes the two launches,
        # whose prepare splits it for the kernels
        mean_ty = running_mean_dtype(running_mean, acc) if running_mean is not None else acc
        wide_mean = mean_ty != acc
        if running_mean is not None and not need_stats and not wide_mean:
            y = torch.empty_like(x)
            _launch_normalize_running(x, y, g, residual, running_mean, running_var, weight,
                                      bias, eps, act, hi, lo)
            return y, None, None, False, None
        if running_mean is not None:
            # mean and the four rows in one buffer, var in one of its own: the custom op
            # batchnorm::batch_norm returns mean and var, which torch refuses to see share
            # storage (a direct call, torch.compile, opcheck), and opcheck wants them at
            # storage offset 0, as its fake tensors are
            coef = torch.empty((4 if wide_mean else 5, c), dtype=acc, device=device)
            var = torch.empty(c, dtype=acc, device=device)
            if wide_mean:
                mean, rows = torch.empty(c, dtype=mean_ty, device=device), coef.unbind(0)
            else:
                mean, *rows = coef.unbind(0)
            _launch_prepare(running_mean, running_var, weight, bias, rows[0], c, eps,
                            (mean, var))
        else:
            plan = _stats_plan(x, g)
            p = plan["P"]
            mean = torch.empty(c, dtype=mean_dtype(x), device=device)
            # var, the four coefficient rows and the partials in one allocation, cut in one
            # call: host time
            work = torch.empty(5 * c + STATS_PLANES * p * c, dtype=acc, device=device)
            var, *rows, part = work.split_with_sizes((c, c, c, c, c, STATS_PLANES * p * c))
            counters = _merge_counters(x, g, plan)
            if counters is None:  # stage 1 first: the GPU starts while the rest is prepared
                _launch_stats_partials(x, g, plan, part)
            count = g.n * g.l
            running = _running_for_finalize(update, mean)
            updated = running is not None
            rm, rv, nbt, m_hi, m_lo = running if updated else (mean, mean, None, 0.0, 0.0)
            b_hi, b_lo = split_float(count / max(count - 1, 1)) if updated else (0.0, 0.0)
            eps_hi, eps_lo = split_float(eps)
            # rows[0]: where the four rows start
            finalize_args = (mean, var, rows[0], _dummy(weight, mean), _dummy(bias, mean), rm,
                             rv, _dummy(nbt, mean))
            flags = {"HAS_W": weight is not None, "HAS_B": bias is not None,
                     "F64": acc == torch.float64, "UPDATE": updated, "HAS_NBT": nbt is not None}
            if counters is not None:
                _launch_stats_fused(x, g, plan, part, counters, finalize_args, count, eps_hi,
                                    eps_lo, b_hi, b_lo, m_hi, m_lo, flags)
            else:
                grid, tile = merge_launch(c, p)
                launch(_reduce.stats_finalize, grid, x, part, *finalize_args, p, c,
                       plan["shift_stride"], p * c, count, eps_hi, eps_lo, b_hi, b_lo, m_hi,
                       m_lo, **flags, **tile)
        y = torch.empty_like(x)
        mean_k, invstd, bias_k, _ = rows
        _launch_normalize(x, y, g, residual, mean_k, invstd, weight, bias_k, act, hi, lo)
    return y, mean, var, updated, tuple(rows)


def _running_for_finalize(update, mean: Tensor):
    """``(running_mean, running_var, num_batches_tracked, momentum_hi, momentum_lo)``
    where ``stats_finalize`` can do the running update (a fixed momentum, buffers the
    kernel takes), else None."""
    if update is None:
        return None
    running_mean, running_var, num_batches_tracked, momentum = update
    if momentum is None or not _running_buffers_ok(running_mean, running_var,
                                                   num_batches_tracked, mean):
        return None
    return (running_mean, running_var, num_batches_tracked, *split_float(float(momentum)))


def _plain_vector(t: Tensor, device: torch.device) -> bool:
    """A [C] tensor the running-update kernels may read or write in place."""
    return (supports(t) and t.device == device and t.is_contiguous() and not t.requires_grad
            and t.dim() == 1 and not t.is_neg())


def _running_buffers_ok(running_mean, running_var, num_batches_tracked, mean: Tensor) -> bool:
    """Whether the running-update kernels can update these buffers in place."""
    if running_mean is None or running_var is None:
        return False
    if not (_plain_vector(running_mean, mean.device) and _plain_vector(running_var, mean.device)):
        return False
    return num_batches_tracked is None or (num_batches_tracked.dtype == torch.int64
                                           and num_batches_tracked.device == mean.device
                                           and not num_batches_tracked.is_neg())


def batch_norm_backward(dy, x, weight, bias, residual, mean, var, eps, training: bool,
                        activation, slope, need_sums: bool, need_dx: bool,
                        want_dresidual: bool, channels_last=False, saved=None):
    """The ``batch_norm_backward`` hook (see ``backends/__init__.py``): ``(dx, Σdz, Σdz·x̂,
    dresidual)``, dx and dresidual in x's shape and memory format. Tensors as the caller
    has them, as in :func:`batch_norm_forward`.

    Three launches: the reduction's stage 1, the merge of the sums with the centring's
    corrections (in stage 1's launch where the plan allows, as in the forward), the
    elementwise pass; a fourth first (:func:`_reduce.prepare`: invstd from the saved var,
    the float64-mean centring) unless ``saved`` holds the rows
    :func:`batch_norm_forward` made. dx (dresidual) is None unless asked, the sums None
    unless ``need_sums`` or training. None where it does not apply.
    """
    if x.numel() == 0 or not supports(x) or not _eps_reaches_kernels(x, eps):
        return None
    x = _dense(x, channels_last)
    g = geometry(x.shape, channels_last)
    dy = _laid_out_as("dy", dy, x)
    residual = _laid_out_as("residual", residual, x)
    weight, bias = _unit_stride(weight), _unit_stride(bias)
    act, hi, lo = _activation_args(activation, slope)
    c, acc, device = g.c, acc_dtype(x.dtype), x.device
    need_sums = need_sums or training
    sum_dz = sum_dzx = sum_dz_k = dx = dres = None
    with _device_guard(x):
        if saved is None:
            coef = torch.empty((4, c), dtype=acc, device=device)
            _launch_prepare(_unit_stride(mean), _unit_stride(var), weight, bias, coef, c, eps)
            saved = coef.unbind(0)
        mean_k, invstd, bias_k, shift = saved
        if need_sums:
            plan = _backward_reduce_plan(dy, x, g, mean_k, invstd, weight, bias_k, residual,
                                         act, hi, lo)
            p = plan["P"]
            # Σdz as the elementwise pass takes it, and the partials
            work = torch.empty(c + 2 * p * c, dtype=acc, device=device)
            sum_dz_k, part = work.split_with_sizes((c, 2 * p * c))
            sum_dz = torch.empty(c, dtype=acc, device=device)
            sum_dzx = torch.empty(c, dtype=acc, device=device)
            sums = (shift, sum_dz, sum_dzx, sum_dz_k)
            counters = _merge_counters(x, g, plan)
            if counters is not None:
                _launch_backward_partials(dy, x, g, plan, part, mean_k, invstd, weight,
                                          bias_k, residual, act, hi, lo, (counters, *sums))
            else:
                _launch_backward_partials(dy, x, g, plan, part, mean_k, invstd, weight,
                                          bias_k, residual, act, hi, lo)
                grid, tile = merge_launch(c, p)
                launch(_reduce.sum_partials_centred, grid, part, *sums, p, c, p * c, **tile)
        if need_dx:
            dx = torch.empty_like(x)
            if want_dresidual:
                dres = torch.empty_like(
                    x, dtype=residual.dtype if residual is not None else x.dtype)
            _launch_backward_elementwise(
                dy, x, g, dx, dres, mean_k, invstd, weight, bias_k, residual,
                sum_dz_k if training else None, sum_dzx if training else None, g.n * g.l,
                act, hi, lo)
    return dx, sum_dz, sum_dzx, dres


def update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count,
                         momentum) -> bool:
    """``ops.update_running_stats`` in one launch instead of ~10 torch kernels; False
    (nothing done) where it does not apply, and ops then runs its torch version."""
    if not isinstance(count, int) or not _running_buffers_ok(
            running_mean, running_var, num_batches_tracked, mean):
        return False
    if not (_plain_vector(mean, mean.device) and _plain_vector(var, mean.device)):
        return False
    if num_batches_tracked is None and momentum is None:
        return False
    m_hi, m_lo = split_float(0.0 if momentum is None else float(momentum))
    b_hi, b_lo = split_float(count / max(count - 1, 1))
    nbt = num_batches_tracked if num_batches_tracked is not None else mean
    with _device_guard(mean):
        launch(_reduce.running_update, (1,),
               running_mean, running_var, nbt, mean, var, mean.shape[0],
               b_hi, b_lo, m_hi, m_lo, HAS_NBT=num_batches_tracked is not None,
               CUMULATIVE=momentum is None, BLOCK_C=min(np2(mean.shape[0]), 1024), num_warps=4)
    return True
