"""``batch_norm``: torch's functional signature and results, plus a fused tail.

Everything is validated before any state changes; only then does the computation run
(``ops.py``) and, last, the running statistics update. A call that raises leaves every
buffer as it was.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.overrides import (
    handle_torch_function,
    has_torch_function,
    has_torch_function_variadic,
)

from . import ops
from .backends.portable import ACTIVATIONS

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# torch.nn modules that can be fused, and how to read their parameter.
_ACTIVATION_MODULES = {
    nn.ReLU: lambda m: ("relu", 0.0),
    nn.LeakyReLU: lambda m: ("leaky_relu", float(m.negative_slope)),
    nn.SiLU: lambda m: ("silu", 0.0),
    nn.GELU: lambda m: (_GELU_KINDS[m.approximate], 0.0),
    nn.Sigmoid: lambda m: ("sigmoid", 0.0),
    nn.Tanh: lambda m: ("tanh", 0.0),
}

DEFAULT_LEAKY_SLOPE = 0.01
_RESOLVED_NAMES = frozenset(ACTIVATIONS)
_GELU_KINDS = {"none": "gelu", "tanh": "gelu_tanh"}


def resolve_activation(activation) -> tuple[str, float]:
    """``(name, slope)`` for None, a name from ``ACTIVATIONS`` or a ``torch.nn`` module.

    A ``nn.LeakyReLU`` keeps its negative slope; the name ``'leaky_relu'`` takes torch's
    default 0.01; ``nn.GELU(approximate='tanh')`` becomes ``'gelu_tanh'``.
    """
    if activation is None:
        return "none", 0.0
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; expected None or one of "
                f"{', '.join(repr(a) for a in ACTIVATIONS[1:])}, or a torch.nn module such as nn.ReLU()")
        return activation, (DEFAULT_LEAKY_SLOPE if activation == "leaky_relu" else 0.0)
    for cls, read in _ACTIVATION_MODULES.items():
        if type(activation) is cls:
            if cls is nn.GELU and activation.approximate not in _GELU_KINDS:
                # (torch's GELU raises at its first call; 'Tanh' was fused as the exact one)
                raise ValueError(f"nn.GELU(approximate={activation.approximate!r}): "
                                 f"approximate must be 'none' or 'tanh'")
            return read(activation)
    names = ", ".join(repr(a) for a in ACTIVATIONS[1:])
    modules = ", ".join(f"nn.{c.__name__}()" for c in _ACTIVATION_MODULES)
    if isinstance(activation, type) and activation in _ACTIVATION_MODULES:
        raise TypeError(f"activation got the class nn.{activation.__name__}: pass an "
                        f"instance, nn.{activation.__name__}(), or a name ({names})")
    if callable(activation) and not isinstance(activation, nn.Module):
        raise TypeError(f"activation {activation!r} is a function, which cannot be fused: "
                        f"pass a name ({names}) or a module ({modules})")
    raise TypeError(f"activation {activation!r} cannot be fused: pass a name ({names}) or "
                    f"one of the modules {modules}")


def refuse_nested(t: Tensor, name: str) -> None:
    # (before anything reads its shape: a strided nested tensor's raises an internal
    # error, and to_dense(), the hint for other layouts, refuses a jagged one)
    if t.is_nested:
        raise NotImplementedError(
            f"{name} is a nested tensor (torch.nested); batch_norm takes dense (strided) "
            f"ones: stack its components (torch.stack(t.unbind())) where their shapes match")


def check_residual(residual, input: Tensor) -> None:
    """A residual (not None) must be a dense floating-point tensor of the input's shape and
    device: no broadcasting (a (1, C, 1, 1) residual is more often a mistake)."""
    if not isinstance(residual, Tensor):
        raise TypeError(f"residual must be None or a tensor of the input's shape "
                        f"{tuple(input.shape)}, got {type(residual).__name__}")
    refuse_nested(residual, "residual")
    if residual.shape != input.shape:
        raise ValueError(f"residual must have the input's shape {tuple(input.shape)}, "
                         f"got {tuple(residual.shape)}")
    if residual.device != input.device:
        raise RuntimeError(
            f"residual is on {residual.device} but the input is on {input.device}; "
            f"move it with .to({str(input.device)!r})")
    if not residual.is_floating_point():
        raise TypeError(f"residual must be floating point, got {residual.dtype}")
    if residual.layout is not torch.strided:
        raise NotImplementedError(f"residual is a {residual.layout} tensor; batch_norm "
                                  f"takes dense (strided) ones: pass residual.to_dense()")


class FusedActivationAttribute:
    """Mixin of a layer with a fused activation: ``activation`` takes, also after
    construction, what the constructor takes (checked at the assignment, so that a bad
    value fails there and not in a later forward), and reads as the resolved name; it sets
    ``activation_slope`` as the constructor does (a module's slope, 0.01 for the name
    ``'leaky_relu'``, else 0), which may be assigned after it."""

    @property
    def activation(self) -> str:
        # (kept under another name than the property's: torch 2.11's dynamo turned
        # self.__dict__.get("activation") into self.activation, a RecursionError)
        return self.__dict__.get("_activation", "none")

    @activation.setter
    def activation(self, value) -> None:
        self.__dict__["_activation"], self.__dict__["activation_slope"] = (
            resolve_activation(value))

    def __getstate__(self):
        # also under the earlier key, which the code before the change reads (without it
        # a layer pickled whole here loaded there without its activation)
        return {**super().__getstate__(), "activation": self.activation}

    def __setstate__(self, state) -> None:
        if "activation" in state:  # a layer pickled whole before the name changed, or here
            state = dict(state)
            state["_activation"] = state.pop("activation")
        super().__setstate__(state)

    def __setattr__(self, name: str, value) -> None:
        if name == "activation":  # nn.Module's rule would make an nn.ReLU() a submodule
            object.__setattr__(self, name, value)  # the property (which dynamo traces)
        elif name == "activation_slope":  # (checked here, not at the next forward)
            super().__setattr__(name, check_slope(value))
        else:
            super().__setattr__(name, value)


def activation_module(name: str, slope: float) -> nn.Module | None:
    """The ``torch.nn`` module equivalent to a resolved activation (None for 'none')."""
    return {
        "none": lambda: None,
        "relu": nn.ReLU,
        "leaky_relu": lambda: nn.LeakyReLU(slope),
        "silu": nn.SiLU,
        "gelu": nn.GELU,
        "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
        "sigmoid": nn.Sigmoid,
        "tanh": nn.Tanh,
    }[name]()


def _check_per_channel(name: str, t: Tensor | None, input: Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):  # (a positional slip, batch_norm(x, rm, rv, True), too)
        raise TypeError(f"batch_norm: {name} must be a Tensor or None, got "
                        f"{type(t).__name__}")
    c = input.shape[1]
    if t.dim() != 1 and t.numel() == c:  # (1, C), say: torch reads any shape of C values
        raise ValueError(f"{name} has shape {tuple(t.shape)}; per-channel tensors are 1-D, "
                         f"one value per channel: pass {name}.reshape(-1)")
    if t.dim() != 1 or t.shape[0] != c:
        raise ValueError(
            f"{name} has shape {tuple(t.shape)} but the input has {c} channels (dim 1 of "
            f"input of shape {tuple(input.shape)}); build the layer with num_features={c}")
    if t.device != input.device:
        where = str(input.device)
        if t.device.type == "meta":  # no data to move: .to() would raise
            raise RuntimeError(
                f"{name} is on the meta device (no data) but the input is on {where}; give "
                f"the module storage there with .to_empty(device={where!r}), then "
                f"reset_parameters() or load_state_dict()")
        raise RuntimeError(
            f"{name} is on {t.device} but the input is on {where}; move the module "
            f"to the input's device with .to({where!r})")
    if t.layout is not torch.strided:
        raise NotImplementedError(f"{name} is a {t.layout} tensor; batch_norm takes dense "
                                  f"(strided) ones: pass {name}.to_dense()")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point (float16, bfloat16, float32 or "
                        f"float64), got {t.dtype}; convert it, e.g. with .float()")


_PER_CHANNEL = ("running_mean", "running_var", "weight", "bias")


def _check_num_batches_tracked(t, input: Tensor) -> None:
    """A one-element real tensor on the input's device (a module's long scalar buffer;
    torch's modules take a float one too): training adds 1 to it in place and
    momentum=None takes 1/count from it."""
    if not isinstance(t, Tensor):
        raise TypeError(f"num_batches_tracked must be a tensor (a long scalar, as a module's "
                        f"buffer: torch.tensor(0)), got {type(t).__name__}")
    if t.numel() != 1 or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"num_batches_tracked must be one number, as a module's buffer "
                        f"torch.tensor(0); got a {t.dtype} tensor of shape {tuple(t.shape)}")
    if t.device != input.device:
        raise RuntimeError(f"num_batches_tracked is on {t.device} but the input is on "
                           f"{input.device}; move it with .to({str(input.device)!r})")


def _real(value, refuse_bool: bool) -> float | None:
    """``value`` as a float, or None where it is no number: a string (which float() would
    read), or a bool where ``refuse_bool`` (an argument in the wrong place, say)."""
    if isinstance(value, (str, bytes)) or (refuse_bool and isinstance(value, bool)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def check_slope(slope) -> float:
    """``slope`` as a float; TypeError unless it is a number (a bool or a string is none)."""
    value = _real(slope, refuse_bool=True)
    if value is None:
        raise TypeError(f"activation_slope must be a number (leaky_relu's negative slope), "
                        f"got {type(slope).__name__} {slope!r}")
    return value


def check_resolved_activation(activation) -> None:
    """ValueError unless ``activation`` is a resolved name (``resolve_activation``'s)."""
    if activation not in _RESOLVED_NAMES:
        raise ValueError(f"activation must be a resolved name, one of "
                         f"{', '.join(map(repr, ACTIVATIONS))}, got {activation!r} (the "
                         f"functional batch_norm and the layers resolve modules and None)")


def check_momentum(momentum) -> None:
    """TypeError unless ``momentum`` is a number (a bool is refused too), ValueError unless
    it is in [0, 1] (None, the cumulative average, is the caller's to allow): the classes
    of torch's errors for a wrong type and of ours for a wrong value."""
    value = _real(momentum, refuse_bool=True)
    if value is None:
        raise TypeError(f"momentum must be a number in [0, 1], or None for a cumulative "
                        f"average, got {type(momentum).__name__} {momentum!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"momentum must be a number in [0, 1], or None for a cumulative "
                         f"average, got {momentum!r}")


def check_eps(eps) -> None:
    """TypeError unless ``eps`` is a number, ValueError for a negative or NaN one."""
    if type(eps) is float and eps >= 0:  # the usual case, on every call
        return
    value = _real(eps, refuse_bool=False)
    if value is None:
        raise TypeError(f"eps must be a number >= 0, got {type(eps).__name__} {eps!r}")
    if not value >= 0:  # NaN too
        raise ValueError(f"eps must be >= 0, got {eps!r}")


def validate(input, running_mean, running_var, weight, bias, training, momentum, eps,
             residual, num_batches_tracked=None) -> None:
    """Every check of :func:`batch_norm`, made before anything is computed or mutated."""
    if not isinstance(input, Tensor):
        raise TypeError(f"batch_norm expects a torch.Tensor input, got {type(input).__name__}")
    refuse_nested(input, "the input")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"batch_norm expects a floating-point input (float16, bfloat16, float32 or "
            f"float64), got {input.dtype}; convert it first, e.g. input.float()")
    if input.layout is not torch.strided:
        raise NotImplementedError(f"batch_norm takes dense (strided) tensors, got a "
                                  f"{input.layout} input; convert it with input.to_dense()")
    if input.dim() < 2:
        raise ValueError(
            f"batch_norm expects an input of shape (N, C, *) with at least 2 dimensions, got "
            f"shape {tuple(input.shape)}; for a single sample use input.unsqueeze(0)")
    if training is not True and training is not False:
        # as torch: None (or 0, "yes") is no answer to "batch statistics or running ones?"
        raise TypeError(f"batch_norm: training must be True or False, got {training!r}")
    # The per-channel tensors: a quick pass for the usual case (each None or [C], floating,
    # on the input's device: a handful of attribute reads, which count on small inputs),
    # the detailed checks with their messages only when it fails.
    per_channel = (running_mean, running_var, weight, bias)
    shape, device = (input.shape[1],), input.device
    for t in per_channel:
        if t is not None and not (isinstance(t, Tensor) and t.shape == shape
                                  and t.dtype in _FLOAT_DTYPES and t.device == device
                                  and t.layout is torch.strided):
            for name, u in zip(_PER_CHANNEL, per_channel):
                _check_per_channel(name, u, input)
    if not training and (running_mean is None or running_var is None):
        # RuntimeError, as torch's ("running_mean must be defined in evaluation mode")
        missing = "running_mean" if running_mean is None else "running_var"
        raise RuntimeError(f"evaluation (training=False) needs running_mean and running_var; "
                           f"{missing} is None")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together or both be None")
    if running_mean is not None and (running_mean.requires_grad or running_var.requires_grad
                                     ) and torch.is_grad_enabled():
        # as torch: the output does not depend on them differentiably (training), or
        # their gradient would be silently missing (evaluation)
        name = "running_mean" if running_mean.requires_grad else "running_var"
        raise RuntimeError(
            f"batch norm is not differentiable with respect to {name}, which has "
            f"requires_grad=True: running statistics are buffers. Pass {name}.detach(), "
            f"or call {name}.requires_grad_(False)")
    if num_batches_tracked is not None:
        _check_num_batches_tracked(num_batches_tracked, input)
    if residual is not None:
        check_residual(residual, input)
    check_eps(eps)  # NaN refused too, as the modules' constructors refuse it
    if momentum is None:
        if training and running_mean is not None and num_batches_tracked is None:
            # TypeError, as torch's (its momentum must be a float)
            raise TypeError(
                "momentum=None (cumulative average) needs num_batches_tracked; pass a float "
                "momentum in [0, 1] to the functional form")
    else:
        check_momentum(momentum)
    if training:
        # (is_contiguous first: 0.1 µs for both, against 0.5 for the loop; an empty batch
        # writes nothing)
        if running_mean is not None and not (running_mean.is_contiguous()
                                             and running_var.is_contiguous()) and input.numel():
            for name, t in (("running_mean", running_mean), ("running_var", running_var)):
                if t.stride(0) == 0 and t.shape[0] > 1:
                    # torch's kernel applies every channel's update in turn to the one value
                    # (they compound); torch's in-place ops (portable, triton) refuse to
                    raise ValueError(
                        f"{name} is an expanded view (stride 0): its channels share one "
                        f"value, and the running update writes one value per channel. "
                        f"Pass a tensor of its own, e.g. {name}.clone()")
        count = ops.values_per_channel(input)
        if count == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size "
                f"{tuple(input.shape)}. Batch statistics need at least 2 values per channel: "
                f"use a larger batch, drop the last incomplete batch (DataLoader(..., "
                f"drop_last=True)), or put the layer in eval mode (model.eval()) to use the "
                f"running statistics")


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    activation=None,
    residual: Tensor | None = None,
    num_batches_tracked: Tensor | None = None,
) -> Tensor:
    r"""Batch normalization with torch's signature, plus ``y = act(BN(x) + residual)``.

    In training, each channel c is normalized with the statistics of this batch,
    :math:`\hat x = (x - \mu_c) / \sqrt{\sigma^2_c + \epsilon}` with the *biased* variance,
    and ``running_mean``/``running_var`` (when given) move towards the batch mean and the
    *unbiased* batch variance by ``momentum``. Out of training the running statistics are
    used. ``activation`` (None, a name or a ``torch.nn`` module, see
    :func:`resolve_activation`) and ``residual`` (a tensor of the input's shape) are
    applied in the same pass. ``num_batches_tracked`` (a long scalar tensor) is
    incremented in training and drives ``momentum=None``, the cumulative average, as
    the modules do. ``eps = 0`` is allowed: a zero-variance channel gives ``bias``
    (then the residual and activation, where fused).
    """
    if _takes_torch_function(input, running_mean, running_var, weight, bias, residual,
                             num_batches_tracked):
        return _handle_torch_function(
            batch_norm, (input, running_mean, running_var, weight, bias, residual,
                         num_batches_tracked),
            input, running_mean, running_var, weight, bias, training, momentum, eps,
            activation=activation, residual=residual, num_batches_tracked=num_batches_tracked)
    act, slope = resolve_activation(activation)
    return batch_norm_resolved(input, running_mean, running_var, weight, bias, training,
                               momentum, eps, act, slope, residual, num_batches_tracked)


