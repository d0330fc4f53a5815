r"""Batch Normalization in plain NumPy float64: the whole math, forward and backward.

This module is the oracle every test compares against, and the page to read to learn
what the library computes. It imports nothing from the package and nothing but NumPy;
every function takes and returns NumPy arrays and computes in float64, whatever the
dtype of its inputs (a float32 or float16 input is widened exactly, so the reference
answers "what is the exact result on *this* input").

Shapes
------
The input ``x`` has shape ``(N, C, *)``: N batch items, C channels, any number of
spatial dimensions (none for ``(N, C)``, L for ``(N, C, L)``, H, W for images, D, H, W
for volumes). Everything below happens *per channel* c, over the ``n = N · ∏ spatial``
values of that channel; per-channel arrays (``weight``, ``bias``, the statistics) have
shape ``(C,)``.

Forward
-------
In training the statistics are the batch's::

    μ  = (1/n) Σ x                      the mean
    σ² = (1/n) Σ (x − μ)²               the *biased* variance (divide by n, not n − 1)

out of training they are ``running_mean`` and ``running_var``. Then, elementwise::

    s  = 1 / √(σ² + ε)                  the inverse standard deviation ("invstd")
    x̂  = (x − μ) · s                    mean 0, variance σ²/(σ² + ε) ≈ 1 (in training)
    z  = γ · x̂ + β + r                  γ = weight, β = bias, r = an optional residual
    y  = act(z)                         an optional activation

With ``weight=None`` γ is 1, with ``bias=None`` β is 0. PyTorch's ``nn.BatchNorm2d`` is
the case r = 0, act = identity; this library fuses the residual add and the activation
that usually follow it (``y = relu(bn(x) + shortcut)`` in a ResNet block).

*ε = 0.* When a channel is constant its variance is 0, and with ε = 0 the formula reads
0/0. We define s = 0 there, so x̂ = 0 and the channel outputs β: the value the
normalization gives for any ε > 0 (x − μ is exactly 0 for every element), kept at ε = 0.
Its gradient with respect to x is taken as 0 too (see below).

*Numerics.* The mean is computed as ``shift + mean(x − shift)`` with ``shift`` the
channel's first value, and the variance from those shifted values. In float64 this hardly
matters, but it makes a constant channel give exactly ``x − μ = 0`` (the mean of n equal
floats can otherwise round away from their value) and shows the technique the float32
kernels need: the textbook ``Σx²/n − μ²`` cancels catastrophically when the mean is large
against the spread (data of mean 1e6 and standard deviation 1 in float32 lose every digit).
The mean itself needs more than float32 there too: float32 values near 1e6 are 0.0625
apart, so a float32 μ would move every x̂ by up to 0.03. The library keeps μ in float64
and gives its float32 kernels the rounded μ plus a per-channel correction folded into the
bias (``batchnorm.ops.centre_for_kernels``).

Running statistics
------------------
In training, each call also updates the running estimates used at evaluation::

    running_mean ← (1 − m) · running_mean + m · μ
    running_var  ← (1 − m) · running_var  + m · σ² · n / (n − 1)     (the *unbiased* variance)

``m`` is ``momentum`` (0.1 by default). ``momentum=None`` means a cumulative average:
``num_batches_tracked`` counts the training calls (incremented first), and m = 1 /
num_batches_tracked, so after k calls the running statistics are the plain average of the
k batch statistics. ``num_batches_tracked`` is incremented whatever the momentum.

Backward
--------
Given the upstream gradient ``g = ∂L/∂y``, work back through the four lines above.

1. The activation is elementwise: ``dz = ∂L/∂z = g · act′(z)``.
2. z is linear in β, γ and r::

       ∂L/∂β = Σ dz          ∂L/∂γ = Σ dz · x̂          ∂L/∂r = dz

   (sums over the n values of the channel). These two sums are all a backend has to
   reduce; everything else in the backward is elementwise.
3. ``h = ∂L/∂x̂ = γ · dz``.
4. x̂ depends on x directly *and* through μ and σ², which depend on every value of the
   channel. Out of training μ and σ² are constants and simply ``∂L/∂x = s · h``. In
   training, differentiate ``x̂ᵢ = (xᵢ − μ) s`` with respect to xⱼ:

   * ``∂μ/∂xⱼ = 1/n``;
   * ``∂σ²/∂xⱼ = (2/n)(xⱼ − μ)``: the term through μ, −(2/n) Σᵢ (xᵢ − μ) / n, vanishes
     because deviations from the mean sum to zero;
   * ``∂s/∂xⱼ = −½ s³ ∂σ²/∂xⱼ = −(s³/n)(xⱼ − μ) = −(s²/n) x̂ⱼ``.

   Hence ``∂x̂ᵢ/∂xⱼ = s (δᵢⱼ − 1/n) + (xᵢ − μ) ∂s/∂xⱼ = (s/n)(n δᵢⱼ − 1 − x̂ᵢ x̂ⱼ)``, and
   summing over i with the weights hᵢ::

       ∂L/∂xⱼ = Σᵢ hᵢ ∂x̂ᵢ/∂xⱼ = s · (hⱼ − mean(h) − x̂ⱼ · mean(h · x̂))

   With h = γ dz and the sums of step 2::

       dx = γ · s · (dz − (Σ dz)/n − x̂ · (Σ dz·x̂)/n)

   The gradient is the upstream one with its per-channel mean removed, and its component
   along x̂ too (exactly at ε = 0, nearly for a small ε): moving every x of a channel
   together does not change x̂, and scaling them about their mean changes it only
   through ε.

   For a zero-variance channel with ε = 0, s = 0 makes dx = 0 and Σ dz·x̂ = 0. Strictly,
   normalization is not differentiable there (the slightest spread gives x̂ values of
   order 1), so this is a choice: the gradient of the constant β the channel outputs,
   which keeps training finite.

The seed's example
------------------
The article this project comes from runs ``torch.nn.BatchNorm2d(2, eps=0, momentum=0)``
on a ``(2, 2, 3, 4)`` tensor of ones with ``x[0, 0, 0, 0] = 25``.

* Channel 0 gathers the 2 · 3 · 4 = 24 values of both batch items: one 25 and 23 ones.
  μ = (25 + 23) / 24 = 2. The deviations are 23 (once) and −1 (23 times), so
  σ² = (23² + 23 · 1) / 24 = 552 / 24 = 23. The first element normalizes to
  (25 − 2) / √23 = √23 = **4.7958**, every other one to −1 / √23 = −0.2085; with the
  initial γ = 1, β = 0 that is the output.
* Channel 1 is all ones: μ = 1, σ² = 0, and ε = 0: the rule above gives x̂ = 0, y = β = 0.
* With momentum 0 the running statistics stay (0, 1). With momentum 0.1 channel 0's would
  become 0.1 · 2 = 0.2 and 0.9 · 1 + 0.1 · 552 / 23 = 0.9 + 0.1 · 24 = 3.3.

>>> import numpy as np
>>> x = np.ones((2, 2, 3, 4)); x[0, 0, 0, 0] = 25
>>> y, cache = forward(x, np.ones(2), np.zeros(2), training=True, eps=0.0)
>>> round(float(y[0, 0, 0, 0]), 4), float(cache["mean"][0]), float(cache["var"][0])
(4.7958, 2.0, 23.0)
>>> float(np.abs(y[:, 1]).max())
0.0

API
---
``forward(x, weight, bias, ...) -> (y, cache)``, ``backward(dy, cache) -> dict``,
``update_running(...) -> (running_mean, running_var, num_batches_tracked)``, plus the
pieces they are built from: :func:`batch_stats`, :func:`activate`,
:func:`activation_grad`.
"""

