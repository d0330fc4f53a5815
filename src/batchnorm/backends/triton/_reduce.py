"""The two reductions (statistics, and the backward's Σdz, Σdz·x̂) as two-stage kernels.

Stage 1 splits the N·L values of every channel over many programs, each writing one
partial result per channel into ``[P, C]`` buffers of the accumulation dtype (float32, or
float64 for float64 inputs). Stage 2, a small kernel over channel blocks, merges the P
partials of a channel in a fixed order. The result depends only on the shapes and the
launch configuration, never on scheduling, and nothing is synchronized with the host
(the grids come from shapes alone). The ``*_fused_*`` kernels do both in one launch: the
last stage-1 program of a channel block, known by an atomic ticket (the only atomic),
merges the block's partials as stage 2 would, in the same fixed order.

Kernel views (see ``portable.py``):
* ``(N, C, L)``: a program owns one channel ``c`` and a rectangle of rows ``n`` and
  positions ``l``, walked in ``[BLOCK_N, BLOCK_L]`` tiles contiguous along L (BLOCK_N > 1
  only when L is short). Partial index ``p = pn * P_L + pl``; program id ``p * C + c``.
* ``(M, C)``: a program owns a block of ``BLOCK_C`` channels and a range of rows, walked in
  ``[BLOCK_M, BLOCK_C]`` tiles with C contiguous (coalesced, vectorized loads); program id
  ``p * n_channel_blocks + cb``.

The innermost loop of stage 1 is ``tl.range(..., num_stages=STAGES)``: 1 (the default,
``CONFIG["reduce_stages"]``) compiles as a plain loop; 2 or 3 let Triton pipeline the
loads of the next tiles through shared memory (``cp.async`` on sm_80 and later), more
bytes in flight per program, the same arithmetic in the same order. The ``(M, C)``
kernels can also load two tiles before adding either (``UNROLL`` 2,
``CONFIG["reduce_unroll"]``): twice the bytes in flight in registers, for the loads only
(the accumulators stay one tile), the additions in the same order; a program's rows are
then a multiple of two tiles.

A program's ranges are whole multiples of its tile, so the only masks needed are
``row < N`` and ``col < L`` (or ``< C``): with L and C divisible by 16, Triton then still
proves 16-byte alignment and emits vector loads; a mask against a computed bound would
not.

Element offsets are int64. Row, column and tile indices are int32 unless the plan's
``I64`` flag (``_plans``: a kernel view whose indices, or a loop's last increment, could
pass 2^31 − 1) widens them: the common case compiles as it did.

Statistics: shifted sums, each lane of a tile around its own first value. A stage-1
program keeps its tile's lanes apart until its loop ends: lane ``i`` sums ``d = x − sᵢ``
and ``d²``, where its shift ``sᵢ`` is the first value it loads (its value in the program's
first tile; ``d`` is 0 there). A lane's ``kᵢ`` values (a few to a few hundred) then give
its mean and ``m2ᵢ = Σd² − Σd·mean_dᵢ``, exact to about ε·(1 + ((sᵢ−μᵢ)/σᵢ)²) relative, as
the shift is one of its own values. A far outlier spoils only the lane it shifts (whose
m2 it dominates anyway), where one shift per channel spoiled every value's d: a value of
3000 first in a channel of N(0, 1) put m2 6% off. The lanes then merge by Chan's formula
(:func:`_merge_lanes`), in the acc dtype around ``r``, the lanes' mean as that dtype
rounds it, so every deviation ``(sᵢ − r) + mean_dᵢ`` is small or exact; the program's
mean leaves relative to the channel's reference ``ref``, its first element
``x[0, c, 0]`` (``x[0, c]``; 0 if that is ±inf or NaN: :func:`_reference`), as ``(r − ref) + mean_d`` in float64. The partial is
``(count, mean_d, m2)`` with mean_d split in two acc-dtype values (hi + lo): around a
far-outlier reference a float32 mean_d would be rounded by more than the partial means
differ. Stage 2 merges the P partials with Chan's G-way formula (``ops.chan_combine``)
in float64: ``n = Σnᵢ``, ``mean_d = Σnᵢ·mean_dᵢ / n``, ``m2 = Σm2ᵢ + Σnᵢ·(mean_dᵢ −
mean_d)²``, then adds ``ref`` back. A constant channel gives d == 0 and r == ref == every
shift: mean == value and m2 == 0 exactly, up to float max. A large mean with
a small spread (1e6 and 1) stays exact to float32 rounding, as every shift is a value of
the data and the float64 mean keeps the digits a float32 one would round away.

The lane shifts cost a select per value and a tile of registers; the merge runs once per
program (three reductions where the float32 sums had two). Registers for sm_90 went from
about 64 to 102-125 per thread for the default stage-1 plans (``triton_notes.md``).
"""

import triton
import triton.language as tl

from ._activation import activation_backward

# Stage 1 of the statistics writes a partial as count, mean_d (hi, lo) and m2: [P, C] each.
STATS_PLANES = 4


@triton.jit
def _dz(dy, x, mu, inv, w, b, r, ACT: tl.constexpr, HAS_W: tl.constexpr,
        HAS_B: tl.constexpr, HAS_RES: tl.constexpr, slope_hi, slope_lo):
    """(x̂, dz = dy·act'(z)) of one tile, in the accumulation dtype."""
    xhat = (x - mu) * inv
    if ACT == 0:
        dz = dy
    else:
        z = xhat
        if HAS_W:
            z = z * w
        if HAS_B:
            z = z + b
        if HAS_RES:
            z = z + r
        dz = activation_backward(dy, z, ACT, slope_hi, slope_lo)
    return xhat, dz


# --------------------------------------------------------------------------------------
# Statistics, stage 1


