r"""Numba kernels of the CPU backend: statistics, fused normalize, and the two backward passes.

Every kernel sees a *kernel view* (``backends/portable.py``): ``(N, C, L)`` contiguous
("NCL") or ``(M, C)`` contiguous ("MC", channels last). Batch norm is memory-bound, so each
kernel reads every input once and writes every output once; the arithmetic is free next to
the bytes.

Statistics
----------
For each channel we need the mean μ and m2 = Σ(x − μ)² over its n values. The one-pass
textbook formula Σx² − (Σx)²/n cancels catastrophically when |μ| ≫ σ, so we sum
*shifted* values d = x − s with the shift s = the channel's first element:

    S1 = Σ d,   S2 = Σ d²,   μ = s + S1/n,   m2 = S2 − S1²/n.

Because s is one of the data, |d| is of the order of the spread, not of the mean. S1 and
S2 accumulate in float64, but blocks of ``_BLK`` values are summed in the accumulation
dtype first (the data's; float32 for 16-bit data, see "Data types"), so that the loops
vectorize, and each block sum of d² carries a rounding error of order u·Σd² (u = 2⁻²⁴ in
float32), where Σd² = m2 + n·(μ − s)²: m2 is good to u·(1 + (μ − s)²/σ²), a few u while s
lies within a few σ of the mean, but only to u·n when s is a far outlier (1e6 first in
N(0, 1) data lost 4e-3 of the variance, a token of 3000 at position 0 of a BatchNorm1d
batch 6e-4). So after the pass, if any channel's shift lies more than 8σ from its mean
(n·(μ − s)² > 64·m2, ``_far``; m2 is then good to about 3e-7), the channels are summed
again, each far one around its first-pass mean rounded to the accumulation dtype
(``_refine``), whose error, of order u·|μ − s|/√n, is far below σ. The second pass reads
only the far channels in the pieces walk, but the whole array in the rows walk (a test
per row cost 8% on rows of 49-64 values) and in the MC view (channels interleave there):
the other channels get the same sums again. Normal data never pay it (a value 8σ out:
1e-15; at 4σ one step in eight on 2048 channels would have); summing each block around
its own first value instead, redone where far, cost 20-90% on rows of 32-512 values. A
constant channel has every d == 0 exactly, so μ == s exactly and m2 == 0 exactly, at any
magnitude, and it is never summed again. A channel whose S2 is not finite is summed again
too (``_again``): on finite data a float32 block of squares can overflow (1e19 first among
zeros gave an infinite variance where torch's is 3e36), and around the mean the squares
are smaller; where S1 overflowed as well (values near float32's largest), or the data hold
a NaN or inf, it is summed around 0, which gives torch's mean (finite, ±inf or NaN)
where those sums hold (data of both signs near float32's largest can overflow them too:
NaN where torch's mean is finite, a known limit). The common shift also makes the
parallel merge trivial: a channel is cut into pieces (so that two channels with a huge
N·L still keep every core busy), each piece sums its own (S1, S2), and the pieces' sums
are added in a fixed order, so the result does not depend on the thread count or
scheduling.
Where rows are short (L ≤ ``_BLK``) the tasks are ranges of whole rows read in memory
order instead, each with per-channel partials: a channel's rows lie C·L apart, a stride
the prefetcher does not follow.

Normalize
---------
    z = (x − μ)·(γ·r) + β (+ residual),   y = act(z),   r = 1/√(σ² + ε)

computed in the accumulation dtype (float32 for float32 and 16-bit inputs, as torch
does), one read of x (and of the residual), one write of y.

Backward
--------
Let x̂ = (x − μ)·r and dz = dy·act′(z). The activation's derivative needs z, which we
*recompute* from x, μ, r, γ, β (and the residual) rather than saving y or z: BN+act keeps
exactly the tensors plain BN keeps. Then y = act(γ x̂ + β + …) gives

    ∂L/∂β = Σ dz,     ∂L/∂γ = Σ dz·x̂                      (backward_reduce, one read of dy, x)

and, for x, the chain through μ and r (both functions of every x of the channel):
∂x̂ᵢ/∂xⱼ = r(δᵢⱼ − 1/n − x̂ᵢx̂ⱼ/n), so

    dx = γ·r·(dz − Σdz/n − x̂·Σ(dz·x̂)/n)                   (backward_elementwise)

With fixed statistics (evaluation) μ and r are constants and dx = γ·r·dz. The residual's
gradient is dz itself. Where r == 0 (zero variance with ε = 0) every term carries the
factor r, so dx == 0, never NaN.

Compilation
-----------
Each kernel is compiled once per dtype (float32, float64, float16, bfloat16) and kept in
numba's on-disk cache; everything else is a run-time argument, so that the whole test
matrix costs a dozen compilations, not hundreds. Absent tensors (weight, bias, residual,
the batch sums in evaluation) arrive as size-0 arrays. The activation is an integer code,
but the branch on it is hoisted out of the inner loop for 'none' and 'relu': the row loop
is an ``inline='always'`` helper called with a literal code, so LLVM folds the switch and
vectorizes those loops. The other activations share one copy that switches per element;
their exp/erf/tanh cost far more than the branch.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import types

import numba
import numba.core.caching
from llvmlite import ir
from numba import carray, prange
from numba.core import types as nb_types
from numba.extending import intrinsic, overload
from numba.np import numpy_support

ACT_CODES = {"none": 0, "relu": 1, "leaky_relu": 2, "silu": 3, "gelu": 4, "gelu_tanh": 5,
             "sigmoid": 6, "tanh": 7}

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)

# Sums may be reassociated (that is what lets LLVM vectorize a reduction); nothing else
# of fastmath is wanted: NaN and inf must propagate as in torch.
_REDUCE_MATH = {"reassoc", "contract"}

# Reductions sum short blocks of this many elements in the accumulation dtype (vectorizable),
# each block's sum then added to a float64 accumulator: the float32 rounding stays that of
# a few hundred terms of (x − shift), which are of the order of the spread.
_BLK = 512

# A channel whose shift lies more than √_FAR = 8 of its standard deviations from its mean
# is summed again around its mean (see "Statistics" and _far).
_FAR = 64.0


def _cache_probe():  # (defined here: numba picks a cache directory by the source file)
    return 0


def _cache_directory_error() -> str | None:
    """Why numba cannot cache this file's kernels (no directory it can write of those it
    tries: ``NUMBA_CACHE_DIR``, the package's ``__pycache__``, the user's
    ``$XDG_CACHE_HOME/numba``), or None where it can."""
    try:
        cache = numba.core.caching.FunctionCache(_cache_probe)
        # (the zip locator, for a package imported from a zip file, does not check that
        # its directory can be written: saving a kernel then failed at every call)
        locator = getattr(getattr(cache, "_impl", None), "locator", None)
        if locator is not None:
            locator.ensure_cache_path()
    except (RuntimeError, OSError) as e:
        return str(e)
    return None


_CACHE_ERROR = _cache_directory_error()
if _CACHE_ERROR is not None:
    warnings.warn(f"batchnorm's CPU kernels cannot be cached ({_CACHE_ERROR}): numba has no "
                  f"directory it can write, so they compile in every process (seconds at "
                  f"the first calls). Set NUMBA_CACHE_DIR to a directory this user can "
                  f"write", stacklevel=2)


def njit(*args, **options):
    """numba's ``njit``, with ``cache=True`` dropped where numba has no directory it can
    write (it would raise at every kernel's decoration, so every call of the backend)."""
    if _CACHE_ERROR is not None:
        options["cache"] = False
    return numba.njit(*args, **options)


def _twin(f, suffix: str):
    """A copy of ``f`` under another name: numba's cache is keyed by the function's
    qualified name, and two builds of one function (parallel, serial) would overwrite
    each other's cache entries."""
    code = f.__code__.replace(co_name=f.__name__ + suffix, co_qualname=f.__qualname__ + suffix)
    return types.FunctionType(code, f.__globals__, f.__name__ + suffix, f.__defaults__,
                              f.__closure__)


# ---------------------------------------------------------------------------------------
# Data types: float32, float64, and float16 and bfloat16 as 16-bit patterns
#
# NumPy has no bfloat16 and numba no float16 arithmetic, so the kernels take 16-bit data
# as its bit patterns (bfloat16 as uint16, float16 as int16: the array's type says which
# format it holds). Every kernel reads a value of its data through ``_load``, which gives
# it in the accumulation dtype (the value itself for float32 and float64; float32 for
# 16-bit data, as torch accumulates), and writes one through ``_store``, which rounds to
# the output's format (to nearest even, as torch's conversions do). For 16-bit data both
# are a few LLVM instructions that vectorize, so each pass reads and writes 2 bytes a
# value; converting to float32 around the kernels added two passes and doubled the
# others' bytes (3-8x torch's time on (32, 64, 56, 56) bfloat16, measured 2026-12-03).
# The per-channel arrays (shifts, coefficients) and the block sums are in the
# accumulation dtype (``_acc_empty``, ``_acc_zero``). So one family of kernels serves the
# four dtypes, each compiled per dtype.

# The 16-bit formats: the integer type that carries each, and a scalar of it (the entry
# points' ``like``).
HALF_LIKE = {"bfloat16": np.uint16(0), "float16": np.int16(0)}

_I32 = ir.IntType(32)


@intrinsic
def _load(typingctx, value):
    """A value of a kernel's data in the accumulation dtype: a float32 or float64 as it
    is, a bfloat16 (``uint16``) or float16 (``int16``) bit pattern widened to float32
    (exactly)."""
    if value in (nb_types.float32, nb_types.float64):
        def codegen(context, builder, signature, args):
            return args[0]
        return value(value), codegen
    if value == nb_types.uint16:
        def codegen(context, builder, signature, args):
            # bfloat16 is float32's upper half
            word = builder.shl(builder.zext(args[0], _I32), ir.Constant(_I32, 16))
            return builder.bitcast(word, ir.FloatType())
    elif value == nb_types.int16:
        def codegen(context, builder, signature, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    else:
        return None
    return nb_types.float32(value), codegen


@intrinsic
def _store(typingctx, value, out):
    """``value`` in the format of the array ``out`` holds: cast as an assignment casts it
    for float32 and float64 data; for 16-bit data rounded to float32, then to nearest even
    into the format, as its bit pattern."""
    if not isinstance(out, nb_types.Array) or not isinstance(value, nb_types.Float):
        return None
    to = out.dtype
    if isinstance(to, nb_types.Float):
        def codegen(context, builder, signature, args):
            return context.cast(builder, args[0], value, to)
    elif to == nb_types.uint16:
        def codegen(context, builder, signature, args):
            f = context.cast(builder, args[0], value, nb_types.float32)
            word = builder.bitcast(f, _I32)
            odd = builder.and_(builder.lshr(word, ir.Constant(_I32, 16)), ir.Constant(_I32, 1))
            rounded = builder.lshr(builder.add(builder.add(word, ir.Constant(_I32, 0x7FFF)), odd),
                                   ir.Constant(_I32, 16))
            # a NaN becomes the quiet NaN torch makes (rounding could carry it into inf)
            nan = builder.fcmp_unordered("uno", f, f)
            rounded = builder.select(nan, ir.Constant(_I32, 0x7FC0), rounded)
            return builder.trunc(rounded, ir.IntType(16))
    elif to == nb_types.int16:
        def codegen(context, builder, signature, args):
            f = context.cast(builder, args[0], value, nb_types.float32)
            return builder.bitcast(builder.fptrunc(f, ir.HalfType()), ir.IntType(16))
    else:
        return None
    return to(value, out), codegen


def _acc_dtype(data):
    """The NumPy scalar type of the accumulation dtype of data of numba type ``data``."""
    return np.float32 if isinstance(data, nb_types.Integer) else numpy_support.as_dtype(data).type


def _acc(like):
    """0 in the accumulation dtype of data of ``like``'s type (a scalar): what the
    per-channel arrays (weight, bias, var, the sums, the running buffers) hold."""


@overload(_acc)
def _acc_overload(like):
    zero = _acc_dtype(like)(0)
    return lambda like: zero


def _acc_empty(n, a):
    """An empty [n] array of the accumulation dtype of the array ``a``'s data."""


@overload(_acc_empty)
def _acc_empty_overload(n, a):
    dtype = _acc_dtype(a.dtype)
    return lambda n, a: np.empty(n, dtype)


def _acc_zero(a):
    """0 in the accumulation dtype of the array ``a``'s data."""


@overload(_acc_zero)
def _acc_zero_overload(a):
    zero = _acc_dtype(a.dtype)(0)
    return lambda a: zero


@njit(inline="always", cache=True)
def _act(z, code, slope):
    if code == 0:
        return z
    if code == 1:
        # `z < 0` rather than max(z, 0): a NaN stays NaN, as in torch.relu. The zero is a
        # float32 so that float32 loops stay float32 (a float64 literal would widen them)
        return np.float32(0.0) if z < 0 else z
    if code == 2:
        return z * slope if z <= 0 else z
    if code == 3:
        return z / (1.0 + math.exp(-z))
    if code == 4:
        return 0.5 * z * (1.0 + math.erf(z * _INV_SQRT_2))
    if code == 5:
        return 0.5 * z * (1.0 + math.tanh(_SQRT_2_OVER_PI * (z + 0.044715 * z * z * z)))
    if code == 6:
        return 1.0 / (1.0 + math.exp(-z))
    return math.tanh(z)


@njit(inline="always", cache=True)
def _dz(dy, z, code, slope):
    """dy·act′(z); relu and leaky_relu select rather than multiply, as torch's backward
    does (a NaN gradient where the unit is off gives 0)."""
    if code == 1:
        return np.float32(0.0) if z <= 0 else dy  # torch's threshold_backward, NaN z included
    if code == 2:
        return dy if z > 0 else dy * slope
    if code == 3:
        s = 1.0 / (1.0 + math.exp(-z))
        return dy * (s * (1.0 + z * (1.0 - s)))
    if code == 4:
        cdf = 0.5 * (1.0 + math.erf(z * _INV_SQRT_2))
        return dy * (cdf + z * math.exp(-0.5 * z * z) * _INV_SQRT_2PI)
    if code == 5:
        u = _SQRT_2_OVER_PI * (z + 0.044715 * z * z * z)
        t = math.tanh(u)
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * z * z)
        return dy * (0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du)
    if code == 6:
        s = 1.0 / (1.0 + math.exp(-z))
        return dy * (s * (1.0 - s))
    t = math.tanh(z)
    return dy * (1.0 - t * t)


# ---------------------------------------------------------------------------------------
# Channels-last tiles
#
# An (M, C) view's inner loop runs over C. With few channels that loop is too short for
# LLVM's vectorized body (it wants a few dozen iterations), so it runs scalar, and with
# ReLU's select compiled as a branch it mispredicts on every other value: BN+ReLU backward
# on (65536, 8) took 2.2 ms a pass against 0.3 ms without the activation (measured). The
# MC kernels therefore work on tiles of k whole rows, k·C ≥ _TILE values, with the
# per-channel coefficients repeated k times: position j of a tile is channel j mod C.
#
# The same kernels take an (N, C, L) array with short rows as (N, C·L) ("wide rows"):
# its columns are then C groups of ``rep`` = L, column j belonging to channel j // L, and
# the coefficients are repeated L times within a row as well. Each NCL row of a few values
# is a loop too short to vectorize (on (64, 128, 8) the NCL kernels took 2-3x longer
# than these, measured); a row of C·L values is not. The per-channel arrays (mean, var,
# weight, ...) always have C entries, which is how the kernels know ``rep``: the columns
# of x over the channels.


_TILE = 64


@njit(inline="always")
def _tile_len(cols):
    """k·cols for the smallest k with k·cols ≥ _TILE."""
    return cols * max(1, -(-_TILE // cols))


@njit(cache=True)
def _tiled(a, rep, t_):
    """a (per channel), each value over ``rep`` neighbouring columns, repeated over a tile
    of t_ positions."""
    cols = a.shape[0] * rep
    if t_ == cols and rep == 1:
        # the tile is the array itself (C >= _TILE, one column a channel): a copy of each
        # per-channel array was most of a small batch's time at large C (normalize on
        # (2, 2048) took 15 µs with the copies, 4 without, measured)
        return a
    out = np.empty(t_, a.dtype)
    # Scalar loops, not slice assignments: in the parallel builds numba turns each slice
    # assignment into a parallel loop of its own, one per channel here (wide rows on
    # (64, 256, 4, 4) took 13x longer than these loops, measured).
    for c in range(a.shape[0]):
        v = a[c]
        for j in range(c * rep, (c + 1) * rep):
            out[j] = v
    # t_ is a multiple of the row (_tile_len): copy the first row on, with no j % cols
    # (an integer division per value cost more than a few rows' arithmetic at large C)
    for j in range(cols, t_):
        out[j] = out[j - cols]
    return out


# ---------------------------------------------------------------------------------------
# Statistics (no activation: one kernel per view)


def stats_ncl(x, split, mean_out, m2_out):
    l_ = x.shape[2]
    if l_ <= _BLK:
        _stats_ncl_rows(x, split, mean_out, m2_out)
    else:
        _stats_ncl_pieces(x, split, mean_out, m2_out)


@njit(inline="always", fastmath=_REDUCE_MATH)
def _shifted_block_sums(xr, n, sk):
    """Σ(x − sk) and Σ(x − sk)² of one short block, in the accumulation dtype."""
    b1 = _acc_zero(xr)
    b2 = _acc_zero(xr)
    for l in range(n):
        d = _load(xr[l]) - sk
        b1 += d
        b2 += d * d
    return b1, b2


@njit(inline="always")
def _far(s1, s2, n):
    """Whether a channel's shift s lies more than √_FAR of its standard deviations from its
    mean, from S1 = Σ(x − s) and S2 = Σ(x − s)² over its n values: n·(μ − s)² > _FAR·m2,
    i.e. S1² > _FAR·(n·S2 − S1²). Its float32 block sums then carry errors of order
    u·(1 + _FAR)·m2 or more (u·n·m2 for an outlier first value). False for a constant
    channel (0 > 0) and wherever a sum is NaN or infinite (NaN compares false, inf > inf
    too)."""
    return s1 * s1 > _FAR * (n * s2 - s1 * s1)


@njit(inline="always")
def _again(s1, s2, n):
    """Whether a channel is summed again: :func:`_far`, or S2 = Σ(x − s)² not finite. A
    float32 block of squares overflows on finite data (1e19 first among zeros: 15e38), and
    S2 = inf read as an infinite variance (torch's is 3e36): around the channel's mean
    the squares are smaller. A NaN or inf in the data gives the same sums again."""
    return _far(s1, s2, n) | (not s2 < math.inf)


@njit(cache=True)
def _refine(shift, a1, a2, total, todo):
    """After a pass of sums (a1, a2) around ``shift``: ``todo`` marks the channels to sum
    again, each around its mean rounded to the accumulation dtype (the new ``shift``). Only
    after the first pass (``todo`` all True on entry), and returns whether any is marked.
    """
    # the test alone in a loop with no branch (it vectorizes: 1 against 3 µs for C = 1024)
    count = 0
    for c in range(shift.shape[0]):
        far = _again(a1[c], a2[c], total)
        todo[c] = far
        count += far
    if count == 0:
        return False
    for c in range(shift.shape[0]):
        if todo[c]:
            # around 0 where S1 overflowed too (values near float32's largest, an outlier
            # first: the mean came out -inf where torch's is 3e36) or the data hold a NaN
            # or inf (whose sums around 0 give torch's mean and variance as before)
            mean = np.float64(shift[c]) + a1[c] / total
            shift[c] = shift.dtype.type(mean if math.isfinite(mean) else 0.0)
    return True


@njit(inline="always")
def _shift_from(first):
    """A channel's shift from its first value: that value, or 0 where it is ±inf or NaN
    (an infinite shift made every x − shift inf − inf: a NaN mean where torch's is ±inf)."""
    return first if math.isfinite(first) else 0.0


@njit(cache=True)
def _ncl_first_pass(x):
    """What the first pass over an (N, C, L) view starts from: each channel's shift (its
    first value, _shift_from), every channel marked to sum, and the channels' totals (S1,
    S2)."""
    c_ = x.shape[1]
    shift = _acc_empty(c_, x)
    for c in range(c_):
        shift[c] = _shift_from(_load(x[0, c, 0]))
    return shift, np.ones(c_, np.bool_), np.zeros(c_), np.zeros(c_)


@njit(cache=True)
def _channel_totals(s1, s2, todo, t1, t2):
    """t1[c], t2[c] = the sums of the [C, K] partials' row c, added in order, for the
    channels marked in ``todo`` (the others keep their sums)."""
    for c in range(s1.shape[0]):
        if todo[c]:
            a1 = 0.0
            a2 = 0.0
            for k in range(s1.shape[1]):
                a1 += s1[c, k]
                a2 += s2[c, k]
            t1[c] = a1
            t2[c] = a2


@njit(cache=True)
def _finish(shift, a1, a2, total, mean_out, m2_out):
    for c in range(shift.shape[0]):
        mean_out[c] = np.float64(shift[c]) + a1[c] / total
        m2 = a2[c] - a1[c] * a1[c] / total
        if a2[c] == math.inf and math.isfinite(a1[c]):
            # float64 data past 1e154: S1², of a rounding-sized S1 around the mean, can
            # overflow where S2 did (inf − inf); S1²/n ≤ S2, so m2 is S2's inf (torch's)
            m2 = math.inf
        m2_out[c] = 0.0 if m2 < 0 else m2  # rounding can dip below 0; NaN stays NaN


@njit(inline="always", fastmath=_REDUCE_MATH)
def _stats_ncl_pieces(x, pieces, mean_out, m2_out):
    # Long rows: each channel is cut into ``pieces`` of its N·L values, so that two
    # channels with a huge N·L still keep every core busy.
    n_, c_, l_ = x.shape
    total = n_ * l_
    tasks = c_ * pieces
    xf = x.reshape(-1)
    s1 = np.empty(tasks, np.float64)
    s2 = np.empty(tasks, np.float64)
    shift, todo, t1, t2 = _ncl_first_pass(x)
    for attempt in range(2):
        _stats_ncl_pieces_pass(x, xf, pieces, shift, todo, s1, s2)
        _channel_totals(s1.reshape(c_, pieces), s2.reshape(c_, pieces), todo, t1, t2)
        if attempt > 0 or not _refine(shift, t1, t2, total, todo):
            break
    _finish(shift, t1, t2, total, mean_out, m2_out)


@njit(inline="always", fastmath=_REDUCE_MATH)
def _stats_ncl_pieces_pass(x, xf, pieces, shift, todo, s1, s2):
    """(S1, S2) of each piece of the channels marked in ``todo``, around ``shift``."""
    n_, c_, l_ = x.shape
    total = n_ * l_
    tasks = c_ * pieces
    for t in prange(tasks):
        c = t // pieces
        if not todo[c]:
            continue
        p = t - c * pieces
        i0 = total * p // pieces
        i1 = total * (p + 1) // pieces
        sk = shift[c]
        a1 = 0.0
        a2 = 0.0
        # the piece walks the channel's rows (stride C·L in the flat array): the row and
        # the offset in it are found once, then advanced, never divided per row
        n = i0 // l_
        l0 = i0 - n * l_
        base = (n * c_ + c) * l_
        i = i0
        while i < i1:
            l1 = min(l_, l0 + (i1 - i), l0 + _BLK)
            # a slice indexed from 0: LLVM then knows no index is negative (no wraparound
            # check), which is what lets the loop vectorize. A short block (_BLK) sums in
            # the accumulation dtype around the shift, then joins the float64 accumulator.
            xr = xf[base + l0:base + l1]
            b1, b2 = _shifted_block_sums(xr, l1 - l0, sk)
            a1 += np.float64(b1)
            a2 += np.float64(b2)
            i += l1 - l0
            if l1 == l_:
                l0 = 0
                base += c_ * l_
            else:
                l0 = l1
        s1[t] = a1
        s2[t] = a2


@njit(inline="always", fastmath=_REDUCE_MATH)
def _stats_ncl_rows(x, tasks, mean_out, m2_out):
    # Short rows (L <= _BLK): walking a channel's rows jumps C·L elements each time, which
    # the prefetcher does not follow (2-3x slower than a sequential read, measured). Here
    # each task reads a range of whole rows in memory order into per-channel float64
    # partials of its own; each row is one block, as in the pieces walk.
    n_, c_, l_ = x.shape
    xf = x.reshape(-1)
    shift, todo, t1, t2 = _ncl_first_pass(x)
    total = n_ * l_
    for attempt in range(2):
        # every channel in the second pass too (a test per row cost 8% on rows of 49-64
        # values); those not marked get the same sums again
        p1 = np.zeros((tasks, c_))
        p2 = np.zeros((tasks, c_))
        _stats_ncl_rows_pass(xf, n_, c_, l_, tasks, shift, p1, p2)
        _channel_totals(p1.T, p2.T, todo, t1, t2)
        if attempt > 0 or not _refine(shift, t1, t2, total, todo):
            break
    _finish(shift, t1, t2, total, mean_out, m2_out)


@njit(inline="always", fastmath=_REDUCE_MATH)
def _stats_ncl_rows_pass(xf, n_, c_, l_, tasks, shift, p1, p2):
    """Per-task, per-channel partials around ``shift`` (p1, p2 zeroed)."""
    rows = n_ * c_
    for t in prange(tasks):
        r0 = rows * t // tasks
        r1 = rows * (t + 1) // tasks
        c = r0 % c_
        a1 = p1[t]
        a2 = p2[t]
        for r in range(r0, r1):
            sk = shift[c]
            xr = xf[r * l_:(r + 1) * l_]
            b1, b2 = _shifted_block_sums(xr, l_, sk)
            a1[c] += np.float64(b1)
            a2[c] += np.float64(b2)
            c += 1
            if c == c_:
                c = 0


@njit(inline="always", fastmath=_REDUCE_MATH)
def _stats_mc_tile(xf, e, n, skt, b1, b2):
    xr = xf[e:e + n]
    for j in range(n):
        d = _load(xr[j]) - skt[j]
        b1[j] += d
        b2[j] += d * d


@njit(cache=True)
def _fold_tiles(s1, s2, c_, rep):
    """Per-channel totals of [blocks, k·C·rep] partials, added block by block and, within
    a block, tile position by tile position: the order of a loop over each channel's
    positions, read in memory order (column by column, the reads were C·k·8 bytes apart:
    108 against 25 µs for the statistics of (64, 1024) in 16 blocks)."""
    a1 = np.zeros(c_, np.float64)
    a2 = np.zeros(c_, np.float64)
    cols = c_ * rep
    if rep == 1:  # the same order of additions, without a one-value loop per channel
        for b in range(s1.shape[0]):
            for k in range(s1.shape[1] // cols):
                for c in range(c_):
                    a1[c] += s1[b, k * cols + c]
                    a2[c] += s2[b, k * cols + c]
        return a1, a2
    for b in range(s1.shape[0]):
        for k in range(s1.shape[1] // cols):
            for c in range(c_):
                for j in range(k * cols + c * rep, k * cols + (c + 1) * rep):
                    a1[c] += s1[b, j]
                    a2[c] += s2[b, j]
    return a1, a2


def stats_mc(x, blocks, mean_out, m2_out):
    m_, cols = x.shape
    c_ = mean_out.shape[0]
    rep = cols // c_  # wide rows: L columns a channel (see "Channels-last tiles")
    t_ = _tile_len(cols)
    xf = x.reshape(-1)
    shift = _acc_empty(c_, x)
    # one shift for all of a channel's columns, so that their sums add up as they are
    for c in range(c_):
        shift[c] = _shift_from(_load(x[0, c * rep]))
    todo = np.ones(c_, np.bool_)
    s1 = np.zeros((blocks, t_), np.float64)
    s2 = np.zeros((blocks, t_), np.float64)
    total = m_ * rep
    for attempt in range(2):
        # every channel again in the second pass (the far ones are interleaved with the
        # others); the others get the same sums again
        _stats_mc_pass(xf, m_, cols, t_, blocks, _tiled(shift, rep, t_), s1, s2)
        a1, a2 = _fold_tiles(s1, s2, c_, rep)
        if attempt > 0 or not _refine(shift, a1, a2, total, todo):
            break
    _finish(shift, a1, a2, total, mean_out, m2_out)


@njit(inline="always", fastmath=_REDUCE_MATH)
def _stats_mc_pass(xf, m_, cols, t_, blocks, skt, s1, s2):
    """s1, s2 = the [blocks, t_] partials around the tiled shifts ``skt``."""
    for b in prange(blocks):
        r0 = m_ * b // blocks
        r1 = m_ * (b + 1) // blocks
        a1 = s1[b]
        a2 = s2[b]
        a1[:] = 0
        a2[:] = 0
        # short blocks of rows summed in the accumulation dtype per tile position, then into
        # float64
        b1 = _acc_empty(t_, xf)
        b2 = _acc_empty(t_, xf)
        q = r0
        while q < r1:
            q1 = min(r1, q + _BLK)
            b1[:] = 0
            b2[:] = 0
            e = q * cols
            end = q1 * cols
            # whole tiles, then the rest: a loop whose trip count is the tile's length
            # (invariant) vectorizes as the row loop did; a min() per tile cost 1.5x
            while e + t_ <= end:
                _stats_mc_tile(xf, e, t_, skt, b1, b2)
                e += t_
            _stats_mc_tile(xf, e, end - e, skt, b1, b2)
            for j in range(t_):
                a1[j] += b1[j]
                a2[j] += b2[j]
            q = q1


# ---------------------------------------------------------------------------------------
# Per-channel coefficients (C-sized, serial)


@njit(cache=True, error_model="numpy")
def _invstd_of(var, eps, invstd):
    """invstd = 1/√(var + eps), 0 where var + eps == 0, NaN where it is negative or NaN
    (``ops.invstd_from_var``). Compiled apart with numpy's error model: Python's (the
    default) tests every division for zero, which kept the loop scalar (18 against 4.5 µs
    for C = 4096); the guard already excludes it, and √ of a negative is NaN there."""
    for c in range(var.shape[0]):
        ve = var[c] + eps
        invstd[c] = 1.0 / math.sqrt(ve) if ve != 0 else 0.0


@njit(cache=True)
def _prologue(mean, v, eps, count, mode, weight, bias, mean_k, invstd, scale, shift, delta,
              var_out):
    """Per-channel coefficients of z = (x − mean_k)·scale + shift.

    ``mean`` is float64 in every mode, so that each kernel is compiled once per data
    dtype (a float32 mean would be a second variant, 10-40 s of compilation each).
    mode 0 (the primitives' contract): the mean is used rounded to the acc dtype, as the
    primitives define it, with no split (delta = 0), and ``v`` is invstd. mode 1 (fused
    training): ``mean`` is the batch mean and ``v`` is m2; var = m2/count is written to
    ``var_out``. mode 2 (fused evaluation): ``mean``/``v`` are the running mean and
    variance. In modes 1 and 2, invstd = 1/√(var + eps) (0 where var + eps == 0), and the
    mean is split into mean_k (acc dtype, what the inner loops subtract) and
    delta = mean − mean_k, which is folded into the shift (and, in backward, into the
    sums): x̂ = (x − mean_k)·r − delta·r exactly as ``ops.centre_for_kernels`` does (a
    mean that came in the acc dtype has delta = 0). γ = 1, β = 0 where absent.
    """
    # One job per loop, no test inside: with the mode and the optional arrays tested per
    # channel the loop stayed scalar, ~10 ns a channel (43 µs for C = 4096, more than the
    # arithmetic of a few rows of BatchNorm1d).
    c_ = mean_k.shape[0]
    if mode == 0:
        for c in range(c_):
            mean_k[c] = mean[c]
            invstd[c] = v[c]
            delta[c] = 0.0
    else:
        var = np.empty(c_, np.float64)
        if mode == 1:
            for c in range(c_):
                var[c] = v[c] / count
        else:
            for c in range(c_):
                var[c] = v[c]
        if var_out.shape[0] > 0:
            for c in range(c_):
                var_out[c] = var[c]
                var[c] = var_out[c]  # the acc-dtype value, as the unfused path has it
        _invstd_of(var, eps, invstd)
        for c in range(c_):
            mean_k[c] = mean[c]
        for c in range(c_):
            # an infinite mean is its own rounding (inf − inf would make every z NaN,
            # where torch's eval gives ±inf: a running mean that overflowed in float16)
            d = mean[c] - np.float64(mean_k[c])
            delta[c] = d if math.isfinite(d) else 0.0
    if weight.shape[0] > 0:
        for c in range(c_):
            scale[c] = invstd[c] * weight[c]
    else:
        for c in range(c_):
            scale[c] = invstd[c]
    if bias.shape[0] > 0:
        if weight.shape[0] > 0:
            for c in range(c_):
                shift[c] = (np.float64(bias[c])
                            - np.float64(weight[c]) * np.float64(invstd[c]) * delta[c])
        else:
            for c in range(c_):
                shift[c] = np.float64(bias[c]) - np.float64(invstd[c]) * delta[c]
    elif weight.shape[0] > 0:
        for c in range(c_):
            shift[c] = 0.0 - np.float64(weight[c]) * np.float64(invstd[c]) * delta[c]
    else:
        for c in range(c_):
            shift[c] = 0.0 - np.float64(invstd[c]) * delta[c]


@njit(cache=True)
def _dx_coefs(invstd, weight, delta, sum_dz, sum_dzx, count, k0, k1, k2):
    """dx = k0·(dz − k1 − (x − mean_k)·k2) with k0 = γ·r, and, with batch statistics
    (S = Σdz·x̂, x̂ = (x − mean_k)·r − delta·r):  k1 = Σdz/n − delta·r·S/n,  k2 = r·S/n.

    In evaluation (no sums) k1 = k2 = 0, i.e. dx = γ·r·dz."""
    # One job per loop, no test inside (see _prologue): with the tests in one loop the
    # MC elementwise kernel on (2, 2048) took 11 µs against 6 (measured)
    c_ = invstd.shape[0]
    if weight.shape[0] > 0:
        for c in range(c_):
            k0[c] = np.float64(invstd[c]) * weight[c]
    else:
        for c in range(c_):
            k0[c] = invstd[c]
    if sum_dz.shape[0] > 0:
        for c in range(c_):
            r = np.float64(invstd[c])
            s = np.float64(sum_dzx[c]) / count
            # no correction where S is not finite (an inf in dy): delta·r·S is ±inf or
            # 0·inf, and k1 NaN made every dx of the channel NaN; torch's are ±inf or
            # NaN by the sign of x̂ (ops.sum_dz_for_kernels)
            correction = delta[c] * r * s if s - s == 0 else 0.0
            k1[c] = np.float64(sum_dz[c]) / count - correction
            k2[c] = r * s
    else:
        for c in range(c_):
            k1[c] = 0.0
            k2[c] = 0.0


@njit(cache=True)
def _arrays(x, c_):
    """(mean_k, invstd, scale, shift) in the accumulation dtype, delta in float64
    (``_prologue``)."""
    return (_acc_empty(c_, x), _acc_empty(c_, x), _acc_empty(c_, x), _acc_empty(c_, x),
            np.empty(c_, np.float64))


# ---------------------------------------------------------------------------------------
# Variants
#
# The walks over a task's values (``_norm_ncl_task``, ``_dx_mc_rows``, ...) take the
# activation's code and whether there is a residual. The common cases (no activation and
# relu, with and without a residual) each run a copy of the whole walk with those
# arguments constant, so that LLVM folds the activation's switch and vectorizes; with the
# branch inside the walk (per row), LLVM optimized the loop nest as a whole 2-3x worse on
# short rows (measured on the 2-core machine). The parallel loop calls, once per task, a
# compiled function (``*_any``) that picks the copy. That function is compiled once per
# process and shared by the parallel and serial builds and the fused entry points; the
# copies had been inlined into each of them, which took about twice as long to compile
# (``batchnorm compile`` with a cold cache: 463 s before, 243 s after, on the 2-core Xeon,
# 2026-12-03). The walks themselves stay inlined into the ``*_any`` functions: compiled on
# their own, numba gives a walk one copy for every case (constant arguments are not
# specialized), and reduce and elementwise ran 7-23% slower on (32,64,112,112). The
# per-channel helpers (``_prologue``, ``_tiled``, ...) are compiled once, not inlined.
# Module steps and kernels on 16 shapes, timed against the old code in alternating
# processes, showed no change beyond the machine's noise.


# ---------------------------------------------------------------------------------------
# Normalize


@njit(inline="always")
def _norm_ncl_seg(xf, rf, yf, a0, a1, m, s, b, code, slope, has_res):
    # slices indexed from 0 (see stats_ncl)
    xr = xf[a0:a1]
    yr = yf[a0:a1]
    rr = rf[a0:a1] if has_res else xr
    for l in range(a1 - a0):
        z = (_load(xr[l]) - m) * s + b
        if has_res:
            z = z + _load(rr[l])
        yr[l] = _store(_act(z, code, slope), yr)


@njit(inline="always")
def _norm_ncl_task(xf, rf, yf, e0, e1, l_, c_, mean, scale, shift, code, slope, has_res):
    # The flat range [e0, e1) of the (N, C, L) array: whole rows of many short ones, or a
    # piece of a long one. The first row's channel is found once, then advanced (a
    # division per row cost more than a short row's arithmetic).
    row = e0 // l_
    c = row % c_
    a0 = e0
    while a0 < e1:
        a1 = min(e1, (row + 1) * l_)
        _norm_ncl_seg(xf, rf, yf, a0, a1, mean[c], scale[c], shift[c], code, slope, has_res)
        a0 = a1
        row += 1
        c += 1
        if c == c_:
            c = 0


@njit(cache=True)
def _norm_ncl_task_any(xf, rf, yf, e0, e1, l_, c_, mean, scale, shift, code, slope, has_res):
    # (see "Variants")
    if code == 0:
        if has_res:
            _norm_ncl_task(xf, rf, yf, e0, e1, l_, c_, mean, scale, shift, 0, slope, True)
        else:
            _norm_ncl_task(xf, rf, yf, e0, e1, l_, c_, mean, scale, shift, 0, slope, False)
    elif code == 1:
        if has_res:
            _norm_ncl_task(xf, rf, yf, e0, e1, l_, c_, mean, scale, shift, 1, slope, True)
        else:
            _norm_ncl_task(xf, rf, yf, e0, e1, l_, c_, mean, scale, shift, 1, slope, False)
    else:
        _norm_ncl_task(xf, rf, yf, e0, e1, l_, c_, mean, scale, shift, code, slope, has_res)


def normalize_ncl(x, mean_in, v, eps, count, mode, weight, bias, res, code, slope, tasks, y,
                  var_out):
    c_, l_ = x.shape[1], x.shape[2]
    mean, invstd, scale, shift, delta = _arrays(x, c_)
    _prologue(mean_in, v, eps, count, mode, weight, bias, mean, invstd, scale, shift, delta,
              var_out)
    has_res = res.shape[0] > 0
    xf = x.reshape(-1)
    yf = y.reshape(-1)
    rf = res.reshape(-1)
    total = x.size
    for t in prange(tasks):
        e0 = total * t // tasks
        e1 = total * (t + 1) // tasks
        _norm_ncl_task_any(xf, rf, yf, e0, e1, l_, c_, mean, scale, shift, code, slope,
                           has_res)


def _norm_mc_tile_py(xf, rf, yf, e, n, mean, scale, shift, code, slope, has_res):
    xr = xf[e:e + n]
    yr = yf[e:e + n]
    rr = rf[e:e + n] if has_res else xr
    for j in range(n):
        z = (_load(xr[j]) - mean[j]) * scale[j] + shift[j]
        if has_res:
            z = z + _load(rr[j])
        yr[j] = _store(_act(z, code, slope), yr)


# Whole tiles run an inlined copy per activation (the switch folds); the last, partial tile
# of a range calls one shared compiled copy, so that each variant inlines a single loop
# (two per variant doubled the channels-last kernels' compile time).
_norm_mc_tile = njit(inline="always")(_norm_mc_tile_py)
_norm_mc_tail = njit(cache=True)(_twin(_norm_mc_tile_py, "_tail"))


@njit(inline="always")
def _norm_mc_rows(xf, rf, yf, r0, r1, cols, mean, scale, shift, code, slope, has_res):
    # rows [r0, r1): whole tiles, then the rest (see stats_mc); mean, scale, shift tiled
    t_ = mean.shape[0]
    e = r0 * cols
    end = r1 * cols
    while e + t_ <= end:
        _norm_mc_tile(xf, rf, yf, e, t_, mean, scale, shift, code, slope, has_res)
        e += t_
    if e < end:
        _norm_mc_tail(xf, rf, yf, e, end - e, mean, scale, shift, code, slope, has_res)


@njit(cache=True)
def _norm_mc_rows_any(xf, rf, yf, r0, r1, cols, mean, scale, shift, code, slope, has_res):
    # (see "Variants")
    if code == 0:
        if has_res:
            _norm_mc_rows(xf, rf, yf, r0, r1, cols, mean, scale, shift, 0, slope, True)
        else:
            _norm_mc_rows(xf, rf, yf, r0, r1, cols, mean, scale, shift, 0, slope, False)
    elif code == 1:
        if has_res:
            _norm_mc_rows(xf, rf, yf, r0, r1, cols, mean, scale, shift, 1, slope, True)
        else:
            _norm_mc_rows(xf, rf, yf, r0, r1, cols, mean, scale, shift, 1, slope, False)
    else:
        _norm_mc_rows(xf, rf, yf, r0, r1, cols, mean, scale, shift, code, slope, has_res)


def normalize_mc(x, mean_in, v, eps, count, mode, weight, bias, res, code, slope, blocks, y,
                 var_out):
    m_, cols = x.shape
    c_ = v.shape[0]
    rep = cols // c_
    mean, invstd, scale, shift, delta = _arrays(x, c_)
    _prologue(mean_in, v, eps, count, mode, weight, bias, mean, invstd, scale, shift, delta,
              var_out)
    has_res = res.shape[0] > 0
    t_ = _tile_len(cols)
    mt, st, bt = _tiled(mean, rep, t_), _tiled(scale, rep, t_), _tiled(shift, rep, t_)
    xf = x.reshape(-1)
    yf = y.reshape(-1)
    rf = res.reshape(-1)
    for bl in prange(blocks):
        r0 = m_ * bl // blocks
        r1 = m_ * (bl + 1) // blocks
        _norm_mc_rows_any(xf, rf, yf, r0, r1, cols, mt, st, bt, code, slope, has_res)


# ---------------------------------------------------------------------------------------
# backward_reduce: Σdz and Σdz·(x − μ) per channel, partials in float64


@njit(inline="always")
def _dz_at(dyr, rr, l, xc, s, b, code, slope, has_res):
    """dz of value l of an NCL row, given xc = x − m: dy itself without an activation (z
    is not needed then), else dy·act′(z) with z recomputed."""
    if code == 0:
        return _load(dyr[l])
    z = xc * s + b
    if has_res:
        z = z + _load(rr[l])
    return _dz(_load(dyr[l]), z, code, slope)


@njit(inline="always", fastmath=_REDUCE_MATH)
def _dz_block_sums(dyr, xr, rr, n, m, s, b, code, slope, has_res):
    """Σdz and Σdz·(x − m) of one short block, in the accumulation dtype."""
    b1 = _acc_zero(xr)
    b2 = _acc_zero(xr)
    for l in range(n):
        xc = _load(xr[l]) - m
        g = _dz_at(dyr, rr, l, xc, s, b, code, slope, has_res)
        b1 += g
        b2 += g * xc
    return b1, b2


@njit(inline="always", fastmath=_REDUCE_MATH)
def _reduce_ncl_span(dyf, xf, rf, i0, i1, c, c_, l_, m, s, b, code, slope, has_res):
    """Σdz and Σdz·(x − m) over elements [i0, i1) of channel c's N·L values, walking its
    rows in the flat arrays as stats_ncl does."""
    a1 = 0.0
    a2 = 0.0
    n = i0 // l_
    l0 = i0 - n * l_
    base = (n * c_ + c) * l_
    i = i0
    while i < i1:
        l1 = min(l_, l0 + (i1 - i), l0 + _BLK)
        xr = xf[base + l0:base + l1]
        dyr = dyf[base + l0:base + l1]
        rr = rf[base + l0:base + l1] if has_res else xr
        # a short block in the accumulation dtype, then into the float64 accumulator
        b1, b2 = _dz_block_sums(dyr, xr, rr, l1 - l0, m, s, b, code, slope, has_res)
        a1 += np.float64(b1)
        a2 += np.float64(b2)
        i += l1 - l0
        if l1 == l_:
            l0 = 0
            base += c_ * l_
        else:
            l0 = l1
    return a1, a2


@njit(inline="always", fastmath=_REDUCE_MATH)
def _reduce_ncl_rows_task(dyf, xf, rf, r0, r1, c_, l_, mean, scale, shift, a1, a2, code,
                          slope, has_res):
    """Σdz and Σdz·(x − m) of whole rows [r0, r1) in memory order, added to the
    per-channel partials a1, a2 (short rows; see _stats_ncl_rows)."""
    c = r0 % c_
    for r in range(r0, r1):
        m = mean[c]
        s = scale[c]
        b = shift[c]
        xr = xf[r * l_:(r + 1) * l_]
        dyr = dyf[r * l_:(r + 1) * l_]
        rr = rf[r * l_:(r + 1) * l_] if has_res else xr
        b1, b2 = _dz_block_sums(dyr, xr, rr, l_, m, s, b, code, slope, has_res)
        a1[c] += np.float64(b1)
        a2[c] += np.float64(b2)
        c += 1
        if c == c_:
            c = 0


@njit(cache=True, fastmath=_REDUCE_MATH)
def _reduce_ncl_span_any(dyf, xf, rf, i0, i1, c, c_, l_, m, s, b, code, slope, has_res):
    # (see "Variants")
    if code == 0:
        return _reduce_ncl_span(dyf, xf, rf, i0, i1, c, c_, l_, m, s, b, 0, slope, False)
    if code == 1:
        if has_res:
            return _reduce_ncl_span(dyf, xf, rf, i0, i1, c, c_, l_, m, s, b, 1, slope, True)
        return _reduce_ncl_span(dyf, xf, rf, i0, i1, c, c_, l_, m, s, b, 1, slope, False)
    return _reduce_ncl_span(dyf, xf, rf, i0, i1, c, c_, l_, m, s, b, code, slope, has_res)


@njit(cache=True, fastmath=_REDUCE_MATH)
def _reduce_ncl_rows_task_any(dyf, xf, rf, r0, r1, c_, l_, mean, scale, shift, a1, a2, code,
                              slope, has_res):
    # (see "Variants")
    if code == 0:
        _reduce_ncl_rows_task(dyf, xf, rf, r0, r1, c_, l_, mean, scale, shift, a1, a2, 0,
                              slope, False)
    elif code == 1:
        if has_res:
            _reduce_ncl_rows_task(dyf, xf, rf, r0, r1, c_, l_, mean, scale, shift, a1, a2, 1,
                                  slope, True)
        else:
            _reduce_ncl_rows_task(dyf, xf, rf, r0, r1, c_, l_, mean, scale, shift, a1, a2, 1,
                                  slope, False)
    else:
        _reduce_ncl_rows_task(dyf, xf, rf, r0, r1, c_, l_, mean, scale, shift, a1, a2, code,
                              slope, has_res)


@njit(inline="always")
def _sum_dz_xhat(invstd, delta, sum_dz, sum_dz_xc):
    """Σ dz·x̂ = r·(Σ dz·(x − mean_k) − delta·Σ dz) from the sums around mean_k (r applied
    once per channel). No correction where Σ dz is not finite (an inf in dy): it would be
    inf − inf or 0·inf, a NaN weight gradient where torch's is ±inf."""
    correction = delta * sum_dz if math.isfinite(sum_dz) else 0.0
    return np.float64(invstd) * (sum_dz_xc - correction)


def reduce_ncl(dy, x, mean_in, v, eps, count, mode, weight, bias, res, code, slope, split,
               sum_dz, sum_dzx):
    n_, c_, l_ = x.shape
    total = n_ * l_
    mean, invstd, scale, shift, delta = _arrays(x, c_)
    _prologue(mean_in, v, eps, count, mode, weight, bias, mean, invstd, scale, shift, delta,
              mean[0:0])
    has_res = res.shape[0] > 0
    dyf = dy.reshape(-1)
    xf = x.reshape(-1)
    rf = res.reshape(-1)
    if l_ <= _BLK:
        # short rows: ``split`` tasks of whole rows in memory order (see _stats_ncl_rows)
        tasks = split
        rows = n_ * c_
        p1 = np.zeros((tasks, c_))
        p2 = np.zeros((tasks, c_))
        for t in prange(tasks):
            r0 = rows * t // tasks
            r1 = rows * (t + 1) // tasks
            a1 = p1[t]
            a2 = p2[t]
            _reduce_ncl_rows_task_any(dyf, xf, rf, r0, r1, c_, l_, mean, scale, shift, a1, a2,
                                      code, slope, has_res)
    else:
        # long rows: ``split`` pieces per channel, each walking its channel's rows
        pieces = split
        tasks = c_ * pieces
        p1 = np.zeros((tasks, 1))
        p2 = np.zeros((tasks, 1))
        for t in prange(tasks):
            c = t // pieces
            p = t - c * pieces
            i0 = total * p // pieces
            i1 = total * (p + 1) // pieces
            m = mean[c]
            s = scale[c]
            b = shift[c]
            a1, a2 = _reduce_ncl_span_any(dyf, xf, rf, i0, i1, c, c_, l_, m, s, b, code,
                                          slope, has_res)
            p1[t, 0] = a1
            p2[t, 0] = a2
    for c in range(c_):
        a1 = 0.0
        a2 = 0.0
        if l_ <= _BLK:
            for t in range(tasks):
                a1 += p1[t, c]
                a2 += p2[t, c]
        else:
            for t in range(c * pieces, (c + 1) * pieces):
                a1 += p1[t, 0]
                a2 += p2[t, 0]
        sum_dz[c] = a1
        sum_dzx[c] = _sum_dz_xhat(invstd[c], delta[c], a1, a2)


def _reduce_mc_tile_py(dyf, xf, rf, e, n, mean, scale, shift, b1, b2, code, slope, has_res):
    xr = xf[e:e + n]
    dyr = dyf[e:e + n]
    rr = rf[e:e + n] if has_res else xr
    for j in range(n):
        xc = _load(xr[j]) - mean[j]
        if code == 0:
            g = _load(dyr[j])
        else:
            z = xc * scale[j] + shift[j]
            if has_res:
                z = z + _load(rr[j])
            g = _dz(_load(dyr[j]), z, code, slope)
        b1[j] += g
        b2[j] += g * xc


# one inlined copy per variant, one shared for partial tiles (see _norm_mc_tail)
_reduce_mc_tile = njit(inline="always", fastmath=_REDUCE_MATH)(_reduce_mc_tile_py)
_reduce_mc_tail = njit(cache=True, fastmath=_REDUCE_MATH)(_twin(_reduce_mc_tile_py, "_tail"))


@njit(inline="always", fastmath=_REDUCE_MATH)
def _reduce_mc_rows(dyf, xf, rf, r0, r1, cols, mean, scale, shift, a1, a2, code, slope,
                    has_res):
    t_ = mean.shape[0]
    # short blocks of rows summed in the accumulation dtype per tile position, then into
    # float64 (a1, a2, per tile position)
    b1 = _acc_empty(t_, xf)
    b2 = _acc_empty(t_, xf)
    q = r0
    while q < r1:
        q1 = min(r1, q + _BLK)
        b1[:] = 0
        b2[:] = 0
        e = q * cols
        end = q1 * cols
        # whole tiles, then the rest (see stats_mc)
        while e + t_ <= end:
            _reduce_mc_tile(dyf, xf, rf, e, t_, mean, scale, shift, b1, b2, code, slope,
                            has_res)
            e += t_
        if e < end:
            _reduce_mc_tail(dyf, xf, rf, e, end - e, mean, scale, shift, b1, b2, code, slope,
                            has_res)
        for j in range(t_):
            a1[j] += b1[j]
            a2[j] += b2[j]
        q = q1


@njit(cache=True, fastmath=_REDUCE_MATH)
def _reduce_mc_rows_any(dyf, xf, rf, r0, r1, cols, mean, scale, shift, a1, a2, code, slope,
                        has_res):
    # (see "Variants")
    if code == 0:
        _reduce_mc_rows(dyf, xf, rf, r0, r1, cols, mean, scale, shift, a1, a2, 0, slope, False)
    elif code == 1:
        if has_res:
            _reduce_mc_rows(dyf, xf, rf, r0, r1, cols, mean, scale, shift, a1, a2, 1, slope,
                            True)
        else:
            _reduce_mc_rows(dyf, xf, rf, r0, r1, cols, mean, scale, shift, a1, a2, 1, slope,
                            False)
    else:
        _reduce_mc_rows(dyf, xf, rf, r0, r1, cols, mean, scale, shift, a1, a2, code, slope,
                        has_res)


def reduce_mc(dy, x, mean_in, v, eps, count, mode, weight, bias, res, code, slope, blocks,
              sum_dz, sum_dzx):
    m_, cols = x.shape
    c_ = v.shape[0]
    rep = cols // c_
    mean, invstd, scale, shift, delta = _arrays(x, c_)
    _prologue(mean_in, v, eps, count, mode, weight, bias, mean, invstd, scale, shift, delta,
              mean[0:0])
    has_res = res.shape[0] > 0
    t_ = _tile_len(cols)
    mt, st, bt = _tiled(mean, rep, t_), _tiled(scale, rep, t_), _tiled(shift, rep, t_)
    dyf = dy.reshape(-1)
    xf = x.reshape(-1)
    rf = res.reshape(-1)
    s1 = np.zeros((blocks, t_), np.float64)
    s2 = np.zeros((blocks, t_), np.float64)
    for bl in prange(blocks):
        r0 = m_ * bl // blocks
        r1 = m_ * (bl + 1) // blocks
        a1 = s1[bl]
        a2 = s2[bl]
        _reduce_mc_rows_any(dyf, xf, rf, r0, r1, cols, mt, st, bt, a1, a2, code, slope,
                            has_res)
    a1, a2 = _fold_tiles(s1, s2, c_, rep)
    for c in range(c_):
        sum_dz[c] = a1[c]
        sum_dzx[c] = _sum_dz_xhat(invstd[c], delta[c], a1[c], a2[c])


# ---------------------------------------------------------------------------------------
# backward_elementwise: dx (and dresidual = dz)


@njit(inline="always")
def _dx_value(g, xc, k0, k1, k2):
    """dx = k0·(dz − k1 − xc·k2) (see _dx_coefs). In evaluation k2 = 0 and dx = k0·dz
    whatever x is, as torch's: an infinite or NaN x must not make xc·k2 a NaN there."""
    return k0 * (g - k1 - (xc * k2 if k2 != 0 else k2))


@njit(inline="always")
def _dx_ncl_seg(dyf, xf, rf, dxf, drf, a0, a1, m, s, b, k0, k1, k2, code, slope, has_res,
                want_dres):
    xr = xf[a0:a1]
    dyr = dyf[a0:a1]
    dxr = dxf[a0:a1]
    rr = rf[a0:a1] if has_res else xr
    drr = drf[a0:a1] if want_dres else dxr
    for l in range(a1 - a0):
        xc = _load(xr[l]) - m
        g = _dz_at(dyr, rr, l, xc, s, b, code, slope, has_res)
        dxr[l] = _store(_dx_value(g, xc, k0, k1, k2), dxr)
        if want_dres:
            drr[l] = _store(g, drr)


@njit(inline="always")
def _dx_ncl_task(dyf, xf, rf, dxf, drf, e0, e1, l_, c_, coefs, code, slope, has_res,
                 want_dres):
    # a flat range, walked as in _norm_ncl_task
    mean, scale, shift, k0, k1, k2 = coefs
    row = e0 // l_
    c = row % c_
    a0 = e0
    while a0 < e1:
        a1 = min(e1, (row + 1) * l_)
        _dx_ncl_seg(dyf, xf, rf, dxf, drf, a0, a1, mean[c], scale[c], shift[c], k0[c], k1[c],
                    k2[c], code, slope, has_res, want_dres)
        a0 = a1
        row += 1
        c += 1
        if c == c_:
            c = 0


@njit(cache=True)
def _dx_ncl_task_any(dyf, xf, rf, dxf, drf, e0, e1, l_, c_, coefs, code, slope, has_res,
                     want_dres):
    # (see "Variants")
    if code == 0:
        _dx_ncl_task(dyf, xf, rf, dxf, drf, e0, e1, l_, c_, coefs, 0, slope, False, False)
    elif code == 1:
        if want_dres:
            _dx_ncl_task(dyf, xf, rf, dxf, drf, e0, e1, l_, c_, coefs, 1, slope, True, True)
        elif has_res:
            _dx_ncl_task(dyf, xf, rf, dxf, drf, e0, e1, l_, c_, coefs, 1, slope, True, False)
        else:
            _dx_ncl_task(dyf, xf, rf, dxf, drf, e0, e1, l_, c_, coefs, 1, slope, False, False)
    else:
        _dx_ncl_task(dyf, xf, rf, dxf, drf, e0, e1, l_, c_, coefs, code, slope, has_res,
                     want_dres)


def elementwise_ncl(dy, x, mean_in, v, eps, count, mode, weight, bias, res, sum_dz, sum_dzx,
                    code, slope, tasks, dx, dres):
    c_, l_ = x.shape[1], x.shape[2]
    mean, invstd, scale, shift, delta = _arrays(x, c_)
    _prologue(mean_in, v, eps, count, mode, weight, bias, mean, invstd, scale, shift, delta,
              mean[0:0])
    k0 = _acc_empty(c_, x)
    k1 = _acc_empty(c_, x)
    k2 = _acc_empty(c_, x)
    _dx_coefs(invstd, weight, delta, sum_dz, sum_dzx, count, k0, k1, k2)
    has_res = res.shape[0] > 0
    want_dres = dres.shape[0] > 0
    dyf = dy.reshape(-1)
    xf = x.reshape(-1)
    rf = res.reshape(-1)
    dxf = dx.reshape(-1)
    drf = dres.reshape(-1)
    total = x.size
    coefs = (mean, scale, shift, k0, k1, k2)
    for t in prange(tasks):
        e0 = total * t // tasks
        e1 = total * (t + 1) // tasks
        _dx_ncl_task_any(dyf, xf, rf, dxf, drf, e0, e1, l_, c_, coefs, code, slope, has_res,
                         want_dres)


def _dx_mc_tile_py(dyf, xf, rf, dxf, drf, e, n, coefs, code, slope, has_res, want_dres):
    mean, scale, shift, k0, k1, k2 = coefs  # tiled
    xr = xf[e:e + n]
    dyr = dyf[e:e + n]
    dxr = dxf[e:e + n]
    rr = rf[e:e + n] if has_res else xr
    drr = drf[e:e + n] if want_dres else dxr
    for j in range(n):
        xc = _load(xr[j]) - mean[j]
        if code == 0:
            g = _load(dyr[j])
        else:
            z = xc * scale[j] + shift[j]
            if has_res:
                z = z + _load(rr[j])
            g = _dz(_load(dyr[j]), z, code, slope)
        dxr[j] = _store(_dx_value(g, xc, k0[j], k1[j], k2[j]), dxr)
        if want_dres:
            drr[j] = _store(g, drr)


# one inlined copy per variant, one shared for partial tiles (see _norm_mc_tail)
_dx_mc_tile = njit(inline="always")(_dx_mc_tile_py)
_dx_mc_tail = njit(cache=True)(_twin(_dx_mc_tile_py, "_tail"))


@njit(inline="always")
def _dx_mc_rows(dyf, xf, rf, dxf, drf, r0, r1, cols, coefs, code, slope, has_res, want_dres):
    # whole tiles, then the rest (see stats_mc)
    t_ = coefs[0].shape[0]
    e = r0 * cols
    end = r1 * cols
    while e + t_ <= end:
        _dx_mc_tile(dyf, xf, rf, dxf, drf, e, t_, coefs, code, slope, has_res, want_dres)
        e += t_
    if e < end:
        _dx_mc_tail(dyf, xf, rf, dxf, drf, e, end - e, coefs, code, slope, has_res,
                    want_dres)


@njit(cache=True)
def _dx_mc_rows_any(dyf, xf, rf, dxf, drf, r0, r1, cols, coefs, code, slope, has_res,
                    want_dres):
    # (see "Variants")
    if code == 0:
        _dx_mc_rows(dyf, xf, rf, dxf, drf, r0, r1, cols, coefs, 0, slope, False, False)
    elif code == 1:
        if want_dres:
            _dx_mc_rows(dyf, xf, rf, dxf, drf, r0, r1, cols, coefs, 1, slope, True, True)
        elif has_res:
            _dx_mc_rows(dyf, xf, rf, dxf, drf, r0, r1, cols, coefs, 1, slope, True, False)
        else:
            _dx_mc_rows(dyf, xf, rf, dxf, drf, r0, r1, cols, coefs, 1, slope, False, False)
    else:
        _dx_mc_rows(dyf, xf, rf, dxf, drf, r0, r1, cols, coefs, code, slope, has_res,
                    want_dres)


def elementwise_mc(dy, x, mean_in, v, eps, count, mode, weight, bias, res, sum_dz, sum_dzx,
                   code, slope, blocks, dx, dres):
    m_, cols = x.shape
    c_ = v.shape[0]
    rep = cols // c_
    mean, invstd, scale, shift, delta = _arrays(x, c_)
    _prologue(mean_in, v, eps, count, mode, weight, bias, mean, invstd, scale, shift, delta,
              mean[0:0])
    k0 = _acc_empty(c_, x)
    k1 = _acc_empty(c_, x)
    k2 = _acc_empty(c_, x)
    _dx_coefs(invstd, weight, delta, sum_dz, sum_dzx, count, k0, k1, k2)
    has_res = res.shape[0] > 0
    want_dres = dres.shape[0] > 0
    t_ = _tile_len(cols)
    coefs = (_tiled(mean, rep, t_), _tiled(scale, rep, t_), _tiled(shift, rep, t_),
             _tiled(k0, rep, t_), _tiled(k1, rep, t_), _tiled(k2, rep, t_))
    dyf = dy.reshape(-1)
    xf = x.reshape(-1)
    rf = res.reshape(-1)
    dxf = dx.reshape(-1)
    drf = dres.reshape(-1)
    for bl in prange(blocks):
        r0 = m_ * bl // blocks
        r1 = m_ * (bl + 1) // blocks
        _dx_mc_rows_any(dyf, xf, rf, dxf, drf, r0, r1, cols, coefs, code, slope, has_res,
                        want_dres)


# ---------------------------------------------------------------------------------------
# Running statistics (C-sized; the same arithmetic as ops.update_running_stats)


@njit(cache=True)
def update_running(running_mean, running_var, counter, mean, var, count, momentum):
    """running = (1 − m)·running + m·batch with the unbiased variance; m = momentum, or
    1/num_batches_tracked (after its increment) when momentum < 0 (None)."""
    if counter.shape[0] > 0:
        counter[0] += 1
    factor = momentum if momentum >= 0 else 1.0 / counter[0]
    bessel = count / max(count - 1.0, 1.0)
    for c in range(running_mean.shape[0]):
        running_mean[c] = mean[c] * factor + np.float64(running_mean[c]) * (1.0 - factor)
        running_var[c] = var[c] * bessel * factor + np.float64(running_var[c]) * (1.0 - factor)


# ---------------------------------------------------------------------------------------
# Parallel and serial builds


def _bind(f, view: str, **names):
    """``f`` compiled with its ``_name`` globals bound to ``names`` (under its own name
    per view, for numba's cache; see ``_twin``)."""
    g = dict(f.__globals__)
    g.update(names)
    code = f.__code__.replace(co_name=f"{f.__name__}_{view}",
                              co_qualname=f"{f.__qualname__}_{view}")
    return njit(cache=True)(types.FunctionType(code, g, f"{f.__name__}_{view}"))


# numba (0.68) caches a function that calls a parallel one wrongly when that parallel one
# was loaded from the cache rather than compiled in the same process: the caller's cache
# entry then lacks the parallel loops' code, and a later process that loads the caller
# alone crashes (a segfault in the first evaluation after, say, a float64-mean evaluation
# had cached the parallel normalize by itself). So the parallel builds are never cached on
# their own: Python reaches each through a cached serial caller (``_call_*`` below), and
# the fused entry points further down link it too, so every cache entry that holds a
# parallel kernel compiled it in its own process.


def _call_stats(x, split, mean_out, m2_out):
    _kernel(x, split, mean_out, m2_out)  # noqa: F821


def _call_normalize(x, mean_in, v, eps, count, mode, weight, bias, res, code, slope, tasks,
                    y, var_out):
    _kernel(x, mean_in, v, eps, count, mode, weight, bias, res, code, slope, tasks,  # noqa: F821
            y, var_out)


def _call_reduce(dy, x, mean_in, v, eps, count, mode, weight, bias, res, code, slope, split,
                 sum_dz, sum_dzx):
    _kernel(dy, x, mean_in, v, eps, count, mode, weight, bias, res, code, slope,  # noqa: F821
            split, sum_dz, sum_dzx)


def _call_elementwise(dy, x, mean_in, v, eps, count, mode, weight, bias, res, sum_dz,
                      sum_dzx, code, slope, tasks, dx, dres):
    _kernel(dy, x, mean_in, v, eps, count, mode, weight, bias, res, sum_dz,  # noqa: F821
            sum_dzx, code, slope, tasks, dx, dres)


def _builds(f, call, view: str, fastmath=False):
    """``((parallel, serial), linked)``: the builds Python calls (the parallel one through
    ``call``) and the uncached parallel build the fused entry points link."""
    # parallel=True wakes the worker threads on every call (tens of µs on an idle
    # machine, milliseconds on a loaded one); small tensors take the serial build
    linked = njit(parallel=True, fastmath=fastmath)(f)
    return ((_bind(call, view, _kernel=linked),
             njit(cache=True, fastmath=fastmath)(_twin(f, "_serial"))), linked)


def _kernel_builds(call, fastmath=False, **views):
    """``_builds`` of one kernel per view: ``({view: builds}, {view: linked})``."""
    built = {v: _builds(f, call, v, fastmath) for v, f in views.items()}
    return {v: b[0] for v, b in built.items()}, {v: b[1] for v, b in built.items()}


STATS, _STATS_LINKED = _kernel_builds(_call_stats, _REDUCE_MATH, ncl=stats_ncl, mc=stats_mc)
NORMALIZE, _NORMALIZE_LINKED = _kernel_builds(_call_normalize, ncl=normalize_ncl,
                                              mc=normalize_mc)
REDUCE, _REDUCE_LINKED = _kernel_builds(_call_reduce, _REDUCE_MATH, ncl=reduce_ncl,
                                        mc=reduce_mc)
ELEMENTWISE, _ELEMENTWISE_LINKED = _kernel_builds(_call_elementwise, ncl=elementwise_ncl,
                                                  mc=elementwise_mc)


# ---------------------------------------------------------------------------------------
# One call per pass, by address
#
# On a small tensor the arithmetic is nothing; the time goes to crossing from Python into
# numba. A NumPy view costs ~1.5-2 µs per tensor (torch's ``.numpy()``, then numba's typing
# of the array: 11-14 µs for six arrays, measured on the 2-core machine) against ~0.2 µs
# for an address (``Tensor.data_ptr()``, an integer argument). So these entry points take
# each tensor as its address (0 for an absent one) plus the kernel view's shape, rebuild
# the arrays inside, and run a whole training forward (statistics, normalize with var
# written, running update), an evaluation forward, or a whole backward (reduce,
# elementwise) in one call, of the parallel builds or of the serial ones. The kernels
# they call are the ones above, so the numbers are the same bit for bit: ``_stats``,
# ``_normalize``, ``_reduce``, ``_elementwise`` and ``_tensor_at`` are not module names
# but bound per view and build by ``_bound_builds`` below. ``like`` is a scalar of the
# data's dtype (of its bit pattern's type for 16-bit data, see "Data types"); the
# counter is int64, the per-channel arrays in the accumulation dtype (``_acc``: the
# data's, float32 for 16-bit data) but the mean, which is float64 in training (see
# ``portable.mean_dtype``) and in the accumulation dtype in evaluation (``mean_wide`` says
# which to the backward). The kernels take it widened to float64 (see ``_prologue``).


# The prologue's modes as run-time int64 values: a literal (``1``) in the call would
# make numba compile the kernel once more for ``Literal[int](1)``, beside the int64
# variant the primitives use (each kernel variant costs 10-40 s of compilation).
_MODE_M2 = np.int64(1)
_MODE_VAR = np.int64(2)


@intrinsic
def _pointer(typingctx, address, like):
    """The integer ``address`` as a pointer to ``like``'s type."""
    target = nb_types.unliteral(like)
    if not isinstance(address, nb_types.Integer) or not isinstance(target, nb_types.Number):
        return None
    pointer = nb_types.CPointer(target)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer))
    return pointer(nb_types.intp, like), codegen


@njit(inline="always")
def _vector_at(address, c, like):
    """[c] at ``address``; size 0 where the address is 0 (an absent tensor)."""
    return carray(_pointer(address, like), (c if address != 0 else 0,))


@njit(inline="always")
def _mean_at(address, c, wide, like):
    """The mean at ``address`` as float64: as it is where ``wide``, else widened from
    ``like``'s dtype (exactly)."""
    if wide:
        return _vector_at(address, c, np.float64(0))
    given = _vector_at(address, c, like)
    out = np.empty(given.shape[0], np.float64)
    for i in range(given.shape[0]):
        out[i] = given[i]
    return out


@njit(inline="always")
def _ncl_at(address, n, c, l_, like):
    k = 1 if address != 0 else 0
    return carray(_pointer(address, like), (n * k, c * k, l_ * k))


@njit(inline="always")
def _mc_at(address, m, c, l_, like):
    # (m, c) rows of channels (l_ = 1), or an (n, c, l) array as wide rows (n, c·l)
    k = 1 if address != 0 else 0
    return carray(_pointer(address, like), (m * k, c * l_ * k))


def forward_train_at(x, n, c, l_, rsplit, esplit, eps, count, weight, bias, res, code, slope,
                     running_mean, running_var, counter, momentum, y, mean, var, like):
    """stats → normalize (mode 1, writes var) → update_running (when running_mean is not
    0: the buffers move only once everything else has run)."""
    xa = _tensor_at(x, n, c, l_, like)  # noqa: F821
    mean_a = _vector_at(mean, c, np.float64(0))
    acc = _acc(like)
    var_a = _vector_at(var, c, acc)
    m2 = np.empty_like(var_a)
    _stats(xa, rsplit, mean_a, m2)  # noqa: F821
    _normalize(xa, mean_a, m2, eps, count, _MODE_M2, _vector_at(weight, c, acc),  # noqa: F821
               _vector_at(bias, c, acc), _tensor_at(res, n, c, l_, like), code, slope,  # noqa: F821
               esplit, _tensor_at(y, n, c, l_, like), var_a)  # noqa: F821
    if running_mean != 0:
        update_running(_vector_at(running_mean, c, acc), _vector_at(running_var, c, acc),
                       _vector_at(counter, 1, np.int64(0)), mean_a, var_a, count, momentum)


def normalize_at(x, n, c, l_, mean, var, eps, count, weight, bias, res, code, slope, esplit,
                 y, like):
    """normalize with given (mean, biased var): mode 2 (evaluation)."""
    acc = _acc(like)
    _normalize(_tensor_at(x, n, c, l_, like), _mean_at(mean, c, False, acc),  # noqa: F821
               _vector_at(var, c, acc), eps, count, _MODE_VAR, _vector_at(weight, c, acc),
               _vector_at(bias, c, acc), _tensor_at(res, n, c, l_, like), code, slope,  # noqa: F821
               esplit, _tensor_at(y, n, c, l_, like), _vector_at(0, 0, acc))  # noqa: F821


def backward_at(dy, x, n, c, l_, mean, var, eps, count, weight, bias, res, code, slope,
                rsplit, esplit, need_sums, need_dx, training, sum_dz, sum_dzx, dx, dres, like,
                mean_wide):
    """reduce (if ``need_sums``) → elementwise (if ``need_dx``; the sums enter it only in
    ``training``), from the saved (mean, biased var): mode 2."""
    acc = _acc(like)
    dya = _tensor_at(dy, n, c, l_, like)  # noqa: F821
    xa = _tensor_at(x, n, c, l_, like)  # noqa: F821
    mean_a = _mean_at(mean, c, mean_wide, acc)
    var_a = _vector_at(var, c, acc)
    w = _vector_at(weight, c, acc)
    b = _vector_at(bias, c, acc)
    r = _tensor_at(res, n, c, l_, like)  # noqa: F821
    s1 = _vector_at(sum_dz, c, acc)
    s2 = _vector_at(sum_dzx, c, acc)
    if need_sums:
        _reduce(dya, xa, mean_a, var_a, eps, count, _MODE_VAR, w, b, r, code, slope,  # noqa: F821
                rsplit, s1, s2)
    if need_dx:
        if not training:
            s1 = s2 = _vector_at(0, 0, acc)
        _elementwise(dya, xa, mean_a, var_a, eps, count, _MODE_VAR, w, b, r, s1, s2, code,  # noqa: F821
                     slope, esplit, _tensor_at(dx, n, c, l_, like),  # noqa: F821
                     _tensor_at(dres, n, c, l_, like))  # noqa: F821


_AT = {"ncl": _ncl_at, "mc": _mc_at}


def _bound_builds(f, view: str, **kernels):
    """(parallel, serial) builds of ``f`` for one view: each with ``f``'s ``_name``
    globals bound to that build of the kernels, given as ``(builds, linked)`` (the
    wrapper itself is serial code; its parallel build links the uncached parallel
    kernels, see ``_builds``)."""
    return tuple(_bind(f, view + suffix, _tensor_at=_AT[view],
                       **{name: linked[view] if i == 0 else builds[view][1]
                          for name, (builds, linked) in kernels.items()})
                 for i, suffix in enumerate(("", "_serial")))


FORWARD_TRAIN = {v: _bound_builds(forward_train_at, v, _stats=(STATS, _STATS_LINKED),
                                  _normalize=(NORMALIZE, _NORMALIZE_LINKED))
                 for v in _AT}
FORWARD_EVAL = {v: _bound_builds(normalize_at, v, _normalize=(NORMALIZE, _NORMALIZE_LINKED))
                for v in _AT}
BACKWARD = {v: _bound_builds(backward_at, v, _reduce=(REDUCE, _REDUCE_LINKED),
                             _elementwise=(ELEMENTWISE, _ELEMENTWISE_LINKED))
            for v in _AT}
