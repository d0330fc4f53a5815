"""``SyncBatchNorm``: batch statistics over the global batch of a ``torch.distributed`` group.

The same pipeline as local batch norm, with one C-sized collective in each direction::

    forward   stats (count, mean, m2 per rank) -> all_gather -> Chan merge -> normalize
              -> update running statistics (global mean, unbiased global variance)
    backward  backward_reduce (Σdz, Σdz·x̂ per rank) -> all_reduce -> backward_elementwise

Unlike ``torch.nn.SyncBatchNorm`` it runs on any device and backend ``torch.distributed``
has (gloo on the CPU, NCCL on GPUs), with uneven and empty per-rank batches.

Numerical choices:

* Each rank sends its (count, mean, m2), never (Σx, Σx²): the merge (Chan et al., G-way,
  :func:`batchnorm.ops.chan_combine`) takes deviations from the merged mean, so a channel
  with mean 1e6 keeps its variance. The exchange is an ``all_gather`` rather than an
  ``all_reduce`` so that every rank merges the same numbers in rank order: the statistics
  are bitwise identical on every rank and from run to run.
* The gathered statistics travel and merge in float64 (2C+1 numbers per rank, nothing
  against the activations): counts stay exact beyond 2**24 values per channel, and the
  merged mean stays wide, as local batch norm keeps it (``ops.centre_for_kernels`` then
  folds its float32 rounding into the bias and the backward sums); the variance is
  cast to the accumulation dtype.
* Weight and bias gradients are the *local* sums Σdz·x̂ and Σdz, as with
  ``torch.nn.SyncBatchNorm``: ``DistributedDataParallel`` then all-reduces them like
  every other parameter's gradient. The input gradient uses the all-reduced sums and the
  global count, so it is the gradient of the sum of every rank's loss.

Semantics:

* Training with a process group of more than one rank synchronizes; evaluation, a world
  of one, or no initialized process group is local batch norm, with no collective (in
  eval with ``track_running_stats=False`` the batch statistics are the local batch's,
  as in torch).
* A rank with zero samples joins both collectives and returns zero-size outputs and
  gradients. The "more than 1 value per channel" rule applies to the *global* count: it is
  checked after the gather, so every rank raises the same error, before any state changes.
* Every rank must call forward and backward the same number of times, on the same layers
  (as for any collective). A rank that fails before a collective leaves the others waiting
  until the process group's ``timeout`` (``init_process_group(timeout=...)``), when they
  raise too.
* No double backward: a backward with ``create_graph=True`` runs, and differentiating its
  result again raises (``once_differentiable``), as in torch.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.fx
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.lazy import LazyModuleMixin

from . import backends, ops
from . import functional as F
from .backends.portable import acc_dtype, mean_dtype
from .modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    _BatchNorm,
    _check_rank,
    fx_leaf,
    register_layer_forward,
)

__all__ = [
    "BatchNormNd",
    "SyncBatchNorm",
    "benchmark_sync_step",
    "convert_sync_batchnorm",
    "revert_sync_batchnorm",
    "sync_batch_norm",
]


def world_size(process_group=None) -> int:
    """Ranks in ``process_group`` (the default group for None); 1 without torch.distributed,
    -1 on a rank that is not a member of ``process_group`` (torch's answer there)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
# (a torch built without distributed has no ProcessGroup: any object passes there)
_PROCESS_GROUP = getattr(dist, "ProcessGroup", object)
# what dist.new_group gives a rank outside the group (the layer is local there)
_NON_GROUP_MEMBER = getattr(getattr(dist, "GroupMember", None), "NON_GROUP_MEMBER", None)


# ---------------------------------------------------------------------------------------
# The pipeline on kernel views


def _local_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    if x.numel() == 0:
        zeros = x.new_zeros(x.shape[1], dtype=acc_dtype(x.dtype))
        return zeros, zeros.clone()
    return backends.select(x).stats(x)


def global_stats(x: Tensor, process_group, ranks: int) -> tuple[Tensor, Tensor, int]:
    """(mean, biased var, count) of the global batch, the same on every rank.

    One ``all_gather`` of ``[count, mean[C], m2[C]]`` per rank; merged in float64 in rank
    order with Chan's formula. The mean stays wide (``mean_dtype``, as the local ``stats``
    gives it: a float32 mean is spaced 0.06 at 1e6); the variance is in the acc dtype. The
    count leaves the device (``.item()``): the backward's arithmetic and the batch-of-one
    check need it on the host.
    """
    c = x.shape[1]
    count = x.numel() // c
    mean, m2 = _local_stats(x)
    local = x.new_empty(2 * c + 1, dtype=torch.float64)
    local[0] = count
    local[1:c + 1] = mean
    local[c + 1:] = m2
    gathered = local.new_empty(ranks * (2 * c + 1))
    _all_gather_flat(gathered, local, group=process_group)
    gathered = gathered.view(ranks, 2 * c + 1)
    counts = gathered[:, :1]
    _, gmean, gm2 = ops.chan_combine(counts.expand(ranks, c), gathered[:, 1:c + 1],
                                     gathered[:, c + 1:])
    total_count = int(counts.sum().item())
    var = gm2 / max(total_count, 1)
    return gmean.to(mean_dtype(x)), var.to(acc_dtype(x.dtype)), total_count


class _SyncBatchNormFunction(torch.autograd.Function):
    """normalize with the global statistics; backward with the one all_reduce.

    The statistics arrive as constants: their dependence on x (on every rank) is the
    analytic backward's, through the all-reduced Σdz and Σdz·x̂ and the global count.
    A wide mean is split as local batch norm does (``ops.centre_for_kernels``): the
    kernels see ``x̂' = x̂ + shift`` and the shift is undone in the bias and in the sums.
    It takes the input and residual as given and makes their kernel views inside, as
    ``ops._EagerBatchNorm`` does: no view node of autograd's between them and the caller
    (a view's backward made the residual's gradient a view of the caller's dy, which
    autograd then kept as .grad, sharing the caller's memory).
    """

    @staticmethod
    def forward(ctx, input, weight, bias, residual, mean, invstd, count, activation, slope,
                process_group, update_running_stats, channels_last):
        ctx.count, ctx.activation, ctx.slope = count, activation, slope
        ctx.process_group, ctx.channels_last = process_group, channels_last
        # The residual is needed only to recompute the pre-activation in backward.
        keep_residual = (ops.saveable_residual(residual)
                         if residual is not None and activation != "none" else None)
        mean_k, bias_k, shift = ops.centre_for_kernels(mean, invstd, weight, bias,
                                                       acc_dtype(input.dtype))
        if input.numel() == 0:
            y = torch.empty_like(input)
        else:
            x = ops.to_kernel_view(input, channels_last)
            r = None if residual is None else ops.to_kernel_view(residual, channels_last)
            y = ops.from_kernel_view(
                backends.select(x).normalize(x, mean_k, invstd, weight, bias_k, r,
                                             activation, slope), input.shape, channels_last)
        # After the output (a failed normalize changes nothing) and before the tensors are
        # saved, as torch's SyncBatchNorm: torch.utils.checkpoint's recomputation stops at
        # the save, and torch's running statistics move in it too.
        update_running_stats()
        # The backward needs the bias only to recompute the pre-activation (bias_k: the bias
        # itself where the mean is already in the acc dtype, float64), and else its dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(input, weight, bias_k if activation != "none" else None,
                              keep_residual, mean_k, invstd, shift)
        # (y may be a view of the kernels' output: the same storage, no view for autograd)
        return y if y._base is None else y.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx, dy_given):
        dy_given = ops.resolve_negative(dy_given)
        input, weight, bias_k, residual, mean_k, invstd, shift = ctx.saved_tensors
        need_x, need_r = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        act, slope, c = ctx.activation, ctx.slope, input.shape[1]
        shape, channels_last = input.shape, ctx.channels_last
        empty = input.numel() == 0
        x, dy = input, dy_given
        if not empty:
            x = ops.to_kernel_view(input, channels_last)
            dy = ops.to_kernel_view(dy_given, channels_last)
            if residual is not None:
                residual = ops.to_kernel_view(residual, channels_last)
        dy = dy.contiguous()
        want_dres = bool(need_r) and act != "none"

        def all_reduce(sum_dz, sum_dz_xhat):
            # Every rank that reaches here joins (the same layers need x's gradient on
            # every rank); one buffer, one collective. cat copies, so the local sums stay
            # local for the weight and bias gradients. In float64 on every rank, as the
            # forward's gather: ranks whose inputs differ in dtype (float32 here, float64
            # there) would otherwise send different byte counts, which gloo answers by
            # aborting the process.
            both = torch.cat([sum_dz, sum_dz_xhat]).to(torch.float64)
            dist.all_reduce(both, group=ctx.process_group)
            both = both.to(sum_dz.dtype)
            return both[:c], both[c:]

        if empty:
            sum_dz = x.new_zeros(c, dtype=invstd.dtype)
            sum_dz_xhat = torch.zeros_like(sum_dz)
            if need_x:
                all_reduce(sum_dz, sum_dz_xhat)
            dx = torch.zeros_like(input) if need_x else None
            dres = torch.zeros_like(input) if want_dres else None
        else:
            sum_dz, sum_dz_xhat, dx, dres = ops.backward_by_primitives(
                backends.select(x), dy, x, mean_k, invstd, shift, weight, bias_k, residual,
                act, slope, ctx.count, True, need_sums=True, need_dx=need_x,
                want_dresidual=want_dres, all_reduce=all_reduce)
            dx = ops.from_kernel_view(dx, shape, channels_last) if dx is not None else None
            dres = ops.from_kernel_view(dres, shape, channels_last) if want_dres else None
        # (without an activation the residual's gradient is dy_given itself)
        return (*ops.autograd_grads(ctx.needs_input_grad[:4], dy_given, dx, dres, sum_dz,
                                    sum_dz_xhat, weight, ctx.bias_dtype, act),
                None, None, None, None, None, None, None, None)