@triton.jit
def _rect_ncl(pid, N, C, L, ROWS, COLS, P_L, I64: tl.constexpr):
    """An ``(N, C, L)`` stage-1 program's channel c, partial index p and rectangle
    ``[n0, n_end) x [l0, l_end)``. Indices are int32, or int64 with ``I64`` (the plan's
    flag, set where a row or column index, a loop's last increment or a program's count
    could pass 2^31 − 1): all the index arithmetic derived from p is then int64."""
    c = pid % C
    p = pid // C
    if I64:
        p = p.to(tl.int64)
    n0 = (p // P_L) * ROWS
    l0 = (p % P_L) * COLS
    return c, p, n0, tl.minimum(n0 + ROWS, N), l0, tl.minimum(l0 + COLS, L)


@triton.jit
def _rows_mc(pid, M, ROWS, NCB, I64: tl.constexpr):
    """An ``(M, C)`` stage-1 program's channel block cb, partial index p and rows
    ``[m0, m_end)``; int64 with ``I64`` as in :func:`_rect_ncl`."""
    cb = pid % NCB
    p = pid // NCB
    if I64:
        p = p.to(tl.int64)
    m0 = p * ROWS
    return cb, p, m0, tl.minimum(m0 + ROWS, M)


@triton.jit
def _lane_counts(extent, r, BLOCK: tl.constexpr):
    """How many values lane ``r`` of a tile axis sees over a program's range of
    ``extent`` along it (a whole number of tiles, or cut at the tensor's end)."""
    return (tl.maximum(extent - r, 0) + BLOCK - 1) // BLOCK


@triton.jit
def _sum_lanes(t, ALL: tl.constexpr):
    """A tile's sum over its rows, per column; over everything with ``ALL``."""
    if ALL:
        r = tl.sum(t)
    else:
        r = tl.sum(t, axis=0)
    return r


@triton.jit
def _per_lane(v, ALL: tl.constexpr):
    """A result of :func:`_sum_lanes` shaped to broadcast against the tile."""
    if ALL:
        r = v
    else:
        r = v[None, :]
    return r


@triton.jit
def _reference(first):
    """A channel's reference (float64) from its first value: that value, or 0 where it is
    ±inf or NaN (every r − ref was then inf − inf: a NaN mean where torch's is ±inf)."""
    return tl.where(first - first == 0, first, 0.0)


@triton.jit
def _merge_lanes(s, q, lane_shift, k, ref, n, ALL: tl.constexpr):
    """A program's ``(mean − ref, m2)`` from its lanes' shifted sums ``s``, ``q`` around
    ``lane_shift``, with ``k`` values each (0: a lane past the tensor's end); per column,
    or over the whole tile with ``ALL``. ``ref`` (a value of the data, float64)
    broadcasts as the result does.

    Chan's merge in the acc dtype around ``r``, the lanes' mean as that dtype rounds it,
    so each lane's deviation ``(shift − r) + mean_dᵢ`` is small, or exact where shift and
    r are close (a large mean); only ``r − ref`` goes to float64. r is formed as ref plus
    the k/n-weighted offsets of the lanes from it, never as Σk·x / n, which overflows
    past float max / n: a constant channel gets r == ref exactly, so every deviation is
    0 and the mean exact, m2 0. Then two sweeps, the mean of the deviations and their
    spread around it, as ``_merge`` does. A channel with an infinite value has r = ±inf
    and NaN deviations: its mean is r (torch's), its m2 NaN."""
    has = k > 0
    k = k.to(s.dtype)
    # a lane whose shift is ±inf summed inf − inf: its mean is the shift itself
    lane_mean_d = tl.where(lane_shift - lane_shift == 0, s / tl.where(has, k, 1.0), 0.0)
    lane_m2 = tl.maximum(q - s * lane_mean_d, 0.0)
    ref_acc = ref.to(s.dtype)  # exact: ref was loaded from x
    r = ref_acc + _sum_lanes((k / n) * ((lane_shift - _per_lane(ref_acc, ALL))
                                        + lane_mean_d), ALL)
    dev = tl.where(has, (lane_shift - _per_lane(r, ALL)) + lane_mean_d, 0.0)
    mean_d = _sum_lanes(k * dev, ALL) / n  # |dev| ~ σ: n·|dev| overflows only with m2
    dev = dev - _per_lane(mean_d, ALL)
    m2 = _sum_lanes(tl.where(has, lane_m2 + k * dev * dev, 0.0), ALL)
    mean_d = tl.where(r - r == 0, mean_d, 0.0)  # r infinite (or NaN): the mean is r
    return (r.to(tl.float64) - ref) + mean_d.to(tl.float64), m2


@triton.jit
def _store_stats_partial(part_ptr, PC, out, n, mean_d, m2, mask):
    """A partial into the four planes of ``part``: count, mean_d as hi + lo, m2."""
    acc_ty = part_ptr.dtype.element_ty
    hi = mean_d.to(acc_ty)
    tl.store(part_ptr + out, n.to(acc_ty), mask=mask)
    tl.store(part_ptr + PC + out, hi, mask=mask)
    lo = tl.where(hi - hi == 0, mean_d - hi.to(tl.float64), 0.0)  # inf: no inf − inf
    # plane k at part_ptr + PC + ... + PC: a pointer plus int32 sizes is formed in 64
    # bits, where k * PC in int32 would wrap from PC >= 2^31 / k (C = 8e8 channels)
    tl.store(part_ptr + PC + PC + out, lo.to(acc_ty), mask=mask)
    tl.store(part_ptr + PC + PC + PC + out, m2.to(acc_ty), mask=mask)


@triton.jit
def stats_partial_ncl(x_ptr, part_ptr, N, C, L, ROWS, COLS, P_L, PC,
                      BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, STAGES: tl.constexpr,
                      I64: tl.constexpr):
    c, p, n0, n_end, l0, l_end = _rect_ncl(tl.program_id(0), N, C, L, ROWS, COLS, P_L, I64)
    acc_ty = part_ptr.dtype.element_ty
    ref = _reference(tl.load(x_ptr + c.to(tl.int64) * L).to(tl.float64))
    rn = tl.arange(0, BLOCK_N)
    rl = tl.arange(0, BLOCK_L)
    lane_shift = tl.zeros([BLOCK_N, BLOCK_L], dtype=acc_ty)
    s = tl.zeros([BLOCK_N, BLOCK_L], dtype=acc_ty)
    q = tl.zeros([BLOCK_N, BLOCK_L], dtype=acc_ty)
    for nb in range(n0, n_end, BLOCK_N):
        rows = nb + rn
        row_off = (rows.to(tl.int64) * C + c) * L
        for lb in tl.range(l0, l_end, BLOCK_L, num_stages=STAGES):
            cols = lb + rl
            mask = (rows < N)[:, None] & (cols < L)[None, :]
            v = tl.load(x_ptr + row_off[:, None] + cols[None, :], mask=mask,
                        other=0.0).to(acc_ty)
            lane_shift = tl.where((nb == n0) & (lb == l0), v, lane_shift)
            d = tl.where(mask, v - lane_shift, 0.0)
            s += d
            q += d * d
    k = (_lane_counts(n_end - n0, rn, BLOCK_N)[:, None]
         * _lane_counts(l_end - l0, rl, BLOCK_L)[None, :])
    n = ((n_end - n0) * (l_end - l0)).to(acc_ty)
    mean_d, m2 = _merge_lanes(s, q, lane_shift, k, ref, n, True)
    _store_stats_partial(part_ptr, PC, p * C + c, n, mean_d, m2, True)


@triton.jit
def _tile_mc(x_ptr, rows, cols, cmask, M, C):
    """One [rows, cols] tile of an (M, C) tensor as stored (0 where masked), and its mask."""
    mask = (rows < M)[:, None] & cmask[None, :]
    v = tl.load(x_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=mask, other=0.0)
    return v, mask


@triton.jit
def stats_partial_mc(x_ptr, part_ptr, M, C, ROWS, NCB, PC,
                     BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, STAGES: tl.constexpr,
                     UNROLL: tl.constexpr, I64: tl.constexpr):
    cb, p, m0, m_end = _rows_mc(tl.program_id(0), M, ROWS, NCB, I64)
    acc_ty = part_ptr.dtype.element_ty
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    ref = _reference(tl.load(x_ptr + cols, mask=cmask, other=0.0).to(tl.float64))
    rm = tl.arange(0, BLOCK_M)
    lane_shift = tl.zeros([BLOCK_M, BLOCK_C], dtype=acc_ty)
    s = tl.zeros([BLOCK_M, BLOCK_C], dtype=acc_ty)
    q = tl.zeros([BLOCK_M, BLOCK_C], dtype=acc_ty)
    for mb in tl.range(m0, m_end, BLOCK_M * UNROLL, num_stages=STAGES):
        v, mask = _tile_mc(x_ptr, mb + rm, cols, cmask, M, C)
        if UNROLL == 2:  # the second tile's load issued before the first tile's additions
            v2, mask2 = _tile_mc(x_ptr, mb + BLOCK_M + rm, cols, cmask, M, C)
        v = v.to(acc_ty)
        lane_shift = tl.where(mb == m0, v, lane_shift)
        d = tl.where(mask, v - lane_shift, 0.0)
        s += d
        q += d * d
        if UNROLL == 2:
            d = tl.where(mask2, v2.to(acc_ty) - lane_shift, 0.0)
            s += d
            q += d * d
    k = _lane_counts(m_end - m0, rm, BLOCK_M)[:, None] + tl.zeros([BLOCK_M, BLOCK_C], tl.int32)
    k = tl.where(cmask[None, :], k, 0)
    n = (m_end - m0).to(acc_ty)
    mean_d, m2 = _merge_lanes(s, q, lane_shift, k, ref, n, False)
    _store_stats_partial(part_ptr, PC, p * C + cols, tl.zeros([BLOCK_C], acc_ty) + n,
                         mean_d, m2, cmask)


# --------------------------------------------------------------------------------------
# Statistics, stage 2


@triton.jit
def _merge(x_ptr, part_ptr, P, C, SHIFT_STRIDE, PC, cols, cmask, mean_ty: tl.constexpr,
           BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, CACHE: tl.constexpr):
    """Chan's G-way merge of the P partials of the channels ``cols`` in float64, then the
    reference added back: ``(mean in mean_ty, m2 in the acc dtype)``.

    Two sweeps over the partials (they are small): the merged mean first, then the
    deviations of the partial means from it, so no raw second moment appears.
    """
    acc_ty = part_ptr.dtype.element_ty
    rp = tl.arange(0, BLOCK_P)
    tot = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float64)
    wsum = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float64)
    for p0 in range(0, P, BLOCK_P):
        n, mu, _, _ = _load_stats_partials(part_ptr, PC, p0 + rp, P, C, cols, cmask, False,
                                           CACHE)
        tot += n
        wsum += n * mu
    total = tl.sum(tot, axis=0)
    mean_d = tl.sum(wsum, axis=0) / tl.where(total > 0, total, 1.0)
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float64)
    for p0 in range(0, P, BLOCK_P):
        n, mu, m2, _ = _load_stats_partials(part_ptr, PC, p0 + rp, P, C, cols, cmask, True,
                                            CACHE)
        dev = mu - mean_d[None, :]
        acc += m2 + n * dev * dev
    # The mean leaves in mean_ty (float64: see portable.mean_dtype): ref is a value of the
    # data and mean_d is small, so their sum there keeps the large-mean digits a float32
    # mean would round away.
    ref = _reference(tl.load(x_ptr + cols.to(tl.int64) * SHIFT_STRIDE, mask=cmask,
                             other=0.0).to(tl.float64))
    return (ref + mean_d).to(mean_ty), tl.sum(acc, axis=0).to(acc_ty)


