"""``recalibrate``: precise batch norm (Wu & Johnson, "Rethinking 'Batch' in BatchNorm",
2021).

The running statistics a model ends training with are an exponential moving average over
the last few hundred batches, taken while the weights were still moving. Precise BN
replaces them with the population statistics of the final model: the exact mean and
variance of each batch norm's input over many batches. Here each layer's input is reduced
per batch to (count, mean, m2) and merged with Chan's formula in float64, so the result is
the variance of all values seen together, weighted by batch size, not an average of
per-batch variances; across processes the same merge runs as two all-reduces.
"""

from __future__ import annotations

import inspect
import itertools
import sys

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.utils._pytree import tree_map

from .. import backends, ops
from ._common import (
    check_integer,
    check_module,
    is_our_bn,
    lazy_batch_norms_without_input,
)
from .convert import _sync_class


def _default_forward(model: nn.Module, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (list, tuple)):  # (inputs, targets) from a DataLoader
        return model(batch[0])
    return model(batch)


class _Accumulator:
    """count (a Python int: shapes only, no device sync), mean and m2 in float64, of the
    input of ``layer``: a forward pre-hook (with kwargs), so the input may come by position
    or by name (``bn(input=x)``)."""

    def __init__(self, layer: nn.Module) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None
        # The name of forward's first parameter: "input" for torch's and ours, whatever a
        # subclass calls it otherwise.
        self.input_name = next(iter(inspect.signature(layer.forward).parameters))

    @torch.no_grad()
    def __call__(self, module: nn.Module, args, kwargs) -> None:
        x = ops.resolve_negative((args[0] if args else kwargs[self.input_name]).detach())
        c = x.shape[1]
        n = x.numel() // c if c else 0
        if n == 0:
            return
        view = ops.to_kernel_view(x, ops.is_channels_last(x))
        mean, m2 = backends.select(view).stats(view)
        mean, m2 = mean.double(), m2.double()
        if self.count == 0:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        # Chan et al.: merging (na, ma, m2a) with (nb, mb, m2b).
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta * delta * (self.count * n / total)
        self.count = total


def _merge_across_processes(layers: list[tuple[str, nn.Module]], accs: list[_Accumulator],
                            seen: int) -> int:
    """Every process's statistics merged into each layer's accumulator: a SyncBatchNorm's
    (torch's or ours) over its ``process_group`` (a process outside it keeps its own, as
    the layer runs local batch norm there), any other layer's over all processes. Returns
    the batches seen by all processes together. Every process calls this, with the same
    layers in the same order (the same model): the groups' collectives run in that order."""
    import torch.distributed as dist

    device = layers[0][1].running_mean.device
    seen_all = torch.tensor([float(seen)], dtype=torch.float64, device=device)
    dist.all_reduce(seen_all)
    by_group: dict = {}
    for i, (_, m) in enumerate(layers):
        group = getattr(m, "process_group", None)
        by_group.setdefault(None if group is None else id(group), (group, []))[1].append(i)
    for group, members in by_group.values():
        if group is not None and dist.get_rank(group) < 0:
            continue
        _all_reduce([layers[i] for i in members], [accs[i] for i in members], group)
    return int(seen_all.item())