def _validate(input, running_mean, running_var, weight, bias, momentum, eps, residual,
              num_batches_tracked) -> None:
    """functional.validate for training, less its local batch-of-one rule.

    One value per channel on this rank is fine when the global count is above 1; that
    rule is checked on the gathered counts instead. The check reads only shapes, so a
    single-value input is shown to it as a (2, C, ...) expanded view (no copy).
    """
    if isinstance(input, Tensor):
        F.refuse_nested(input, "the input")
    count = input.numel() // input.shape[1] if isinstance(input, Tensor) and input.dim() >= 2 \
        and input.shape[1] else 0
    if count == 1 and (residual is None or (isinstance(residual, Tensor)
                                            and residual.shape == input.shape)):
        shape = (2, *input.shape[1:])
        input = input.expand(shape)
        residual = residual.expand(shape) if residual is not None else None
    F.validate(input, running_mean, running_var, weight, bias, True, momentum, eps,
               residual, num_batches_tracked)


# torch.compile runs it as it is (a graph break): dynamo would otherwise trace into the
# collectives and the CPU kernels' numba dispatchers, and fail there.
@torch.compiler.disable
def sync_batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                    weight: Tensor | None, bias: Tensor | None, momentum: float | None,
                    eps: float, activation: str = "none", slope: float = 0.0,
                    residual: Tensor | None = None, num_batches_tracked: Tensor | None = None,
                    process_group=None) -> Tensor:
    """Training-mode batch norm over the global batch of ``process_group``.

    The functional form of :class:`SyncBatchNorm` (activation already resolved, see
    :func:`batchnorm.functional.resolve_activation`). Every rank of the group must call
    it; validation happens before the collective, the batch-of-one check on the global
    count after it, and the running statistics change last (after the output, as torch's
    do, also when ``torch.utils.checkpoint`` recomputes the call). Under
    ``torch.compile`` it runs outside the graph (a graph break; ``fullgraph=True`` cannot
    take it).
    """
    ranks = world_size(process_group)
    if ranks < 1:
        raise ValueError(f"sync_batch_norm: this rank ({dist.get_rank()}) is not a member of "
                         f"process_group: call it on the group's ranks only (SyncBatchNorm "
                         f"runs local batch norm on the others, as torch's does)")
    F.check_resolved_activation(activation)
    _validate(input, running_mean, running_var, weight, bias, momentum, eps, residual,
              num_batches_tracked)
    if ops.needs_composed(input):
        # The collective takes real tensors and our Function has no rules for torch.func
        # (nor has torch's SyncBatchNorm): said before the collective, not from deep
        # inside a kernel.
        raise RuntimeError(
            "SyncBatchNorm's synchronized training step cannot run under torch.func "
            "transforms (vmap, grad, ...), forward-mode AD, torch.jit.trace or a dispatch "
            "mode (make_fx, FakeTensorMode), nor on tensor subclasses that dispatch in "
            "Python. Run it in eval mode there, or use a local batch norm "
            "(batchnorm.revert_sync_batchnorm)")
    ops.refuse_inference_buffers((running_mean, running_var, num_batches_tracked, momentum))
    input, weight, bias, residual = ops.resolve_negatives(ops.densify(input), weight, bias,
                                                          residual)
    shape = input.shape
    channels_last = ops.is_channels_last(input)
    # An empty rank computes nothing but still needs autograd to reach our backward (to
    # join its all_reduce): it passes its input as it is, whose layout empty_like keeps.
    empty = input.numel() == 0
    with torch.no_grad():
        x = input if empty else ops.to_kernel_view(input.detach(), channels_last)
        mean, var, count = global_stats(x, process_group, ranks)
    if count == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got 1 over the global "
            f"batch of {ranks} ranks (this rank's input size {tuple(shape)}). Batch "
            f"statistics need at least 2 values per channel: use a larger batch, drop the "
            f"last incomplete batch (DataLoader(..., drop_last=True)), or put the layer in "
            f"eval mode (model.eval()) to use the running statistics")
    invstd = ops.invstd_from_var(var, eps)

    def update_running_stats():
        if count > 0:
            ops.update_running_stats(running_mean, running_var, num_batches_tracked, mean,
                                     var, count, momentum)
        elif num_batches_tracked is not None:
            # As local batch norm and torch: an empty batch is counted, the statistics stay.
            num_batches_tracked.add_(1)

    return _SyncBatchNormFunction.apply(input, weight, bias, residual, mean, invstd, count,
                                        activation, slope, process_group,
                                        update_running_stats, channels_last)