@triton.jit
def _load_stats_partials(part_ptr, PC, rows, P, C, cols, cmask, WITH_M2: tl.constexpr,
                         CACHE: tl.constexpr):
    """Partials ``rows`` of the channels ``cols`` in float64: (count, mean_d, m2 or 0,
    mask); 0 where masked. ``CACHE``: tl.load's cache modifier ("" or ".cg")."""
    mask = (rows < P)[:, None] & cmask[None, :]
    off = rows[:, None] * C + cols[None, :]
    n = tl.load(part_ptr + off, mask=mask, other=0.0, cache_modifier=CACHE).to(tl.float64)
    mu = (tl.load(part_ptr + PC + off, mask=mask, other=0.0,
                  cache_modifier=CACHE).to(tl.float64)
          + tl.load(part_ptr + PC + PC + off, mask=mask, other=0.0,  # (see _store_stats_partial)
                    cache_modifier=CACHE).to(tl.float64))
    m2 = 0.0
    if WITH_M2:
        m2 = tl.load(part_ptr + PC + PC + PC + off, mask=mask, other=0.0,
                     cache_modifier=CACHE).to(tl.float64)
    return n, mu, m2, mask


@triton.jit
def stats_merge(x_ptr, part_ptr, mean_ptr, m2_ptr, P, C, SHIFT_STRIDE, PC,
                BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Stage 2 of ``stats``: :func:`_merge` for a block of channels."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean, m2 = _merge(x_ptr, part_ptr, P, C, SHIFT_STRIDE, PC, cols, cmask,
                      mean_ptr.dtype.element_ty, BLOCK_P, BLOCK_C, "")
    tl.store(mean_ptr + cols, mean, mask=cmask)
    tl.store(m2_ptr + cols, m2, mask=cmask)


