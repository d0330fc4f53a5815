"""Freezing: batch norms that use and keep their running statistics, in ``train()`` too.

Two forms. :func:`freeze` sets the ``frozen`` state of our layers (saved with their
state_dict, see ``modules.py``), optionally also stopping the affine parameters'
gradients, and :func:`unfreeze` undoes it. :class:`FrozenBatchNorm2d` (and 1d, 3d, and Nd
for input of any rank, as a SyncBatchNorm takes) holds weight and bias as *buffers*, for checkpoints and code written for torchvision's or
detectron2's ``FrozenBatchNorm2d``.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from .. import functional as F
from .. import modules
from ..modules import _check_rank, check_constructor_args, refuse_script
from ._common import (
    check_module,
    computed_affine,
    hook_computed_affine,
    is_our_bn,
    is_torch_bn,
    lazy_batch_norms_without_input,
    move_hooks,
    set_submodule,
    warn_computed_affine,
    warn_subclasses,
)


class _FrozenBatchNorm(F.FusedActivationAttribute, nn.Module):
    """Batch norm with fixed statistics and affine parameters, all four as buffers.

    ``y = act((x - running_mean) / sqrt(running_var + eps) * weight + bias + residual)``
    in train and eval alike; gradients flow to the input (and residual) only. Computed by
    the same evaluation path as our ``BatchNorm*d`` in eval, so the outputs are identical.
    Loads a ``BatchNorm`` state_dict (its ``num_batches_tracked`` is ignored). Input of the
    ranks the matching ``BatchNorm1d/2d/3d`` takes; ``FrozenBatchNormNd``, any of 2 or more.

    Args:
        num_features: C, the channel count.
        eps: added to the variance. Default: 1e-5
        activation: (keyword) fused activation, as for ``BatchNorm2d``. Default: None
        device, dtype: of the buffers. Default: None
    """

    __prepare_scriptable__ = refuse_script

    _ranks: tuple[int, ...] = ()
    _what = ""

    def __init__(self, num_features: int, eps: float = 1e-5, *, activation=None,
                 device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        num_features = check_constructor_args(num_features, eps, None)
        self.num_features = num_features
        self.eps = eps
        self.activation = activation  # and activation_slope
        self.register_buffer("weight", torch.ones(num_features, **kw))
        self.register_buffer("bias", torch.zeros(num_features, **kw))
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))

    def _check_input_dim(self, input: Tensor) -> None:
        _check_rank(type(self).__name__, input, self._ranks, self._what)

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        run = F.batch_norm_resolved
        if type(input) is not Tensor and isinstance(input, torch.fx.Proxy):
            # torch.fx.symbolic_trace: one node, as our layers (the function looked up in
            # modules, where torch.fx.wrap patches it while tracing)
            leaf = modules.fx_leaf(self, input, residual)
            if leaf is not None:
                return leaf
            run = modules._traced_batch_norm
        else:
            self._check_input_dim(input)
        return run(input, self.running_mean, self.running_var, self.weight, self.bias, False,
                   0.0, self.eps, self.activation, self.activation_slope, residual, None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        text = f"{self.num_features}, eps={self.eps}"
        if self.activation != "none":
            text += f", activation={self.activation!r}"
            if self.activation == "leaky_relu":
                text += f", negative_slope={self.activation_slope}"
        return text

    @staticmethod
    def from_batchnorm(bn: nn.Module) -> _FrozenBatchNorm:
        """A frozen copy (cloned tensors) of a torch or batchnorm ``BatchNorm*d`` layer; the
        rank follows the layer's class: a SyncBatchNorm's ``convert_sync_batchnorm`` made
        from a ``BatchNorm*d`` gives that one's (as ``revert_sync_batchnorm`` would), any
        other layer that takes every rank of 2 or more (a SyncBatchNorm built as one)
        :class:`FrozenBatchNormNd`, which takes them too."""
        if getattr(bn, "running_mean", None) is None:
            raise ValueError(f"{type(bn).__name__} with track_running_stats=False has no "
                             f"running statistics to freeze")
        name = getattr(bn, "_batchnorm_origin", type(bn)).__name__
        cls = (FrozenBatchNorm1d if "1d" in name else FrozenBatchNorm2d if "2d" in name
               else FrozenBatchNorm3d if "3d" in name else FrozenBatchNormNd)
        act = getattr(bn, "activation", "none")
        new = cls(bn.num_features, bn.eps, device="meta")
        new.activation, new.activation_slope = act, getattr(bn, "activation_slope", 0.0)
        rm = bn.running_mean.detach()
        new.running_mean = rm.clone()
        new.running_var = bn.running_var.detach().clone()
        w, b = getattr(bn, "weight", None), getattr(bn, "bias", None)
        new.weight = w.detach().clone() if w is not None else torch.ones_like(rm)
        new.bias = b.detach().clone() if b is not None else torch.zeros_like(rm)
        new.train(bn.training)
        return new


modules.register_layer_forward(_FrozenBatchNorm.forward)


class FrozenBatchNorm1d(_FrozenBatchNorm):
    _ranks, _what = (2, 3), "2D or 3D"


class FrozenBatchNorm2d(_FrozenBatchNorm):
    _ranks, _what = (4,), "4D"


class FrozenBatchNorm3d(_FrozenBatchNorm):
    _ranks, _what = (5,), "5D"


class FrozenBatchNormNd(_FrozenBatchNorm):
    # input of any rank of 2 or more, as a SyncBatchNorm takes (the frozen copy of one
    # that was not made from a BatchNorm*d)
    def _check_input_dim(self, input: Tensor) -> None:
        if not isinstance(input, Tensor) or input.dim() < 2:
            _check_rank(type(self).__name__, input, (), "at least 2D")


for _cls in (FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, FrozenBatchNormNd):
    _cls.__doc__ = _FrozenBatchNorm.__doc__


def _frozen_copy(bn: nn.Module) -> _FrozenBatchNorm:
    """The layer that replaces ``bn`` under ``freeze(buffers=True)``, with its hooks."""
    new = _FrozenBatchNorm.from_batchnorm(bn)
    move_hooks(new, bn)
    return new


def freeze(model: nn.Module, affine: bool = False, buffers: bool = False) -> nn.Module:
    """Make every batch norm in ``model`` use and keep its running statistics, also after
    ``model.train()``; in place, returns the model.

    torch's ``BatchNorm*d`` layers are first converted to ours (``convert`` without
    activation fusion), since only ours have the ``frozen`` state. ``affine=True`` also sets
    ``requires_grad=False`` on weight and bias (``unfreeze`` gives it back to those it
    turned off, also after repeated calls). ``buffers=True``
    instead replaces each layer with a :class:`FrozenBatchNorm1d/2d/3d` copy (parameters
    become buffers, hooks move to it; ``unfreeze`` does not undo that). Layers without
    running statistics (built with ``track_running_stats=False``; one whose flag was
    turned off later keeps its buffers and is frozen with them) are left as they are, with a
    warning, and so are subclasses of torch's batch norms (their ``forward`` may differ
    from the layer that would replace them), torch's layers with a parametrization (their
    weight is computed), and torch's layers whose weight or bias a forward pre-hook
    computes (the hook-based ``torch.nn.utils.prune``, ``spectral_norm``, ``weight_norm``),
    ours too with ``buffers=True`` (the copy would lack the hook's parameters; without it
    ours are frozen in place); the warning names the layer. ``affine=True`` leaves a computed
    weight or bias trainable, with a warning. A lazy batch norm
    that has not seen input yet raises ``ValueError`` (it has nothing to freeze: run the
    model once first). If a layer fails to convert or copy, the exception leaves the model
    unchanged.
    """
    check_module(model, "freeze", compiled=("torch", "ours"))
    lazy = lazy_batch_norms_without_input(model)
    if lazy:
        raise ValueError(f"freeze: {', '.join(map(repr, lazy))} is a lazy batch norm that "
                         f"has not seen input yet, so it has no statistics to freeze: run "
                         f"the model on one batch first (in eval mode, model.eval(), to "
                         f"leave its statistics alone)")
    warn_subclasses(model, "freeze", "It is not frozen: in train() it still normalizes with "
                    "batch statistics and updates its running ones. Keep it in eval mode "
                    "yourself (call .eval() on it after model.train()).")
    if buffers:
        # (the hook would move to a copy without the parameters it computes from)
        warn_computed_affine(model, "freeze", lambda m: is_our_bn(m) or is_torch_bn(m))
        if is_our_bn(model) or is_torch_bn(model):
            return model if hook_computed_affine(model) else _frozen_copy(model)
        # All copies first, then install them: a layer that fails leaves the model as it was.
        frozen: dict[int, _FrozenBatchNorm] = {}
        places = []
        for name, m in model.named_modules(remove_duplicate=False):
            if ((is_our_bn(m) or is_torch_bn(m)) and name
                    and not hook_computed_affine(m)):
                if m.running_mean is None:
                    warnings.warn(f"freeze: {name!r} has no running statistics; left as it is",
                                  stacklevel=2)
                    continue
                if id(m) not in frozen:  # a shared layer stays one shared copy
                    frozen[id(m)] = _frozen_copy(m)
                places.append((name, frozen[id(m)]))
        for name, new in places:
            set_submodule(model, name, new)
        from .convert import repoint_markers
        repoint_markers(model, frozen)  # (a marker kept the layer, and all it holds, alive)
        return model
    from .convert import _convert
    warn_computed_affine(model, "freeze", is_torch_bn)  # torch's: not converted
    model = _convert(model, fuse_activations=False)
    for name, m in model.named_modules():
        if not is_our_bn(m):
            continue
        if not m._has_running_stats():
            where = repr(name) if name else type(m).__name__
            warnings.warn(f"freeze: {where} has no running statistics; left as it is",
                          stacklevel=2)
            continue
        m.frozen = True
        if affine:
            computed = computed_affine(m)
            if computed:
                where = repr(name) if name else type(m).__name__
                warnings.warn(f"freeze: {where} has its statistics frozen, not its "
                              f"{' and '.join(computed)}: a parametrization or a forward "
                              f"pre-hook computes {'them' if len(computed) > 1 else 'it'}; "
                              f"set requires_grad=False on the parameters "
                              f"{'they are' if len(computed) > 1 else 'it is'} computed from",
                              stacklevel=2)
            froze = [p for n, p in (("weight", m.weight), ("bias", m.bias))
                     if p is not None and p.requires_grad and n not in computed]
            for p in froze:
                p.requires_grad_(False)
            # Remember what we froze, so that unfreeze gives back only that. Merged with
            # an earlier call's record: that call froze them, so this one finds nothing
            # to freeze, and overwriting would lose what unfreeze must give back.
            earlier = m.__dict__.get("_affine_frozen_by_freeze", [])
            m._affine_frozen_by_freeze = [
                n for n in ("weight", "bias")
                if n in earlier or any(getattr(m, n) is p for p in froze)]
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze` on our layers (``frozen=False``, and ``requires_grad`` back on
    the affine parameters that ``freeze(affine=True)`` froze, also on a torch layer that
    ``revert`` made of one); in place, returns the model.
    ``FrozenBatchNorm*d`` layers stay as they are."""
    check_module(model, "unfreeze", compiled=("ours",))
    for m in model.modules():
        if is_our_bn(m) or is_torch_bn(m):  # torch's: one that revert made of a frozen one
            if is_our_bn(m):
                m.frozen = False
            for n in m.__dict__.pop("_affine_frozen_by_freeze", []):
                p = getattr(m, n)
                if p is not None:
                    p.requires_grad_(True)
    return model
