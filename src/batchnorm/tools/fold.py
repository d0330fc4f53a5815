"""``fold``: bake eval-mode batch norms into the layer before them, for inference.

In eval a batch norm is a per-channel affine map, ``y = x * s + t`` with
``s = weight / sqrt(running_var + eps)`` and ``t = bias - running_mean * s``. When ``x`` is
the output of a convolution or linear layer ``x = W * u + c`` (and goes nowhere else), the
map moves into that layer: ``W' = s ⊙ W`` (scaled along the *output* channels) and
``c' = s * c + t``. The arithmetic is done in float64 and rounded once to the layer's dtype.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils.weight_norm import WeightNorm

from .. import functional as F
from .. import modules
from ..modules import refuse_script
from ..ops import invstd_from_var
from ._common import (
    check_module,
    has_hooks,
    is_any_bn,
    lazy_batch_norms_without_input,
    module_calls,
    parameter_counts,
    sequential_pairs,
    set_submodule,
    trace,
    use_counts,
    uses,
    warn_sequential_fallback,
    warn_subclasses,
)
from .convert import repoint_markers
from .freeze import _FrozenBatchNorm

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


_INPLACE_ACTIVATIONS = {
    "relu": lambda y, slope: torch.relu_(y),
    "leaky_relu": lambda y, slope: torch.nn.functional.leaky_relu_(y, slope),
    "silu": lambda y, slope: torch.nn.functional.silu(y, inplace=True),
    "sigmoid": lambda y, slope: torch.sigmoid_(y),
    "tanh": lambda y, slope: torch.tanh_(y),
}


def _inplace_activation(activation: str, slope: float):
    """The in-place op for ``activation``, or None where there is none that autograd can
    differentiate: in-place leaky_relu with a negative slope has no backward in torch (the
    sign of its output no longer tells which side of 0 the input was)."""
    if activation == "leaky_relu" and slope < 0:
        return None
    return _INPLACE_ACTIVATIONS.get(activation)


class ChannelAffine(nn.Module):
    """``act(x * scale + shift + residual)`` per channel (dim 1): what is left of a batch
    norm after :func:`fold`. ``scale``/``shift`` are None when the batch norm went into the
    layer before it; the module then only applies the residual and activation it fused.

    ``inplace``: the input is a tensor nothing else reads (``fold`` sets it when the layer
    before feeds only this one), so the residual and activation may overwrite it. The
    activation always runs in place on a tensor this module made: each fresh tensor an
    inference pass allocates costs page faults on the CPU (see ``backends/cpu_buffers.py``).
    The ops used in place do not need their input for backward, so autograd still works
    (leaky_relu with a negative slope, which would, runs out of place).

    ``input_ranks``: the input ranks for which this module does what the batch norm did
    (None: any rank of 2 or more). ``fold`` gives the batch norm's own (``(4,)`` for a
    ``BatchNorm2d``, None for a ``SyncBatchNorm``), or, where the batch norm went into
    the layer before it, that layer's batched output rank (its weight's rank): a folded
    ``Conv1d`` takes an unbatched ``(C, L)`` input, on which the ``BatchNorm1d`` after it
    normalized ``L``. Input of another rank raises ``ValueError`` instead of being scaled
    along a dimension that is not its channels.

    ``linear_input``: the batch norm went into a ``Linear`` (``fold`` sets it), which is
    right only when its output is ``(N, C)``; any other rank raises ``ValueError``.

    ``num_features``: C, as the batch norm had it (a forward may check its input against
    it); by default the length of ``scale``, if any.

    The output has the input's dtype, as the batch norm's had: scale and shift keep the
    running statistics' dtype (float32 for a bfloat16 model under autocast's rules, or
    float64), the arithmetic runs in the wider of the two, rounded once at the end.
    """

    __prepare_scriptable__ = refuse_script

    # what a ChannelAffine pickled before these attributes existed reads (torch.load of a
    # whole model): no rank rule, no channel count
    input_ranks: tuple[int, ...] | None = None
    num_features: int | None = None

    def __init__(self, scale: Tensor | None, shift: Tensor | None, activation: str = "none",
                 slope: float = 0.0, inplace: bool = False, linear_input: bool = False,
                 input_ranks: tuple[int, ...] | None = None,
                 num_features: int | None = None) -> None:
        super().__init__()
        F.check_resolved_activation(activation)
        slope = F.check_slope(slope)
        if num_features is None and scale is not None:
            num_features = scale.shape[0]
        self.num_features = num_features
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)
        self.activation, self.activation_slope = activation, slope
        self.inplace = inplace
        self.linear_input = linear_input
        self.input_ranks = None if input_ranks is None else tuple(input_ranks)
        self.act = F.activation_module(activation, slope) or nn.Identity()

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        if type(input) is not Tensor and isinstance(input, torch.fx.Proxy):
            return self._traced_forward(input, residual)
        F.refuse_nested(input, "the input")
        if not input.is_floating_point():
            # (a quantized input, from eager-mode quantization, met torch's internal error)
            raise TypeError(
                f"ChannelAffine expects a floating-point input, got {input.dtype}: in "
                f"eager-mode quantization put a DeQuantStub before it, or quantize with "
                f"torch.ao.quantization.quantize_fx, which does")
        # On (N, L, C) the batch norm normalized dim 1 = L, not the Linear's C outputs the
        # fold scaled: the folded model would silently disagree (nothing fails when L == C).
        # The rank is static under torch.export and ONNX export, so the check exports away.
        if self.linear_input and input.dim() != 2:
            raise ValueError(
                f"ChannelAffine: this batch norm was folded into the Linear before it, which "
                f"is right only for (N, C) input, got {input.dim()}D input of shape "
                f"{tuple(input.shape)}: the batch norm normalized dim 1 of it, not the "
                f"Linear's features. Run the unfolded model for this input")
        if input.dim() < 2 or (self.input_ranks is not None
                               and input.dim() not in self.input_ranks):
            raise ValueError(
                f"ChannelAffine: the batch norm it replaces took {_ranks_text(self.input_ranks)} "
                f"input, got {input.dim()}D input of shape {tuple(input.shape)}")
        if self.num_features is not None and input.shape[1] != self.num_features:
            # (scale and shift would broadcast over one channel where the batch norm raised)
            raise ValueError(
                f"ChannelAffine: the batch norm it replaces had {self.num_features} channels, "
                f"got input of shape {tuple(input.shape)} ({input.shape[1]} in dim 1)")
        if residual is not None:  # as the batch norm it replaces checked it
            F.check_residual(residual, input)
        y, owned = input, self.inplace
        if self.scale is not None:
            view = (-1,) + (1,) * (input.dim() - 2)
            y, owned = torch.addcmul(self.shift.view(view), y, self.scale.view(view)), True
        if residual is not None:
            y, owned = (y.add_(residual) if owned else y + residual), True
        if self.activation != "none":
            act_ = _inplace_activation(self.activation, self.activation_slope)
            y = act_(y, self.activation_slope) if owned and act_ is not None else self.act(y)
        return y if y.dtype == input.dtype else y.to(input.dtype)

    def _traced_forward(self, input, residual):
        """The forward as torch.fx.symbolic_trace records it: its ops, out of place, so that
        fx passes see them (after a batch norm folded into a convolution, prepare_fx finds
        the convolution and its activation side by side). The checks are left out: they
        read the input's rank and shape, which a Proxy does not have."""
        y = input
        if self.scale is not None:
            y = torch.addcmul(_per_channel(self.shift, input), y, _per_channel(self.scale, input))
        if residual is not None:
            y = (_plus_residual(y, residual) if _may_be_none(residual) else
                 y + residual)
        if self.activation != "none":
            y = self.act(y)
        # (the rounding to the input's dtype only where a wider scale or residual came in)
        return y if self.scale is None and residual is None else y.to(input.dtype)

    def extra_repr(self) -> str:
        text = "folded" if self.scale is None else f"{self.scale.shape[0]}"
        text += (", (N, C) input only" if self.linear_input else
                 f", {_ranks_text(self.input_ranks)} input")
        return text + (f", activation={self.activation!r}" if self.activation != "none" else "")