# --------------------------------------------------------------------------------------
# Backward reduction: Σdz and Σdz·x̂ per channel (the bias and weight gradients)


@triton.jit
def backward_partial_ncl(dy_ptr, x_ptr, r_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, part_ptr,
                         N, C, L, ROWS, COLS, P_L, PC, slope_hi, slope_lo,
                         ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                         HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
                         STAGES: tl.constexpr, I64: tl.constexpr):
    c, p, n0, n_end, l0, l_end = _rect_ncl(tl.program_id(0), N, C, L, ROWS, COLS, P_L, I64)
    psdz_ptr, psdzx_ptr = part_ptr, part_ptr + PC
    acc_ty = part_ptr.dtype.element_ty
    mu = tl.load(mean_ptr + c)
    inv = tl.load(invstd_ptr + c)
    w = 1.0
    b = 0.0
    if HAS_W:
        w = tl.load(w_ptr + c).to(acc_ty)
    if HAS_B:
        b = tl.load(b_ptr + c).to(acc_ty)
    rn = tl.arange(0, BLOCK_N)
    rl = tl.arange(0, BLOCK_L)
    sdz = tl.zeros([BLOCK_N, BLOCK_L], dtype=acc_ty)
    sdzx = tl.zeros([BLOCK_N, BLOCK_L], dtype=acc_ty)
    for nb in range(n0, n_end, BLOCK_N):
        rows = nb + rn
        row_off = (rows.to(tl.int64) * C + c) * L
        for lb in tl.range(l0, l_end, BLOCK_L, num_stages=STAGES):
            cols = lb + rl
            mask = (rows < N)[:, None] & (cols < L)[None, :]
            off = row_off[:, None] + cols[None, :]
            xv = tl.load(x_ptr + off, mask=mask, other=0.0).to(acc_ty)
            dyv = tl.load(dy_ptr + off, mask=mask, other=0.0).to(acc_ty)
            if HAS_RES:
                rv = tl.load(r_ptr + off, mask=mask, other=0.0).to(acc_ty)
            else:
                rv = 0.0
            xhat, dz = _dz(dyv, xv, mu, inv, w, b, rv, ACT, HAS_W, HAS_B, HAS_RES,
                           slope_hi, slope_lo)
            dz = tl.where(mask, dz, 0.0)
            sdz += dz
            # a padding lane's x̂ is (0 − mean)·invstd: ±inf for an infinite mean, and
            # 0·inf would make the channel's sum NaN
            sdzx += tl.where(mask, dz * xhat, 0.0)
    out = p * C + c
    tl.store(psdz_ptr + out, tl.sum(tl.sum(sdz, axis=1), axis=0))
    tl.store(psdzx_ptr + out, tl.sum(tl.sum(sdzx, axis=1), axis=0))


@triton.jit
def _backward_tile(dy_ptr, x_ptr, r_ptr, rows, cols, cmask, M, C, acc_ty: tl.constexpr,
                   HAS_RES: tl.constexpr):
    """x, dy and the residual (0.0 without one) of one [rows, cols] tile in the
    accumulation dtype, and its mask."""
    xv, mask = _tile_mc(x_ptr, rows, cols, cmask, M, C)
    dyv, _ = _tile_mc(dy_ptr, rows, cols, cmask, M, C)
    rv = 0.0
    if HAS_RES:
        rv = _tile_mc(r_ptr, rows, cols, cmask, M, C)[0].to(acc_ty)
    return xv.to(acc_ty), dyv.to(acc_ty), rv, mask