def _all_reduce(layers: list[tuple[str, nn.Module]], accs: list[_Accumulator],
                group=None) -> None:
    """Merge every layer's (count, mean, m2) across the processes of ``group`` (None: all),
    exactly: the global mean from Σn·mean / Σn, then Σ(m2 + n·(mean − global mean)²)."""
    import torch.distributed as dist

    device = layers[0][1].running_mean.device
    sizes = [m.num_features for _, m in layers]
    local = []
    for (_, m), a in zip(layers, accs):
        mean = a.mean if a.mean is not None else torch.zeros(
            m.num_features, dtype=torch.float64, device=device)
        m2 = a.m2 if a.m2 is not None else torch.zeros_like(mean)
        local.append((float(a.count), mean.to(device), m2.to(device)))
    counts = torch.tensor([n for n, _, _ in local], dtype=torch.float64, device=device)
    sums = torch.cat([n * mean for n, mean, _ in local])
    flat = torch.cat([counts, sums])
    dist.all_reduce(flat, group=group)
    counts_g, sums_g = flat[:len(local)], flat[len(local):].split(sizes)
    means_g = [s / n.clamp(min=1) for s, n in zip(sums_g, counts_g)]
    m2s = torch.cat([m2 + n * (mean - mg) ** 2 for (n, mean, m2), mg in zip(local, means_g)])
    dist.all_reduce(m2s, group=group)
    for a, n, mg, m2 in zip(accs, counts_g.tolist(), means_g, m2s.split(sizes)):
        a.count, a.mean, a.m2 = int(n), mg, m2


def _in_lockstep(iterable, device):
    """The batches of ``iterable`` while every process has one: a SyncBatchNorm's
    training forward is a collective, so a process that ran out while others go on would
    wait in the merge while they wait in a forward (until the process group's timeout)."""
    import torch.distributed as dist

    end = object()
    it = iter(iterable)
    while True:
        batch = next(it, end)
        more = torch.tensor([batch is not end], dtype=torch.int32, device=device)
        dist.all_reduce(more, op=dist.ReduceOp.MIN)
        if not more.item():
            return
        yield batch


def _synchronizes(m: nn.Module) -> bool:
    return isinstance(m, (nn.SyncBatchNorm, _sync_class()))


def _progress(iterable, total, enabled):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _plain_progress(iterable, total)
    return tqdm(iterable, total=total, desc="recalibrate", unit="batch")