from __future__ import annotations

import math

import numpy as np

ACTIVATIONS = ("none", "relu", "leaky_relu", "silu", "gelu", "gelu_tanh", "sigmoid", "tanh")

_erf = np.vectorize(math.erf, otypes=[np.float64])
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_TANH_C = 0.044715


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def _reduce_axes(x: np.ndarray) -> tuple[int, ...]:
    """Every axis but the channel axis (1)."""
    return (0,) + tuple(range(2, x.ndim))


def _per_channel(v: np.ndarray, ndim: int) -> np.ndarray:
    """A (C,) array shaped to broadcast against an (N, C, *) array."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _sigmoid(z):
    # 1 / (1 + e^(−z)) without overflowing e^(−z) for very negative z.
    return 0.5 * (1.0 + np.tanh(0.5 * z))


# ---------------------------------------------------------------------------------------
# Activations


def activate(z: np.ndarray, activation: str = "none", slope: float = 0.01) -> np.ndarray:
    """act(z) for one of :data:`ACTIVATIONS`; ``slope`` is LeakyReLU's negative slope."""
    if activation == "none":
        return z
    if activation == "relu":
        return np.maximum(z, 0.0)
    if activation == "leaky_relu":
        return np.where(z > 0, z, slope * z)
    if activation == "silu":
        return z * _sigmoid(z)
    if activation == "gelu":  # z Φ(z), Φ the standard normal CDF
        return 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0)))
    if activation == "gelu_tanh":  # the tanh approximation of Φ
        return 0.5 * z * (1.0 + np.tanh(_SQRT_2_OVER_PI * (z + _GELU_TANH_C * z**3)))
    if activation == "sigmoid":
        return _sigmoid(z)
    if activation == "tanh":
        return np.tanh(z)
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def activation_grad(z: np.ndarray, activation: str = "none", slope: float = 0.01) -> np.ndarray:
    """act′(z). At the kinks of relu and leaky_relu (z = 0) the left derivative, as torch."""
    if activation == "none":
        return np.ones_like(z)
    if activation == "relu":
        return (z > 0).astype(np.float64)
    if activation == "leaky_relu":
        return np.where(z > 0, 1.0, slope)
    if activation == "silu":  # (z σ)′ = σ + z σ (1 − σ)
        s = _sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    if activation == "gelu":  # (z Φ)′ = Φ + z φ
        return (0.5 * (1.0 + _erf(z / math.sqrt(2.0)))
                + z * np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi))
    if activation == "gelu_tanh":
        u = _SQRT_2_OVER_PI * (z + _GELU_TANH_C * z**3)
        t = np.tanh(u)
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_C * z * z)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du
    if activation == "sigmoid":
        s = _sigmoid(z)
        return s * (1.0 - s)
    if activation == "tanh":
        return 1.0 - np.tanh(z) ** 2
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


