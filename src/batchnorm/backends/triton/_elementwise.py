"""The two elementwise passes: normalize (forward) and backward_elementwise.

Both see the kernel view as a 2-D grid of ``R`` rows by ``K`` contiguous columns, cut into
``[BLOCK_R, BLOCK_K]`` tiles numbered ``rb * NKB + kb``. A program takes tiles
``pid, pid + grid, ...``: one each when the grid covers every tile (the default), several
when the launcher caps the grid at a multiple of the SM count (a persistent grid):
* ``(N, C, L)``: rows are the ``N·C`` rows ``(n, c)``, columns are L, and a row's channel
  is ``row % C`` (per-channel values broadcast along the row);
* ``(M, C)`` (``CL``): rows are the M positions, columns the channels (per-channel values
  broadcast down the columns).
As in ``_reduce.py`` the only masks are ``row < R`` and ``col < K``, which keep 16-byte
vector accesses where K is a multiple of 16 elements.

All arithmetic is in the accumulation dtype (that of ``mean``); ``x − mean`` is formed
before scaling, so a large mean does not cancel against a large ``mean·invstd``.
"""

import triton
import triton.language as tl

from ._activation import activate
from ._reduce import _dz, _invstd


@triton.jit
def _tiles(R, K, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, I64: tl.constexpr):
    """``(R, K, n_tiles)``: the sizes, and the number of tiles a kernel's loop runs over.
    With ``I64`` (the plan's flag, set where R or K plus a tile, or the loop's last
    increment, could pass 2^31 − 1: ``tl.cdiv`` adds the tile before dividing) the sizes
    are widened to int64, and with them the loop's tile index and :func:`_tile`'s rows
    and columns; otherwise they stay as passed (int32 below 2^31, where Triton passes
    int64 sizes the arithmetic is int64 anyway)."""
    if I64:  # tl.cast, not .to(): a size of 1 arrives as a constexpr
        R = tl.cast(R, tl.int64)
        K = tl.cast(K, tl.int64)
    return R, K, tl.cdiv(R, BLOCK_R) * tl.cdiv(K, BLOCK_K)