def _plain_progress(iterable, total):
    every = max(1, (total or 100) // 10)
    i = 0
    for i, item in enumerate(iterable, 1):
        yield item
        if i % every == 0:
            print(f"recalibrate: {i}/{total if total is not None else '?'} batches",
                  file=sys.stderr, flush=True)
    print(f"recalibrate: done, {i} batches", file=sys.stderr, flush=True)


def _recalibrated(m: nn.Module) -> bool:
    """Ours, and any instance of torch's batch norm (a user's subclass too, as
    ``torch.optim.swa_utils.update_bn`` takes them: the model runs in train(), so a layer
    left out would have its running statistics updated and not restored), with running
    statistics, not frozen. (Lazy ones without input were refused before.)"""
    if not (is_our_bn(m) or isinstance(m, nn.modules.batchnorm._BatchNorm)):
        return False
    return m.track_running_stats and not getattr(m, "frozen", False)


def _keeps_statistics_untracked(m: nn.Module) -> bool:
    """A batch norm (ours or torch's) whose ``track_running_stats`` was turned off after
    construction, with its running statistics kept."""
    return ((is_our_bn(m) or isinstance(m, nn.modules.batchnorm._BatchNorm))
            and not m.track_running_stats
            and getattr(m, "running_mean", None) is not None
            and getattr(m, "running_var", None) is not None)


def _left_alone(m: nn.Module) -> bool:
    """A norm layer with running statistics that recalibrate does not recompute but whose
    statistics its train() would move: torch's InstanceNorm with track_running_stats, a
    compiled (TorchScript) layer with running statistics. Put back afterwards."""
    if isinstance(m, torch.jit.ScriptModule):
        return "running_var" in dict(m.named_buffers(recurse=False))
    return (isinstance(m, nn.modules.batchnorm._NormBase) and not _recalibrated(m)
            and m.track_running_stats
            and not (isinstance(m, LazyModuleMixin) and m.has_uninitialized_params()))


def _set_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for m, mode in modes:
        m.training = mode


def _saved_state(m: nn.Module) -> tuple:
    if isinstance(m, torch.jit.ScriptModule):
        # (its buffers, whatever their names, by name: its forward may assign new tensors
        # to them; a compiled layer's momentum cannot change, and a traced one has none)
        return tuple((name, b.clone()) for name, b in m.named_buffers(recurse=False))
    return (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(),
            m.momentum)


@torch.no_grad()
def _restore(m: nn.Module, state: tuple) -> None:
    if isinstance(m, torch.jit.ScriptModule):
        for name, saved in state:
            now = getattr(m, name)
            if isinstance(now, Tensor) and now.shape == saved.shape:
                now.copy_(saved)
            else:
                setattr(m, name, saved)
        return
    mean, var, tracked, momentum = state
    m.momentum = momentum
    m.running_mean.copy_(mean)
    m.running_var.copy_(var)
    m.num_batches_tracked.copy_(tracked)


def recalibrate(model: nn.Module, batches, num_batches: int | None = None,
                progress: bool = True, *, forward=None, device=None) -> dict[str, int]:
    """Recompute the running statistics of every batch norm in ``model`` as the exact
    population mean and variance of its input over ``batches`` (precise BN).

    The model runs in training mode under ``torch.no_grad()`` (so each batch norm sees the
    inputs it sees in training, every layer normalizing with batch statistics), over
    ``num_batches`` of ``batches`` (all when None). Then ``running_mean`` is the mean of all
    values seen and ``running_var`` their *unbiased* variance (count − 1), as torch stores
    it; ``num_batches_tracked`` counts the calls. When ``torch.distributed`` is initialized,
    the statistics of all processes are merged (each process must call this): a
    SyncBatchNorm's over its ``process_group`` (a process outside the group keeps its own),
    every other layer's over all processes; a process whose ``batches`` yield nothing
    takes the others' statistics. Where a SyncBatchNorm normalizes with batch statistics
    here (in training mode after ``model.train()``, not frozen: its forwards
    synchronize), the processes go in step instead: each runs as many batches as the
    process with the fewest, so none may have none. Afterwards
    every module's training flag is restored, and the running statistics of the other
    norm layers that train() moves (an ``InstanceNorm`` with ``track_running_stats=True``,
    a TorchScript submodule's batch norm, which it cannot recompute: with a warning)
    are put back. If a batch or ``forward`` raises, every
    layer's running statistics, ``num_batches_tracked`` and momentum are put back as they
    were before the call, and the exception propagates.

    Args:
        model: a model with our or torch's batch norms (subclasses of torch's included).
            Frozen layers, ``FrozenBatchNorm*d``, layers whose ``track_running_stats``
            was turned off after construction (they keep their running statistics) and
            layers that the model's ``train()`` keeps in eval mode (a backbone whose
            statistics stay fixed in training) keep theirs: they normalize with their
            running statistics, as in eval, and the layers after them are recalibrated
            on that. Layers without running statistics normalize with batch statistics,
            as always. A lazy batch norm that has not seen input yet raises
            ``ValueError`` before anything changes.
        batches: an iterable of batches, e.g. a DataLoader.
        num_batches: how many batches to use. Default: all
        progress: show a progress bar (tqdm if installed, else lines on stderr). Default: True
        forward: ``forward(model, batch)`` runs one batch. Default: ``model(batch)``,
            ``model(batch[0])`` for a list/tuple, ``model(**batch)`` for a dict.
        device: move the batch's tensors there first. Default: None (as they are)

    Returns:
        ``{layer name: values per channel seen}``. A layer that saw nothing keeps its old
        statistics and is absent. ``batches`` that yield nothing (on every process, when
        distributed) raise ``ValueError``, with every layer's statistics as before.
    """
    check_module(model, "recalibrate", compiled=("torch", "ours"))
    if num_batches is not None:
        num_batches = check_integer(num_batches, 1, "recalibrate(): num_batches must be "
                                                    "None (all) or an integer >= 1")
    forward = forward or _default_forward
    lazy = lazy_batch_norms_without_input(model)
    if lazy:
        # Its first training-mode forward would make its statistics and move them, with
        # nothing to restore them to: neither the population statistics nor "as before".
        raise ValueError(f"recalibrate(): {', '.join(map(repr, lazy))} is a lazy batch norm "
                         f"that has not seen input yet: run the model on one batch first "
                         f"(in eval mode, model.eval(), to leave its statistics alone)")
    candidates = [(name, m) for name, m in model.named_modules() if _recalibrated(m)]
    if not candidates:
        raise ValueError("recalibrate(): the model has no batch norm with running statistics "
                         "to recalibrate (frozen layers, and those whose track_running_stats "
                         "is False, are left alone)")
    saved = [_saved_state(m) for _, m in candidates]
    others = [(m, _saved_state(m)) for m in model.modules() if _left_alone(m)]
    modes = [(m, m.training) for m in model.modules()]
    total = num_batches
    if hasattr(batches, "__len__"):
        total = len(batches) if num_batches is None else min(num_batches, len(batches))
    import torch.distributed as dist
    distributed = dist.is_available() and dist.is_initialized()
    show = progress and (not distributed or dist.get_rank() == 0)
    seen = 0
    handles = []
    try:
        model.train()
        # A layer whose track_running_stats was turned off after construction keeps its
        # running statistics and evaluates with them: so it does here, and the layers
        # after it are recalibrated on what they get in eval (in train() it would use
        # batch statistics). _set_modes puts its flag back.
        for m in model.modules():
            if _keeps_statistics_untracked(m):
                m.training = False
        # A layer that the model's own train() keeps in eval mode normalizes with its
        # running statistics; the layers after it see that output, so it stays as it is.
        layers = [(name, m, state) for (name, m), state in zip(candidates, saved)
                  if m.training]
        if not layers:
            raise ValueError("recalibrate(): model.train() leaves every batch norm with "
                             "running statistics in eval mode, so none normalizes with batch "
                             "statistics: there is nothing to recalibrate")
        accs = [_Accumulator(m) for _, m, _ in layers]
        handles = [m.register_forward_pre_hook(a, with_kwargs=True)
                   for (_, m, _), a in zip(layers, accs)]
        for _, m, _ in layers:
            m.reset_running_stats()
        chosen = itertools.islice(
            batches, None if num_batches is None else min(num_batches, sys.maxsize))
        # (any SyncBatchNorm that normalizes with batch statistics here, recalibrated or
        # not: one without running statistics synchronizes too)
        lockstep = distributed and any(
            _synchronizes(m) and m.training and not getattr(m, "frozen", False)
            for m in model.modules())
        if lockstep:
            chosen = _in_lockstep(chosen, layers[0][1].running_mean.device)
        with torch.no_grad():
            for batch in _progress(chosen, total, show):
                if device is not None:
                    batch = tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, batch)
                forward(model, batch)
                seen += 1
        if distributed:
            # a process that saw no batch takes the others' statistics; none anywhere
            # raises on every process, below, with every layer as it was
            seen = _merge_across_processes([(name, m) for name, m, _ in layers], accs, seen)
    except BaseException:
        # The training-mode forwards have reset and partly updated the running statistics
        # (and Ctrl-C lands here too): give every layer back exactly what it had.
        for (_, m), state in zip(candidates, saved):
            _restore(m, state)
        raise
    finally:
        for h in handles:
            h.remove()
        _set_modes(modes)
        for m, state in others:
            _restore(m, state)
    result = {}
    with torch.no_grad():
        for (name, m, state), a in zip(layers, accs):
            if a.count == 0:  # never called: keep what it had
                _restore(m, state)
                continue
            m.running_mean.copy_(a.mean.to(m.running_mean.dtype))
            m.running_var.copy_((a.m2 / max(a.count - 1, 1)).to(m.running_var.dtype))
            result[name] = a.count
    if seen == 0:
        raise ValueError("recalibrate(): no batches" + (
            " (the model has SyncBatchNorm layers, so every process runs as many batches "
            "as the one with the fewest, and one had none)" if lockstep else ""))
    return result
