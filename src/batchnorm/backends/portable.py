"""The four primitives in plain torch ops: any device, any floating dtype, differentiable.

This module is the contract every other backend implements, and the fallback for
tensors no faster backend takes. Because it is written in torch ops, calling these
functions directly (not through the custom ops) records an autograd graph, which is how
double backward works (see ``ops.py``).

Conventions shared by every backend
-----------------------------------
* ``x`` (and ``dy``, ``residual``, the outputs) arrive in a *kernel view*: either
  ``(N, C, L)`` contiguous ("NCL") or ``(M, C)`` contiguous ("channels-last", which
  also covers a plain ``(N, C)`` input). The channel dimension is always dim 1.
* ``mean`` and ``invstd`` are ``[C]`` in the accumulation dtype: float64 for float64
  inputs, float32 otherwise. Exception: ``stats`` returns the mean in float64 (see
  :func:`mean_dtype`); ``ops`` splits it before the elementwise primitives see it. ``weight`` and ``bias`` are ``[C]`` or None, in any
  floating dtype (float32 parameters with half inputs, as autocast produces).
* ``activation`` is one of :data:`ACTIVATIONS`; ``slope`` is LeakyReLU's negative
  slope (ignored by the others).
* The output of the forward is ``y = act(z)`` with the pre-activation
  ``z = weight * (x - mean) * invstd + bias + residual``. In backward,
  ``dz = dy * act'(z)``; the weight and bias gradients are exactly ``Σ dz·x̂`` and ``Σ dz``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ACTIVATIONS = ("none", "relu", "leaky_relu", "silu", "gelu", "gelu_tanh", "sigmoid", "tanh")
DEVICES = None  # torch ops: any device


# ---------------------------------------------------------------------------------------
# Kernel views


CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def is_channels_last(x: Tensor) -> bool:
    """Dense with channels innermost (channels_last, channels_last_3d, or (N, L, C)ᵀ):
    ``x.movedim(1, -1).is_contiguous()``, asked through the memory format where torch has
    one (a flag it keeps, 0.5 µs against 2.5 µs for making the view)."""
    if x.dim() < 3 or x.is_contiguous():
        return False
    fmt = CHANNELS_LAST.get(x.dim())
    if fmt is not None:
        return x.is_contiguous(memory_format=fmt)
    return x.movedim(1, -1).is_contiguous()


def strided_channels_last(x: Tensor) -> bool:
    """Whether torch takes a 4-D/5-D tensor's strides for channels_last (and so gives it a
    channels_last output): c10's ``is_channels_last_strides_2d``/``_3d``, which
    ``suggest_memory_format`` reads. Each stride, C first, then the spatial dims from the
    last, then N, is at least the one before times its size; a stride-0 C (a broadcast) and
    the ambiguous cases go to the contiguous format. A channel slice or a crop of a
    channels_last tensor passes; a step along W (stride 12 for a row of 30) does not."""
    sizes, strides = x.shape, x.stride()
    if strides[1] == 0:
        return False
    least = 0
    for d in (1, *range(x.dim() - 1, 1, -1), 0):
        if sizes[d] == 0 or strides[d] < least:
            return False
        if d == 0 and least == strides[1]:
            return False
        least = strides[d] * max(sizes[d], 1)
    return True


def to_kernel_view(x: Tensor, channels_last: bool) -> Tensor:
    """(M, C) contiguous for channels-last data and 2-D input, else (N, C, L) contiguous.

    A view where the layout allows, a copy otherwise (non-contiguous slices, or a
    residual whose layout differs from the input's).
    """
    shape = x.shape
    if len(shape) == 2:
        return x.contiguous()
    if channels_last:
        return x.movedim(1, -1).contiguous().view(-1, shape[1])
    if len(shape) == 3:
        return x.contiguous()
    # L spelled out: view(N, C, -1) is ambiguous for an empty batch.
    return x.contiguous().view(shape[0], shape[1], math.prod(shape[2:]))


def from_kernel_view(v: Tensor, shape: torch.Size, channels_last: bool) -> Tensor:
    """The inverse of :func:`to_kernel_view`: the input's shape, with its memory format."""
    if len(shape) <= 3 and not channels_last:
        return v
    if not channels_last:
        return v.view(shape)
    permuted = (shape[0], *shape[2:], shape[1])
    return v.view(permuted).movedim(-1, 1)


# ---------------------------------------------------------------------------------------
# Dtypes


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics accumulate in float64 for float64 inputs, in float32 for the rest."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def mean_dtype(x: Tensor) -> torch.dtype:
    """``stats`` returns the mean in float64 (where the device has it), whatever x's dtype.

    A float32 mean cannot hold a large mean precisely enough: at 1e6 its spacing is
    0.0625, so ``x - mean`` would be off by up to 0.03 for data of standard deviation 1 (a
    3% error in the output). The kernels accumulate around a shift (a value of the
    channel) in the acc dtype and add the shift back in float64; ``ops`` then hands the
    elementwise primitives a float32 mean and folds the remainder into the bias.
    """
    return torch.float32 if x.device.type == "mps" else torch.float64


def running_mean_dtype(running_mean: Tensor, acc: torch.dtype) -> torch.dtype:
    """The dtype evaluation keeps ``running_mean`` in: the wider of its own and the acc
    dtype. A float64 running mean on float32 data (a ``.double()`` layer) stays float64
    and is split for the kernels as the batch mean is (``ops.centre_for_kernels``):
    rounded to float32, a mean of 1e6 would move every output by up to 0.03/std."""
    return torch.promote_types(acc, running_mean.dtype)


def channel_sums(t: Tensor) -> Tensor:
    """Per-channel sums over every dimension of a kernel view but the channel one (dim 1).

    An (N, C, L) view is summed over L, then over N, not over both at once: torch's CPU
    reduction over dims (0, 2) with a short L adds the values one by one into a float32
    accumulator (on (2^23, 2, 2) the variance came out 5.9e-3 off, and 10σ with an outlier
    as the first value), where a sum over one dimension at a time cascades (1e-7); it is
    also faster there. With L = 1, or off the CPU (whose reductions are trees), in one."""
    if t.dim() == 2:
        return t.sum(0)
    if t.shape[2] == 1 or t.device.type != "cpu":
        return t.sum((0, 2))
    return t.sum(2).sum(0)


def _per_channel(t: Tensor, like: Tensor) -> Tensor:
    """A [C] tensor shaped to broadcast against a kernel view."""
    return t.view(1, -1) if like.dim() == 2 else t.view(1, -1, 1)


def stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel ``mean`` (in :func:`mean_dtype`) and ``m2 = Σ (x - mean)²`` (acc dtype).

    Two passes (mean, then centred squares) rather than ``Σx² - (Σx)²/n``: the raw
    formula cancels catastrophically when the mean is large against the spread (float32
    data with mean 1e6 and std 1 would lose every digit of the variance). Both passes
    work on ``x - shift``, shift being the channel's first value (0 if that is not
    finite): that difference is exact for data close to the shift, so neither the mean
    nor m2 loses digits to the magnitude of the data, and a constant channel gives exactly
    mean == its value and m2 == 0. An empty input gives mean 0 and m2 0.

    The second pass also sums the centred values (the corrected two-pass algorithm): Σc
    is what the acc-dtype shifted mean missed, and Σc/n is added to the mean. Without it
    the mean carried the rounding of a float32 value of the size of mean − shift: with an
    outlier as the first value (1000σ from the mean) that was an error of 5e-5σ, against
    3e-8σ with it. (m2 would lose (Σc)²/n, of relative size u²·n at most: not worth two
    more ops.)
    """
    xa = x.to(acc_dtype(x.dtype))
    if xa.numel() == 0:
        zeros = xa.new_zeros(x.shape[1])
        return zeros.to(mean_dtype(x)), zeros
    shift = xa.select(0, 0) if x.dim() == 2 else xa[0, :, 0]
    # an infinite first value would make every x − shift inf − inf (a NaN mean where
    # torch's is ±inf): such a channel sums around 0
    shift = shift.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    # Detached: the statistics do not depend on the shift, but a graph through it does
    # (double backward). There, d mean/d x0 = 1 − (n−1)/n cancels in float32, and the
    # second derivative at the channel's first value was 1e-3 where it is 0 (n = 8192).
    shift = shift.detach()
    shifted = xa - _per_channel(shift, xa)
    count = xa.numel() // xa.shape[1]
    shifted_mean = channel_sums(shifted) / count
    centred = shifted - _per_channel(shifted_mean, xa)
    m2 = channel_sums(centred * centred)
    # a NaN or infinite Σc comes with a NaN or infinite shifted mean already: the
    # correction is left out there, so that an inf in x still gives an infinite mean
    residue = channel_sums(centred).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    mean = torch.add(shift.to(mean_dtype(x)) + shifted_mean.to(mean_dtype(x)), residue,
                     alpha=1.0 / count)
    return mean, m2


def _activate(z: Tensor, activation: str, slope: float) -> Tensor:
    if activation == "none":
        return z
    if activation == "relu":
        return torch.relu(z)
    if activation == "leaky_relu":
        return torch.nn.functional.leaky_relu(z, slope)
    if activation == "silu":
        return torch.nn.functional.silu(z)
    if activation == "gelu":
        return torch.nn.functional.gelu(z)
    if activation == "gelu_tanh":
        return torch.nn.functional.gelu(z, approximate="tanh")
    if activation == "sigmoid":
        return torch.sigmoid(z)
    if activation == "tanh":
        return torch.tanh(z)
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def activation_grad(z: Tensor, activation: str, slope: float) -> Tensor:
    """act'(z), written out so that it is itself differentiable (double backward)."""
    if activation == "relu":
        return (z > 0).to(z.dtype)
    if activation == "leaky_relu":
        return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, slope))
    if activation == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if activation == "gelu":
        # d/dz [z Φ(z)] = Φ(z) + z φ(z)
        cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2.0)))
        return cdf + z * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
    if activation == "gelu_tanh":
        # gelu_tanh(z) = 0.5 z (1 + tanh(u)), u = √(2/π) (z + 0.044715 z³)
        u = _SQRT_2_OVER_PI * (z + 0.044715 * z * z * z)
        t = torch.tanh(u)
        du = _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * z * z)
        return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * du
    if activation == "sigmoid":
        s = torch.sigmoid(z)
        return s * (1 - s)
    if activation == "tanh":
        t = torch.tanh(z)
        return 1 - t * t
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def _xhat(x: Tensor, mean: Tensor, invstd: Tensor) -> Tensor:
    xa = x.to(mean.dtype)
    return (xa - _per_channel(mean, xa)) * _per_channel(invstd, xa)


