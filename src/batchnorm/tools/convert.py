"""``convert`` torch's batch norms into ours (moving a following activation inside), and
``revert`` back.

Both work in place on the model's module tree, so the model keeps its class, its methods
and its parameters: the new layers *share* the old ``Parameter`` and buffer tensors (as
``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does), and an optimizer built before the
conversion still holds the right tensors. Hooks registered on a replaced layer move to
its replacement (the same hook dicts: their handles still remove them).
"""

from __future__ import annotations

import inspect
import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import functional as F
from ..modules import _BatchNorm
from ._common import (
    OURS_BY_RANK,
    TORCH_BY_OURS,
    check_module,
    has_hooks,
    hook_computed_affine,
    hook_computed_reason,
    is_our_bn,
    is_torch_bn,
    lazy_batch_norms_without_input,
    module_calls,
    move_hooks,
    sequential_pairs,
    set_submodule,
    trace_in_both_modes,
    use_counts,
    uses,
    warn_computed_affine,
    warn_lazy_torch_batch_norms,
    warn_sequential_fallback,
    warn_subclasses,
)

_FUSABLE = tuple(F._ACTIVATION_MODULES)


def _fusable(m: nn.Module) -> bool:
    """An activation module a batch norm can take: one of ``_FUSABLE`` whose settings
    ``resolve_activation`` accepts (not an ``nn.GELU`` of an unknown approximation)."""
    if type(m) not in _FUSABLE:
        return False
    try:
        F.resolve_activation(m)
    except (TypeError, ValueError):
        return False
    return True


class FusedActivation(nn.Identity):
    """Stands where an activation module was after ``convert`` moved it into the batch norm
    ``bn`` (named ``bn_name`` in the model converted); ``revert`` puts ``original`` back.
    Its forward returns the input; an attribute it lacks is read from ``original``
    (``negative_slope``, ``inplace``)."""

    def __init__(self, original: nn.Module, bn: nn.Module, bn_name: str) -> None:
        super().__init__()
        # Plain attributes, not submodules: the original no longer runs and has no state,
        # and the batch norm is in the model already. revert finds the batch norm by
        # identity, not by name: a converted block may be reverted inside another model.
        self.__dict__["original"] = original
        self.__dict__["bn"] = bn
        self.bn_name = bn_name

    def __getattr__(self, name: str):
        # The original's settings, for a forward that reads them (``self.act.negative_slope``:
        # the batch norm applies that slope now); its private ones stay its own.
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self.__dict__.get("original")
            if original is None or name.startswith("_") or not hasattr(original, name):
                raise
            return getattr(original, name)

    def extra_repr(self) -> str:
        return f"{self.original!r} fused into {self.bn_name!r}"


def repoint_markers(model: nn.Module, replaced: dict[int, nn.Module]) -> None:
    """Point each :class:`FusedActivation` of ``model`` whose batch norm was replaced
    (``replaced``: id of the old layer -> the new one) at the new layer, so that revert
    finds what has its activation now."""
    for m in model.modules():
        if isinstance(m, FusedActivation) and id(m.__dict__.get("bn")) in replaced:
            m.__dict__["bn"] = replaced[id(m.__dict__["bn"])]


def _distributed_class(name: str):
    """A class of ``batchnorm.distributed`` (imported here: it imports the tools)."""
    from .. import distributed
    return getattr(distributed, name)


def _sync_class():
    return _distributed_class("SyncBatchNorm")


def _without_bias(m: nn.Module) -> bool:
    """An affine layer built with ``bias=False`` (ours, or torch's where it takes it)."""
    return m.affine and getattr(m, "bias", None) is None


# torch 2.13's BatchNorm*d take ``bias``; where torch's do not, a layer of ours without
# bias becomes one with a fixed zero bias.
_TORCH_TAKES_BIAS = "bias" in inspect.signature(nn.BatchNorm2d.__init__).parameters