# ---------------------------------------------------------------------------------------
# Modules


class SyncBatchNorm(_BatchNorm):
    r"""Batch Normalization over the global batch of a process group, any input rank.

    A drop-in for ``torch.nn.SyncBatchNorm`` that also runs on the CPU (gloo), accepts
    uneven and empty per-rank batches, and fuses an activation and a residual:
    ``y = act((x - E[x]) / sqrt(Var[x] + eps) * weight + bias + residual)``, with E and
    Var over the N and spatial dimensions of *every* rank's input. In eval, with one rank,
    or without an initialized process group it is local batch norm.

    Args:
        num_features: C, the channel count of an input (N, C, ...) of any rank >= 2.
        eps, momentum, affine, track_running_stats, device, dtype, bias, activation: as
            for :class:`batchnorm.BatchNorm2d`.
        process_group: the ``torch.distributed`` group whose ranks share statistics; None
            for the default (whole world) group. Default: None

    Gradients of ``weight`` and ``bias`` are this rank's sums, as with torch's
    SyncBatchNorm: wrap the model in ``DistributedDataParallel`` (which all-reduces them),
    or all-reduce them yourself.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None, *, bias: bool = True, activation=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, bias=bias, activation=activation)
        if not (process_group is None or isinstance(process_group, _PROCESS_GROUP)
                or (type(process_group) is int and process_group == _NON_GROUP_MEMBER)):
            # (the first synchronized call would fail deep inside torch.distributed)
            raise TypeError(f"process_group must be None (the default group) or a "
                            f"torch.distributed ProcessGroup (dist.new_group(...)), got "
                            f"{type(process_group).__name__} {process_group!r}")
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if not isinstance(input, Tensor) or input.dim() < 2:
            _check_rank(type(self).__name__, input, (), "at least 2D")

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """:func:`convert_sync_batchnorm`, spelt as ``torch.nn.SyncBatchNorm``'s."""
        return convert_sync_batchnorm(module, process_group)

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        """``act(BN(input) + residual)`` as ``BatchNorm2d.forward`` (input of any rank >=
        2), with the statistics of the global batch (every rank of ``process_group``) in
        training."""
        # Eval and frozen layers use the running statistics: nothing to synchronize. A world
        # of one has no one to synchronize with, and a rank outside process_group (size -1)
        # none either: torch's SyncBatchNorm runs local batch norm on both.
        if not self.training or self.frozen:
            return super().forward(input, residual)
        traced = type(input) is not Tensor and isinstance(input, torch.fx.Proxy)
        if traced:
            leaf = fx_leaf(self, input, residual)  # (the layer decides when it runs)
            if leaf is not None:
                return leaf
        else:
            if world_size(self.process_group) <= 1:
                return super().forward(input, residual)
            self._check_input_dim(input)
        tracking = self.track_running_stats
        num_batches_tracked = self.num_batches_tracked if tracking else None
        args = (input, self.running_mean if tracking else None,
                self.running_var if tracking else None, self.weight, self.bias,
                self._momentum_given(num_batches_tracked), self.eps, self.activation,
                self.activation_slope, residual, num_batches_tracked)
        if traced:  # the traced root: one node that synchronizes when it runs
            return _traced_sync_batch_norm(*args, _traced_group(self.process_group))
        y = sync_batch_norm(*args, self.process_group)
        if residual is not None:
            self._note_residual()
        return y


