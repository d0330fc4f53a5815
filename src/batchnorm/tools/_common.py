"""What the tools share: which modules are batch norms, and finding modules in a model."""

from __future__ import annotations

import itertools
import operator
import os
import sys
import warnings

import torch
from torch import nn
from torch.fx import Tracer
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

from ..modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm

# Exact types: a user subclass of torch's BatchNorm may override forward, and replacing it
# would silently drop that behaviour (see is_torch_bn_subclass).
TORCH_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
OURS_BY_RANK = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d,
                nn.BatchNorm3d: BatchNorm3d}
TORCH_BY_OURS = {BatchNorm1d: nn.BatchNorm1d, BatchNorm2d: nn.BatchNorm2d,
                 BatchNorm3d: nn.BatchNorm3d}


def check_module(model, caller: str,
                 compiled: tuple[str, ...] = ("torch", "ours", "frozen")) -> None:
    """TypeError for what is not an ``nn.Module`` (an AttributeError from deep inside would
    not say what was wrong) or is a TorchScript module; a warning for each TorchScript
    submodule that holds batch norms of the kinds ``caller`` changes (``compiled``: of
    :data:`COMPILED_KINDS`), as it cannot change them."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}() takes a torch.nn.Module (a model or a layer), got "
                        f"{type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        # (its submodules are compiled code: nothing could be replaced or changed, and the
        # tool would return it as it was without a word)
        raise TypeError(f"{caller}() cannot change a TorchScript module "
                        f"({type(model).__name__}): apply it to the model before "
                        f"torch.jit.script or torch.jit.trace")
    warn_script_submodules(model, caller, compiled)


# A compiled layer's class, by the start of its qualified name (torch's mangling may add
# a ``___torch_mangle_N.`` before the class): torch's batch norms, ours (SyncBatchNorm
# included), our FrozenBatchNorm*d; "sync" is either's SyncBatchNorm.
COMPILED_KINDS = {"torch": ("__torch__.torch.nn.modules.batchnorm.",),
                  "ours": ("__torch__.batchnorm.modules.", "__torch__.batchnorm.distributed."),
                  "frozen": ("__torch__.batchnorm.tools.freeze.",)}


def _compiled_kind(qualified_name: str, kinds: tuple[str, ...]) -> bool:
    if "sync" in kinds and qualified_name.endswith(".SyncBatchNorm"):
        kinds = ("torch", "ours")  # (a SyncBatchNorm of either)
    return any(qualified_name.startswith(prefix) for kind in kinds
               for prefix in COMPILED_KINDS.get(kind, ()))


def warn_script_submodules(model: nn.Module, caller: str, kinds: tuple[str, ...]) -> None:
    """Warn about each outermost TorchScript submodule (scripted or traced) that holds
    batch norms of ``kinds`` (see :data:`COMPILED_KINDS`), naming them: the tools find
    layers by their Python class, and a compiled one has none, so ``caller`` would pass
    them over without a word (recalibrate would let their statistics move and not put
    them back)."""
    inside: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(outer + ".") for outer in inside):
            continue
        if not isinstance(m, torch.jit.ScriptModule):
            continue
        inside.append(name)
        layers = [f"{name}.{inner}".rstrip(".") for inner, layer in m.named_modules()
                  if _compiled_kind(layer._c._type().qualified_name(), kinds)]
        if layers:
            warnings.warn(f"{caller}: {name!r} is a TorchScript module "
                          f"({type(m).__name__}) holding batch norms "
                          f"({', '.join(map(repr, layers))}), which {caller} cannot change "
                          f"and leaves as they are: apply {caller} before torch.jit.script "
                          f"or torch.jit.trace", stacklevel=outside_package_stacklevel())


def check_integer(value, minimum: int, rule: str) -> int:
    """``value`` as an int: an integer of any kind (Python's, NumPy's, a 0-d integer
    tensor or array; a bool is none), TypeError otherwise, ValueError below ``minimum``;
    ``rule`` says what is asked ("count must be ...")."""
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None:
        raise TypeError(f"{rule}, got {type(value).__name__} {value!r}")
    if number < minimum:
        raise ValueError(f"{rule}, got {value!r}")
    return number


def is_torch_bn(m: nn.Module) -> bool:
    return type(m) in TORCH_BN


def is_torch_bn_subclass(m: nn.Module) -> bool:
    """A subclass of torch's batch norm that the tools leave as it is: a user's (not one of
    the exact classes, nor torch's own ``LazyBatchNorm*d``), or the class
    ``torch.nn.utils.parametrize`` gives a layer whose weight or bias it computes."""
    return (isinstance(m, nn.modules.batchnorm._BatchNorm) and not is_torch_bn(m)
            and (not type(m).__module__.startswith("torch.")
                 or parametrize.is_parametrized(m)))


def warn_subclasses(model: nn.Module, caller: str, consequence: str) -> None:
    """Warn, once per layer, about each subclass of torch's batch norm that ``caller``
    leaves as it is, naming the layer and its class (or its parametrization)."""
    for name, m in model.named_modules():
        if is_torch_bn_subclass(m):
            base = next(c.__name__ for c in type(m).__mro__ if c in TORCH_BN + (
                nn.modules.batchnorm._BatchNorm,))
            where = repr(name) if name else "the model"
            if parametrize.is_parametrized(m):
                what = (f"a {base} whose {' and '.join(m.parametrizations)} a "
                        f"parametrization computes (torch.nn.utils.parametrize), and is left "
                        f"as it is: ours would take the tensor as it is now, not computed")
            else:
                what = (f"a {type(m).__name__}, a subclass of torch's {base}, and is left as "
                        f"it is: its forward may differ from torch's, so it is not replaced "
                        f"by ours (if its forward is torch's, replace it by hand)")
            warnings.warn(f"{caller}: {where} is {what}. {consequence}", stacklevel=3)


def computed_affine(m: nn.Module) -> list[str]:
    """Which of ``weight`` and ``bias`` the layer computes rather than holds: a
    parametrization's (``torch.nn.utils.parametrize``), or a forward pre-hook's (the
    hook-based ``torch.nn.utils.prune``, ``spectral_norm`` and ``weight_norm`` set a plain
    tensor before each call, from parameters of other names)."""
    return [n for n in ("weight", "bias") if n not in m._parameters
            and n not in m._buffers and getattr(m, n, None) is not None]


def hook_computed_affine(m: nn.Module) -> list[str]:
    """:func:`computed_affine` less what a parametrization computes: what a forward
    pre-hook sets. A tool that replaced the layer would move the hook to a layer without
    the hook's parameters, or assign the computed tensor as a parameter (a TypeError)."""
    return [n for n in computed_affine(m) if not parametrize.is_parametrized(m, n)]


def hook_computed_reason(names: list[str]) -> str:
    """Why a layer whose ``names`` a forward pre-hook computes is left, and what to do."""
    return (f"a forward pre-hook computes its {' and '.join(names)} (torch.nn.utils.prune, "
            f"spectral_norm or weight_norm, the hook-based ones); remove it first "
            f"(prune.remove, remove_spectral_norm, remove_weight_norm), or use "
            f"torch.nn.utils.parametrize")


def warn_computed_affine(model: nn.Module, caller: str, which,
                         parametrized: bool = False) -> None:
    """Warn about each layer ``which(m)`` selects whose weight or bias a forward pre-hook
    computes (with ``parametrized``, or a parametrization), which ``caller`` leaves as it
    is; the warning points at the first caller outside this package."""
    for name, m in model.named_modules():
        names = (computed_affine(m) if parametrized else hook_computed_affine(m)) \
            if which(m) else []
        if not names:
            continue
        where = repr(name) if name else "the model"
        if parametrize.is_parametrized(m):
            why = (f"a parametrization computes its {' and '.join(names)} "
                   f"(torch.nn.utils.parametrize), which {caller} cannot move: call it "
                   f"before registering the parametrization")
        else:
            why = hook_computed_reason(names)
        warnings.warn(f"{caller}: {where} is left as it is: {why}",
                      stacklevel=outside_package_stacklevel())


def outside_package_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` in the function that calls this one that
    points at the first frame outside the batchnorm package (the user's call, however
    deep inside the package the warning is raised)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def warn_lazy_torch_batch_norms(model: nn.Module, caller: str) -> None:
    """Warn about each of torch's ``LazyBatchNorm*d`` that has not seen input: it becomes a
    ``BatchNorm*d`` at its first call, too late for ``caller``."""
    for name, m in model.named_modules():
        if (isinstance(m, nn.modules.batchnorm._BatchNorm) and isinstance(m, LazyModuleMixin)
                and m.has_uninitialized_params()):
            where = repr(name) if name else "the model"
            warnings.warn(f"{caller}: {where} is torch's {type(m).__name__} and has not seen "
                          f"input yet, so it is left as it is: run the model once first "
                          f"(or build it with batchnorm.{type(m).__name__})", stacklevel=3)


# The hooks that run around a module's forward and backward (global ones aside).
_CALL_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks",
               "_backward_hooks")


def has_hooks(m: nn.Module) -> bool:
    """Whether hooks are registered on ``m`` that run with its forward or backward."""
    return any(getattr(m, name, None) for name in _CALL_HOOKS)


def move_hooks(new: nn.Module, old: nn.Module) -> None:
    """Give ``new`` every hook registered on ``old`` (forward, backward, state_dict and
    load_state_dict ones, with their flags): the same dicts, so that the handles which
    registered them still remove them (any of ``new``'s own join them)."""
    for name, value in vars(old).items():
        if "hook" not in name:
            continue
        own = new.__dict__.get(name)
        if isinstance(value, dict) and isinstance(own, dict):
            for key, hook in own.items():
                value.setdefault(key, hook)
        new.__dict__[name] = value


def is_our_bn(m: nn.Module) -> bool:
    return isinstance(m, _BatchNorm)


def is_any_bn(m: nn.Module) -> bool:
    from .freeze import _FrozenBatchNorm
    return is_torch_bn(m) or is_our_bn(m) or isinstance(m, _FrozenBatchNorm)


def lazy_batch_norms_without_input(model: nn.Module) -> list[str]:
    """The names of the lazy batch norms (ours, torch's) that have not seen input yet,
    ``'the model'`` for the root: they have no parameters or statistics until then."""
    return [name or "the model" for name, m in model.named_modules()
            if (is_our_bn(m) or isinstance(m, nn.modules.batchnorm._BatchNorm))
            and isinstance(m, LazyModuleMixin) and m.has_uninitialized_params()]


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def use_counts(model: nn.Module) -> dict[int, int]:
    """How many times each module object appears in the module tree (shared instances)."""
    counts: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    return counts


def parameter_counts(model: nn.Module) -> dict[int, int]:
    """How many times each Parameter object appears in the module tree (tied weights)."""
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    return counts


class _LeafTracer(Tracer):
    """torch.fx tracer that keeps every batch-norm-like module of ours as one node, and
    records a forward's reads of buffers (``self.bn.running_mean``) as ``get_attr`` nodes,
    as it does for parameters (by default it would bake the tensor in as a constant)."""

    proxy_buffer_attributes = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from .fold import ChannelAffine
        return is_any_bn(m) or isinstance(m, ChannelAffine) or super().is_leaf_module(m, qualname)


_MODULE_DICTS = ("_parameters", "_buffers", "_modules")


def _attributes(model: nn.Module) -> list:
    """Each module's attributes, and the contents of its parameter, buffer and submodule
    dicts, as they are: what :func:`_put_back` restores."""
    return [(m, dict(vars(m)), {name: dict(vars(m)[name]) for name in _MODULE_DICTS
                                if isinstance(vars(m).get(name), dict)})
            for m in model.modules()]


def _put_back(attributes: list) -> None:
    for m, attrs, dicts in attributes:
        live = vars(m)
        live.clear()
        live.update(attrs)
        for name, contents in dicts.items():
            live[name].clear()
            live[name].update(contents)


def trace(model: nn.Module) -> torch.fx.Graph | None:
    """The model's fx graph, or None when it does not trace (data-dependent control flow,
    unsupported Python). Tracing runs each ``forward`` in Python on placeholders, so what
    a forward assigns to its module (``self.features = y`` would keep an fx Proxy, which
    cannot be pickled; ``self.calls += 1`` would count the trace) is put back afterwards:
    every module's attributes, parameters, buffers and submodules are as before (what a
    forward changes inside an attribute, a list it appends to, is not)."""
    attributes = _attributes(model)
    tracer = _LeafTracer()
    try:
        graph = tracer.trace(model)
        _count_stored_values(model)
        return graph
    except Exception:  # noqa: BLE001 - any failure means "use the nn.Sequential fallback"
        return None
    finally:
        _put_back(attributes)
        # fx leaves the tracer in reference cycles: what it holds of the model would live
        # on (the replaced layers too) until gc ran
        tracer.root = tracer.submodule_paths = None


def _count_stored_values(model: nn.Module) -> None:
    """Count each value a forward stored on a module (``self.features = y``, or in a list
    or dict there) as a use of its node (``node.meta["stored"]``, read by :func:`uses`):
    the graph does not show such a store, and a rewrite of that value (an activation fused
    into the batch norm that made it, a batch norm folded into the conv before it) would
    change what the module keeps."""
    def visit(value, depth: int) -> None:
        if isinstance(value, torch.fx.Proxy):
            value.node.meta["stored"] = value.node.meta.get("stored", 0) + 1
        elif depth < 3 and isinstance(value, (list, tuple, set)):
            for item in value:
                visit(item, depth + 1)
        elif depth < 3 and isinstance(value, dict):
            for item in value.values():
                visit(item, depth + 1)

    for m in model.modules():
        for value in vars(m).values():
            visit(value, 0)


def trace_in_both_modes(model: nn.Module) -> list[torch.fx.Graph] | None:
    """The model's fx graphs in training and in eval mode, or None when either does not
    trace: a ``forward`` may branch on ``self.training`` (an auxiliary output read in
    training only), and a rewrite must hold in both. The modules' flags are set directly
    (a module's own ``train()`` may do more) and restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    graphs = []
    try:
        for mode in (True, False):
            for m, _ in flags:
                m.training = mode
            graph = trace(model)
            if graph is None:
                return None
            graphs.append(graph)
    finally:
        for m, flag in flags:
            m.training = flag
    return graphs


def warn_sequential_fallback(caller: str, what: str) -> None:
    """The nn.Sequential fallback pairs modules by order, assuming each Sequential runs as
    a whole; a forward that walks one itself and reads an inner output would be changed
    silently. Said whenever the fallback pairs anything."""
    warnings.warn(
        f"{caller}: the model does not trace with torch.fx, so {what} by their order in "
        f"nn.Sequential containers. That is right when every Sequential runs as a whole; "
        f"if a forward reads an output from inside one (iterating over it, say), compare "
        f"the result's outputs with the original's", stacklevel=3)


def module_calls(graph: torch.fx.Graph) -> dict[str, list[torch.fx.Node]]:
    calls: dict[str, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    return calls


def uses(node: torch.fx.Node) -> int:
    """How many times ``node``'s value is read: every occurrence in its users' args and
    kwargs, nested ones included, and each place a forward stored it on a module (see
    :func:`trace`). ``node.users`` counts distinct user *nodes*, so ``bn(y, residual=y)``
    is one user but two uses."""
    count = node.meta.get("stored", 0)

    def visit(arg: torch.fx.Node) -> torch.fx.Node:
        nonlocal count
        if arg is node:
            count += 1
        return arg

    for user in node.users:
        torch.fx.node.map_arg((user.args, user.kwargs), visit)
    return count


def sequential_pairs(model: nn.Module, first, second):
    """``(name_a, a, name_b, b)`` for consecutive children of plain ``nn.Sequential``s with
    ``first(a)`` and ``second(b)``. Only the exact class: a subclass may have its own
    forward."""
    for seq_name, seq in model.named_modules():
        if type(seq) is not nn.Sequential:
            continue
        children = list(seq.named_children())
        for (na, a), (nb, b) in itertools.pairwise(children):
            if first(a) and second(b):
                prefix = f"{seq_name}." if seq_name else ""
                yield prefix + na, a, prefix + nb, b