def _takes_torch_function(*tensors) -> bool:
    """Whether a subclass's ``__torch_function__`` or a mode takes the call, as in
    torch's functional batch_norm. While torch.compile traces, only where one could act
    on it (an override of ``__torch_function__``, a mode): dynamo carries a plain
    subclass's type through the ops itself, and fails on the handler's call."""
    if not has_torch_function_variadic(*tensors):
        return False
    if not torch.compiler.is_compiling():
        return True
    return torch._C._is_torch_function_mode_enabled() or any(
        _overrides_torch_function(type(t)) for t in tensors
        if t is not None and type(t) not in (Tensor, nn.Parameter))


def _overrides_torch_function(cls) -> bool:
    """Whether a tensor class has a ``__torch_function__`` of its own (nn.Parameter's is
    disabled, a plain subclass's is Tensor's)."""
    for c in cls.__mro__:  # (read from the classes' dicts, as dynamo can while it traces)
        own = c.__dict__.get("__torch_function__")
        if own is not None:
            return c is not Tensor and own is not torch._C._disabled_torch_function_impl
    return False


@torch.compiler.disable
def _handle_outside_the_graph(func, relevant, *args, **kwargs):
    """``handle_torch_function`` while torch.compile traces: outside its graph (a graph
    break; under fullgraph, an error), where the override or mode sees our call, as in
    eager, rather than dynamo's failing trace of it. Where nothing takes it there (a
    subclass's own call under DisableTorchFunctionSubclass), the function runs."""
    if not has_torch_function(relevant):
        return func(*args, **kwargs)
    return handle_torch_function(func, relevant, *args, **kwargs)