@triton.jit
def backward_partial_mc(dy_ptr, x_ptr, r_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, part_ptr,
                        M, C, ROWS, NCB, PC, slope_hi, slope_lo,
                        ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                        HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                        STAGES: tl.constexpr, UNROLL: tl.constexpr, I64: tl.constexpr):
    cb, p, m0, m_end = _rows_mc(tl.program_id(0), M, ROWS, NCB, I64)
    psdz_ptr, psdzx_ptr = part_ptr, part_ptr + PC
    acc_ty = part_ptr.dtype.element_ty
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mu = tl.load(mean_ptr + cols, mask=cmask, other=0.0)[None, :]
    inv = tl.load(invstd_ptr + cols, mask=cmask, other=0.0)[None, :]
    w = 1.0
    b = 0.0
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(acc_ty)[None, :]
    if HAS_B:
        b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(acc_ty)[None, :]
    rm = tl.arange(0, BLOCK_M)
    sdz = tl.zeros([BLOCK_M, BLOCK_C], dtype=acc_ty)
    sdzx = tl.zeros([BLOCK_M, BLOCK_C], dtype=acc_ty)
    for mb in tl.range(m0, m_end, BLOCK_M * UNROLL, num_stages=STAGES):
        xv, dyv, rv, mask = _backward_tile(dy_ptr, x_ptr, r_ptr, mb + rm, cols, cmask, M, C,
                                           acc_ty, HAS_RES)
        if UNROLL == 2:  # the second tile's loads issued before the first tile's additions
            xv2, dyv2, rv2, mask2 = _backward_tile(dy_ptr, x_ptr, r_ptr, mb + BLOCK_M + rm,
                                                   cols, cmask, M, C, acc_ty, HAS_RES)
        xhat, dz = _dz(dyv, xv, mu, inv, w, b, rv, ACT, HAS_W, HAS_B, HAS_RES, slope_hi,
                       slope_lo)
        dz = tl.where(mask, dz, 0.0)
        sdz += dz
        sdzx += tl.where(mask, dz * xhat, 0.0)  # (a padding lane: see the NCL kernel)
        if UNROLL == 2:
            xhat, dz = _dz(dyv2, xv2, mu, inv, w, b, rv2, ACT, HAS_W, HAS_B, HAS_RES,
                           slope_hi, slope_lo)
            dz = tl.where(mask2, dz, 0.0)
            sdz += dz
            sdzx += tl.where(mask2, dz * xhat, 0.0)
    out = p * C + cols
    tl.store(psdz_ptr + out, tl.sum(sdz, axis=0), mask=cmask)
    tl.store(psdzx_ptr + out, tl.sum(sdzx, axis=0), mask=cmask)


@triton.jit
def _column_sums(part_ptr, P, C, PC, cols, cmask, BLOCK_P: tl.constexpr,
                 BLOCK_C: tl.constexpr, CACHE: tl.constexpr):
    """Sums over the P rows of the two ``[P, C]`` planes of ``part`` for the channels
    ``cols``, in a fixed order (deterministic)."""
    pa_ptr, pb_ptr = part_ptr, part_ptr + PC
    acc_ty = part_ptr.dtype.element_ty
    rp = tl.arange(0, BLOCK_P)
    sa = tl.zeros([BLOCK_P, BLOCK_C], dtype=acc_ty)
    sb = tl.zeros([BLOCK_P, BLOCK_C], dtype=acc_ty)
    for p0 in range(0, P, BLOCK_P):
        rows = p0 + rp
        mask = (rows < P)[:, None] & cmask[None, :]
        off = rows[:, None] * C + cols[None, :]
        sa += tl.load(pa_ptr + off, mask=mask, other=0.0, cache_modifier=CACHE)
        sb += tl.load(pb_ptr + off, mask=mask, other=0.0, cache_modifier=CACHE)
    return tl.sum(sa, axis=0), tl.sum(sb, axis=0)


@triton.jit
def sum_partials(part_ptr, a_ptr, b_ptr, P, C, PC, BLOCK_P: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    """Column sums of the two ``[P, C]`` planes of ``part`` (:func:`_column_sums`)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    sa, sb = _column_sums(part_ptr, P, C, PC, cols, cmask, BLOCK_P, BLOCK_C, "")
    tl.store(a_ptr + cols, sa, mask=cmask)
    tl.store(b_ptr + cols, sb, mask=cmask)


@triton.jit
def stats_finalize(x_ptr, part_ptr, mean_ptr, var_ptr, coef_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr,
                   nbt_ptr, P, C, SHIFT_STRIDE, PC, count, eps_hi, eps_lo, bessel_hi,
                   bessel_lo, momentum_hi, momentum_lo, HAS_W: tl.constexpr,
                   HAS_B: tl.constexpr, F64: tl.constexpr, UPDATE: tl.constexpr,
                   HAS_NBT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """:func:`_merge`, then the C-sized math of ``ops._forward_by_primitives`` in the same
    program, so a training forward is three launches instead of a dozen:
    var = m2 / count, invstd = 1/√(var + eps) (0 where var + eps == 0), and
    ``ops.centre_for_kernels``: mean_k = acc(mean), shift = (mean − mean_k)·invstd,
    bias_k = bias − weight·shift. Divisions and the square root are IEEE-rounded
    (div_rn, sqrt_rn), as torch's are; float64 inputs give shift == 0, bias_k == bias.
    ``coef`` gets the four [C] rows of :func:`prepare` (mean_k, invstd, bias_k, shift),
    which the backward then reads instead of recomputing them.

    With ``UPDATE`` the running statistics move towards the batch's here as in
    :func:`running_update`, with a fixed momentum (the cumulative average needs the
    incremented num_batches_tracked in every program: :func:`running_update` does it);
    program 0 increments num_batches_tracked, which no program reads."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    _finalize(x_ptr, part_ptr, mean_ptr, var_ptr, coef_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr,
              nbt_ptr, P, C, SHIFT_STRIDE, PC, count, eps_hi, eps_lo, bessel_hi, bessel_lo,
              momentum_hi, momentum_lo, cols, tl.program_id(0) == 0, HAS_W, HAS_B, F64,
              UPDATE, HAS_NBT, BLOCK_P, BLOCK_C, "")


