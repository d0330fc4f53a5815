"""``BatchNorm1d/2d/3d`` and their lazy forms: drop-in replacements for torch's.

The modules own state (parameters, buffers, ``num_batches_tracked``, the ``momentum=None``
rule, input checks) and never compute: ``forward`` checks the input's rank and hands
everything to :func:`batchnorm.functional.batch_norm`, which validates before it mutates.
Parameter and buffer names, ``state_dict`` layout and version are torch's, so checkpoints
load both ways.
"""

from __future__ import annotations

import functools
import operator
import typing

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn import init
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

from . import functional as F


def check_constructor_args(num_features: int, eps: float, momentum: float | None,
                           allow_zero_features: bool = False) -> int:
    """TypeError for an argument of a wrong type, ValueError for values torch accepts
    silently but that cannot work; returns ``num_features`` as a Python int (an integer
    type such as ``np.int64`` is accepted, as torch accepts it)."""
    try:
        count = None if isinstance(num_features, bool) else operator.index(num_features)
    except TypeError:
        count = None
    if count is None:
        raise TypeError(f"num_features must be a positive int (the C of an (N, C, ...) "
                        f"input), got {type(num_features).__name__} {num_features!r}")
    if count < 1 and not (allow_zero_features and count == 0):
        raise ValueError(f"num_features must be a positive int (the C of an (N, C, ...) "
                         f"input), got {num_features!r}")
    F.check_eps(eps)
    if momentum is not None:
        F.check_momentum(momentum)
    return count


def refuse_script(module: nn.Module) -> None:
    """``torch.jit.script`` asks each module's ``__prepare_scriptable__`` first: ours say
    what to do instead of failing deep inside their Python (an f-string it cannot
    compile)."""
    revert = (", or put torch's layers back first with batchnorm.revert(model) (it keeps "
              "ours where torch has no equivalent: a BatchNormNd, a layer called with a "
              "residual, a lazy one before its first input)"
              if isinstance(module, _NormBase) else "")
    raise TypeError(
        f"torch.jit.script cannot compile batchnorm's {type(module).__name__}: its forward "
        f"is not TorchScript. Use torch.jit.trace, torch.export or torch.compile{revert}")


