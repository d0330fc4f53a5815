"""Batch-norm weights across frameworks: Keras and Flax conventions to torch's, and back.

What differs, precisely:

==================  ==========================  ==========================  =====================
                    torch (and batchnorm)       Keras ``BatchNormalization``  Flax ``nn.BatchNorm``
==================  ==========================  ==========================  =====================
names               weight, bias,               gamma, beta,                params: scale, bias;
                    running_mean, running_var   moving_mean,                batch_stats: mean, var
                                                moving_variance
momentum            weight of the *new* batch:  decay, weight of the *old*  decay, as Keras:
                    r = (1-m)·r + m·batch,      value: r = d·r + (1-d)·batch  default 0.99
                    default 0.1                 default 0.99 (m = 1 - d)
eps                 1e-5                        1e-3 (``epsilon``)          1e-5 (``epsilon``)
running variance    EMA of the *unbiased* batch EMA of the *biased* batch   EMA of the *biased*
                    variance (÷ (n-1))          variance (÷ n) in Keras 3;  batch variance (÷ n)
                                                tf.keras 2's fused kernel
                                                (4-D input, its default)
                                                the unbiased one
channel axis        1 (N, C, ...)               -1 (N, ..., C)              -1 (N, ..., C)
==================  ==========================  ==========================  =====================

Normalization itself uses the biased batch variance everywhere, so the layers compute
the same function given the same four vectors and eps: copied as is (the default), the
running variance gives the source layer's evaluation outputs exactly. Where the source
averaged the biased batch variance, the stored variances differ by the factor n/(n-1),
n the values per channel of a training batch (batch size × spatial size), which is not
in the checkpoint: ``count=n`` applies it, so that further training averages the same
quantity as torch's layers do, at the price of evaluation outputs that differ from the
source layer's by that factor in the variance (relative 1/(n-1): 0.4% for a batch of 256
vectors, far less for images). Leave ``count`` out for tf.keras 2 models whose batch
norms ran its fused kernel (4-D input, its default): that kernel averages the unbiased
variance, as torch does. The momentum and eps are set on the module so that it goes on
behaving as the source layer did. A ``momentum=None`` layer (a cumulative average) is
exported with momentum None and loads back as one, but the number of batches it has
averaged is in neither checkpoint: the loaded layer goes on with its own
``num_batches_tracked`` (a new layer's next training batch replaces the loaded
statistics), unless that is set to the number. The channel axis is the caller's business: permute Keras/Flax
channels-last inputs to (N, C, ...).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from decimal import Decimal

import numpy as np
import torch
from torch import nn

from ._common import check_integer, lazy_batch_norms_without_input


def _key(name: str) -> str:
    # "model/bn_1/gamma:0" -> "gamma"
    return name.rsplit("/", 1)[-1].split(":", 1)[0]


def _bessel(count: int | None) -> float:
    if count is None:
        return 1.0
    count = check_integer(count, 2, "count must be an integer >= 2 (values per channel in "
                                    "a training batch)")
    return count / (count - 1)


def _complement(x: float) -> float:
    """``1 - x`` as written in decimal: 0.99 gives 0.01, not 1 - 0.99 =
    0.010000000000000009, so that a momentum survives a round trip as it was typed."""
    return float(1 - Decimal(repr(float(x))))


_KERAS_NAMES = ("gamma", "beta", "moving_mean", "moving_variance")
_KERAS_WHAT = ("a scale (gamma)", "an offset (beta)", "a moving mean", "a moving variance")
_FLAX_WHAT = ("a scale ('scale')", "an offset ('bias')", "a mean ('mean')",
              "a variance ('var')")


def _check_layer(bn, caller: str) -> None:
    """TypeError for what is not one batch-norm layer (ours, torch's, a FrozenBatchNorm,
    torchvision's too: what has running statistics and an eps): a model or another layer
    has no weights of one Keras/Flax layer."""
    if not (isinstance(bn, nn.Module) and hasattr(bn, "running_mean")
            and hasattr(bn, "running_var") and hasattr(bn, "eps")):
        raise TypeError(f"{caller}() takes one batch-norm layer (ours, torch's or a "
                        f"FrozenBatchNorm), got {type(bn).__name__}: pass the layer itself "
                        f"(model.bn1, say), once per layer")


def _refuse_uninitialized(bn: nn.Module) -> None:
    if lazy_batch_norms_without_input(bn):
        raise ValueError(f"{type(bn).__name__} has not seen input yet, so it has no "
                         f"parameters or statistics of a known size: run it (or the model) "
                         f"on one batch first")


def _checked(t, value, what: str, absent_because: str):
    """``value`` as a float64 tensor of ``t``'s shape (None where both are absent), or
    ValueError; writes nothing."""
    if t is None:
        if value is not None:
            raise ValueError(f"the source has {what} but this layer has none ({absent_because})")
        return None
    if value is None:
        raise ValueError(f"the source lacks {what}, which this layer has")
    v = torch.as_tensor(np.asarray(value), dtype=torch.float64, device="cpu")
    if v.shape != t.shape:
        raise ValueError(f"{what} has shape {tuple(v.shape)}, the layer expects "
                         f"{tuple(t.shape)}")
    return v


def _real(x, what: str, rule: str) -> float:
    """``float(x)`` for a real number: Python's, NumPy's or a one-value real tensor (a bool
    is none); TypeError otherwise."""
    if isinstance(x, torch.Tensor) and x.numel() == 1 and not (
            x.dtype.is_complex or x.dtype is torch.bool):
        return float(x)
    if not isinstance(x, numbers.Real) or isinstance(x, bool):
        raise TypeError(f"{what} must be {rule}, got {type(x).__name__} {x!r}")
    return float(x)


def _torch_momentum(momentum) -> float | None:
    """torch's momentum for a Keras/Flax decay; None (a cumulative average) stays None."""
    if momentum is None:
        return None
    rule = ("the Keras/Flax decay in [0, 1] (0.99 is torch's momentum 0.01), or None for "
            "a cumulative average")
    decay = _real(momentum, "momentum", rule)
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"momentum must be {rule}; got {momentum!r}")
    return _complement(decay)


