"""The Triton backend: the four primitives of ``portable.py`` as GPU kernels.

* ``stats`` and ``backward_reduce`` are two-stage reductions (``_reduce.py``): many
  programs per channel write partials to ``[P, C]`` buffers, a small kernel merges them in
  a fixed order. Deterministic, no atomics.
* ``normalize`` and ``backward_elementwise`` are one fused elementwise pass each
  (``_elementwise.py``), with the residual and the activation (and, in backward, the
  activation's derivative recomputed from x) folded in.
* Launch grids come from shapes only, and nothing here reads a device value on the host:
  a training step stays capturable in a CUDA graph.
* Small inputs are host-bound, so the whole passes (``batch_norm_forward`` /
  ``batch_norm_backward``, which ops calls) do the C-sized math inside the kernels, read
  tensors as given by address, and launch through ``_launch.launch``, which calls a
  compiled kernel's launcher directly once Triton's JIT has picked it.

The launchers accept the kernel views of ``portable.py``: ``(N, C, L)`` or ``(M, C)``,
contiguous. The tile and grid choices live in :data:`CONFIG` (read at every call;
``benchmarks/triton_dev.py`` times variants by editing it); the environment variable
``BATCHNORM_TRITON_CONFIG="reduce_tile=8192,programs_per_sm=4"`` overrides it at import.

On a machine without a GPU, ``TRITON_INTERPRET=1`` (set before triton is imported) runs
the same kernels on CPU tensors through Triton's NumPy interpreter; ``supports`` then
accepts CPU tensors, for tests.
"""

from __future__ import annotations

import functools
import math
import os
from contextlib import nullcontext
from typing import NamedTuple

import torch
import triton  # noqa: F401  (ImportError here marks the backend unavailable)
from torch import Tensor

from ..portable import acc_dtype, mean_dtype
from . import _elementwise, _reduce
from ._activation import CODES, split_float
from ._launch import launch

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

CONFIG = {
    # Stage-1 reductions: aim for this many programs per SM in total, each walking tiles of
    # reduce_tile elements (accumulators live in registers: 2 per element of the tile).
    "programs_per_sm": 8,
    "reduce_tile": 4096,
    "reduce_warps": 8,
    # Tiles in flight in stage 1's loop (num_stages of its tl.range): 1 is a plain loop;
    # 2-3 pipeline the loads through shared memory. Unmeasured on a GPU: the channels-last
    # reductions ran at 50-64% of the copy bandwidth on an H200 (2026-11-27), and section E
    # of benchmarks/triton_dev.py compares 2 and 3.
    "reduce_stages": 1,
    # Elementwise passes: tiles of elem_tile elements; one per program when
    # elem_programs_per_sm is 0, else a persistent grid of that many programs per SM.
    "elem_tile": 4096,
    "elem_warps": 8,
    # ... over (M, C) views (channels-last, BatchNorm1d): 4 warps took backward_elementwise
    # on (256,256,56,56) bf16 CL from 0.517 to 0.295 ms, on (8192,4096) bf16 from 0.132 to
    # 0.119, and normalize on (8192,4096) from 0.085 to 0.062 (H200, section E of
    # benchmarks/triton_dev.py, 2026-11-27); over NCL views they were 1-3% slower.
    "elem_warps_cl": 4,
    "elem_programs_per_sm": 0,
    # Widest channel block of an (M, C) tile; rows fill the rest of the tile.
    "block_c": 128,
    # Stage-2 merges: [merge_block_p, <= merge_block_c] tiles, one program per channel block.
    "merge_block_p": 64,
    "merge_block_c": 32,
}


def _apply_env_config() -> None:
    spec = os.environ.get("BATCHNORM_TRITON_CONFIG", "")
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, _, value = item.partition("=")
        if key not in CONFIG:
            raise ValueError(f"BATCHNORM_TRITON_CONFIG: unknown key {key!r}; known: {sorted(CONFIG)}")
        CONFIG[key] = int(value)


_apply_env_config()


# Read once, as triton itself does at import: whether kernels are interpreted on the CPU.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def supports(x: Tensor) -> bool:
    """CUDA tensors of a floating dtype; CPU ones too under ``TRITON_INTERPRET=1``."""
    if x.dtype not in _DTYPES:
        return False
    return x.is_cuda or (_INTERPRET and x.device.type == "cpu")


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 2  # interpreter: a few programs per channel, enough to exercise the merge
    return torch.cuda.get_device_properties(device).multi_processor_count