class _NormBase(F.FusedActivationAttribute, nn.Module):
    """State of a batch-norm layer, laid out exactly as torch's ``_NormBase``."""

    _version = 2
    _frozen = False  # class default: modules pickled before ``frozen`` existed still run
    # Set by the first call with a residual, which torch's layers do not take:
    # batchnorm.revert leaves such a layer as it is.
    called_with_residual = False
    __constants__ = ["track_running_stats", "momentum", "eps", "num_features", "affine"]
    __prepare_scriptable__ = refuse_script

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None,
                 dtype=None, *, bias: bool = True, activation=None) -> None:
        num_features = check_constructor_args(
            num_features, eps, momentum, allow_zero_features=isinstance(self, LazyModuleMixin))
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.activation = activation  # and activation_slope
        self._frozen = False
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory_kwargs))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory_kwargs))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory_kwargs))
            self.register_buffer("running_var", torch.ones(num_features, **factory_kwargs))
            self.register_buffer("num_batches_tracked",
                                 torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            init.ones_(self.weight)
            if self.bias is not None:
                init.zeros_(self.bias)

    def _check_input_dim(self, input: Tensor) -> None:
        raise NotImplementedError

    def _momentum_given(self, num_batches_tracked: Tensor | None) -> float | None:
        """The momentum a training step passes on. ``momentum=None`` averages over
        num_batches_tracked; with that buffer set to None torch's layers take the factor
        0.0 (the running statistics stay as they are), and so do ours."""
        if self.momentum is None and num_batches_tracked is None:
            return 0.0
        return self.momentum

    def _note_residual(self) -> None:
        """``called_with_residual`` after a call with a residual succeeded; not while
        torch.compile traces (the write would be a guard of the graph: every model passing
        a residual compiled twice), so a model only ever run compiled is not marked."""
        if not self.called_with_residual and not torch.compiler.is_compiling():
            self.__dict__["called_with_residual"] = True  # (no Module.__setattr__)

    @property
    def frozen(self) -> bool:
        """Use and keep the running statistics, in ``train()`` too (see ``batchnorm.freeze``)."""
        return self._frozen

    def _has_running_stats(self) -> bool:
        """Both running buffers exist: with ``track_running_stats=False`` set after
        construction they are kept, and eval normalizes with them."""
        return self.running_mean is not None and self.running_var is not None

    @frozen.setter
    def frozen(self, value: bool) -> None:
        if value and not self._has_running_stats():
            raise ValueError(f"{type(self).__name__} without running statistics "
                             f"(track_running_stats=False) has none to freeze")
        self._frozen = bool(value)

    # ``frozen`` travels in the state_dict's *metadata* (next to ``version``), not as a key:
    # the keys stay exactly torch's, so strict loading works both ways, and torch.save /
    # load_state_dict keep the flag. A dict rebuilt from the items (safetensors, a dict
    # comprehension) drops it, as it drops ``version``; a state_dict without the flag (any
    # torch checkpoint) leaves the module's current ``frozen`` as it is; so does a flag False
    # (see _load_from_state_dict).
    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        metadata = getattr(destination, "_metadata", None)
        if metadata is not None and prefix[:-1] in metadata:
            metadata[prefix[:-1]]["frozen"] = self._frozen

    def extra_repr(self) -> str:
        text = (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, bias={self.bias is not None}, "
                f"track_running_stats={self.track_running_stats}")
        if self.activation != "none":
            text += f", activation={self.activation!r}"
            if self.activation == "leaky_relu":
                text += f", negative_slope={self.activation_slope}"
        if self._frozen:
            text += ", frozen=True"
        return text

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs) -> None:
        version = local_metadata.get("version", None)
        if (version is None or version < 2) and self.track_running_stats:
            # Checkpoints from before num_batches_tracked existed (version 1) load with 0.
            key = prefix + "num_batches_tracked"
            if key not in state_dict:
                nbt = self.num_batches_tracked
                state_dict[key] = (nbt if nbt is not None and nbt.device != torch.device("meta")
                                   else torch.tensor(0, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)
        # A frozen state_dict freezes the layer; one that is not leaves the layer as it is
        # (every state_dict of ours says frozen False or True: "build, freeze, then load
        # the pretrained weights" keeps the freeze, as with a torch checkpoint). A layer
        # without running statistics takes the flag as it takes their keys: unexpected,
        # an error under strict loading (which torch reports for those keys) and ignored
        # otherwise (torch hands this method strict=True either way).
        if local_metadata.get("frozen") and self._has_running_stats():
            self._frozen = True


class _BatchNorm(_NormBase):
    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        """``act(BN(input) + residual)``, in one pass.

        ``input``: (N, C, *) of the ranks the class takes; ``residual``: None, or a tensor
        of the input's shape added before the activation. In training (unless frozen)
        the batch's statistics normalize and the running ones move towards them; in eval
        the running statistics normalize.
        """
        run = F.batch_norm_resolved
        if type(input) is not Tensor and isinstance(input, torch.fx.Proxy):
            leaf = fx_leaf(self, input, residual)
            if leaf is not None:
                return leaf
            run = functools.partial(_traced_batch_norm, buffers=tuple(
                t for name, t in self._buffers.items()
                if name not in self._non_persistent_buffers_set))
        else:
            self._check_input_dim(input)
        # Batch statistics in training, and in eval too when there are no running ones;
        # a frozen layer uses and keeps its running statistics in training as in eval.
        training = self.training and not self._frozen
        weight, bias, running_mean, running_var, num_batches_tracked = _state_of(self)
        use_batch_stats = training or (running_mean is None and running_var is None)
        if training and not self.track_running_stats:
            running_mean = running_var = None
        if not (training and self.track_running_stats):
            num_batches_tracked = None
        y = run(
            input, running_mean, running_var, weight, bias, use_batch_stats,
            self._momentum_given(num_batches_tracked), self.eps, self.activation,
            self.activation_slope, residual, num_batches_tracked,
        )
        if residual is not None:
            self._note_residual()
        return y


# The forwards that call fx_leaf (ours; each module registers its own with
# register_layer_forward): a subclass with another is traced through, as fx traces any
# module.
FX_LEAF_FORWARDS: set = set()


def _global_forward_hooks() -> bool:
    """Whether hooks registered for every module (``register_module_forward_hook``, ...)
    run around each forward."""
    hooks = torch.nn.modules.module
    return bool(getattr(hooks, "_global_forward_hooks", None)
                or getattr(hooks, "_global_forward_pre_hooks", None))


def _own_forward(module: nn.Module) -> bool:
    """Whether the instance has a ``forward`` of its own: not its class's bound back onto
    it (what accelerate's ``remove_hook_from_module`` leaves)."""
    forward = vars(module).get("forward")
    return forward is not None and not (getattr(forward, "__self__", None) is module
                                        and getattr(forward, "__func__", None)
                                        in FX_LEAF_FORWARDS)


def fx_leaf(module: nn.Module, input, residual):
    """Under ``torch.fx.symbolic_trace``: the layer as one ``call_module`` node, as torch's
    own layers are (fx makes only torch.nn's modules leaves; ours cannot be traced
    through: the checks read shapes, the kernels are no torch ops). The graph then runs
    the layer, which follows the GraphModule's train/eval mode (quantization-aware
    training's ``convert_fx`` of a trained model), and the tools find it there.

    None where no such node can stand for it: the traced root itself (torch traces its
    layer's forward there too), a layer that is not a submodule of the root, and one
    around whose forward fx already ran code on Proxies, which the node would run a
    second time: forward hooks (the layer's or global ones), a subclass's own
    ``forward`` (one that transposes its input, say, then calls ours) or the instance's
    (accelerate's hooks set one). The caller then records its computation as a
    ``call_function`` (:func:`_traced_batch_norm`).
    """
    tracer = input.tracer
    if (not hasattr(tracer, "path_of_module") or module._forward_hooks
            or module._forward_pre_hooks or _global_forward_hooks()
            or type(module).forward not in FX_LEAF_FORWARDS or _own_forward(module)):
        return None
    try:
        path = tracer.path_of_module(module)
    except NameError:
        return None
    if not path:
        return None
    args = (input,) if residual is None else (input, residual)
    return tracer.create_proxy("call_module", path, args, {})


def _traced_batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
                       eps, activation, slope, residual, num_batches_tracked, buffers=()):
    """``functional.batch_norm_resolved`` as one node of a ``torch.fx`` graph where the
    layer cannot be one (see :func:`fx_leaf`). As in the graph fx makes of torch's layer
    traced as the root, the parameters and buffers are the module's (``get_attr``) and
    the mode (training, momentum) is the one at trace time. ``buffers``: the layer's
    persistent ones, unread: the node keeps them in the GraphModule, whose state_dict is
    then the layer's (num_batches_tracked of a layer traced in eval included)."""
    return F.batch_norm_resolved(input, running_mean, running_var, weight, bias, training,
                                 momentum, eps, activation, slope, residual,
                                 num_batches_tracked)