def _share_state(new: nn.Module, old: nn.Module) -> nn.Module:
    with torch.no_grad():
        if old.affine:
            new.weight = old.weight
            if getattr(old, "bias", None) is not None:
                new.bias = old.bias
            elif getattr(new, "bias", None) is not None:  # a torch layer without bias=
                new.bias = nn.Parameter(torch.zeros_like(old.weight), requires_grad=False)
        # Each running buffer as it is, whatever track_running_stats says: the flag turned
        # off after construction keeps the buffers (torch then normalizes with them in
        # eval and leaves them alone in training), and TENT's setup keeps
        # num_batches_tracked alone.
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(new, name, getattr(old, name, None))
    if "_affine_frozen_by_freeze" in old.__dict__:  # what unfreeze gives requires_grad back
        new._affine_frozen_by_freeze = list(old._affine_frozen_by_freeze)
    new.train(old.training)
    return new


def _to_ours(m: nn.Module) -> nn.Module:
    args = (m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
    kw = {"device": "meta", "bias": not _without_bias(m)}
    if type(m) is nn.SyncBatchNorm:
        new = _sync_class()(*args, process_group=m.process_group, **kw)
    else:
        new = OURS_BY_RANK[type(m)](*args, **kw)
    move_hooks(new, m)
    return _share_state(new, m)


def _to_torch(m: _BatchNorm) -> nn.Module:
    if m.frozen:
        warnings.warn("revert: a frozen batch norm becomes a torch one, which cannot be "
                      "frozen: it will use batch statistics in train()", stacklevel=3)
    if m.__dict__.get("_affine_frozen_by_freeze"):
        warnings.warn(f"revert: the {' and '.join(m._affine_frozen_by_freeze)} that "
                      f"freeze(affine=True) froze stay requires_grad=False; "
                      f"batchnorm.unfreeze gives "
                      f"{'them' if len(m._affine_frozen_by_freeze) > 1 else 'it'} back",
                      stacklevel=3)
    args = (m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
    kw = {"device": "meta"}
    if _TORCH_TAKES_BIAS and _without_bias(m):
        kw["bias"] = False
    cls = TORCH_BY_OURS.get(type(m))
    if cls is None:  # batchnorm.distributed.SyncBatchNorm
        group = getattr(m, "process_group", None)
        new = nn.SyncBatchNorm(*args, process_group=group, **kw)
    else:
        new = cls(*args, **kw)
    new = _share_state(new, m)
    act = F.activation_module(m.activation, m.activation_slope)
    # A new module starts in training mode: the pair takes the mode of the layer it replaces.
    if act is not None:  # the hooks saw the activation's output: they go on the pair
        new = nn.Sequential(new, act).train(m.training)
    move_hooks(new, m)
    return new


def _convertible(m: nn.Module) -> bool:
    """One of torch's layers that convert replaces by ours (see convert)."""
    return is_torch_bn(m) and not hook_computed_affine(m)


def _revertible(m: nn.Module) -> bool:
    return ((type(m) in TORCH_BY_OURS or type(m) is _sync_class())
            and not hook_computed_affine(m))


def _warn_unrevertible(model: nn.Module) -> None:
    """Warn about each layer of ours that revert leaves as it is for want of a torch
    class to make of it (as convert warns about the torch layers it leaves)."""
    lazy = set(lazy_batch_norms_without_input(model))
    nd = _distributed_class("BatchNormNd")
    for name, m in model.named_modules():
        if not is_our_bn(m) or _revertible(m):
            continue
        where = repr(name) if name else "the model"
        if (name or "the model") in lazy:
            why = (f"a {type(m).__name__} that has not seen input yet: run the model once "
                   f"first")
        elif parametrize.is_parametrized(m):
            why = (f"a parametrization (torch.nn.utils.parametrize) computes its "
                   f"{' and '.join(m.parametrizations)}")
        elif hook_computed_affine(m):
            why = hook_computed_reason(hook_computed_affine(m))
        elif type(m) is nd:
            why = ("a BatchNormNd (any input rank, what revert_sync_batchnorm makes of a "
                   "SyncBatchNorm of unknown rank) has no torch class of its own: "
                   "replace it by hand with torch's BatchNorm1d, 2d or 3d")
        else:
            why = (f"a {type(m).__name__}, a subclass of batchnorm's, may have a forward of "
                   f"its own")
        warnings.warn(f"revert: {where} stays batchnorm's: {why}", stacklevel=3)


def _fusion_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(bn_name, activation_name)`` where the activation module only ever consumes that
    batch norm's output, and that output goes nowhere else, in training and in eval."""
    counts = use_counts(model)
    once = lambda m: counts[id(m)] == 1
    # Neither may have hooks: the batch norm's would see the activation's output, and
    # the activation's would no longer run.
    bn_ok = lambda m: once(m) and not has_hooks(m) and (
        _convertible(m) or (is_our_bn(m) and m.activation == "none"))
    act_ok = lambda m: _fusable(m) and once(m) and not has_hooks(m)
    graphs = trace_in_both_modes(model)
    if graphs is None:
        pairs = [(nb, na) for nb, _, na, _ in sequential_pairs(model, bn_ok, act_ok)]
        if pairs:
            warn_sequential_fallback("convert", "activations were paired with the batch "
                                     "norms before them")
        return pairs
    train_pairs, eval_pairs = (_traced_fusion_pairs(model, g, bn_ok, act_ok) for g in graphs)
    return [p for p in train_pairs if p in eval_pairs]


def _traced_fusion_pairs(model, graph, bn_ok, act_ok) -> list[tuple[str, str]]:
    calls = module_calls(graph)
    pairs = []
    for act_name, act_nodes in calls.items():
        if len(act_nodes) != 1 or not act_ok(model.get_submodule(act_name)):
            continue
        node = act_nodes[0]
        src = node.args[0] if node.args else None
        if (len(node.args) != 1 or node.kwargs or not isinstance(src, torch.fx.Node)
                or src.op != "call_module" or len(calls[src.target]) != 1
                or uses(src) != 1 or not bn_ok(model.get_submodule(src.target))):
            continue
        pairs.append((src.target, act_name))
    return pairs


def convert(model: nn.Module, fuse_activations: bool = True) -> nn.Module:
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` with ours, in place.

    Parameters and buffers are shared with the old layers (same tensors: device, dtype and
    optimizer references are kept), and each layer keeps its train/eval mode and its hooks.
    Only those exact classes are converted: a user's subclass may have its own
    ``forward``, and a layer with a parametrization (``torch.nn.utils.parametrize``)
    computes its weight, so each is left as it is, with a warning naming the layer; so is
    a ``LazyBatchNorm*d`` of torch's that has not seen input yet, and a layer whose weight
    or bias a forward pre-hook computes (the hook-based ``torch.nn.utils.prune``,
    ``spectral_norm``, ``weight_norm``).

    ``torch.nn.SyncBatchNorm`` becomes ``batchnorm.distributed.SyncBatchNorm``.

    With ``fuse_activations``, a ``ReLU``/``LeakyReLU``/``SiLU``/``GELU``/``Sigmoid``/``Tanh``
    *module* whose only input is a batch norm's output, where that output goes nowhere else
    and neither module is called twice nor has hooks, moves into the batch norm's
    ``activation``; it is replaced by a :class:`FusedActivation` (an identity). Pairs are
    found by ``torch.fx`` when the model traces (in training and in eval mode: a pair must
    hold in both), else by order inside plain ``nn.Sequential`` (with a warning: that
    assumes each runs as a whole). Activations applied as functions (``F.relu(x)``) or
    through a module reused elsewhere stay as they are. Returns the model (a new module only when ``model`` itself is a batch norm). If a
    layer fails to convert, the exception leaves the model unchanged.
    """
    check_module(model, "convert", compiled=("torch",))
    warn_subclasses(model, "convert", "It goes on working as torch's layer.")
    warn_lazy_torch_batch_norms(model, "convert")
    warn_computed_affine(model, "convert", is_torch_bn)
    return _convert(model, fuse_activations)


def _convert(model: nn.Module, fuse_activations: bool) -> nn.Module:
    """:func:`convert` without the warnings about subclasses (callers word their own)."""
    pairs = _fusion_pairs(model) if fuse_activations else []
    if is_torch_bn(model):
        return _to_ours(model) if _convertible(model) else model
    # Every replacement is built before the first is installed: when one layer fails to
    # convert, the exception leaves the model exactly as it was, not half converted.
    replaced: dict[int, nn.Module] = {}
    places = []
    for name, m in model.named_modules(remove_duplicate=False):
        if name and _convertible(m):
            if id(m) not in replaced:
                replaced[id(m)] = _to_ours(m)
            places.append((name, replaced[id(m)]))
    fusions = []
    for bn_name, act_name in pairs:
        act, bn = model.get_submodule(act_name), model.get_submodule(bn_name)
        new_bn = replaced.get(id(bn), bn)
        fusions.append((new_bn, F.resolve_activation(act), act_name,
                        FusedActivation(act, new_bn, bn_name).train(act.training)))
    for name, new in places:
        set_submodule(model, name, new)
    for bn, (activation, slope), act_name, fused in fusions:
        bn.activation, bn.activation_slope = activation, slope
        set_submodule(model, act_name, fused)
    return model


def revert(model: nn.Module) -> nn.Module:
    """Undo :func:`convert`: our batch norms become torch's again, in place.

    An activation that ``convert`` fused goes back where it was; any other fused activation
    (a layer built with ``activation=...``) becomes ``nn.Sequential(torch_bn, activation)``,
    which changes that layer's state_dict keys (``bn.weight`` -> ``bn.0.weight``). Every
    module put back takes the train/eval mode of the one it replaces, and its hooks. A
    layer built with ``bias=False`` becomes torch's with ``bias=False`` (with a torch
    whose batch norms do not take ``bias``, one with a fixed zero bias,
    ``requires_grad=False``).
    A layer that has been called with a ``residual`` stays ours, with a warning naming
    it: torch's layers take no residual, so the model's call would fail. So does, with a
    warning, a layer no torch class matches (``BatchNormNd``, a subclass, a lazy one
    without input), one with a parametrization, and one whose weight or bias a forward
    pre-hook computes (the hook-based ``prune``, ``spectral_norm``, ``weight_norm``).
    """
    check_module(model, "revert", compiled=("ours",))
    inside = {id(m) for m in model.modules()}
    for name, m in list(model.named_modules(remove_duplicate=False)):
        if not isinstance(m, FusedActivation):
            continue
        bn = m.__dict__.get("bn")
        if bn is None:  # one pickled when it kept the name alone (before 2026-12-03)
            try:
                bn = model.get_submodule(m.bn_name)
            except AttributeError:
                continue
        # a sync conversion of a submodule alone replaced the layer but not this marker
        # (a layer still in the model is the one: it may have been converted elsewhere too)
        while id(bn) not in inside and "_batchnorm_replaced_by" in bn.__dict__:
            bn = bn.__dict__["_batchnorm_replaced_by"]
        fused = F.resolve_activation(m.original)
        if id(bn) in inside and is_our_bn(bn) and (bn.activation,
                                                   bn.activation_slope) == fused:
            bn.activation, bn.activation_slope = "none", 0.0
            # The original sat outside the module tree while fused, so model.train() and
            # .eval() since convert reached only the FusedActivation: take its mode.
            set_submodule(model, name, m.original.train(m.training))
    kept = [name or "the model" for name, m in model.named_modules()
            if _revertible(m) and m.called_with_residual]
    if kept:
        warnings.warn(f"revert: {', '.join(kept)} {'stays' if len(kept) == 1 else 'stay'} "
                      f"batchnorm's: called with a residual, which torch's batch norms do "
                      f"not take (the model's call would fail); compute act(bn(x) + "
                      f"residual) in the forward to revert {'it' if len(kept) == 1 else 'them'}",
                      stacklevel=2)
    _warn_unrevertible(model)
    if _revertible(model):
        return model if model.called_with_residual else _to_torch(model)
    replaced: dict[int, nn.Module] = {}
    for name, m in list(model.named_modules(remove_duplicate=False)):
        if name and _revertible(m) and not m.called_with_residual:
            if id(m) not in replaced:
                replaced[id(m)] = _to_torch(m)
            set_submodule(model, name, replaced[id(m)])
    return model
