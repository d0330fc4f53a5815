"""The Triton backend: the four primitives of ``portable.py`` as GPU kernels.

* ``stats`` and ``backward_reduce`` are two-stage reductions (``_reduce.py``): many
  programs per channel write partials to ``[P, C]`` buffers, a small kernel merges them in
  a fixed order. Deterministic, no atomics.
* ``normalize`` and ``backward_elementwise`` are one fused elementwise pass each
  (``_elementwise.py``), with the residual and the activation (and, in backward, the
  activation's derivative recomputed from x) folded in.
* Launch grids come from shapes only, and nothing here reads a device value on the host:
  a training step stays capturable in a CUDA graph.

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
import os

import torch
import triton  # noqa: F401  (ImportError here marks the backend unavailable)
from torch import Tensor

from ..portable import acc_dtype, from_kernel_view, mean_dtype, to_kernel_view
from . import _elementwise, _reduce
from ._activation import CODES, split_float

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

CONFIG = {
    # Stage-1 reductions: aim for this many programs per SM in total, each walking tiles of
    # reduce_tile elements (accumulators live in registers: 2 per element of the tile).
    "programs_per_sm": 8,
    "reduce_tile": 4096,
    "reduce_warps": 8,
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


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def supports(x: Tensor) -> bool:
    """CUDA tensors of a floating dtype; CPU ones too under ``TRITON_INTERPRET=1``."""
    if x.dtype not in _DTYPES:
        return False
    return x.is_cuda or (x.device.type == "cpu" and _interpreting())


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
    """Memoize a launch plan on (shape, device, CONFIG): plans are pure functions of those,
    and the host time of a step matters for the small rows."""
    cache = {}

    def wrapper(x: Tensor):
        key = (tuple(x.shape), x.device, tuple(CONFIG.values()))
        plan = cache.get(key)
        if plan is None:
            if len(cache) > 4096:
                cache.clear()
            plan = cache[key] = fn(x)
        return plan
    wrapper.__wrapped__ = fn
    return wrapper


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _device_guard(x: Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else _NullContext()


class _NullContext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------------------
# Launch geometry


@_cached
def _reduce_plan(x: Tensor) -> dict:
    """Tiles and the split of each channel's values over programs, for stage 1."""
    tile = CONFIG["reduce_tile"]
    target = CONFIG["programs_per_sm"] * _sm_count(x.device)
    if x.dim() == 2:
        m, c = x.shape
        block_c = min(_np2(c), CONFIG["block_c"])
        block_m = min(max(tile // block_c, 1), _np2(m))
        ncb = _cdiv(c, block_c)
        per_cb = max(1, _cdiv(target, ncb))
        rows = _cdiv(_cdiv(m, block_m), per_cb) * block_m
        p = _cdiv(m, rows)
        return dict(cl=True, P=p, grid=(p * ncb,), rows=rows, ncb=ncb,
                    BLOCK_M=block_m, BLOCK_C=block_c)
    n, c, length = x.shape
    block_l = min(_np2(length), tile)
    block_n = min(max(tile // block_l, 1), _np2(n))
    nb, lb = _cdiv(n, block_n), _cdiv(length, block_l)
    per_channel = max(1, _cdiv(target, c))
    k = max(1, (nb * lb) // per_channel)  # tiles per program
    kl = min(lb, k)
    kn = max(1, k // kl)
    cols, rows = kl * block_l, kn * block_n
    p_l, p_n = _cdiv(length, cols), _cdiv(n, rows)
    return dict(cl=False, P=p_n * p_l, grid=(p_n * p_l * c,), rows=rows, cols=cols, p_l=p_l,
                BLOCK_N=block_n, BLOCK_L=block_l)


@functools.lru_cache(maxsize=1024)
def _merge_grid(c: int, block_c_max: int) -> tuple[tuple[int], int]:
    block_c = min(_np2(c), block_c_max)
    return (_cdiv(c, block_c),), block_c


@_cached
def _elem_plan(x: Tensor) -> dict:
    """(R, K, C) and the tile of the elementwise passes."""
    tile = CONFIG["elem_tile"]
    if x.dim() == 2:
        r, k = x.shape
        c = k
        block_k = min(_np2(k), CONFIG["block_c"])
    else:
        n, c, k = x.shape
        r = n * c
        block_k = min(_np2(k), tile)
    block_r = min(max(tile // block_k, 1), _np2(r))
    n_tiles = _cdiv(r, block_r) * _cdiv(k, block_k)
    persistent = CONFIG["elem_programs_per_sm"] * _sm_count(x.device)
    grid = (min(n_tiles, persistent) if persistent > 0 else n_tiles,)
    cl = x.dim() == 2
    return dict(R=r, K=k, C=c, grid=grid, BLOCK_R=block_r, BLOCK_K=block_k, CL=cl,
                warps=CONFIG["elem_warps_cl" if cl else "elem_warps"])


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


# --------------------------------------------------------------------------------------
# The four primitives


def _stats_partials(x: Tensor) -> tuple[Tensor, int, int]:
    """Stage 1 of the statistics: ``(part [3, P, C], P, shift_stride)``."""
    c = x.shape[1]
    plan = _reduce_plan(x)
    p = plan["P"]
    # count, mean and m2 planes of the partials in one allocation (host time per launch)
    part = torch.empty((3, p, c), dtype=acc_dtype(x.dtype), device=x.device)
    warps = CONFIG["reduce_warps"]
    if plan["cl"]:
        _reduce.stats_partial_mc[plan["grid"]](
            x, part, x.shape[0], c, plan["rows"], plan["ncb"], p * c,
            BLOCK_M=plan["BLOCK_M"], BLOCK_C=plan["BLOCK_C"], num_warps=warps)
        return part, p, 1
    _reduce.stats_partial_ncl[plan["grid"]](
        x, part, x.shape[0], c, x.shape[2], plan["rows"], plan["cols"], plan["p_l"],
        p * c, BLOCK_N=plan["BLOCK_N"], BLOCK_L=plan["BLOCK_L"], num_warps=warps)
    return part, p, x.shape[2]


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
    with _device_guard(x):
        part, p, shift_stride = _stats_partials(x)
        grid, block_c = _merge_grid(c, CONFIG["merge_block_c"])
        _reduce.stats_merge[grid](x, part, mean, m2, p, c, shift_stride, p * c,
                                  BLOCK_P=CONFIG["merge_block_p"], BLOCK_C=block_c, num_warps=4)
    return mean, m2


def batch_norm_forward(x, weight, bias, residual, running_mean, running_var, eps,
                       activation, slope, update=None, channels_last=False):
    """``ops._batch_norm_forward`` in training: ``(y, mean, var, False)`` in three
    launches.

    The statistics' stage 2 also does the C-sized math ops would do with a dozen torch
    kernels (var, invstd, the float64-mean centring), then normalize runs. None (ops then
    takes its own path) in evaluation, for empty inputs, and for what ``supports`` declines.
    The running update (``update``) is left to ops (``updated`` False): its one launch,
    :func:`update_running_stats`.
    x comes as the caller has it ((N, C, *), channels-last when ``channels_last``); y
    goes back in its shape and format.
    """
    if running_mean is not None or x.numel() == 0 or not supports(x):
        return None
    shape = x.shape
    x = to_kernel_view(x, channels_last)
    if residual is not None:
        residual = to_kernel_view(residual, channels_last)
    _check_view(x)
    c = x.shape[1]
    acc = acc_dtype(x.dtype)
    mean = torch.empty(c, dtype=mean_dtype(x), device=x.device)
    var = torch.empty(c, dtype=acc, device=x.device)
    scratch = torch.empty((3, c), dtype=acc, device=x.device)  # mean_k, invstd, bias_k
    eps_hi, eps_lo = split_float(eps)
    with _device_guard(x):
        part, p, shift_stride = _stats_partials(x)
        grid, block_c = _merge_grid(c, CONFIG["merge_block_c"])
        mean_k, invstd, bias_k = scratch.unbind(0)
        _reduce.stats_finalize[grid](
            x, part, mean, var, mean_k, invstd, bias_k, _dummy(weight, mean),
            _dummy(bias, mean), p, c, shift_stride, p * c, x.numel() // c, eps_hi, eps_lo,
            HAS_W=weight is not None, HAS_B=bias is not None, F64=acc == torch.float64,
            BLOCK_P=CONFIG["merge_block_p"], BLOCK_C=block_c, num_warps=4)
    y = normalize(x, mean_k, invstd, weight, bias_k, residual, activation, slope)
    return from_kernel_view(y, shape, channels_last), mean, var, False


def _dummy(t: Tensor | None, like: Tensor) -> Tensor:
    # A pointer the kernel never reads (its HAS_* flag is off).
    return like if t is None else t


def _check_same(name: str, t: Tensor | None, x: Tensor) -> Tensor | None:
    if t is None:
        return None
    if t.shape != x.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, the kernel view {tuple(x.shape)}")
    return t.contiguous()


def normalize(x, mean, invstd, weight, bias, residual, activation: str, slope: float) -> Tensor:
    """``y = act(weight * (x - mean) * invstd + bias + residual)``, in x's dtype."""
    _check_view(x)
    residual = _check_same("residual", residual, x)
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    act, hi, lo = _activation_args(activation, slope)
    acc = acc_dtype(x.dtype)
    mean, invstd = mean.to(acc).contiguous(), invstd.to(acc).contiguous()
    plan = _elem_plan(x)
    with _device_guard(x):
        _elementwise.normalize_kernel[plan["grid"]](
            x, y, _dummy(residual, x), mean, invstd, _dummy(weight, mean), _dummy(bias, mean),
            plan["R"], plan["K"], plan["C"], hi, lo, CL=plan["CL"], ACT=act,
            HAS_W=weight is not None, HAS_B=bias is not None, HAS_RES=residual is not None,
            BLOCK_R=plan["BLOCK_R"], BLOCK_K=plan["BLOCK_K"], num_warps=plan["warps"])
    return y


def _backward_partials(dy, x, mean, invstd, weight, bias, residual, act, hi, lo):
    """Stage 1 of the backward reduction: ``(part [2, P, C], P)`` (Σdz and Σdz·x̂ planes)."""
    c = x.shape[1]
    plan = _reduce_plan(x)
    p = plan["P"]
    part = torch.empty((2, p, c), dtype=acc_dtype(x.dtype), device=x.device)
    flags = dict(ACT=act, HAS_W=weight is not None, HAS_B=bias is not None,
                 HAS_RES=residual is not None and act != 0, num_warps=CONFIG["reduce_warps"])
    common = (dy, x, _dummy(residual, x), mean, invstd, _dummy(weight, mean),
              _dummy(bias, mean), part)
    if plan["cl"]:
        _reduce.backward_partial_mc[plan["grid"]](
            *common, x.shape[0], c, plan["rows"], plan["ncb"], p * c, hi, lo,
            BLOCK_M=plan["BLOCK_M"], BLOCK_C=plan["BLOCK_C"], **flags)
    else:
        _reduce.backward_partial_ncl[plan["grid"]](
            *common, x.shape[0], c, x.shape[2], plan["rows"], plan["cols"], plan["p_l"],
            p * c, hi, lo, BLOCK_N=plan["BLOCK_N"], BLOCK_L=plan["BLOCK_L"], **flags)
    return part, p


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
    mean, invstd = mean.to(acc).contiguous(), invstd.to(acc).contiguous()
    with _device_guard(x):
        part, p = _backward_partials(dy, x, mean, invstd, weight, bias, residual, act, hi, lo)
        grid, block_c = _merge_grid(c, CONFIG["merge_block_c"])
        _reduce.sum_partials[grid](part, sdz, sdzx, p, c, p * c, BLOCK_P=CONFIG["merge_block_p"],
                                   BLOCK_C=block_c, num_warps=4)
    return sdz, sdzx


def batch_norm_backward(dy, x, weight, bias, residual, mean, var, eps, training: bool,
                        activation, slope, need_sums: bool, need_dx: bool,
                        want_dresidual: bool, channels_last=False):
    """``ops._batch_norm_backward`` in four launches: ``(dx, Σdz, Σdz·x̂, dresidual)``.
    Tensors
    as the caller has them, as in :func:`batch_norm_forward`.

    A one-program-per-128-channels prologue does the C-sized math ops would do with about
    fifteen torch kernels (invstd from the saved var; the float64-mean centring), and the
    merge of the sums applies the centring's corrections. dx (dresidual) is None unless
    asked, the sums None unless ``need_sums`` or training. None where it does not apply.
    """
    if x.numel() == 0 or not supports(x):
        return None
    shape = x.shape
    x, dy = to_kernel_view(x, channels_last), to_kernel_view(dy, channels_last)
    if residual is not None:
        residual = to_kernel_view(residual, channels_last)
    _check_view(x)
    dy = _check_same("dy", dy, x)
    residual = _check_same("residual", residual, x)
    c = x.shape[1]
    acc = acc_dtype(x.dtype)
    act, hi, lo = _activation_args(activation, slope)
    eps_hi, eps_lo = split_float(eps)
    pre = torch.empty((4, c), dtype=acc, device=x.device)  # mean_k, invstd, bias_k, shift
    sum_dz = sum_dzx = sum_dz_k = None
    with _device_guard(x):
        _reduce.backward_prepare[(_cdiv(c, 128),)](
            mean, var, _dummy(weight, pre), _dummy(bias, pre), pre, c, eps_hi, eps_lo,
            HAS_W=weight is not None, HAS_B=bias is not None, F64=acc == torch.float64,
            BLOCK_C=128, num_warps=4)
        mean_k, invstd, bias_k, shift = pre.unbind(0)
        if need_sums or training:
            part, p = _backward_partials(dy, x, mean_k, invstd, weight, bias_k, residual, act,
                                         hi, lo)
            sum_dz = torch.empty(c, dtype=acc, device=x.device)
            sum_dzx = torch.empty(c, dtype=acc, device=x.device)
            sum_dz_k = torch.empty(c, dtype=acc, device=x.device)
            grid, block_c = _merge_grid(c, CONFIG["merge_block_c"])
            _reduce.sum_partials_centred[grid](
                part, shift, sum_dz, sum_dzx, sum_dz_k, p, c, p * c,
                BLOCK_P=CONFIG["merge_block_p"], BLOCK_C=block_c, num_warps=4)
    dx = dres = None
    if need_dx:
        dx, dres = backward_elementwise(
            dy, x, mean_k, invstd, weight, bias_k, residual,
            sum_dz_k if training else None, sum_dzx if training else None,
            x.numel() // c, activation, slope, want_dresidual)
        dx = from_kernel_view(dx, shape, channels_last)
        if dres is not None:
            dres = from_kernel_view(dres, shape, channels_last)
    return dx, sum_dz, sum_dzx, dres


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
    mean, invstd = mean.to(acc).contiguous(), invstd.to(acc).contiguous()
    train = sum_dz is not None
    if train:
        sum_dz, sum_dz_xhat = sum_dz.to(acc).contiguous(), sum_dz_xhat.to(acc).contiguous()
    plan = _elem_plan(x)
    with _device_guard(x):
        _elementwise.backward_kernel[plan["grid"]](
            dy, x, _dummy(residual, x), mean, invstd, _dummy(weight, mean), _dummy(bias, mean),
            sum_dz if train else mean, sum_dz_xhat if train else mean, dx, _dummy(dres, dx),
            int(count), plan["R"], plan["K"], plan["C"], hi, lo, CL=plan["CL"], ACT=act,
            HAS_W=weight is not None, HAS_B=bias is not None,
            HAS_RES=residual is not None and act != 0, TRAIN=train, WANT_DRES=want_dresidual,
            BLOCK_R=plan["BLOCK_R"], BLOCK_K=plan["BLOCK_K"], num_warps=plan["warps"])
    return dx, dres


def update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count,
                         momentum) -> bool:
    """``ops.update_running_stats`` in one launch instead of ~10 torch kernels; False
    (nothing done) where it does not apply, and ops then runs its torch version."""
    if running_mean is None or running_var is None or not isinstance(count, int):
        return False
    for t in (running_mean, running_var, mean, var):
        if (not supports(t) or t.device != mean.device or not t.is_contiguous()
                or t.requires_grad or t.dim() != 1):
            return False
    if num_batches_tracked is not None:
        if num_batches_tracked.dtype != torch.int64 or num_batches_tracked.device != mean.device:
            return False
    elif momentum is None:
        return False
    m_hi, m_lo = split_float(0.0 if momentum is None else float(momentum))
    b_hi, b_lo = split_float(count / max(count - 1, 1))
    nbt = num_batches_tracked if num_batches_tracked is not None else mean
    with _device_guard(mean):
        _reduce.running_update[(1,)](
            running_mean, running_var, nbt, mean, var, mean.shape[0],
            b_hi, b_lo, m_hi, m_lo, HAS_NBT=num_batches_tracked is not None,
            CUMULATIVE=momentum is None, BLOCK_C=min(_np2(mean.shape[0]), 1024), num_warps=4)
    return True