torch.fx.wrap("_traced_batch_norm")


def evaluate_annotations(*functions) -> None:
    """Annotations as objects, not the strings ``from __future__ import annotations``
    leaves: fx copies a traced root's forward annotations into its graph's code, and a
    GraphModule whose code names them as strings cannot be pickled."""
    for f in functions:
        f.__annotations__ = typing.get_type_hints(f)


def register_layer_forward(forward) -> None:
    """The forward of one of our batch-norm classes: fx_leaf may make its layers
    ``call_module`` nodes, and a layer traced as the root pickles."""
    FX_LEAF_FORWARDS.add(forward)
    evaluate_annotations(forward)


register_layer_forward(_BatchNorm.forward)

_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _state_of(m: nn.Module) -> tuple:
    """``(weight, bias, running_mean, running_var, num_batches_tracked)`` of a layer.

    Read from the module's parameter and buffer dicts: ``m.weight`` goes through
    ``nn.Module.__getattr__``, about 1.5 µs a name on torch 2.13 (measured on the 2-core
    machine): the five names cost about 8 µs of the 50 µs our module's training forward
    took on (2, 2, 3, 4). Where a name is not in those dicts (a parametrization,
    ``weight_norm``, a plain attribute set over a deleted parameter) the attributes are
    read as usual.
    """
    p, b = m._parameters, m._buffers
    try:
        return (p["weight"], p["bias"], b["running_mean"], b["running_var"],
                b["num_batches_tracked"])
    except KeyError:
        return tuple(getattr(m, name) for name in _STATE)


_LAYER_FOR_RANK = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}


def _check_rank(cls_name: str, input: Tensor, allowed: tuple[int, ...], what: str) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"{cls_name} expects a torch.Tensor, got {type(input).__name__}")
    if input.dim() not in allowed:
        fit = _LAYER_FOR_RANK.get(input.dim())
        hint = (f"; use {fit} for {input.dim()}D input" if fit and fit not in cls_name else
                "; reshape it to (N, C, ...)" if input.dim() < 2 else "")
        raise ValueError(
            f"{cls_name} expected {what} input (got {input.dim()}D input of shape "
            f"{tuple(input.shape)}){hint}")