@triton.jit
def _tile(t, R, K, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    nkb = tl.cdiv(K, BLOCK_K)
    rows = (t // nkb) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (t % nkb) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows < R)[:, None] & (cols < K)[None, :]
    off = rows.to(tl.int64)[:, None] * K + cols[None, :]
    return rows, cols, mask, off


@triton.jit
def _channel(ptr, rows, cols, R, K, C, acc_ty: tl.constexpr, CL: tl.constexpr):
    """A per-channel [C] vector, read for this tile in the dtype ``acc_ty`` and shaped to
    broadcast against the tile."""
    if CL:
        v = tl.load(ptr + cols, mask=cols < K, other=0.0).to(acc_ty)[None, :]
    else:
        v = tl.load(ptr + rows % C, mask=rows < R, other=0.0).to(acc_ty)[:, None]
    return v


@triton.jit
def _normalize_tile(t, x_ptr, y_ptr, r_ptr, mean_ptr, scale_ptr, w_ptr, b_ptr, R, K, C,
                    slope_hi, slope_lo, eps_hi, eps_lo, acc_ty: tl.constexpr,
                    CL: tl.constexpr, ACT: tl.constexpr, HAS_W: tl.constexpr,
                    HAS_B: tl.constexpr, HAS_RES: tl.constexpr, FROM_VAR: tl.constexpr,
                    F64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """y = act(w·(x − mean)·invstd + b + r) on tile t; with ``FROM_VAR`` scale_ptr holds
    the variance and invstd is formed here (``_reduce._invstd``), else it holds invstd."""
    rows, cols, mask, off = _tile(t, R, K, BLOCK_R, BLOCK_K)
    scale = _channel(scale_ptr, rows, cols, R, K, C, acc_ty, CL)
    if FROM_VAR:
        scale = _invstd(scale, eps_hi, eps_lo, F64)
    if HAS_W:
        scale = scale * _channel(w_ptr, rows, cols, R, K, C, acc_ty, CL)
    mu = _channel(mean_ptr, rows, cols, R, K, C, acc_ty, CL)
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(acc_ty)
    z = (x - mu) * scale
    if HAS_B:
        z = z + _channel(b_ptr, rows, cols, R, K, C, acc_ty, CL)
    if HAS_RES:
        z = z + tl.load(r_ptr + off, mask=mask, other=0.0).to(acc_ty)
    y = activate(z, ACT, slope_hi, slope_lo)
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def normalize_kernel(x_ptr, y_ptr, r_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, R, K, C,
                     slope_hi, slope_lo, CL: tl.constexpr, ACT: tl.constexpr,
                     HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, I64: tl.constexpr):
    """y = act(w·(x − mean)·invstd + b + r), mean and invstd in the acc dtype."""
    R, K, n_tiles = _tiles(R, K, BLOCK_R, BLOCK_K, I64)
    for t in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        _normalize_tile(t, x_ptr, y_ptr, r_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, R, K, C,
                        slope_hi, slope_lo, 0.0, 0.0, mean_ptr.dtype.element_ty, CL, ACT,
                        HAS_W, HAS_B, HAS_RES, False, False, BLOCK_R, BLOCK_K)


@triton.jit
def normalize_running_kernel(x_ptr, y_ptr, r_ptr, rm_ptr, rv_ptr, w_ptr, b_ptr, R, K, C,
                             slope_hi, slope_lo, eps_hi, eps_lo, CL: tl.constexpr,
                             ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                             HAS_RES: tl.constexpr, F64: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, I64: tl.constexpr):
    """Evaluation in one launch: normalize straight from the running statistics (any
    floating dtype), rounded to the acc dtype (float64 with ``F64``, else float32) as
    ``_reduce.prepare`` rounds them: y has the two-launch y's values (a zero's sign aside)."""
    acc_ty = tl.float64 if F64 else tl.float32
    R, K, n_tiles = _tiles(R, K, BLOCK_R, BLOCK_K, I64)
    for t in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        _normalize_tile(t, x_ptr, y_ptr, r_ptr, rm_ptr, rv_ptr, w_ptr, b_ptr, R, K, C,
                        slope_hi, slope_lo, eps_hi, eps_lo, acc_ty, CL, ACT, HAS_W, HAS_B,
                        HAS_RES, True, F64, BLOCK_R, BLOCK_K)


# The backward of y = act(z), z = w·x̂ + b + r, x̂ = (x − μ)·σ⁻¹, where μ and
# σ⁻¹ = (var + eps)^(−1/2) are the statistics of the n = N·L values of the channel and
# var = (1/n)·Σ(x − μ)² (biased).
#
# The activation is elementwise, so dz = dy·act′(z), with z recomputed from x, the
# statistics, w, b and r (no mask is saved in forward). The weight and bias gradients
# are Σdz·x̂ and Σdz (backward_reduce); ∂L/∂x̂ᵢ = w·dzᵢ.
#
# With fixed statistics (evaluation) x̂ is affine in x: dx = w·σ⁻¹·dz.
#
# With batch statistics every x̂ⱼ of the channel depends on every xᵢ. Since Σ(x − μ) = 0,
# ∂var/∂xᵢ = 2(xᵢ − μ)/n (the path through μ vanishes), hence
# ∂σ⁻¹/∂xᵢ = −σ⁻³·(xᵢ − μ)/n = −σ⁻²·x̂ᵢ/n and, with ∂μ/∂xᵢ = 1/n,
#     ∂x̂ⱼ/∂xᵢ = σ⁻¹·(δᵢⱼ − 1/n − x̂ⱼ·x̂ᵢ/n).
# Summing w·dzⱼ·∂x̂ⱼ/∂xᵢ over j:
#     dxᵢ = w·σ⁻¹·(dzᵢ − Σdz/n − x̂ᵢ·Σdz·x̂/n),
# so one elementwise pass needs only the two per-channel sums of backward_reduce. A
# channel with σ⁻¹ = 0 (zero variance, eps = 0) has x̂ = 0 and gets dx = 0. The residual's
# gradient is dz itself (z is linear in r with slope 1).
@triton.jit
def backward_kernel(dy_ptr, x_ptr, r_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, sdz_ptr,
                    sdzx_ptr, dx_ptr, dr_ptr, count, R, K, C, slope_hi, slope_lo,
                    CL: tl.constexpr, ACT: tl.constexpr, HAS_W: tl.constexpr,
                    HAS_B: tl.constexpr, HAS_RES: tl.constexpr, TRAIN: tl.constexpr,
                    WANT_DRES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                    I64: tl.constexpr):
    acc_ty = mean_ptr.dtype.element_ty
    R, K, n_tiles = _tiles(R, K, BLOCK_R, BLOCK_K, I64)
    for t in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        rows, cols, mask, off = _tile(t, R, K, BLOCK_R, BLOCK_K)
        mu = _channel(mean_ptr, rows, cols, R, K, C, acc_ty, CL)
        inv = _channel(invstd_ptr, rows, cols, R, K, C, acc_ty, CL)
        if HAS_W:
            w = _channel(w_ptr, rows, cols, R, K, C, acc_ty, CL)
        else:
            w = 1.0
        if HAS_B:
            b = _channel(b_ptr, rows, cols, R, K, C, acc_ty, CL)
        else:
            b = 0.0
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(acc_ty)
        dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(acc_ty)
        if HAS_RES:
            r = tl.load(r_ptr + off, mask=mask, other=0.0).to(acc_ty)
        else:
            r = 0.0
        xhat, dz = _dz(dy, x, mu, inv, w, b, r, ACT, HAS_W, HAS_B, HAS_RES, slope_hi, slope_lo)
        g = dz
        if TRAIN:
            # count is an integer argument: dividing the acc-dtype sums by it keeps float64
            # exact where a float32 1/count would not be.
            mean_dz = _channel(sdz_ptr, rows, cols, R, K, C, acc_ty, CL) / count
            mean_dzx = _channel(sdzx_ptr, rows, cols, R, K, C, acc_ty, CL) / count
            g = dz - mean_dz - xhat * mean_dzx
        dx = g * (inv * w)
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if WANT_DRES:
            tl.store(dr_ptr + off, dz.to(dr_ptr.dtype.element_ty), mask=mask)