modules.evaluate_annotations(ChannelAffine.forward)  # (a traced root pickles)


def _per_channel(t: Tensor, input: Tensor) -> Tensor:
    """``t`` (C,) as a view that broadcasts along dim 1 of ``input``."""
    return t.view((-1,) + (1,) * (input.dim() - 2))


torch.fx.wrap("_per_channel")  # one node: a Proxy's rank is not known while tracing


def _may_be_none(value) -> bool:
    """Whether a traced value is an argument whose default is None (traced as the root,
    ChannelAffine's own optional residual): fx records it as a placeholder either way."""
    node = getattr(value, "node", None)
    return node is not None and node.op == "placeholder" and node.args[:1] == (None,)


def _plus_residual(y: Tensor, residual: Tensor | None) -> Tensor:
    return y if residual is None else y + residual


torch.fx.wrap("_plus_residual")  # one node: whether the residual is None is known when it runs


def _why_not_copied(model: nn.Module) -> str:
    """What in ``model`` deepcopy refuses: the hook-based ``weight_norm`` (its weight is
    computed by autograd), or a tensor autograd computed that a forward stored on a module
    (``self.features = y`` with gradients on)."""
    weight_norm = {name for name, m in model.named_modules()
                   if any(isinstance(h, WeightNorm) for h in m._forward_pre_hooks.values())}
    stored = [f"{name}.{attr}" if name else attr
              for name, m in model.named_modules() if name not in weight_norm
              for attr, value in vars(m).items()
              if isinstance(value, torch.Tensor) and not value.is_leaf]
    advice = []
    if weight_norm:
        names = ", ".join(repr(n) if n else "the model" for n in sorted(weight_norm))
        advice.append(f"{names} {'has' if len(weight_norm) == 1 else 'have'} the hook-based "
                      f"torch.nn.utils.weight_norm, which cannot be copied: use "
                      f"torch.nn.utils.parametrizations.weight_norm, or remove_weight_norm "
                      f"first")
    if stored:
        one = len(stored) == 1
        advice.append(f"{', '.join(map(repr, stored))} {'is a tensor' if one else 'are tensors'} "
                      f"that autograd computed, stored on the module by a forward run with "
                      f"gradients on: delete {'it' if one else 'them'}, or run that forward "
                      f"under torch.no_grad()")
    return "; ".join(advice) or ("Every tensor the model holds must be a leaf of "
                                 "autograd's graph.")