_DOC = r"""Batch Normalization over a {rank} input, a drop-in for ``torch.nn.{name}``.

    .. math::  y = \mathrm{{act}}\Big(\frac{{x - \mathrm{{E}}[x]}}{{\sqrt{{\mathrm{{Var}}[x] + \epsilon}}}}
               \gamma + \beta + \text{{residual}}\Big)

    Mean and variance are computed per channel over the {over} dimensions of the batch,
    the variance *biased* (divided by the count). In training, ``running_mean`` and
    ``running_var`` move towards the batch mean and the *unbiased* batch variance:
    ``running = (1 - momentum) * running + momentum * batch``. In eval they replace the
    batch statistics, unless ``track_running_stats=False``, in which case batch
    statistics are used in eval too.

    Args:
        num_features: C, the channel count of an input of shape {shape}.
        eps: added to the variance for stability. ``eps=0`` is accepted (torch refuses it
            in training); a zero-variance channel is then normalized to 0, so it outputs
            ``bias`` (then the residual and activation, where fused). Default: 1e-5
        momentum: weight of the batch in the running statistics; None for a cumulative
            average over all batches seen. Default: 0.1
        affine: learnable per-channel ``weight`` (γ) and ``bias`` (β). Default: True
        track_running_stats: keep running statistics for eval. Default: True
        device, dtype: of the parameters and buffers. Default: None
        bias: (keyword) learn β too when ``affine``. Default: True
        activation: (keyword) fused after the normalization: None, ``'relu'``,
            ``'leaky_relu'``, ``'silu'``, ``'gelu'``, ``'gelu_tanh'``, ``'sigmoid'``,
            ``'tanh'``, or the matching ``torch.nn`` module (``nn.LeakyReLU(0.2)`` keeps its
            slope). The attribute takes the same later (``bn.activation = None`` unfuses),
            and reads as the name. Default: None

    Shape:
        input and output {shape} (the output keeps the input's memory format);
        ``forward(input, residual=None)``: ``residual`` of the input's shape is added
        before the activation.
"""


class BatchNorm1d(_BatchNorm):
    def _check_input_dim(self, input):
        _check_rank(type(self).__name__, input, (2, 3), "2D or 3D")


class BatchNorm2d(_BatchNorm):
    def _check_input_dim(self, input):
        _check_rank(type(self).__name__, input, (4,), "4D")


class BatchNorm3d(_BatchNorm):
    def _check_input_dim(self, input):
        _check_rank(type(self).__name__, input, (5,), "5D")


BatchNorm1d.__doc__ = _DOC.format(name="BatchNorm1d", rank="2D or 3D", over="N (and L)",
                                  shape="(N, C) or (N, C, L)")
BatchNorm2d.__doc__ = _DOC.format(name="BatchNorm2d", rank="4D", over="N, H, W",
                                  shape="(N, C, H, W)")
BatchNorm3d.__doc__ = _DOC.format(name="BatchNorm3d", rank="5D", over="N, D, H, W",
                                  shape="(N, C, D, H, W)")


class _LazyNormBase(LazyModuleMixin, _NormBase):
    """``num_features`` is read from the first input's dim 1, as torch's lazy modules do."""

    cls_to_become = None

    def __init__(self, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, *, bias: bool = True, activation=None) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        # Built with no state, then given uninitialized parameters and buffers.
        super().__init__(0, eps, momentum, False, False, activation=activation, **factory_kwargs)
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = UninitializedParameter(**factory_kwargs)
            self.bias = UninitializedParameter(**factory_kwargs) if bias else None
        if track_running_stats:
            self.running_mean = UninitializedBuffer(**factory_kwargs)
            self.running_var = UninitializedBuffer(**factory_kwargs)
            self.num_batches_tracked = torch.tensor(0, dtype=torch.long, device=device)

    def reset_parameters(self) -> None:
        if not self.has_uninitialized_params() and self.num_features != 0:
            super().reset_parameters()

    def initialize_parameters(self, input, *args, **kwargs) -> None:
        # (the first call's other arguments, a residual, come too: LazyModuleMixin passes
        # the forward's)
        if self.has_uninitialized_params():
            # The rank first (input.shape[1] of a 1-D input is an IndexError), and no layer
            # of 0 channels: the constructor refuses num_features=0, and so does this.
            if isinstance(input, Tensor):
                F.refuse_nested(input, "the input")
            self._check_input_dim(input)
            if input.shape[1] == 0:
                raise ValueError(f"{type(self).__name__} takes num_features from the first "
                                 f"input's dim 1, and the input of shape "
                                 f"{tuple(input.shape)} has no channels")
            self.num_features = input.shape[1]
            for name in ("weight", "bias", "running_mean", "running_var"):
                t = getattr(self, name)
                if t is not None:
                    t.materialize((self.num_features,))
            self.reset_parameters()


class LazyBatchNorm1d(_LazyNormBase, BatchNorm1d):
    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(_LazyNormBase, BatchNorm2d):
    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(_LazyNormBase, BatchNorm3d):
    cls_to_become = BatchNorm3d


for _lazy, _cls in ((LazyBatchNorm1d, BatchNorm1d), (LazyBatchNorm2d, BatchNorm2d),
                    (LazyBatchNorm3d, BatchNorm3d)):
    _lazy.__doc__ = (f"``{_cls.__name__}`` whose ``num_features`` is inferred from the first "
                     f"input (dim 1), like ``torch.nn.{_lazy.__name__}``.\n\n    "
                     f"Same arguments as :class:`{_cls.__name__}` without ``num_features``.")