register_layer_forward(SyncBatchNorm.forward)

# The process groups of traced SyncBatchNorm nodes, by the name the node carries (a graph
# holds constants it can print; a process group is none)
_TRACED_GROUPS: dict = {}


def _traced_group(process_group) -> str | None:
    if process_group is None:
        return None
    name = f"group-{id(process_group)}"
    _TRACED_GROUPS[name] = process_group
    return name


def _traced_sync_batch_norm(input, running_mean, running_var, weight, bias, momentum, eps,
                            activation, slope, residual, num_batches_tracked, group):
    """A training SyncBatchNorm as one node of a ``torch.fx`` graph (see
    ``modules._traced_batch_norm``): whether it synchronizes is decided when the node
    runs, as the layer decides when it is called, not when the model was traced (a model
    traced before ``init_process_group`` synchronizes once it runs under one)."""
    process_group = _TRACED_GROUPS[group] if group is not None else None
    if world_size(process_group) <= 1:
        return F.batch_norm_resolved(input, running_mean, running_var, weight, bias, True,
                                     momentum, eps, activation, slope, residual,
                                     num_batches_tracked)
    return sync_batch_norm(input, running_mean, running_var, weight, bias, momentum, eps,
                           activation, slope, residual, num_batches_tracked, process_group)


torch.fx.wrap("_traced_sync_batch_norm")