def _handle_torch_function(*args, **kwargs):
    if torch.compiler.is_compiling():
        return _handle_outside_the_graph(*args, **kwargs)
    return handle_torch_function(*args, **kwargs)


def batch_norm_resolved(input, running_mean, running_var, weight, bias, training, momentum,
                        eps, activation: str, slope: float, residual=None,
                        num_batches_tracked=None) -> Tensor:
    """:func:`batch_norm` with the activation already resolved to ``(name, slope)``.

    Both take part in ``__torch_function__`` as ``torch.nn.functional.batch_norm`` does:
    a tensor subclass that overrides it, or a ``TorchFunctionMode``, sees one call (this
    one, from the modules), and a subclass without an override gets its type back."""
    if _takes_torch_function(input, running_mean, running_var, weight, bias, residual,
                             num_batches_tracked):
        return _handle_torch_function(
            batch_norm_resolved, (input, running_mean, running_var, weight, bias, residual,
                                  num_batches_tracked),
            input, running_mean, running_var, weight, bias, training, momentum, eps,
            activation, slope, residual, num_batches_tracked)
    if activation not in _RESOLVED_NAMES:
        check_resolved_activation(activation)
    validate(input, running_mean, running_var, weight, bias, training, momentum, eps,
             residual, num_batches_tracked)
    # While exporting, what changes no state is written with torch's ops (see below).
    if (not training or running_mean is None) and _is_exporting():
        return _standard_ops(input, running_mean, running_var, weight, bias, eps,
                             activation, slope, residual)
    if not training:
        return ops.batch_norm(input, weight, bias, residual, running_mean, running_var, eps,
                              activation, slope)
    update = None
    if input.numel() == 0:
        if num_batches_tracked is not None:
            # As torch: an empty batch is counted, the running statistics stay.
            num_batches_tracked.add_(1)
    elif running_mean is not None or num_batches_tracked is not None:
        update = (running_mean, running_var, num_batches_tracked, momentum)
    return ops.batch_norm(input, weight, bias, residual, None, None, eps, activation, slope,
                          update)