# ---------------------------------------------------------------------------------------
# Forward


def batch_stats(x) -> tuple[np.ndarray, np.ndarray, int]:
    """``(mean, biased variance, n)`` of each channel of an (N, C, *) array.

    Computed around each channel's first value (see "Numerics" above; around 0 where
    that value is ±inf or NaN): a constant channel gets exactly its value as mean and
    exactly 0 as variance.
    """
    x = _f64(x)
    axes = _reduce_axes(x)
    n = x.size // x.shape[1]
    if n == 0:
        raise ValueError(f"no values per channel in an input of shape {x.shape}")
    shift = x[(0, slice(None)) + (0,) * (x.ndim - 2)]
    # an infinite (or NaN) first value is no shift: inf − inf would make the mean NaN
    # where torch's is ±inf, so such a channel is summed around 0
    shift = np.where(np.isfinite(shift), shift, 0.0)
    shifted = x - _per_channel(shift, x.ndim)
    shifted_mean = shifted.mean(axis=axes)
    centred = shifted - _per_channel(shifted_mean, x.ndim)
    return shift + shifted_mean, (centred * centred).mean(axis=axes), n


def invstd(var: np.ndarray, eps: float) -> np.ndarray:
    """``1 / √(var + eps)``, and 0 where ``var + eps == 0`` (the ε = 0 rule); NaN where
    ``var + eps`` is negative or NaN (a corrupted running variance), as in torch."""
    v = _f64(var) + eps
    zero = v == 0
    with np.errstate(invalid="ignore"):
        return np.where(zero, 0.0, 1.0 / np.sqrt(np.where(zero, 1.0, v)))