@triton.jit
def _finalize(x_ptr, part_ptr, mean_ptr, var_ptr, coef_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr,
              nbt_ptr, P, C, SHIFT_STRIDE, PC, count, eps_hi, eps_lo, bessel_hi, bessel_lo,
              momentum_hi, momentum_lo, cols, count_batch, HAS_W: tl.constexpr,
              HAS_B: tl.constexpr, F64: tl.constexpr, UPDATE: tl.constexpr,
              HAS_NBT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
              CACHE: tl.constexpr):
    """:func:`stats_finalize` for the channels ``cols``; ``count_batch``: this program
    increments num_batches_tracked (one program of the launch)."""
    acc_ty = part_ptr.dtype.element_ty
    cmask = cols < C
    mean, m2 = _merge(x_ptr, part_ptr, P, C, SHIFT_STRIDE, PC, cols, cmask,
                      mean_ptr.dtype.element_ty, BLOCK_P, BLOCK_C, CACHE)
    count_f = tl.maximum(tl.zeros_like(m2) + count, 1.0)
    if F64:  # float64 division and square root are IEEE-rounded already
        var = m2 / count_f
    else:
        var = tl.math.div_rn(m2, count_f)
    tl.store(mean_ptr + cols, mean, mask=cmask)
    tl.store(var_ptr + cols, var, mask=cmask)
    _store_coefficients(coef_ptr, cols, cmask, C, mean, var, w_ptr, b_ptr, eps_hi, eps_lo,
                        acc_ty, HAS_W, HAS_B, F64)
    if UPDATE:
        if HAS_NBT:
            if count_batch:
                tl.store(nbt_ptr, tl.load(nbt_ptr) + 1)
        factor = tl.zeros([BLOCK_C], dtype=tl.float64) + momentum_hi + momentum_lo
        bessel = tl.zeros([BLOCK_C], dtype=tl.float64) + bessel_hi + bessel_lo
        _running_step(rm_ptr, rv_ptr, cols, cmask, mean, var, factor, bessel)


@triton.jit
def _invstd(var, eps_hi, eps_lo, F64: tl.constexpr):
    """``ops.invstd_from_var``: 1/√(var + eps), 0 where var + eps == 0 (NaN where it is
    negative or NaN), IEEE-rounded."""
    v = (var + eps_hi) + eps_lo
    zero = v == 0
    v = tl.where(zero, 1.0, v)
    if F64:
        r = 1.0 / tl.sqrt(v)
    else:
        r = tl.math.div_rn(tl.zeros_like(v) + 1.0, tl.math.sqrt_rn(v))
    return tl.where(zero, 0.0, r)


@triton.jit
def _store_coefficients(out_ptr, cols, cmask, C, mean, var, w_ptr, b_ptr, eps_hi, eps_lo,
                        acc_ty: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                        F64: tl.constexpr):
    """The four [C] rows the elementwise kernels and the backward merge read, from the
    (float64) mean and the biased var: mean_k = acc(mean), invstd, bias_k = bias −
    weight·shift and shift = (mean − mean_k)·invstd (``ops.centre_for_kernels``)."""
    invstd = _invstd(var.to(acc_ty), eps_hi, eps_lo, F64)
    mean_k = mean.to(acc_ty)
    # an infinite mean is its own rounding: inf − inf would make every z NaN, where
    # torch's evaluation gives ±inf (a float16 running mean that overflowed)
    rest = mean - mean_k.to(mean.dtype)
    shift = tl.where(rest - rest == 0, rest, 0.0).to(acc_ty) * invstd
    centre = shift
    if HAS_W:
        centre = shift * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(acc_ty)
    bias_k = -centre
    if HAS_B:
        bias_k = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(acc_ty) - centre
    tl.store(out_ptr + cols, mean_k, mask=cmask)
    tl.store(out_ptr + C + cols, invstd, mask=cmask)
    tl.store(out_ptr + C + C + cols, bias_k, mask=cmask)  # (2 * C could wrap: see
    tl.store(out_ptr + C + C + C + cols, shift, mask=cmask)  # _store_stats_partial)


@triton.jit
def prepare(mean_ptr, var_ptr, w_ptr, b_ptr, out_ptr, mean_out_ptr, var_out_ptr, C, eps_hi,
            eps_lo, HAS_W: tl.constexpr, HAS_B: tl.constexpr, F64: tl.constexpr,
            COPY: tl.constexpr, BLOCK_C: tl.constexpr):
    """The C-sized prologue of the backward (invstd and the centring that
    ``ops._kernel_view_backward`` computes) and of the evaluation forward, in one launch,
    from a saved (or running) mean and var (see :func:`_store_coefficients`). ``out``
    gets the four [C] rows mean_k, invstd, bias_k, shift; with ``COPY`` (evaluation: the statistics are the
    running buffers) ``mean_out`` and ``var_out`` get copies of them as ops makes them:
    the var in the acc dtype, the mean in ``mean_out``'s (a float64 running mean stays
    float64, and is split for the kernels as the batch mean is). (The custom op
    ``batchnorm::batch_norm`` returns those two: they may not share storage.)"""
    acc_ty = out_ptr.dtype.element_ty
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
    var = tl.load(var_ptr + cols, mask=cmask, other=1.0).to(acc_ty)
    if COPY:
        tl.store(mean_out_ptr + cols, mean.to(mean_out_ptr.dtype.element_ty), mask=cmask)
        tl.store(var_out_ptr + cols, var, mask=cmask)
    _store_coefficients(out_ptr, cols, cmask, C, mean, var, w_ptr, b_ptr, eps_hi, eps_lo,
                        acc_ty, HAS_W, HAS_B, F64)