class BatchNormNd(_BatchNorm):
    """Local batch norm for an input of any rank >= 2: what :func:`revert_sync_batchnorm`
    makes of a SyncBatchNorm whose original class is unknown (one built directly, or
    torch's). Same arguments and results as :class:`batchnorm.BatchNorm2d`."""

    def _check_input_dim(self, input: Tensor) -> None:
        if not isinstance(input, Tensor) or input.dim() < 2:
            _check_rank(type(self).__name__, input, (), "at least 2D")


# ---------------------------------------------------------------------------------------
# Conversion

# What revert builds from a recorded original class: ours stay ours, torch's map to ours.
_LOCAL_OF = {
    nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d,
    BatchNorm1d: BatchNorm1d, BatchNorm2d: BatchNorm2d, BatchNorm3d: BatchNorm3d,
}


def _is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, (_BatchNorm, nn.modules.batchnorm._BatchNorm))


def _move_state(src: nn.Module, dst: nn.Module) -> nn.Module:
    """dst takes src's parameters and buffers (the same tensors: optimizers and other
    references stay valid, device and dtype are kept), its training mode, and its
    ``frozen`` state with what :func:`batchnorm.unfreeze` restores (ours only: torch's
    layers cannot be frozen)."""
    with torch.no_grad():
        for name in ("weight", "bias"):
            setattr(dst, name, getattr(src, name, None))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            dst.register_buffer(name, getattr(src, name, None))
    dst.train(src.training)
    if isinstance(src, _BatchNorm):
        dst.frozen = src.frozen
        if src.called_with_residual:  # (revert leaves such a layer; see _NormBase)
            dst._note_residual()
        if "_affine_frozen_by_freeze" in src.__dict__:  # batchnorm.freeze(affine=True)'s record
            dst._affine_frozen_by_freeze = list(src._affine_frozen_by_freeze)
    if hasattr(src, "qconfig"):
        dst.qconfig = src.qconfig
    return dst