def _pre_activation(x, mean, invstd, weight, bias, residual) -> tuple[Tensor, Tensor]:
    """(x̂, z) in the acc dtype."""
    xhat = _xhat(x, mean, invstd)
    z = xhat
    if weight is not None:
        z = z * _per_channel(weight.to(mean.dtype), z)
    if bias is not None:
        z = z + _per_channel(bias.to(mean.dtype), z)
    if residual is not None:
        z = z + residual.to(mean.dtype)
    return xhat, z


def normalize(x, mean, invstd, weight, bias, residual, activation: str, slope: float) -> Tensor:
    """``y = act(weight * (x - mean) * invstd + bias + residual)``, in x's dtype."""
    _, z = _pre_activation(x, mean, invstd, weight, bias, residual)
    return _activate(z, activation, slope).to(x.dtype)


def _dz(dy, x, mean, invstd, weight, bias, residual, activation, slope) -> tuple[Tensor, Tensor]:
    """(x̂, dz) with dz = dy · act'(z), in the acc dtype."""
    if activation == "none":
        return _xhat(x, mean, invstd), dy.to(mean.dtype)
    xhat, z = _pre_activation(x, mean, invstd, weight, bias, residual)
    dy = dy.to(mean.dtype)
    # relu and leaky_relu: torch's own backward ops, selects (a NaN z passes dy, a NaN or
    # infinite dy where relu's unit is off gives 0: dy · 0 would be NaN) whose derivative
    # in z is 0, not absent: a double backward reaches bias and residual as torch's does
    if activation == "relu":
        return xhat, torch.ops.aten.threshold_backward(dy, z, 0)
    if activation == "leaky_relu":
        return xhat, torch.ops.aten.leaky_relu_backward(dy, z, slope, False)
    return xhat, dy * activation_grad(z, activation, slope)