@triton.jit
def sum_partials_centred(part_ptr, shift_ptr, sdz_ptr, sdzx_ptr, sdz_k_ptr, P, C, PC,
                         BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """``sum_partials``, then the shift corrections of ``ops.backward_by_primitives``: the
    kernels' x̂' is x̂ + shift, so S = Σdz·x̂ = Σdz·x̂' − shift·Σdz, and the elementwise
    pass gets Σdz − shift·S in place of Σdz. No correction of S where Σdz is not finite,
    nor of Σdz where S is not (``ops.sum_dz_xhat_from_kernels``, ``sum_dz_for_kernels``)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    _sums_centred(part_ptr, shift_ptr, sdz_ptr, sdzx_ptr, sdz_k_ptr, P, C, PC, cols, BLOCK_P,
                  BLOCK_C, "")


@triton.jit
def _sums_centred(part_ptr, shift_ptr, sdz_ptr, sdzx_ptr, sdz_k_ptr, P, C, PC, cols,
                  BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, CACHE: tl.constexpr):
    """:func:`sum_partials_centred` for the channels ``cols``."""
    cmask = cols < C
    sdz, sdzx_k = _column_sums(part_ptr, P, C, PC, cols, cmask, BLOCK_P, BLOCK_C, CACHE)
    shift = tl.load(shift_ptr + cols, mask=cmask, other=0.0)
    s = sdzx_k - tl.where(sdz - sdz == 0, shift * sdz, 0.0)
    tl.store(sdz_ptr + cols, sdz, mask=cmask)
    tl.store(sdzx_ptr + cols, s, mask=cmask)
    tl.store(sdz_k_ptr + cols, sdz - tl.where(s - s == 0, shift * s, 0.0), mask=cmask)


@triton.jit
def _running_step(rm_ptr, rv_ptr, cols, cmask, mean, var, factor, bessel):
    """running = batch·m + running·(1 − m) for the channels ``cols``, the variance
    unbiased by ``bessel`` = count/(count − 1); the arithmetic in the batch statistics'
    dtypes, or float64 for a float64 running statistic (a float32 batch variance would
    round its digits: one with momentum 0 moved), m and bessel float64 vectors."""
    mean_ty = mean.dtype
    if rm_ptr.dtype.element_ty == tl.float64:
        mean_ty = tl.float64
    var_ty = var.dtype
    if rv_ptr.dtype.element_ty == tl.float64:
        var_ty = tl.float64
    rm = tl.load(rm_ptr + cols, mask=cmask, other=0.0)
    new_mean = (mean.to(mean_ty) * factor.to(mean_ty)
                + rm.to(mean_ty) * (1.0 - factor).to(mean_ty))
    tl.store(rm_ptr + cols, new_mean.to(rm_ptr.dtype.element_ty), mask=cmask)
    rv = tl.load(rv_ptr + cols, mask=cmask, other=0.0)
    new_var = (var.to(var_ty) * bessel.to(var_ty) * factor.to(var_ty)
               + rv.to(var_ty) * (1.0 - factor).to(var_ty))
    tl.store(rv_ptr + cols, new_var.to(rv_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def running_update(rm_ptr, rv_ptr, nbt_ptr, mean_ptr, var_ptr, C, bessel_hi, bessel_lo,
                   momentum_hi, momentum_lo, HAS_NBT: tl.constexpr, CUMULATIVE: tl.constexpr,
                   BLOCK_C: tl.constexpr):
    """``ops._update_running_stats_torch`` in one launch of one program (C-sized work; a
    single program, so that reading and incrementing num_batches_tracked needs no
    ordering between programs): :func:`_running_step` with m = momentum or
    1/num_batches_tracked."""
    if HAS_NBT:
        n = tl.load(nbt_ptr) + 1
        # Every thread loads the counter and thread 0 alone stores it (the PTX of sm_90):
        # without the barrier a late warp could read the incremented value.
        tl.debug_barrier()
        tl.store(nbt_ptr, n)
    # as a float64 vector: a runtime float is float32 on the GPU, a Python float in the
    # interpreter, and neither has .to()
    factor = tl.zeros([BLOCK_C], dtype=tl.float64)
    if CUMULATIVE:
        factor += 1.0 / n.to(tl.float64)
    else:
        factor = factor + momentum_hi + momentum_lo
    # count/(count − 1) arrives as two float32 halves too: one float32 would cost float64
    # buffers 1e-8 of relative error (seen on an H200: running_var off in float64)
    bessel = tl.zeros([BLOCK_C], dtype=tl.float64) + bessel_hi + bessel_lo
    offs = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs
        cmask = cols < C
        mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
        var = tl.load(var_ptr + cols, mask=cmask, other=0.0)
        _running_step(rm_ptr, rv_ptr, cols, cmask, mean, var, factor, bessel)


# --------------------------------------------------------------------------------------
# Stage 1 and stage 2 in one launch: the last program of a channel block merges


@triton.jit
def _last_of_block(count_ptr, block, programs):
    """Whether this program is the last of its block's ``programs`` stage-1 programs to
    have stored its partials (then it merges them, and puts the block's counter back to 0
    for the next launch on this stream).

    The barrier makes every thread's stores precede the ticket, and the ticket is an
    acquire-release atomic at GPU scope: the last program's later loads see every other
    program's partials (they go through L2, ``CACHE=".cg"``: this SM's L1 may hold lines
    of the buffer that an earlier merge on it read before they were written). The merge
    itself walks the partials in a fixed order, whichever program comes last: the bits
    depend on the plan alone, as with the separate launch."""
    tl.debug_barrier()
    ticket = tl.atomic_add(count_ptr + block, 1, sem="acq_rel", scope="gpu")
    return ticket == programs - 1


@triton.jit
def stats_fused_ncl(x_ptr, part_ptr, count_ptr, mean_ptr, var_ptr, coef_ptr, w_ptr, b_ptr,
                    rm_ptr, rv_ptr, nbt_ptr, N, C, L, ROWS, COLS, P_L, P, PC, count, eps_hi,
                    eps_lo, bessel_hi, bessel_lo, momentum_hi, momentum_lo,
                    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, STAGES: tl.constexpr,
                    I64: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                    F64: tl.constexpr, UPDATE: tl.constexpr, HAS_NBT: tl.constexpr,
                    MERGE_P: tl.constexpr):
    """:func:`stats_partial_ncl`, then :func:`stats_finalize` of its channel by the last
    of the channel's P programs."""
    stats_partial_ncl(x_ptr, part_ptr, N, C, L, ROWS, COLS, P_L, PC, BLOCK_N, BLOCK_L,
                      STAGES, I64)
    c = tl.program_id(0) % C  # its channel (see _rect_ncl)
    if _last_of_block(count_ptr, c, P):
        _finalize(x_ptr, part_ptr, mean_ptr, var_ptr, coef_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr,
                  nbt_ptr, P, C, L, PC, count, eps_hi, eps_lo, bessel_hi, bessel_lo,
                  momentum_hi, momentum_lo, c + tl.arange(0, 1), c == 0, HAS_W, HAS_B, F64,
                  UPDATE, HAS_NBT, MERGE_P, 1, ".cg")
        tl.store(count_ptr + c, 0)


