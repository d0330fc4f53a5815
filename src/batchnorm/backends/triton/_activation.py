"""Activations and their derivatives as Triton device functions, selected by a constexpr code.

The formulas are those of ``portable._activate`` / ``portable._dz``, so the
backward recomputes act'(z) from x and the statistics instead of saving a mask.
Python float literals take the dtype of the tensor they meet (Triton's scalar promotion),
so these constants keep float64 precision for float64 inputs. A *runtime* float argument,
though, arrives as float32 on the GPU: LeakyReLU's slope is therefore passed as a
float32 pair ``slope_hi + slope_lo`` (see ``split_float``).
"""

import functools
import math

import numpy as np
import triton
import triton.language as tl

CODES = {"none": 0, "relu": 1, "leaky_relu": 2, "silu": 3, "gelu": 4, "gelu_tanh": 5,
         "sigmoid": 6, "tanh": 7}


@functools.lru_cache(maxsize=256)
def split_float(v: float) -> tuple[float, float]:
    """``v`` as two float32 values whose float64 sum is ``v`` to about 1e-14 (cached: a
    step asks for the same eps and slope several times, and host time counts on small
    inputs)."""
    with np.errstate(over="ignore"):
        hi = float(np.float32(v))
    if not math.isfinite(hi):
        # over float32's largest value (or inf, NaN): the pair (hi, 0), as float32
        # arithmetic holds it; v − hi would be ∓inf (or NaN), and hi + lo NaN in a kernel
        return hi, 0.0
    return hi, float(np.float32(v - hi))


@functools.lru_cache(maxsize=256)
def split_holds(v: float) -> bool:
    """Whether :func:`split_float`'s pair carries ``v`` to float64 kernels (to 1e-13): not
    for a nonzero ``v`` under float32's normal range (about 1.2e-38: the halves are
    subnormal or 0) or over its largest value (inf)."""
    hi, lo = split_float(v)
    return abs((hi + lo) - v) <= 1e-13 * abs(v)


@triton.jit
def _sigmoid(z):
    # exp(-z) overflows to inf for very negative z, and 1/inf == 0: no NaN either way.
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _tanh(u):
    # Written through exp so that it runs on every Triton version and in the interpreter:
    # 1 − 2/(e^{2|u|} + 1), given u's sign (an e^{2|u|} of inf gives 1). Near 0 that
    # difference cancels (its error is an ulp of 1: 1-2 ulps of a float16 output under
    # 1e-3, and tanh(−tiny) came out +0), so there the odd series u − u³/3 + 2u⁵/15 −
    # 17u⁷/315, whose next term is under 2.2e-18 of u for |u| < 0.01.
    a = tl.abs(u)
    t = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
    u2 = u * u
    series = u * (1.0 + u2 * (-0.3333333333333333 + u2 * (0.13333333333333333
                                                          + u2 * -0.05396825396825397)))
    return tl.where(a < 0.01, series, tl.where(u < 0, -t, t))


@triton.jit
def activate(z, ACT: tl.constexpr, slope_hi, slope_lo):
    if ACT == 1:
        y = tl.where(z < 0, 0.0, z)  # keeps NaN, like torch.relu
    elif ACT == 2:
        # One product, as torch's: z·hi + z·lo was −inf·0 or −inf + inf (NaN) at z = −inf.
        # The pair's sum is formed in z's dtype (zeros_like first; float64 keeps slope_lo)
        y = tl.where(z > 0, z, z * (tl.zeros_like(z) + slope_hi + slope_lo))
    elif ACT == 3:
        y = z * _sigmoid(z)
    elif ACT == 4:
        y = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == 5:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        y = 0.5 * z * (1.0 + _tanh(u))
    elif ACT == 6:
        y = _sigmoid(z)
    elif ACT == 7:
        y = _tanh(z)
    else:
        y = z
    return y


@triton.jit
def activation_backward(dy, z, ACT: tl.constexpr, slope_hi, slope_lo):
    """dy·act'(z) for ACT != 0. relu selects, as torch's threshold_backward does: a NaN z
    passes dy, and a NaN or infinite dy where the unit is off gives 0 (dy·0 is NaN)."""
    if ACT == 1:
        dz = tl.where(z <= 0, 0.0, dy)
    elif ACT == 2:
        # zeros_like first: the sum is then formed in z's dtype (float64 keeps slope_lo)
        g = tl.where(z > 0, 1.0, tl.zeros_like(z) + slope_hi + slope_lo)
    elif ACT == 3:
        s = _sigmoid(z)
        g = s * (1.0 + z * (1.0 - s))
    elif ACT == 4:
        # d/dz [z Φ(z)] = Φ(z) + z φ(z)
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        g = cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACT == 5:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        t = _tanh(u)
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        g = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du
    elif ACT == 6:
        s = _sigmoid(z)
        g = s * (1.0 - s)
    else:
        t = _tanh(z)
        g = 1.0 - t * t
    if ACT != 1:
        dz = dy * g
    return dz