def forward(x, weight=None, bias=None, *, training: bool = True, running_mean=None,
            running_var=None, eps: float = 1e-5, activation: str = "none",
            slope: float = 0.01, residual=None):
    """``y = act(weight · (x − μ) / √(σ² + eps) + bias + residual)`` and a backward cache.

    Args:
        x: (N, C, *) input.
        weight, bias: (C,) arrays or None (γ = 1, β = 0).
        training: batch statistics if True, else ``running_mean``/``running_var``
            (required then). The running statistics are *not* updated here: see
            :func:`update_running`, which takes ``cache["mean"]``, ``cache["var"]``
            and ``cache["count"]``.
        eps: added to the variance; 0 is allowed (zero-variance channels output bias).
        activation, slope: one of :data:`ACTIVATIONS`; slope is leaky_relu's.
        residual: None or an array of x's shape, added before the activation.

    Returns:
        ``(y, cache)``: y in float64; cache a dict with the per-channel ``mean``,
        ``var`` (biased, in training) and ``invstd``, ``count`` (n), and what
        :func:`backward` needs.
    """
    x = _f64(x)
    if x.ndim < 2:
        raise ValueError(f"expected an (N, C, *) input, got shape {x.shape}")
    if training:
        mean, var, count = batch_stats(x)
    else:
        if running_mean is None or running_var is None:
            raise ValueError("training=False needs running_mean and running_var")
        mean, var, count = _f64(running_mean), _f64(running_var), x.size // x.shape[1]
    s = invstd(var, eps)
    xhat = (x - _per_channel(mean, x.ndim)) * _per_channel(s, x.ndim)
    z = xhat
    if weight is not None:
        z = z * _per_channel(_f64(weight), x.ndim)
    if bias is not None:
        z = z + _per_channel(_f64(bias), x.ndim)
    if residual is not None:
        residual = _f64(residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {residual.shape} != input shape {x.shape}")
        z = z + residual
    y = activate(z, activation, slope)
    cache = dict(mean=mean, var=var, invstd=s, count=count, xhat=xhat, z=z,
                 weight=_f64(weight), has_bias=bias is not None,
                 has_residual=residual is not None, training=training,
                 activation=activation, slope=slope)
    return y, cache


# ---------------------------------------------------------------------------------------
# Backward


def backward(dy, cache) -> dict:
    """Gradients of ``Σ dy · y`` given the ``cache`` of :func:`forward`.

    Returns a dict with ``dx`` (x's shape), ``dweight`` and ``dbias`` ((C,), None when
    the forward had no weight / bias) and ``dresidual`` (None without a residual).
    """
    dy = _f64(dy)
    xhat, z = cache["xhat"], cache["z"]
    nd = xhat.ndim
    axes = _reduce_axes(xhat)
    dz = dy * activation_grad(z, cache["activation"], cache["slope"])
    sum_dz = dz.sum(axis=axes)
    sum_dz_xhat = (dz * xhat).sum(axis=axes)
    w = cache["weight"] if cache["weight"] is not None else np.ones_like(sum_dz)
    scale = _per_channel(w * cache["invstd"], nd)
    if cache["training"]:
        n = cache["count"]
        dx = scale * (dz - _per_channel(sum_dz / n, nd) - xhat * _per_channel(sum_dz_xhat / n, nd))
    else:
        dx = scale * dz
    return dict(
        dx=dx,
        dweight=sum_dz_xhat if cache["weight"] is not None else None,
        dbias=sum_dz if cache["has_bias"] else None,
        dresidual=dz if cache["has_residual"] else None,
    )


# ---------------------------------------------------------------------------------------
# Running statistics


def update_running(running_mean, running_var, num_batches_tracked: int, mean, var,
                   count: int, momentum: float | None = 0.1):
    """One training step's update: ``(running_mean, running_var, num_batches_tracked)``.

    ``mean`` and ``var`` are the batch's (``var`` biased, as in ``cache["var"]``); the
    unbiased ``var · count / (count − 1)`` is what is stored. ``momentum=None`` is the
    cumulative average, factor 1 / num_batches_tracked after the increment. Returns new
    arrays (float64); the inputs are not modified.
    """
    if count < 2:
        raise ValueError("the unbiased variance needs at least 2 values per channel "
                         "(training refuses a batch of one)")
    num_batches_tracked = int(num_batches_tracked) + 1
    factor = 1.0 / num_batches_tracked if momentum is None else float(momentum)
    unbiased = _f64(var) * count / (count - 1)
    new_mean = (1.0 - factor) * _f64(running_mean) + factor * _f64(mean)
    new_var = (1.0 - factor) * _f64(running_var) + factor * unbiased
    return new_mean, new_var, num_batches_tracked