@torch.no_grad()
def _load(bn: nn.Module, weight, bias, mean, var, momentum, eps, count,
          what=_KERAS_WHAT) -> nn.Module:
    # Everything is checked before the first write: a bad array, count, momentum or eps
    # raises with the layer exactly as it was, never with some of it loaded.
    _refuse_uninitialized(bn)
    bessel = _bessel(count)
    torch_momentum = _torch_momentum(momentum)
    eps = _real(eps, "epsilon", "a number >= 0")
    if not eps >= 0:
        raise ValueError(f"epsilon must be a number >= 0, got {eps!r}")
    no_stats = "track_running_stats=False"
    targets = [getattr(bn, "weight", None), getattr(bn, "bias", None), bn.running_mean,
               bn.running_var]
    values = [_checked(targets[0], weight, what[0], "affine=False"),
              _checked(targets[1], bias, what[1], "affine=False or bias=False"),
              _checked(targets[2], mean, what[2], no_stats),
              _checked(targets[3], var, what[3], no_stats)]
    if values[3] is not None:
        values[3] = values[3] * bessel
    if any(t is not None and t.is_meta for t in targets):
        # (a copy into a meta tensor is no copy: the layer would keep no weight at all)
        raise ValueError(f"{type(bn).__name__} is on the meta device, where tensors hold no "
                         f"values: give it memory first (bn.to_empty(device='cpu'))")
    for t, v in zip(targets, values):
        if t is not None:
            t.copy_(v)
    if hasattr(bn, "momentum"):  # (a FrozenBatchNorm has none: its statistics never move)
        bn.momentum = torch_momentum
    bn.eps = eps
    return bn


def _export(bn: nn.Module, count, caller: str) -> tuple:
    _check_layer(bn, caller)
    _refuse_uninitialized(bn)
    if getattr(bn, "running_mean", None) is None:
        raise ValueError(f"{type(bn).__name__} with track_running_stats=False has no running "
                         f"statistics, and Keras's and Flax's batch norms keep a moving mean "
                         f"and variance")
    bessel = _bessel(count)

    def get(t, scale=1.0):
        # scaled in float64, rounded once to the layer's precision (a copy: .numpy() of
        # the layer's own float64 tensor would leave its storage unresizable, see cpu.py)
        return None if t is None else (
            t.detach().to("cpu", torch.float64, copy=True).numpy() / scale).astype(
            np.float32 if t.dtype != torch.float64 else np.float64)
    # A FrozenBatchNorm's statistics never move: decay 1
    momentum = getattr(bn, "momentum", 0.0)
    decay = None if momentum is None else _complement(momentum)
    return get(getattr(bn, "weight", None)), get(getattr(bn, "bias", None)), \
        get(bn.running_mean), get(bn.running_var, bessel), decay


def _required(source: Mapping, keys: tuple[str, ...], what: str) -> list:
    missing = [k for k in keys if k not in source]
    if missing:
        raise ValueError(f"{what} lacks {', '.join(map(repr, missing))} (it has "
                         f"{', '.join(map(repr, source)) or 'nothing'})")
    return [source[k] for k in keys]