def _ranks_text(ranks: tuple[int, ...] | None) -> str:
    return "at least 2D" if ranks is None else " or ".join(f"{d}D" for d in ranks)


_PROBED_RANKS = range(1, 9)


def _takes(check, rank: int) -> bool:
    try:
        check(torch.empty((1,) * rank, device="meta"))
    except Exception:  # noqa: BLE001  (ValueError from torch's and ours; a subclass's own)
        return False
    return True


def _input_ranks(bn: nn.Module) -> tuple[int, ...] | None:
    """The input ranks ``bn`` takes, read off its own check of them (``_check_input_dim``,
    torch's, ours and the frozen copies', on an empty meta tensor of each rank up to 8);
    None where it takes any rank of 2 or more, or has no check."""
    check = getattr(bn, "_check_input_dim", None)
    if check is None:
        return None
    taken = [d for d in _PROBED_RANKS if _takes(check, d)]
    if not taken or taken[-1] == _PROBED_RANKS[-1]:
        return None
    return tuple(taken)


@dataclass
class FoldReport:
    """What :func:`fold` did: ``folded`` (batch norm, layer it went into), ``scale_shift``
    (batch norms left as a :class:`ChannelAffine`), ``skipped`` (name, reason), and how
    the predecessors were found (``'fx'`` or ``'sequential'``)."""

    method: str = "fx"
    folded: list[tuple[str, str]] = field(default_factory=list)
    scale_shift: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [(f"fold ({self.method}): {len(self.folded)} folded, "
                 f"{len(self.scale_shift)} scale-shift, {len(self.skipped)} skipped")]
        lines += [f"  {bn} -> {layer}" for bn, layer in self.folded]
        lines += [f"  {bn} -> ChannelAffine" for bn in self.scale_shift]
        lines += [f"  {bn}: skipped, {why}" for bn, why in self.skipped]
        return "\n".join(lines)