def _is_exporting() -> bool:
    # The flag itself where torch has it: torch 2.11's dynamo took is_exporting() for
    # True under any torch.compile (compiled eval ran torch's batch norm, not ours).
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    if flag is not None:
        return flag
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return is_exporting is not None and is_exporting()


def _standard_ops(input, running_mean, running_var, weight, bias, eps, activation, slope,
                  residual) -> Tensor:
    """Batch norm written with torch's own ops, used while ``torch.export`` traces: in eval,
    and with batch statistics where no running ones exist (``track_running_stats=False``).

    The exported graph then holds ``aten`` batch norm and activation ops, which every
    consumer knows (ONNX ``BatchNormalization`` + ``Relu``...), instead of our custom op,
    which none does. What torch's batch norm refuses is written so that it runs: the
    per-channel tensors take the dtype torch's kernels take with this input (the input's,
    float32 for half inputs), the output the input's dtype (a residual of another dtype
    promoted it), and ``eps = 0`` with batch statistics (torch's refuses it in training)
    is written out with our rule for a zero-variance channel (x̂ = 0). One difference
    remains: in eval with ``eps = 0`` a zero ``running_var`` gives inf/NaN, as in torch,
    instead of ``bias``.
    """
    wide = input.dtype if input.dtype in (torch.float32, torch.float64) else torch.float32
    running_mean, running_var, weight, bias = (
        t if t is None or t.dtype == wide else t.to(wide)
        for t in (running_mean, running_var, weight, bias))
    # Half input with a residual or an activation: computed in float32 and rounded once
    # at the end, as the kernels do (rounding the batch norm's output too would move
    # about a fifth of the values by one bfloat16 step).
    x = input if residual is None and activation == "none" else input.to(wide)
    if running_mean is None and eps == 0:
        y = _batch_stats_normalized_eps0(x.to(wide), weight, bias)
    else:
        y = torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias,
                                           running_mean is None, 0.0, eps)
    if residual is not None:
        y = y + residual
    act = activation_module(activation, slope)
    y = y if act is None else act(y)
    return y if y.dtype == input.dtype else y.to(input.dtype)


def _batch_stats_normalized_eps0(x: Tensor, weight, bias) -> Tensor:
    """``weight · x̂ + bias`` with the batch's statistics and eps = 0, a zero-variance
    channel giving x̂ = 0, in torch ops."""
    dims = [0, *range(2, x.dim())]
    view = (1, -1) + (1,) * (x.dim() - 2)
    var, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
    invstd = torch.where(var > 0, var.rsqrt(), torch.zeros_like(var))
    y = (x - mean) * invstd
    if weight is not None:
        y = y * weight.view(view)
    return y if bias is None else y + bias.view(view)