def load_keras(bn: nn.Module, weights, *, momentum: float = 0.99, epsilon: float = 1e-3,
               count: int | None = None) -> nn.Module:
    """Load a Keras ``BatchNormalization``'s weights into ``bn`` (ours or torch's); in place.

    ``weights``: a mapping with ``gamma``, ``beta``, ``moving_mean``, ``moving_variance``
    (names may carry a scope and ``:0``; gamma/beta absent for ``scale``/``center=False``),
    or the 4-list ``layer.get_weights()`` returns. ``momentum`` and ``epsilon`` are the
    Keras layer's; ``bn.momentum`` becomes ``1 - momentum`` and ``bn.eps`` ``epsilon``.
    ``momentum=None``, what :func:`to_keras` gives for a ``momentum=None`` layer, makes
    ``bn`` one too (a cumulative average, counted by ``bn``'s own num_batches_tracked:
    see the module docstring).
    ``count``: values per channel of a training batch, to turn a biased moving variance
    into torch's unbiased one for further training (see the module docstring: evaluation
    then differs from the source layer's). Default: copied as is.
    The names of a mapping must be one layer's: two that are the same name once their
    scopes are removed (a whole model's weights), or a name of none of the four, raise
    ``ValueError``.

    Shapes, ``count``, ``momentum`` (a decay in [0, 1], or None) and ``epsilon`` (>= 0) are
    all checked before anything is written: on ``ValueError`` or ``TypeError`` ``bn`` is
    unchanged.
    """
    _check_layer(bn, "load_keras")
    if isinstance(weights, Mapping):
        w, given = {}, {}
        for name, value in weights.items():
            key = _key(name)
            if key in w:
                raise ValueError(f"{given[key]!r} and {name!r} are both {key!r} once their "
                                 f"scopes are removed: pass one layer's weights")
            w[key], given[key] = value, name
        unknown = [given[k] for k in w if k not in _KERAS_NAMES]
        if unknown:
            raise ValueError(f"{', '.join(map(repr, unknown))}: not a weight of a Keras "
                             f"BatchNormalization ({', '.join(_KERAS_NAMES)})")
    elif isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
        raise TypeError(f"weights must be a dict of named weights or the list "
                        f"get_weights() returns, got {type(weights).__name__}")
    elif len(weights) == 4:
        w = dict(zip(_KERAS_NAMES, weights))
    else:
        raise ValueError("pass a dict of named weights unless get_weights() returned all 4 "
                         f"(gamma, beta, moving_mean, moving_variance); got {len(weights)}")
    mean, var = _required(w, ("moving_mean", "moving_variance"), "the Keras weights")
    return _load(bn, w.get("gamma"), w.get("beta"), mean, var, momentum, epsilon, count)


def to_keras(bn: nn.Module, *, count: int | None = None) -> tuple[dict, dict]:
    """``(weights, config)`` for a Keras ``BatchNormalization``: weights as float NumPy
    arrays named gamma/beta/moving_mean/moving_variance (absent when the layer has none),
    config ``{'momentum': 1 - bn.momentum (None for momentum=None), 'epsilon': bn.eps,
    'axis': 1, 'center': has beta, 'scale': has gamma}`` (axis 1 for (N, C, ...) data,
    center/scale False where the layer has no bias/weight, so that
    ``BatchNormalization(**config)`` takes the weights); a ``FrozenBatchNorm*d``, whose statistics
    never move, gives momentum 1. ``count`` turns the unbiased running variance into
    Keras's biased one. A layer without running statistics raises ``ValueError``."""
    g, b, m, v, decay = _export(bn, count, "to_keras")
    weights = {k: a for k, a in (("gamma", g), ("beta", b), ("moving_mean", m),
                                 ("moving_variance", v)) if a is not None}
    return weights, {"momentum": decay, "epsilon": float(bn.eps), "axis": 1,
                     "center": b is not None, "scale": g is not None}


def load_flax(bn: nn.Module, variables: Mapping, *, momentum: float = 0.99,
              epsilon: float = 1e-5, count: int | None = None) -> nn.Module:
    """Load a Flax ``nn.BatchNorm``'s variables into ``bn``; in place.

    ``variables``: ``{'params': {'scale', 'bias'}, 'batch_stats': {'mean', 'var'}}`` for
    this layer (arrays of any kind NumPy reads, jax arrays included). ``momentum`` and
    ``epsilon`` are the Flax layer's (``momentum=None`` and the checks before writing as
    in :func:`load_keras`); ``count`` as in :func:`load_keras`.
    """
    _check_layer(bn, "load_flax")
    if not isinstance(variables, Mapping):
        raise TypeError(f"variables must be a mapping {{'params': ..., 'batch_stats': ...}}, "
                        f"got {type(variables).__name__}")
    params = variables.get("params", {})
    [stats] = _required(variables, ("batch_stats",), "the Flax variables")
    mean, var = _required(stats, ("mean", "var"), "the Flax batch_stats")
    return _load(bn, params.get("scale"), params.get("bias"), mean, var, momentum, epsilon,
                 count, _FLAX_WHAT)


def to_flax(bn: nn.Module, *, count: int | None = None) -> tuple[dict, dict]:
    """``(variables, config)`` for a Flax ``nn.BatchNorm``: ``{'params': {'scale', 'bias'},
    'batch_stats': {'mean', 'var'}}`` as NumPy arrays, and ``{'momentum', 'epsilon',
    'axis': 1, 'use_bias', 'use_scale'}``, as :func:`to_keras` gives them."""
    g, b, m, v, decay = _export(bn, count, "to_flax")
    params = {k: a for k, a in (("scale", g), ("bias", b)) if a is not None}
    return ({"params": params, "batch_stats": {"mean": m, "var": v}},
            {"momentum": decay, "epsilon": float(bn.eps), "axis": 1, "use_bias": b is not None,
             "use_scale": g is not None})