def _affine_of(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """(s, t) of ``y = x * s + t`` in float64."""
    mean = bn.running_mean.detach().double()
    invstd = invstd_from_var(bn.running_var.detach().double(), bn.eps)
    w, b = getattr(bn, "weight", None), getattr(bn, "bias", None)
    s = invstd if w is None else w.detach().double() * invstd
    t = -mean * s if b is None else b.detach().double() - mean * s
    return s, t


_HOOKED = "it has hooks, which a folded layer would not run"
_READ = ("a forward reads its parameters or buffers itself (self.bn.running_mean, say), "
         "which a folded layer no longer has")


def _activation_of(bn: nn.Module) -> tuple[str, float]:
    return getattr(bn, "activation", "none"), getattr(bn, "activation_slope", 0.0)


def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _foldable(layer: nn.Module) -> bool:
    """A plain Conv/ConvTranspose/Linear whose forward reads its own weight and bias as
    they are: not one whose weight a hook recomputes (``nn.utils.spectral_norm`` keeps it
    in ``weight_orig`` and writes ``weight`` before each call), nor one with hooks that
    could change its output."""
    return (type(layer) in (*_CONV, *_CONV_T, nn.Linear)
            and isinstance(layer._parameters.get("weight"), nn.Parameter)
            and not layer._forward_pre_hooks and not layer._forward_hooks)


def _compatible(layer: nn.Module, bn: nn.Module) -> bool:
    if _out_channels(layer) != bn.num_features:
        return False
    # Linear folds only into a batch norm that takes its (N, C) output: a 1d one, or one
    # of any rank (torch's SyncBatchNorm, ours, convert's local fallback); on (N, L, C)
    # it would normalize L, not the linear layer's features (the folded layer checks).
    # A SyncBatchNorm converted from a BatchNorm*d is named by its origin.
    name = getattr(bn, "_batchnorm_origin", type(bn)).__name__
    return not isinstance(layer, nn.Linear) or "1d" in name or "Sync" in name


@torch.no_grad()
def _fold_into(layer: nn.Module, s: Tensor, t: Tensor) -> None:
    w = layer.weight.detach().double()
    if isinstance(layer, _CONV_T):
        # ConvTranspose weights are (in, out / groups, *k): output channel o of group g is
        # column o - g * (out / groups) of that group's rows.
        g = layer.groups
        w = w.reshape(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
        w = w * s.reshape(g, 1, -1, *([1] * (w.dim() - 3)))
        w = w.reshape(layer.weight.shape)
    else:  # Conv (out, in / groups, *k) and Linear (out, in): scale the rows
        w = w * s.reshape(-1, *([1] * (w.dim() - 1)))
    c = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(s)
    dtype, requires_grad = layer.weight.dtype, layer.weight.requires_grad
    layer.weight = nn.Parameter(w.to(dtype), requires_grad=requires_grad)
    layer.bias = nn.Parameter((c * s + t).to(dtype), requires_grad=requires_grad)


def _pairs(model: nn.Module) -> tuple[str, dict[str, str], set[str]]:
    """``(method, pairs, read)``: ``pairs`` maps ``bn_name -> layer_name`` where the batch
    norm's only input is the layer's output, the layer's output goes nowhere else, neither
    is used twice, and nothing else reads the layer's weight or bias (a Parameter another
    module shares, or, when the model traces, ``self.fc.weight`` read in a forward):
    folding rewrites them. ``read``: the batch norms whose tensors a forward reads itself
    (``self.bn.running_mean``, seen when the model traces), which must stay as they are."""
    counts = use_counts(model)
    param_counts = parameter_counts(model)
    once = lambda m: counts[id(m)] == 1
    layer_ok = lambda m: _foldable(m) and once(m) and all(
        param_counts[id(p)] == 1 for p in m.parameters())
    bn_ok = lambda m: is_any_bn(m) and once(m) and not has_hooks(m)
    graph = trace(model)
    if graph is None:
        pairs = {nb: nl for nl, layer, nb, bn in sequential_pairs(model, layer_ok, bn_ok)
                 if _compatible(layer, bn)}
        if pairs:
            warn_sequential_fallback("fold", "batch norms were folded into the layers "
                                     "before them")
        return "sequential", pairs, set()
    calls = module_calls(graph)
    attributes_read = [node.target for node in graph.nodes if node.op == "get_attr"]
    read_directly = lambda name: any(a == name or a.startswith(name + ".")
                                     for a in attributes_read)
    read = {name for name, m in model.named_modules() if is_any_bn(m) and read_directly(name)}
    pairs = {}
    for bn_name, nodes in calls.items():
        bn = model.get_submodule(bn_name)
        if len(nodes) != 1 or not bn_ok(bn) or not nodes[0].args or bn_name in read:
            continue
        src = nodes[0].args[0]
        if (isinstance(src, torch.fx.Node) and src.op == "call_module"
                and len(calls[src.target]) == 1 and uses(src) == 1
                and not read_directly(src.target)):
            layer = model.get_submodule(src.target)
            if layer_ok(layer) and _compatible(layer, bn):
                pairs[bn_name] = src.target
    return "fx", pairs, read


def fold(model: nn.Module) -> tuple[nn.Module, FoldReport]:
    """Fold every eval-mode batch norm of ``model`` for inference; returns
    ``(new_model, report)`` and leaves ``model`` untouched.

    Each batch norm (ours, torch's, frozen) whose input is the output of a ``Conv1d/2d/3d``,
    ``ConvTranspose1d/2d/3d`` or ``Linear`` used only there goes into that layer's weight
    and bias, and becomes a :class:`ChannelAffine` that only applies its fused activation
    (and residual); any other becomes a ``ChannelAffine`` with its scale and shift. A layer
    whose weight or bias is used elsewhere too (a Parameter shared with another module, or
    one a ``forward`` reads directly, such as tied weights) is not folded into, nor is
    one with forward hooks or a weight a hook computes (``nn.utils.spectral_norm``). The
    predecessors are found with ``torch.fx`` when the model traces, else by order in plain
    ``nn.Sequential`` (with a warning: that assumes each runs as a whole); a direct read of
    a weight is seen only when the model traces.
    Layers without running statistics are skipped, and so are those with forward or
    backward hooks (a folded layer would not run them) and, when the model traces, those
    whose parameters or buffers a forward reads itself (``self.bn.running_mean``, which a
    folded layer no longer has); the report names them. A subclass of torch's batch norm
    (its forward may differ) or one with a parametrization is left as it is, with a
    warning. A lazy batch norm that has not seen input yet raises ``ValueError``.

    A batch norm after a ``Linear`` is folded for ``(N, C)`` input, the only case where its
    channels are the Linear's features (on ``(N, L, C)`` a ``BatchNorm1d`` normalizes
    ``L``). fold sees no shapes, so the ``ChannelAffine`` left in its place raises
    ``ValueError`` at call time for input of any other rank, rather than disagree with
    the original model. Likewise a batch norm folded into a convolution is right only
    for the convolution's batched output (a folded ``Conv2d`` takes an unbatched
    ``(C, H, W)`` image, which the ``BatchNorm2d`` refused; on a ``Conv1d``'s unbatched
    ``(C, L)`` a ``BatchNorm1d`` normalizes ``L``), and a scale-and-shift only for the
    ranks its batch norm took: other ranks raise ``ValueError``.

    Raises ``RuntimeError`` for a model in training mode (or with a batch norm in training
    mode that is not frozen): folding bakes in running statistics that training changes.
    """
    check_module(model, "fold")
    if model.training:
        raise RuntimeError("fold() is for inference: the model is in training mode. Call "
                           "model.eval() first; folding bakes the running statistics into "
                           "the weights, and training would go on changing them")
    for name, m in model.named_modules():
        if (is_any_bn(m) and not isinstance(m, _FrozenBatchNorm) and m.training
                and not getattr(m, "frozen", False)):
            raise RuntimeError(f"fold(): batch norm {name!r} is in training mode inside an "
                               f"eval model; call model.eval() (or freeze it) first")
    lazy = lazy_batch_norms_without_input(model)
    if lazy:
        raise ValueError(f"fold(): {', '.join(map(repr, lazy))} is a lazy batch norm that "
                         f"has not seen input yet, so it has no statistics to fold: run the "
                         f"model on one batch first")
    warn_subclasses(model, "fold", "It is not folded and runs as it is.")
    try:
        new = copy.deepcopy(model)
    except RuntimeError as e:
        raise RuntimeError(f"fold() works on a copy of the model, and copy.deepcopy(model) "
                           f"failed: {e}. {_why_not_copied(model)}") from e
    if is_any_bn(new):
        if new.running_mean is None:
            raise ValueError("fold(): this batch norm has no running statistics")
        if has_hooks(new):
            return new, FoldReport("fx", skipped=[("", _HOOKED)])
        s, t = _affine_of(new)
        dt = new.running_mean.dtype
        return ChannelAffine(s.to(dt), t.to(dt), *_activation_of(new),
                             input_ranks=_input_ranks(new),
                             num_features=new.num_features).eval(), \
            FoldReport("fx", scale_shift=[""])
    method, pairs, read = _pairs(new)
    report = FoldReport(method)
    done: dict[int, nn.Module] = {}
    for name, bn in list(new.named_modules(remove_duplicate=False)):
        if not name or not is_any_bn(bn):
            continue
        if id(bn) in done:  # a shared instance: same replacement at every place
            set_submodule(new, name, done[id(bn)])
            continue
        if bn.running_mean is None:
            report.skipped.append((name, "no running statistics (track_running_stats=False)"))
            continue
        if has_hooks(bn):
            report.skipped.append((name, _HOOKED))
            continue
        if name in read:
            report.skipped.append((name, _READ))
            continue
        s, t = _affine_of(bn)
        if name in pairs:
            layer = new.get_submodule(pairs[name])
            _fold_into(layer, s, t)
            # The layer's output feeds only this module: it may be overwritten.
            repl = ChannelAffine(None, None, *_activation_of(bn), inplace=True,
                                 linear_input=isinstance(layer, nn.Linear),
                                 input_ranks=(layer.weight.dim(),),
                                 num_features=bn.num_features)
            report.folded.append((name, pairs[name]))
        else:
            dt = bn.running_mean.dtype
            repl = ChannelAffine(s.to(dt), t.to(dt), *_activation_of(bn),
                                 input_ranks=_input_ranks(bn), num_features=bn.num_features)
            report.scale_shift.append(name)
        repl.train(False)
        done[id(bn)] = repl
        set_submodule(new, name, repl)
    # a convert marker of an activation now in a ChannelAffine: not the copy of the batch
    # norm it fused into, which the model no longer has (pickles carried it)
    repoint_markers(new, done)
    return new, report