def backward_reduce(dy, x, mean, invstd, weight, bias, residual, activation: str, slope: float):
    """Per-channel ``(Σ dz, Σ dz·x̂)`` in the acc dtype: the bias and weight gradients."""
    xhat, dz = _dz(dy, x, mean, invstd, weight, bias, residual, activation, slope)
    return channel_sums(dz), channel_sums(dz * xhat)


def backward_elementwise(
    dy, x, mean, invstd, weight, bias, residual, sum_dz, sum_dz_xhat, count: int,
    activation: str, slope: float, want_dresidual: bool,
):
    """``dx`` (and ``dresidual = dz`` when asked), in the dtypes of x and residual.

    With batch statistics (``sum_dz`` given), mean and invstd depend on x:
        dx = weight · invstd · (dz − Σdz / count − x̂ · Σdz·x̂ / count)
    With fixed statistics (``sum_dz`` None, evaluation): dx = weight · invstd · dz.
    A channel with invstd == 0 (zero variance and eps == 0) gets dx == 0.
    """
    xhat, dz = _dz(dy, x, mean, invstd, weight, bias, residual, activation, slope)
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    if sum_dz is None:
        g = dz
    else:
        g = dz - _per_channel(sum_dz / count, dz) - xhat * _per_channel(sum_dz_xhat / count, dz)
    dx = (g * _per_channel(scale, g)).to(x.dtype)
    dres = dz.to(residual.dtype if residual is not None else x.dtype) if want_dresidual else None
    return dx, dres