def _np2(n: int) -> int:
    # Not triton.next_power_of_2: in Triton 3.9 that is a wrapped constexpr function costing
    # ~20 µs a call on the host, which is per launch.
    return 1 << (max(int(n), 1) - 1).bit_length()


def _cached(fn):
    """Memoize a launch plan on (geometry, device, CONFIG): plans are pure functions of
    those, and the host time of a step matters for the small rows."""
    cache = {}

    def wrapper(g: "_Geometry", device: torch.device):
        key = (g, device, tuple(CONFIG.values()))
        plan = cache.get(key)
        if plan is None:
            if len(cache) > 4096:
                cache.clear()
            plan = cache[key] = fn(g, device)
        return plan
    wrapper.__wrapped__ = fn
    return wrapper


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


_NO_GUARD = nullcontext()


def _device_guard(x: Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else _NO_GUARD


# --------------------------------------------------------------------------------------
# Launch geometry


class _Geometry(NamedTuple):
    """A kernel view's sizes: ``(M, C)`` with the channels innermost (``cl``; ``l`` is 1),
    or ``(N, C, L)``. The kernels read tensors by address, so any tensor whose memory is
    laid out as that view will do: the view itself, or the input as given (contiguous, or
    channels-last dense), which saves the view calls of a step."""
    cl: bool
    n: int
    c: int
    l: int


@functools.lru_cache(maxsize=4096)
def _geometry(shape: torch.Size, channels_last: bool) -> _Geometry:
    """Of a kernel view (2-D or 3-D, ``channels_last`` False) or of an (N, C, *) input whose
    memory is contiguous, or channels-last dense when ``channels_last``."""
    c = shape[1]
    if len(shape) == 2 or channels_last:
        return _Geometry(True, math.prod(shape) // c if c else 0, c, 1)
    return _Geometry(False, shape[0], c, math.prod(shape[2:]))


@_cached
def _reduce_plan(g: _Geometry, device: torch.device) -> dict:
    """Tiles and the split of each channel's values over programs, for stage 1."""
    tile = CONFIG["reduce_tile"]
    target = CONFIG["programs_per_sm"] * _sm_count(device)
    if g.cl:
        m, c = g.n, g.c
        block_c = min(_np2(c), CONFIG["block_c"])
        block_m = min(max(tile // block_c, 1), _np2(m))
        ncb = _cdiv(c, block_c)
        per_cb = max(1, _cdiv(target, ncb))
        rows = _cdiv(_cdiv(m, block_m), per_cb) * block_m
        p = _cdiv(m, rows)
        return dict(P=p, grid=(p * ncb,), rows=rows, ncb=ncb, shift_stride=1,
                    BLOCK_M=block_m, BLOCK_C=block_c)
    n, c, length = g.n, g.c, g.l
    block_l = min(_np2(length), tile)
    block_n = min(max(tile // block_l, 1), _np2(n))
    nb, lb = _cdiv(n, block_n), _cdiv(length, block_l)
    per_channel = max(1, _cdiv(target, c))
    k = max(1, (nb * lb) // per_channel)  # tiles per program
    kl = min(lb, k)
    kn = max(1, k // kl)
    cols, rows = kl * block_l, kn * block_n
    p_l, p_n = _cdiv(length, cols), _cdiv(n, rows)
    return dict(P=p_n * p_l, grid=(p_n * p_l * c,), rows=rows, cols=cols, p_l=p_l,
                shift_stride=length, BLOCK_N=block_n, BLOCK_L=block_l)


@functools.lru_cache(maxsize=1024)
def _merge_grid(c: int, block_c_max: int) -> tuple[tuple[int], int]:
    block_c = min(_np2(c), block_c_max)
    return (_cdiv(c, block_c),), block_c


@_cached
def _elem_plan(g: _Geometry, device: torch.device) -> dict:
    """(R, K, C) and the tile of the elementwise passes."""
    tile = CONFIG["elem_tile"]
    if g.cl:
        r, k = g.n, g.c
        block_k = min(_np2(k), CONFIG["block_c"])
    else:
        r, k = g.n * g.c, g.l
        block_k = min(_np2(k), tile)
    block_r = min(max(tile // block_k, 1), _np2(r))
    n_tiles = _cdiv(r, block_r) * _cdiv(k, block_k)
    persistent = CONFIG["elem_programs_per_sm"] * _sm_count(device)
    grid = (min(n_tiles, persistent) if persistent > 0 else n_tiles,)
    return dict(R=r, K=k, C=g.c, grid=grid, BLOCK_R=block_r, BLOCK_K=block_k, CL=g.cl,
                warps=CONFIG["elem_warps_cl" if g.cl else "elem_warps"])


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
# Launches: tensors laid out as the geometry says, per-channel vectors ready; no checks


def _launch_stats_partials(x: Tensor, g: _Geometry, plan: dict, part: Tensor) -> None:
    """Stage 1 of the statistics into ``part`` (count, mean and m2 planes of [P, C])."""
    p, c, warps, stages = plan["P"], g.c, CONFIG["reduce_warps"], CONFIG["reduce_stages"]
    if g.cl:
        launch(_reduce.stats_partial_mc, plan["grid"],
               x, part, g.n, c, plan["rows"], plan["ncb"], p * c,
               BLOCK_M=plan["BLOCK_M"], BLOCK_C=plan["BLOCK_C"], STAGES=stages,
               num_warps=warps)
    else:
        launch(_reduce.stats_partial_ncl, plan["grid"],
               x, part, g.n, c, g.l, plan["rows"], plan["cols"], plan["p_l"], p * c,
               BLOCK_N=plan["BLOCK_N"], BLOCK_L=plan["BLOCK_L"], STAGES=stages,
               num_warps=warps)


def _launch_normalize(x, y, g, residual, mean_k, invstd, weight, bias_k, act, hi, lo):
    plan = _elem_plan(g, x.device)
    launch(_elementwise.normalize_kernel, plan["grid"],
           x, y, _dummy(residual, x), mean_k, invstd, _dummy(weight, mean_k),
           _dummy(bias_k, mean_k), plan["R"], plan["K"], plan["C"], hi, lo, CL=plan["CL"],
           ACT=act, HAS_W=weight is not None, HAS_B=bias_k is not None,
           HAS_RES=residual is not None, BLOCK_R=plan["BLOCK_R"], BLOCK_K=plan["BLOCK_K"],
           num_warps=plan["warps"])


def _launch_backward_partials(dy, x, g, plan, part, mean_k, invstd, weight, bias_k,
                              residual, act, hi, lo) -> None:
    """Stage 1 of the backward reduction into ``part`` (Σdz and Σdz·x̂ planes of [P, C])."""
    p, c = plan["P"], g.c
    flags = dict(ACT=act, HAS_W=weight is not None, HAS_B=bias_k is not None,
                 HAS_RES=residual is not None and act != 0, STAGES=CONFIG["reduce_stages"],
                 num_warps=CONFIG["reduce_warps"])
    common = (dy, x, _dummy(residual, x), mean_k, invstd, _dummy(weight, mean_k),
              _dummy(bias_k, mean_k), part)
    if g.cl:
        launch(_reduce.backward_partial_mc, plan["grid"],
               *common, g.n, c, plan["rows"], plan["ncb"], p * c, hi, lo,
               BLOCK_M=plan["BLOCK_M"], BLOCK_C=plan["BLOCK_C"], **flags)
    else:
        launch(_reduce.backward_partial_ncl, plan["grid"],
               *common, g.n, c, g.l, plan["rows"], plan["cols"], plan["p_l"], p * c, hi, lo,
               BLOCK_N=plan["BLOCK_N"], BLOCK_L=plan["BLOCK_L"], **flags)


def _launch_backward_elementwise(dy, x, g, dx, dres, mean_k, invstd, weight, bias_k,
                                 residual, sum_dz, sum_dz_xhat, count, act, hi, lo) -> None:
    plan = _elem_plan(g, x.device)
    train = sum_dz is not None
    launch(_elementwise.backward_kernel, plan["grid"],
           dy, x, _dummy(residual, x), mean_k, invstd, _dummy(weight, mean_k),
           _dummy(bias_k, mean_k), sum_dz if train else mean_k,
           sum_dz_xhat if train else mean_k, dx, _dummy(dres, dx), int(count), plan["R"],
           plan["K"], plan["C"], hi, lo, CL=plan["CL"], ACT=act, HAS_W=weight is not None,
           HAS_B=bias_k is not None, HAS_RES=residual is not None and act != 0, TRAIN=train,
           WANT_DRES=dres is not None, BLOCK_R=plan["BLOCK_R"], BLOCK_K=plan["BLOCK_K"],
           num_warps=plan["warps"])


def _launch_prepare(mean, var, weight, bias, out, c, eps, copy: bool) -> None:
    eps_hi, eps_lo = split_float(eps)
    launch(_reduce.prepare, (_cdiv(c, 128),),
           mean, var, _dummy(weight, out), _dummy(bias, out), out, c, eps_hi, eps_lo,
           HAS_W=weight is not None, HAS_B=bias is not None, F64=out.dtype == torch.float64,
           COPY=copy, BLOCK_C=128, num_warps=4)


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
    g = _geometry(x.shape, False)
    plan = _reduce_plan(g, x.device)
    p = plan["P"]
    with _device_guard(x):
        part = torch.empty(3 * p * c, dtype=acc, device=x.device)
        _launch_stats_partials(x, g, plan, part)
        grid, block_c = _merge_grid(c, CONFIG["merge_block_c"])
        launch(_reduce.stats_merge, grid, x, part, mean, m2, p, c, plan["shift_stride"], p * c,
               BLOCK_P=CONFIG["merge_block_p"], BLOCK_C=block_c, num_warps=4)
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
        _launch_normalize(x, y, _geometry(x.shape, False), residual, _per_channel(mean, acc),
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
    g = _geometry(x.shape, False)
    plan = _reduce_plan(g, x.device)
    p = plan["P"]
    with _device_guard(x):
        part = torch.empty(2 * p * c, dtype=acc, device=x.device)
        _launch_backward_partials(dy, x, g, plan, part, _per_channel(mean, acc),
                                  _per_channel(invstd, acc), _unit_stride(weight),
                                  _unit_stride(bias), residual, act, hi, lo)
        grid, block_c = _merge_grid(c, CONFIG["merge_block_c"])
        launch(_reduce.sum_partials, grid, part, sdz, sdzx, p, c, p * c,
               BLOCK_P=CONFIG["merge_block_p"], BLOCK_C=block_c, num_warps=4)
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
            dy, x, _geometry(x.shape, False), dx, dres, _per_channel(mean, acc),
            _per_channel(invstd, acc), _unit_stride(weight), _unit_stride(bias), residual,
            sum_dz, sum_dz_xhat, count, act, hi, lo)
    return dx, dres


# --------------------------------------------------------------------------------------
# Whole passes (the hooks ops calls): the C-sized math inside the kernels, tensors as given


def batch_norm_forward(x, weight, bias, residual, running_mean, running_var, eps,
                       activation, slope, update=None, channels_last=False):
    """``ops._batch_norm_forward``: ``(y, mean, var, updated, saved)``.

    Training, three launches: the statistics' stage 1; stage 2 with the C-sized math ops
    would do with a dozen torch kernels (var, invstd, the float64-mean centring) and, with
    a fixed momentum, the running update (``updated`` True; otherwise ops launches
    :func:`update_running_stats`); normalize. Evaluation, two: the coefficients from the
    running statistics (:func:`_reduce.prepare`), normalize. ``saved`` is the [4, C] rows
    mean_k, invstd, bias_k, shift, which :func:`batch_norm_backward` takes back instead of
    recomputing them. None (ops then takes its own path) for empty inputs, for what
    ``supports`` declines, and in evaluation for strided running buffers or ones on
    another device.
    x comes as the caller has it ((N, C, *), channels-last when ``channels_last``); y
    goes back in its shape and memory format.
    """
    if x.numel() == 0 or not supports(x):
        return None
    if running_mean is not None and not all(
            t.is_contiguous() and t.device == x.device for t in (running_mean, running_var)):
        return None
    x = _dense(x, channels_last)
    g = _geometry(x.shape, channels_last)
    residual = _laid_out_as("residual", residual, x)
    weight, bias = _unit_stride(weight), _unit_stride(bias)
    act, hi, lo = _activation_args(activation, slope)
    c, acc, device = g.c, acc_dtype(x.dtype), x.device
    updated = False
    with _device_guard(x):
        if running_mean is not None:
            coef = torch.empty((6, c), dtype=acc, device=device)
            _launch_prepare(running_mean, running_var, weight, bias, coef, c, eps, copy=True)
            mean, var = coef[4], coef[5]
        else:
            plan = _reduce_plan(g, device)
            p = plan["P"]
            mean = torch.empty(c, dtype=mean_dtype(x), device=device)
            # var, the four coefficient rows and the partials in one allocation: host time
            work = torch.empty(5 * c + 3 * p * c, dtype=acc, device=device)
            var, coef = work[:c], work[c:5 * c].view(4, c)
            part = work[5 * c:]
            _launch_stats_partials(x, g, plan, part)
            count = g.n * g.l
            running = _running_for_finalize(update, mean)
            updated = running is not None
            rm, rv, nbt, m_hi, m_lo = running if updated else (mean, mean, None, 0.0, 0.0)
            b_hi, b_lo = split_float(count / max(count - 1, 1)) if updated else (0.0, 0.0)
            eps_hi, eps_lo = split_float(eps)
            grid, block_c = _merge_grid(c, CONFIG["merge_block_c"])
            launch(_reduce.stats_finalize, grid,
                   x, part, mean, var, coef, _dummy(weight, mean), _dummy(bias, mean), rm, rv,
                   _dummy(nbt, mean), p, c, plan["shift_stride"], p * c, count, eps_hi, eps_lo,
                   b_hi, b_lo, m_hi, m_lo, HAS_W=weight is not None, HAS_B=bias is not None,
                   F64=acc == torch.float64, UPDATE=updated, HAS_NBT=nbt is not None,
                   BLOCK_P=CONFIG["merge_block_p"], BLOCK_C=block_c, num_warps=4)
        y = torch.empty_like(x)
        mean_k, invstd, bias_k, _ = coef.unbind(0)[:4]
        _launch_normalize(x, y, g, residual, mean_k, invstd, weight, bias_k, act, hi, lo)
    return y, mean, var, updated, coef[:4]


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
            and t.dim() == 1)


def _running_buffers_ok(running_mean, running_var, num_batches_tracked, mean: Tensor) -> bool:
    """Whether the running-update kernels can update these buffers in place."""
    if running_mean is None or running_var is None:
        return False
    if not (_plain_vector(running_mean, mean.device) and _plain_vector(running_var, mean.device)):
        return False
    return num_batches_tracked is None or (num_batches_tracked.dtype == torch.int64
                                           and num_batches_tracked.device == mean.device)


def batch_norm_backward(dy, x, weight, bias, residual, mean, var, eps, training: bool,
                        activation, slope, need_sums: bool, need_dx: bool,
                        want_dresidual: bool, channels_last=False, saved=None):
    """``ops._batch_norm_backward``: ``(dx, Σdz, Σdz·x̂, dresidual)``, dx and dresidual in x's
    shape and memory format. Tensors as the caller has them, as in
    :func:`batch_norm_forward`.

    Three launches: the reduction's stage 1, the merge of the sums with the centring's
    corrections, the elementwise pass; a fourth first (:func:`_reduce.prepare`: invstd
    from the saved var, the float64-mean centring) unless ``saved`` holds the rows
    :func:`batch_norm_forward` made. dx (dresidual) is None unless asked, the sums None
    unless ``need_sums`` or training. None where it does not apply.
    """
    if x.numel() == 0 or not supports(x):
        return None
    x = _dense(x, channels_last)
    g = _geometry(x.shape, channels_last)
    dy = _laid_out_as("dy", dy, x)
    residual = _laid_out_as("residual", residual, x)
    weight, bias = _unit_stride(weight), _unit_stride(bias)
    act, hi, lo = _activation_args(activation, slope)
    c, acc, device = g.c, acc_dtype(x.dtype), x.device
    need_sums = need_sums or training
    plan = _reduce_plan(g, device) if need_sums else None
    p = plan["P"] if need_sums else 0
    pre = 0 if saved is not None else 4 * c
    # the coefficients (unless saved), Σdz as the elementwise pass takes it, the partials
    work = torch.empty(pre + c + 2 * p * c, dtype=acc, device=device)
    sum_dz = sum_dzx = sum_dz_k = dx = dres = None
    with _device_guard(x):
        if saved is None:
            saved = work[:pre].view(4, c)
            _launch_prepare(_unit_stride(mean), _unit_stride(var), weight, bias, saved, c, eps,
                            copy=False)
        mean_k, invstd, bias_k, shift = saved.unbind(0)
        if need_sums:
            part = work[pre + c:]
            _launch_backward_partials(dy, x, g, plan, part, mean_k, invstd, weight, bias_k,
                                      residual, act, hi, lo)
            sum_dz = torch.empty(c, dtype=acc, device=device)
            sum_dzx = torch.empty(c, dtype=acc, device=device)
            sum_dz_k = work[pre:pre + c]
            grid, block_c = _merge_grid(c, CONFIG["merge_block_c"])
            launch(_reduce.sum_partials_centred, grid,
                   part, shift, sum_dz, sum_dzx, sum_dz_k, p, c, p * c,
                   BLOCK_P=CONFIG["merge_block_p"], BLOCK_C=block_c, num_warps=4)
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
               CUMULATIVE=momentum is None, BLOCK_C=min(_np2(mean.shape[0]), 1024), num_warps=4)
    return True