@triton.jit
def stats_fused_mc(x_ptr, part_ptr, count_ptr, mean_ptr, var_ptr, coef_ptr, w_ptr, b_ptr,
                   rm_ptr, rv_ptr, nbt_ptr, M, C, ROWS, NCB, P, PC, count, eps_hi, eps_lo,
                   bessel_hi, bessel_lo, momentum_hi, momentum_lo,
                   BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, STAGES: tl.constexpr,
                   UNROLL: tl.constexpr, I64: tl.constexpr, HAS_W: tl.constexpr,
                   HAS_B: tl.constexpr, F64: tl.constexpr, UPDATE: tl.constexpr,
                   HAS_NBT: tl.constexpr, MERGE_P: tl.constexpr):
    """:func:`stats_partial_mc`, then :func:`stats_finalize` of its channel block by the
    last of the block's P programs."""
    stats_partial_mc(x_ptr, part_ptr, M, C, ROWS, NCB, PC, BLOCK_M, BLOCK_C, STAGES, UNROLL,
                     I64)
    cb = tl.program_id(0) % NCB  # its channel block (see _rows_mc)
    if _last_of_block(count_ptr, cb, P):
        _finalize(x_ptr, part_ptr, mean_ptr, var_ptr, coef_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr,
                  nbt_ptr, P, C, 1, PC, count, eps_hi, eps_lo, bessel_hi, bessel_lo,
                  momentum_hi, momentum_lo, cb * BLOCK_C + tl.arange(0, BLOCK_C), cb == 0,
                  HAS_W, HAS_B, F64, UPDATE, HAS_NBT, MERGE_P, BLOCK_C, ".cg")
        tl.store(count_ptr + cb, 0)


@triton.jit
def backward_fused_ncl(dy_ptr, x_ptr, r_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, part_ptr,
                       count_ptr, shift_ptr, sdz_ptr, sdzx_ptr, sdz_k_ptr, N, C, L, ROWS, COLS,
                       P_L, P, PC, slope_hi, slope_lo,
                       ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                       HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
                       STAGES: tl.constexpr, I64: tl.constexpr, MERGE_P: tl.constexpr):
    """:func:`backward_partial_ncl`, then :func:`sum_partials_centred` of its channel by
    the last of the channel's P programs."""
    backward_partial_ncl(dy_ptr, x_ptr, r_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, part_ptr,
                         N, C, L, ROWS, COLS, P_L, PC, slope_hi, slope_lo, ACT, HAS_W, HAS_B,
                         HAS_RES, BLOCK_N, BLOCK_L, STAGES, I64)
    c = tl.program_id(0) % C
    if _last_of_block(count_ptr, c, P):
        _sums_centred(part_ptr, shift_ptr, sdz_ptr, sdzx_ptr, sdz_k_ptr, P, C, PC,
                      c + tl.arange(0, 1), MERGE_P, 1, ".cg")
        tl.store(count_ptr + c, 0)


@triton.jit
def backward_fused_mc(dy_ptr, x_ptr, r_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, part_ptr,
                      count_ptr, shift_ptr, sdz_ptr, sdzx_ptr, sdz_k_ptr, M, C, ROWS, NCB, P,
                      PC, slope_hi, slope_lo,
                      ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                      HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                      STAGES: tl.constexpr, UNROLL: tl.constexpr, I64: tl.constexpr,
                      MERGE_P: tl.constexpr):
    """:func:`backward_partial_mc`, then :func:`sum_partials_centred` of its channel block
    by the last of the block's P programs."""
    backward_partial_mc(dy_ptr, x_ptr, r_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, part_ptr,
                        M, C, ROWS, NCB, PC, slope_hi, slope_lo, ACT, HAS_W, HAS_B, HAS_RES,
                        BLOCK_M, BLOCK_C, STAGES, UNROLL, I64)
    cb = tl.program_id(0) % NCB
    if _last_of_block(count_ptr, cb, P):
        _sums_centred(part_ptr, shift_ptr, sdz_ptr, sdzx_ptr, sdz_k_ptr, P, C, PC,
                      cb * BLOCK_C + tl.arange(0, BLOCK_C), MERGE_P, BLOCK_C, ".cg")
        tl.store(count_ptr + cb, 0)