def _activation_of(module: nn.Module):
    return getattr(module, "activation", "none"), getattr(module, "activation_slope", 0.0)


def _rebuild(module: nn.Module, cls, **extra) -> nn.Module:
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        raise ValueError(f"cannot convert an uninitialized {type(module).__name__}: run one "
                         f"forward pass first so that num_features is known")
    act, slope = _activation_of(module)
    new = cls(module.num_features, module.eps, module.momentum, module.affine,
              module.track_running_stats, device="meta", **extra)
    # Set the resolved activation directly: a leaky slope is kept exactly.
    new.activation, new.activation_slope = act, slope
    return _move_state(module, new)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Every batch-norm layer of ``module`` made a :class:`SyncBatchNorm`.

    Converts our BatchNorm1d/2d/3d and SyncBatchNorm and torch's ``nn.BatchNorm1d/2d/3d``
    and ``nn.SyncBatchNorm``, keeping parameters and buffers (the same tensors), device,
    dtype, training mode, ``frozen`` state and fused activation. Returns the converted module (a new object
    when ``module`` itself is a batch-norm layer, else ``module`` changed in place), as
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does. The original class is recorded
    for :func:`revert_sync_batchnorm`. A layer whose weight or bias a forward pre-hook
    computes (the hook-based ``prune``, ``spectral_norm``, ``weight_norm``) or a
    parametrization (``torch.nn.utils.parametrize``) is left as it is, with a warning; a
    lazy layer that has not seen input raises ``ValueError``, with the model unchanged.
    """
    def to_sync(layer):
        new = _rebuild(layer, SyncBatchNorm, process_group=process_group)
        # A layer converted twice keeps its first origin.
        new._batchnorm_origin = getattr(layer, "_batchnorm_origin", type(layer))
        return new

    return _replace_batch_norms(module, _is_batchnorm, to_sync, "convert_sync_batchnorm",
                                ("torch", "ours"))


def _replace_batch_norms(module: nn.Module, wanted, make, caller: str,
                         compiled: tuple[str, ...]) -> nn.Module:
    """``module`` with each layer that is ``wanted`` replaced by ``make(layer)``, in place
    (a new object when ``module`` itself is one). A layer found at several places (an
    alias ``self.again = self.bn``, or two parents) becomes one replacement at all of them,
    as it was one layer. Each ``batchnorm.convert`` marker of an activation fused into a
    replaced layer (``FusedActivation.bn``) follows it, so that ``batchnorm.revert`` still
    finds the layer it fused into; a marker outside ``module`` (a submodule converted
    alone) finds it through the old layer's ``_batchnorm_replaced_by``."""
    from .tools._common import check_module, computed_affine, warn_computed_affine
    check_module(module, caller, compiled)  # (the compiled layers it would change)

    # A layer whose weight a forward pre-hook (the hook-based prune, spectral_norm,
    # weight_norm) or a parametrization computes has no Parameter to move: left as it
    # is, with a warning.
    warn_computed_affine(module, caller, wanted, parametrized=True)
    if wanted(module):
        if computed_affine(module):
            return module
        new = make(module)
        module.__dict__["_batchnorm_replaced_by"] = new
        return new
    # Every replacement is made before the first is installed: a layer that fails to
    # convert (a lazy one without input) leaves the model as it was.
    replaced: dict[int, nn.Module] = {}
    places: list[tuple[nn.Module, str, nn.Module]] = []
    # A loop, not a recursive closure: that would hold itself, and with it every layer
    # and parent it saw, in a reference cycle after the call (freed only by gc).
    pending, walked = [module], {id(module)}
    while pending:
        m = pending.pop()
        # every name, aliases too (named_children() gives a module once)
        for name, child in list(m._modules.items()):
            if child is None:
                continue
            if wanted(child):
                if computed_affine(child):
                    continue
                if id(child) not in replaced:
                    replaced[id(child)] = make(child)
                places.append((m, name, child))
            elif id(child) not in walked:
                walked.add(id(child))
                pending.append(child)
    for parent, name, old in places:
        parent.add_module(name, replaced[id(old)])
        old.__dict__["_batchnorm_replaced_by"] = replaced[id(old)]
    if replaced:
        from .tools.convert import repoint_markers
        repoint_markers(module, replaced)
    return module


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every SyncBatchNorm of ``module`` (ours or torch's) made a local batch-norm layer.

    The class is ours: the one recorded by :func:`convert_sync_batchnorm` (``BatchNorm2d``
    for a converted ``nn.BatchNorm2d`` or ``batchnorm.BatchNorm2d``, and so on). A
    SyncBatchNorm with no record (built directly, or torch's, which keep no input rank)
    becomes :class:`BatchNormNd`, which accepts any input rank >= 2 as SyncBatchNorm does.
    Parameters, buffers, device, dtype, training mode and activation are kept. A layer
    whose weight a forward pre-hook or a parametrization computes is left as it is, with a
    warning.
    """
    def to_local(layer):
        return _rebuild(layer, _LOCAL_OF.get(getattr(layer, "_batchnorm_origin", None),
                                             BatchNormNd))

    return _replace_batch_norms(
        module, lambda m: isinstance(m, (SyncBatchNorm, nn.SyncBatchNorm)), to_local,
        "revert_sync_batchnorm", ("sync",))


# ---------------------------------------------------------------------------------------
# Benchmark: `batchnorm bench` calls this


def _bench_worker(rank, ranks, init_file, shape, repeats, warmup, threads, out_file):
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=ranks, timeout=timedelta(seconds=120))
    try:
        torch.manual_seed(rank)
        c = shape[1]
        x = torch.randn(shape).requires_grad_()
        dy = torch.randn(shape)
        local = BatchNormNd(c)
        sync = SyncBatchNorm(c)

        def step(layer):
            dist.barrier()  # both ranks start together: each timing sees the same contention
            t0 = time.perf_counter()
            layer(x).backward(dy)
            t = time.perf_counter() - t0
            x.grad = None
            return t

        gathered = torch.empty(ranks * (2 * c + 1), dtype=torch.float64)
        stats_buf, sums_buf = torch.zeros(2 * c + 1, dtype=torch.float64), torch.zeros(2 * c)

        def collectives(_):
            # The traffic SyncBatchNorm adds to a step, alone: both C-sized collectives.
            dist.barrier()
            t0 = time.perf_counter()
            _all_gather_flat(gathered, stats_buf)
            dist.all_reduce(sums_buf)
            return time.perf_counter() - t0

        times = {"local": [], "sync": [], "collectives": []}
        for i in range(warmup + repeats):
            for name, fn, arg in (("local", step, local), ("sync", step, sync),
                                  ("collectives", collectives, None)):
                t = fn(arg)
                if i >= warmup:
                    times[name].append(t)
        # A step ends when its slowest rank does: the max over ranks of each repeat, for
        # the local steps too (they would meet at DDP's gradient all-reduce), then the median.
        slowest = torch.tensor([times[k] for k in times], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump({f"{k}_ms": statistics.median(row) * 1e3
                           for k, row in zip(times, slowest.tolist())}, f)
    finally:
        dist.destroy_process_group()


def benchmark_sync_step(shape=(16, 256, 56, 56), world_size=2, repeats=20, warmup=3,
                        threads_per_rank=None) -> dict:
    """Median time of a SyncBatchNorm forward+backward step against a local BatchNorm step
    on the same per-rank input, with ``world_size`` CPU ranks (gloo) on this machine.

    The two are interleaved, each step starting on a barrier, and a step counts as long as
    its slowest rank (the max over ranks of each repeat; the median over repeats). Returns ``shape`` (per rank), ``world_size``, ``repeats``,
    ``threads_per_rank``, ``local_ms``, ``sync_ms``, ``ratio`` = sync / local, and
    ``collectives_ms``, the two C-sized collectives of a step timed alone. On a loaded
    machine ``sync_ms`` also holds the ranks waiting for each other mid-step, which
    independent local steps do not.
    """
    import torch.multiprocessing as mp

    shape = tuple(shape)
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // world_size)
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "store"), os.path.join(tmp, "result.json")
        mp.spawn(_bench_worker, args=(world_size, init_file, shape, repeats, warmup, threads,
                                      out_file), nprocs=world_size, join=True)
        with open(out_file) as f:
            result = json.load(f)
    result.update(shape=shape, world_size=world_size, repeats=repeats,
                  threads_per_rank=threads, ratio=result["sync_ms"] / result["local_ms"])
    return result
