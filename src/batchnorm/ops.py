"""How a batch norm runs: the pipeline, its ``torch.library`` custom ops, and which path
a call takes.

Forward  = stats -> (combine across ranks) -> update running statistics -> normalize
Backward = backward_reduce -> (all-reduce) -> backward_elementwise

:func:`batch_norm` (the entry of the layers and of ``functional``) takes one of three paths:

- eager, with something to differentiate: ``_EagerBatchNorm``, an ``autograd.Function``
  (the custom-op dispatcher's overhead would dominate small inputs) running the device
  backend's fused entry points, ``batch_norm_forward``/``batch_norm_backward``, where it
  has them, else the primitives; without, the same forward alone;
- under ``torch.compile`` and ``torch.export``: the custom op ``batchnorm::batch_norm``
  (a fake implementation and the analytic backward registered), one node of the graph,
  whose backward calls the ops ``batchnorm::backward_reduce`` and
  ``::backward_elementwise``;
- under torch.func transforms, forward-mode AD, ``torch.jit.trace``, dispatch modes and
  tensor subclasses that dispatch in Python (:func:`needs_composed`): :func:`_composed`,
  the same arithmetic in torch ops.

SyncBatchNorm (``distributed.py``) calls the backend's primitives directly, its
collectives in between: its forward gathers the statistics before ``normalize``, its
backward is local batch norm's (:func:`backward_by_primitives`) with the all-reduce of
the sums passed in.

The running-statistics update mutates buffers, and a custom op that mutates cannot carry
an autograd formula, so it is kept out of the ops: it is a few in-place torch ops on
C-sized tensors (:func:`update_running_stats`), which compile without graph breaks.

The C-sized math (invstd, the running update, Chan's combination) is written here in
torch ops; the CPU and Triton kernels compute it again inside their fused entry points
(one call instead of a dozen small ops). Tensors reaching the ops are *kernel views* (see
``backends/portable.py``); :func:`to_kernel_view` and :func:`from_kernel_view` make and
undo them.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd import forward_ad

from . import backends
from .backends import portable
from .backends.portable import acc_dtype, mean_dtype, running_mean_dtype

# ---------------------------------------------------------------------------------------
# Kernel views


# Made in portable.py, where every backend can reach them (the fused entry points take
# tensors as the caller has them and make their own views).
is_channels_last = portable.is_channels_last
to_kernel_view = portable.to_kernel_view
from_kernel_view = portable.from_kernel_view


# ---------------------------------------------------------------------------------------
# C-sized math


def values_per_channel(x: Tensor) -> int:
    """The count each channel's statistics are over: N·L (0 for an input without channels)."""
    return x.numel() // x.shape[1] if x.shape[1] else 0


def invstd_from_var(var: Tensor, eps: float) -> Tensor:
    """1/√(var + eps), and 0 where var + eps == 0.

    eps = 0 is allowed: a zero-variance channel then normalizes to x̂ = 0 (pre-activation
    output = bias, gradient 0) instead of 0/0. Both branches are kept finite so that the
    gradient of this expression (double backward) is never 0·inf. A NaN or negative
    var + eps (a corrupted running_var, in evaluation) gives NaN, as torch's does: the
    zero rule must not hide it.
    """
    v = var + eps
    zero = v == 0
    return torch.where(zero, 0, torch.rsqrt(torch.where(zero, torch.ones_like(v), v)))


def centre_for_kernels(mean: Tensor, invstd: Tensor, weight: Tensor | None,
                       bias: Tensor | None, acc: torch.dtype):
    """``(mean_k, bias_k, shift)``: what the elementwise primitives get for a wide mean.

    ``stats`` gives the mean in float64 (see ``portable.mean_dtype``) but the kernels
    take it in the acc dtype. Rounding it to float32 would move every x̂ of a channel by
    ``(mean - mean_k)·invstd``, a 3% error at mean 1e6, std 1. So the kernels get
    ``mean_k = float32(mean)`` and compute ``x̂' = (x − mean_k)·invstd = x̂ + shift`` with
    ``shift = (mean − mean_k)·invstd`` (exact subtraction for data near the mean), and the
    shift is undone on C-sized tensors: in the bias, ``bias_k = bias − weight·shift``
    (so the pre-activation is exact), and in the backward sums (``_batch_norm_backward``).
    ``shift`` is None when the mean already is in the acc dtype.
    """
    if mean.dtype == acc:
        return mean, bias, None
    mean_k = mean.to(acc)
    # an infinite mean is its own rounding (inf − inf would make every x̂ NaN)
    rest = (mean - mean_k.to(mean.dtype)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    shift = rest.to(acc) * invstd
    scaled = shift if weight is None else shift * weight.to(acc)
    bias_k = -scaled if bias is None else bias.to(acc) - scaled
    return mean_k, bias_k, shift


def sum_dz_xhat_from_kernels(sum_dz: Tensor, sum_dz_xhat_k: Tensor,
                             shift: Tensor | None) -> Tensor:
    """Σdz·x̂ from the kernels' Σdz·x̂', where x̂' = x̂ + shift (:func:`centre_for_kernels`):
    Σdz·x̂ = Σdz·x̂' − shift·Σdz. Linear, so per-rank sums may be corrected before they
    are summed across ranks. No correction where Σdz is not finite (an inf in dy): it
    would be inf − inf or 0·inf, a NaN weight gradient where torch's is ±inf."""
    if shift is None:
        return sum_dz_xhat_k
    return sum_dz_xhat_k - torch.where(sum_dz.isfinite(), shift * sum_dz, 0.0)


def sum_dz_for_kernels(sum_dz: Tensor, sum_dz_xhat: Tensor, shift: Tensor | None) -> Tensor:
    """The Σdz that ``backward_elementwise`` must get when its x̂' is x̂ + shift:
    dz − Σdz/n − x̂·S/n  ==  dz − (Σdz − shift·S)/n − x̂'·S/n,  with S = Σdz·x̂. No
    correction where S is not finite (an inf in dy): shift·S would be ±inf or 0·inf, a
    NaN Σdz and every dx of the channel NaN, where torch's are ±inf or NaN by x̂'s sign."""
    if shift is None:
        return sum_dz
    return sum_dz - torch.where(sum_dz_xhat.isfinite(), shift * sum_dz_xhat, 0.0)


def chan_combine(counts: Tensor, means: Tensor, m2s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Merge per-group statistics ``[G, C]`` (count, mean, m2) into one ``[C]`` set.

    Chan et al.'s parallel formula, written in its G-way form: with n = Σ nᵢ and
    μ = Σ nᵢ μᵢ / n, m2 = Σ m2ᵢ + Σ nᵢ (μᵢ − μ)². Deviations are taken from the merged
    mean, never as raw Σx², so large means stay exact; groups with nᵢ = 0 contribute
    nothing (and give mean 0 when every group is empty).
    """
    counts = counts.to(means.dtype)
    total = counts.sum(0)
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    # Weight by count over total before summing: equal means then merge to exactly that
    # mean only if the weights sum to 1 exactly, so centre on the first non-empty group's
    # mean (a constant channel stays exactly constant).
    first = torch.argmax((counts > 0).to(torch.int8), dim=0, keepdim=True)
    shift = torch.gather(means, 0, first).squeeze(0)
    # an infinite (or NaN) mean is no shift: inf − inf would make the merged mean NaN
    # where torch's is ±inf (0 instead, as the kernels' shifts)
    # (detached: the merge does not depend on it, a graph through it would cancel; see
    # portable.stats)
    shift = torch.where(shift.isfinite(), shift, torch.zeros_like(shift)).detach()
    mean = shift + (counts * (means - shift)).sum(0) / safe_total
    m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)
    return total, mean, m2


def update_running_stats(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    mean: Tensor,
    var: Tensor,
    count: int | Tensor,
    momentum: float | None,
) -> None:
    """In place: ``running = (1 − m)·running + m·batch``, storing the *unbiased* variance.

    ``momentum=None`` is the cumulative average, m = 1 / num_batches_tracked after the
    increment; it is computed as a tensor, so that no value leaves the device.
    """
    if not torch.compiler.is_compiling():
        # Eager: the device's fast backend may do this C-sized arithmetic in one call (numba
        # on the CPU, one Triton launch on CUDA) instead of ~10 small torch ops, which cost
        # more than a small batch norm itself; it returns False for what it does not take.
        fast = getattr(backends.for_device(mean.device), "update_running_stats", None)
        if fast is not None and fast(running_mean, running_var, num_batches_tracked, mean,
                                     var, count, momentum):
            _kernel_counted(num_batches_tracked)
            return
    _update_running_stats_torch(running_mean, running_var, num_batches_tracked, mean, var,
                                count, momentum)


def _kernel_counted(num_batches_tracked: Tensor | None) -> None:
    """A kernel added 1 to ``num_batches_tracked`` by its address: its version counter
    moves as under torch's module, whose ``add_(1)`` moves it (the running statistics'
    own counters stay, as torch's kernel leaves them)."""
    if num_batches_tracked is not None:
        _increment_version((num_batches_tracked,))


_increment_version = torch._C._increment_version


def _update_running_stats_torch(running_mean, running_var, num_batches_tracked, mean, var,
                                count, momentum) -> None:
    # The batch statistics detached rather than the function under torch.no_grad(): an
    # exported training program holds no_grad as a wrapper node without outputs, which
    # torch.export.load refuses (SpecViolationError); detach is an ordinary node.
    mean, var = mean.detach(), var.detach()

    def factor(dt):  # (the count after this batch; a counter of any one-value shape)
        if momentum is not None:
            return momentum
        return 1.0 / (num_batches_tracked.reshape(()) + 1).to(dt)

    # Each in the wider of its dtype and the batch's, as the CPU kernels do: a float64
    # running_var on float32 data keeps its digits (the batch's dtype rounded it, so one
    # with momentum 0 moved, and a cumulative average drifted by 4.5e-8 in 3 steps).
    new_mean = new_var = None
    if running_mean is not None:
        dt = torch.promote_types(mean.dtype, running_mean.dtype)
        m = factor(dt)
        new_mean = mean.to(dt) * m + running_mean.to(dt) * (1 - m)
    if running_var is not None:
        dt = torch.promote_types(var.dtype, running_var.dtype)
        m = factor(dt)
        # count - 1 == 0 only with a single value per channel, which training refuses;
        # the guard keeps a zero-size rank of SyncBatchNorm (count 0 everywhere) finite.
        if isinstance(count, Tensor):
            bessel = count.to(dt) / (count.to(dt) - 1).clamp(min=1)
        else:
            bessel = count / max(count - 1, 1)
        new_var = var.to(dt) * bessel * m + running_var.to(dt) * (1 - m)
    # The state changes last: what fails above (a tensor subclass, a dispatch mode) leaves
    # it. The count first: a torch.func transform refuses its in-place add (as torch's).
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if new_mean is not None:
        _assign(running_mean, new_mean)
    if new_var is not None:
        _assign(running_var, new_var)


_functorch = torch._C._functorch
_preserve_version = torch.autograd._unsafe_preserve_version_counter


def _assign(running: Tensor, value: Tensor) -> None:
    """``running.copy_(value)``; for a running statistic captured from outside a
    torch.func transform (``grad(lambda x: batch_norm(x, running_mean, ...))``), ``value``
    without the transform's wrappers, copied by a custom op: an in-place op on a captured
    tensor raises "mutate a captured Tensor" there, where torch's batch norm updates it
    (inside its op). Under a vmap around the transform, per-sample running statistics
    (batched) get the per-sample values (see :func:`_copy_into_batched`).

    In eager mode outside transforms the running statistic's version counter stays, as
    torch's kernel and ours leave it: a graph that saved it (``w * bn.running_mean``)
    still runs its backward after a training step, whichever path did the update."""
    if torch.compiler.is_compiling():
        running.copy_(value)
        return
    level = _functorch.maybe_current_level()
    if level is None and not running.is_inference():  # (which have no version counter)
        with _preserve_version(running):
            running.copy_(value)
        return
    if level is None or _functorch.maybe_get_level(running) >= level:
        running.copy_(value)
        return
    while (_functorch.is_functorch_wrapped_tensor(value)
           and _functorch.maybe_get_level(value) > _functorch.maybe_get_level(running)):
        value = _functorch.get_unwrapped(value)
    _copy_into(running, value)


@torch.library.custom_op("batchnorm::copy_into", mutates_args=("dst",))
def _copy_into(dst: Tensor, src: Tensor) -> None:
    """``dst.copy_(src)`` as one op (see :func:`_assign`)."""
    dst.copy_(src)


@_copy_into.register_vmap
def _copy_into_batched(info, in_dims, dst, src):
    """Each sample's ``dst`` takes its own ``src`` (or the one ``src``); one ``dst`` for
    a batch of values is refused, as torch's in-place ops refuse it under vmap."""
    dst_dim, src_dim = in_dims
    if dst_dim is None:
        raise RuntimeError(
            "batchnorm: a running statistic shared by every sample of a vmap cannot take "
            "each sample's batch statistics: give each sample its own (a batched running "
            "statistic), or use eval mode or track_running_stats=False under vmap")
    dst = dst.movedim(dst_dim, 0)
    src = src.movedim(src_dim, 0) if src_dim is not None else src.expand_as(dst)
    _copy_into(dst, src)
    return None, None


# ---------------------------------------------------------------------------------------
# The backward primitives as custom ops (the compiled backward of batchnorm::batch_norm)


def _per_channel_empty(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[1], dtype=acc_dtype(x.dtype))


@torch.library.custom_op("batchnorm::backward_reduce", mutates_args=())
def backward_reduce(
    dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
    bias: Tensor | None, residual: Tensor | None, activation: str, slope: float,
) -> tuple[Tensor, Tensor]:
    return backends.select(x).backward_reduce(
        dy, x, mean, invstd, weight, bias, residual, activation, slope)


@backward_reduce.register_fake
def _(dy, x, mean, invstd, weight, bias, residual, activation, slope):
    return _per_channel_empty(x), _per_channel_empty(x)


@torch.library.custom_op("batchnorm::backward_elementwise", mutates_args=())
def backward_elementwise(
    dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
    bias: Tensor | None, residual: Tensor | None, sum_dz: Tensor | None,
    sum_dz_xhat: Tensor | None, count: int, activation: str, slope: float,
    want_dresidual: bool,
) -> tuple[Tensor, Tensor]:
    """(dx, dresidual); dresidual is an empty tensor unless ``want_dresidual``."""
    dx, dres = backends.select(x).backward_elementwise(
        dy, x, mean, invstd, weight, bias, residual, sum_dz, sum_dz_xhat, count,
        activation, slope, want_dresidual)
    return dx, (dres if dres is not None else x.new_empty(0))


@backward_elementwise.register_fake
def _(dy, x, mean, invstd, weight, bias, residual, sum_dz, sum_dz_xhat, count,
      activation, slope, want_dresidual):
    dres = torch.empty_like(residual if residual is not None else x) if want_dresidual else x.new_empty(0)
    return torch.empty_like(x), dres


# ---------------------------------------------------------------------------------------
# Local batch norm: one op, forward and analytic backward


def _batch_norm_forward(x, weight, bias, residual, running_mean, running_var, eps,
                        activation, slope, update=None):
    """``(y, mean, var)`` of a kernel view; with ``update`` (see :func:`batch_norm`) the
    running statistics have moved towards the batch's when it returns."""
    return _forward(x, weight, bias, residual, running_mean, running_var, eps, activation,
                    slope, update)[:3]


def _forward(x, weight, bias, residual, running_mean, running_var, eps, activation, slope,
             update, channels_last=False, need_stats=True):
    """:func:`_batch_norm_forward` of x as given ((N, C, *), channels-last when
    ``channels_last``; y in the same shape and format), plus the backend that ran it and
    what that backend keeps for its ``batch_norm_backward`` (``saved``, or None).

    A backend's ``batch_norm_forward`` hook returns ``(y, mean, var, updated, saved)``:
    ``updated`` whether it did the running update, ``saved`` its own per-channel results
    (or None) that its ``batch_norm_backward`` takes back as ``saved=``. Without
    ``need_stats`` (the caller keeps y alone) a hook may return None for mean, var and
    saved, except where ops still needs them for the running update.
    """
    backend = backends.select(x)
    fused = getattr(backend, "batch_norm_forward", None)
    if fused is not None:
        # stats and normalize with the C-sized math below done inside the kernels (and,
        # where the buffers allow, the running update too): the dozen torch ops on [C]
        # tensors would cost more than a small input's whole computation
        out = fused(x, weight, bias, residual, running_mean, running_var, eps, activation,
                    slope, update, channels_last, need_stats)
        if out is not None:
            y, mean, var, updated, saved = out
            if update is not None:
                if updated:
                    _kernel_counted(update[2])
                else:
                    _update_from_batch(update, mean, var, x)
            return y, mean, var, backend, saved
    y, mean, var = _forward_by_primitives(x, weight, bias, residual, running_mean,
                                          running_var, eps, activation, slope, update,
                                          channels_last, backend)
    return y, mean, var, backend, None


def _forward_by_primitives(input, weight, bias, residual, running_mean, running_var, eps,
                           activation, slope, update, channels_last, backend,
                           fast_update=True):
    """``(y, mean, var)`` from ``backend``'s ``stats`` and ``normalize`` with the C-sized
    math in torch ops between them; ``fast_update``: the running update may go to the
    device's one-call hook (see :func:`update_running_stats`), else torch ops only."""
    x = to_kernel_view(input, channels_last)
    if residual is not None:
        residual = to_kernel_view(residual, channels_last)
    acc = acc_dtype(x.dtype)
    if running_mean is None:
        mean, m2 = backend.stats(x)
        mean = mean.to(mean_dtype(x))
        var = m2 / max(values_per_channel(x), 1)
    else:
        mean = running_mean.to(running_mean_dtype(running_mean, acc), copy=True)
        var = running_var.to(acc, copy=True)
    invstd = invstd_from_var(var, eps)
    mean_k, bias_k, _ = centre_for_kernels(mean, invstd, weight, bias, acc)
    y = backend.normalize(x, mean_k, invstd, weight, bias_k, residual, activation, slope)
    if update is not None:  # last: a call that fails changes no state
        _update_from_batch(update, mean.detach(), var.detach(), x, fast_update)
    return from_kernel_view(y, input.shape, channels_last), mean, var


def _update_from_batch(update, mean, var, x, fast=True) -> None:
    running_mean, running_var, num_batches_tracked, momentum = update
    apply = update_running_stats if fast else _update_running_stats_torch
    apply(running_mean, running_var, num_batches_tracked, mean, var, values_per_channel(x),
          momentum)


@torch.library.custom_op("batchnorm::batch_norm", mutates_args=())
def batch_norm_op(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, residual: Tensor | None,
    running_mean: Tensor | None, running_var: Tensor | None, eps: float,
    activation: str, slope: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, biased var) of a kernel view (the mean in ``mean_dtype(x)`` in training,
    in evaluation in the wider of the acc dtype and ``running_mean``'s).

    With ``running_mean``/``running_var`` None the statistics are the batch's
    (training); otherwise those are used as they are (evaluation).
    """
    return _batch_norm_forward(x, weight, bias, residual, running_mean, running_var, eps,
                               activation, slope)


@batch_norm_op.register_fake
def _(x, weight, bias, residual, running_mean, running_var, eps, activation, slope):
    mean_type = mean_dtype(x) if running_mean is None else running_mean_dtype(
        running_mean, acc_dtype(x.dtype))
    return (torch.empty_like(x), x.new_empty(x.shape[1], dtype=mean_type),
            _per_channel_empty(x))


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, running_mean, running_var, eps, activation, slope = inputs
    _, mean, var = output
    _save(ctx, x, weight, bias, residual, running_mean, mean, var, eps, activation, slope)
    ctx.mark_non_differentiable(mean, var)
    ctx.eager = False


def _save(ctx, x, weight, bias, residual, running_mean, mean, var, eps, activation, slope):
    """What ``_batch_norm_backward`` reads from ctx, for the custom op and the eager
    Function alike."""
    ctx.training = running_mean is None
    ctx.eps, ctx.activation, ctx.slope = eps, activation, slope
    # The bias and the residual are needed only to recompute the pre-activation in
    # backward: without an activation they are not kept (as torch keeps no bias, so an
    # optimizer step on the bias between forward and backward is no in-place error).
    fused = activation != "none"
    ctx.bias_dtype = None if bias is None else bias.dtype
    if _residual_only(ctx):
        # dresidual is dy itself: nothing is kept (as torch's add keeps nothing, so an
        # in-place change of x before backward is no error)
        ctx.save_for_backward(None, None, None, None, None, None)
        return
    ctx.save_for_backward(x, weight, bias if fused else None, residual if fused else None,
                          mean, var)


def _saved(ctx) -> tuple[Tensor | None, ...]:
    """What :func:`_save` kept, negative views resolved (a saved-tensor hook may give
    one back: the kernels read by address)."""
    return resolve_negatives(*ctx.saved_tensors)


def _residual_only(ctx) -> bool:
    """Only the residual needs a gradient, and there is no activation: it is dy."""
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    return ctx.activation == "none" and not (need_x or need_w or need_b)


def autograd_grads(needs, dy, dx, dres, sum_dz, sum_dz_xhat, weight, bias_dtype, activation):
    """``(dx, dweight, dbias, dresidual)`` as autograd wants them: None where no gradient
    is needed; the parameter gradients are the backward sums in the parameters' dtypes,
    and without an activation d(x + r)/dr = 1, so dresidual is dy itself (the tensor
    autograd handed the backward: a view of it would become the residual's .grad as it
    is, sharing the caller's memory, where torch's add hands on dy, which autograd copies)."""
    need_x, need_w, need_b, need_r = needs
    if need_r and activation == "none":
        dres = dy
    return (dx if need_x else None,
            _as(sum_dz_xhat, weight.dtype) if need_w else None,
            _as(sum_dz, bias_dtype) if need_b else None,
            dres if need_r else None)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _batch_norm_backward(ctx, dy, _dmean, _dvar):
    if _residual_only(ctx):
        return None, None, None, dy, None, None, None, None, None
    x, weight, bias, residual, mean, var = _saved(ctx)
    if ctx.eager:
        # _EagerBatchNorm saves the tensors as given; their kernel views are made here,
        # where (with create_graph=True) they are part of the double-backward graph
        shape, channels_last, dy_given = x.shape, ctx.channels_last, dy
        x = to_kernel_view(x, channels_last)
        dy = to_kernel_view(dy, channels_last)
        if residual is not None:
            residual = to_kernel_view(residual, channels_last)
        dx, dw, db, dr, *rest = _kernel_view_backward(ctx, x, weight, bias, residual, mean,
                                                      var, dy)
        if dr is not None:  # dy itself without an activation (see autograd_grads)
            dr = dy_given if ctx.activation == "none" else from_kernel_view(
                dr, shape, channels_last)
        return (from_kernel_view(dx, shape, channels_last) if dx is not None else None, dw, db,
                dr, *rest)
    return _kernel_view_backward(ctx, x, weight, bias, residual, mean, var, dy)


def _kernel_view_backward(ctx, x, weight, bias, residual, mean, var, dy):
    need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
    act, slope = ctx.activation, ctx.slope
    dy = dy.contiguous()
    count = values_per_channel(x)

    if torch.is_grad_enabled():
        # create_graph=True (double backward): build the backward from differentiable torch
        # ops, with the batch statistics recomputed from x so that their dependence on x
        # is part of the graph.
        prims = portable
        if ctx.training:
            mean, m2 = portable.stats(x)
            var = m2 / max(count, 1)
    elif ctx.eager:
        # a cotangent the kernels cannot take (see kernels_take) gets torch ops, which
        # vmap batches and forward-mode AD differentiates
        prims = _DirectPrimitives if kernels_take(dy) else portable
    else:
        prims = torch.ops.batchnorm
    invstd = invstd_from_var(var, ctx.eps)
    mean_k, bias_k, shift = centre_for_kernels(mean, invstd, weight, bias, acc_dtype(x.dtype))
    sum_dz, sum_dz_xhat, dx, dres = backward_by_primitives(
        prims, dy, x, mean_k, invstd, shift, weight, bias_k, residual, act, slope, count,
        ctx.training, need_sums=need_w or need_b, need_dx=need_x,
        want_dresidual=bool(need_r) and act != "none")
    return (*autograd_grads(ctx.needs_input_grad[:4], dy, dx, dres, sum_dz, sum_dz_xhat,
                            weight, ctx.bias_dtype, act),
            None, None, None, None, None)


def backward_by_primitives(prims, dy, x, mean_k, invstd, shift, weight, bias_k, residual,
                           activation, slope, count, training, need_sums, need_dx,
                           want_dresidual, all_reduce=None):
    """``(Σdz, Σdz·x̂, dx, dresidual)`` of kernel views from ``prims``' two backward
    primitives, with the corrections for the centring (:func:`centre_for_kernels`'s
    ``shift``) between them: the backward of local batch norm and of SyncBatchNorm.
    The sums are None unless ``need_sums`` or ``training``, dx unless ``need_dx``,
    dresidual unless ``want_dresidual``. In training dx needs the sums over the whole
    batch: ``all_reduce(Σdz, Σdz·x̂)`` (SyncBatchNorm's collective) gives them from this
    process's, called only where dx is needed; ``count`` is the whole batch's values per
    channel."""
    sum_dz = sum_dz_xhat = None
    if training or need_sums:
        sum_dz, sum_dz_xhat_k = prims.backward_reduce(
            dy, x, mean_k, invstd, weight, bias_k, residual, activation, slope)
        sum_dz_xhat = sum_dz_xhat_from_kernels(sum_dz, sum_dz_xhat_k, shift)
    dx = dres = None
    if need_dx or want_dresidual:
        batch_dz = batch_dz_xhat = None
        if training and need_dx:
            batch_dz, batch_dz_xhat = ((sum_dz, sum_dz_xhat) if all_reduce is None
                                       else all_reduce(sum_dz, sum_dz_xhat))
            batch_dz = sum_dz_for_kernels(batch_dz, batch_dz_xhat, shift)
        dx, dres = prims.backward_elementwise(
            dy, x, mean_k, invstd, weight, bias_k, residual, batch_dz, batch_dz_xhat, count,
            activation, slope, want_dresidual)
    return (sum_dz, sum_dz_xhat, dx if need_dx else None,
            dres if want_dresidual else None)


batch_norm_op.register_autograd(_batch_norm_backward, setup_context=_setup_context)


class _DirectPrimitives:
    """The backward primitives called straight on the backend, without custom-op dispatch."""

    @staticmethod
    def backward_reduce(dy, x, *args):
        return backends.select(x).backward_reduce(dy, x, *args)

    @staticmethod
    def backward_elementwise(dy, x, *args):
        return backends.select(x).backward_elementwise(dy, x, *args)


class _EagerBatchNorm(torch.autograd.Function):
    """``batchnorm::batch_norm`` for eager mode: the same forward and backward, reached
    through ``autograd.Function`` rather than the custom-op dispatcher, whose overhead
    (about 0.1 ms a call, measured on the 2-core CPU machine) would dominate small
    tensors. It hands the input to the backend as given (N, C, *): the kernel views are
    made inside, where no autograd node records them (view nodes cost more than a small
    batch norm; the CPU backend hands its kernels addresses and shapes). It returns y
    alone: the statistics stay inside, saved for backward, and the running update (the
    last input) is done in the forward."""

    @staticmethod
    def forward(ctx, input, weight, bias, residual, running_mean, running_var, eps,
                activation, slope, update):
        channels_last = is_channels_last(input)
        y, mean, var, ctx.backend, ctx.backend_saved = _forward(
            input, weight, bias, residual, running_mean, running_var, eps, activation,
            slope, update, channels_last)
        # (mean, var) are not outputs here: nothing to mark.
        _save(ctx, input, weight, bias, residual, running_mean, mean, var, eps, activation,
              slope)
        ctx.channels_last = channels_last
        ctx.eager = True
        # y may be a view of the kernels' output (the primitives' path), and autograd
        # forbids in-place ops on a view made inside a Function (nn.ReLU(inplace=True)
        # after the layer): the same storage, no longer recorded as a view.
        return y if y._base is None else y.detach()

    @staticmethod
    def backward(ctx, dy):
        dy = resolve_negative(dy)
        if not torch.is_grad_enabled() and kernels_take(dy):
            grads = _fused_backward(ctx, dy)
            if grads is not None:
                return (*grads, None, None, None, None, None, None)
        return (*_batch_norm_backward(ctx, dy, None, None)[:4], None, None, None, None, None,
                None)


def _fused_backward(ctx, dy):
    """``(dx, dweight, dbias, dresidual)`` of an :class:`_EagerBatchNorm` from the backend's
    two backward passes with the C-sized math done in the kernels (see :func:`_forward`),
    on the tensors as given; None where the backend has none or does not take them."""
    fused = getattr(ctx.backend, "batch_norm_backward", None)
    if fused is None:
        return None
    if _residual_only(ctx):
        return None, None, None, dy
    x, weight, bias, residual, mean, var = _saved(ctx)
    if ctx.channels_last and not is_channels_last(x):
        # A saved-tensor hook gave x back in another layout (save_on_cpu(pin_memory=True)
        # makes it contiguous): the kernels would read it as channels-last by address.
        # The composed backward lays it out again.
        return None
    needs = ctx.needs_input_grad[:4]
    need_x, need_w, need_b, need_r = needs
    act = ctx.activation
    want_dres = need_r and act != "none"
    out = fused(dy, x, weight, bias, residual, mean, var, ctx.eps, ctx.training, act,
                ctx.slope, need_w or need_b, need_x or want_dres, want_dres,
                ctx.channels_last, saved=ctx.backend_saved)
    if out is None:
        return None
    dx, sum_dz, sum_dz_xhat, dres = out
    return autograd_grads(needs, dy, dx, dres, sum_dz, sum_dz_xhat, weight, ctx.bias_dtype,
                          act)


try:
    # Function.apply is Python that, besides calling the C apply, prepares functorch
    # transforms (vmap, grad, ...): ~9 µs of the ~60 µs of torch's whole small batch norm
    # on the 2-core machine. Calls under a transform take the composed path instead (see
    # _composed), so _eager_apply calls the C apply directly; private names, so any change
    # falls back to Function.apply.
    _c_apply = torch._C._FunctionBase.__dict__["apply"].__get__(None, _EagerBatchNorm)
except (AttributeError, KeyError, TypeError):
    _c_apply = None
# (functorch's wrapped tensors exist only while a transform is active)
_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)
_tracing_state = torch._C._get_tracing_state
# (make_fx, FakeTensorMode, FlopCounterMode, ...: each sees only the torch ops it is handed)
_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 1)
_plain_dispatch = Tensor.__torch_dispatch__


def _eager_apply(input, weight, bias, residual, *rest):
    if _c_apply is None:
        return _EagerBatchNorm.apply(input, weight, bias, residual, *rest)
    return _c_apply(input, weight, bias, residual, *rest)


def needs_composed(input: Tensor | None = None) -> bool:
    """Whether the call runs under something our kernels cannot serve: a torch.func
    transform (vmap, grad, jvp, ...: its tensors have no storage to hand a kernel, and
    an autograd.Function would need rules for each), forward-mode AD (dual tensors),
    torch.jit.trace or a Python dispatch mode (make_fx, FakeTensorMode: they record or
    fake torch ops, and would miss a kernel's work, or hand it no storage), or an
    ``input`` of a tensor subclass that dispatches in Python (a FakeTensor, a DTensor)."""
    return (_transforms_active() or forward_ad._current_level >= 0
            or _tracing_state() is not None or _dispatch_modes() > 0
            or (input is not None and type(input).__torch_dispatch__ is not _plain_dispatch))


def kernels_take(dy: Tensor) -> bool:
    """Whether a backward of a forward run by the kernels may hand them ``dy`` too. Not a
    dy without storage (a cotangent that ``autograd.grad(..., is_grads_batched=True)``,
    ``jacobian(vectorize=True)`` or a vmap over a backward batched: the kernels read
    addresses), nor one under a transform or forward-mode AD (a dual cotangent, whose
    tangent the kernels would drop: forward-over-reverse Hessian-vector products)."""
    return _has_storage(dy) and not needs_composed(dy)


_has_storage = torch._C._has_storage


def _composed(input, weight, bias, residual, running_mean, running_var, eps, activation,
              slope, update) -> Tensor:
    """Batch norm in torch ops alone (the portable backend's, called directly): the same
    arithmetic as the kernels (shifted statistics, the wide mean split as
    :func:`centre_for_kernels` splits it, the eps = 0 rule), which autograd, forward-mode
    AD and torch.func differentiate, vmap batches and torch.jit.trace records like any
    torch code. Slower than the kernels: only for the calls :func:`needs_composed` picks.
    Under vmap a training step that updates running statistics fails, as torch's own
    batch norm does, before anything changes."""
    if update is not None and _batched_under_vmap(input) and not all(
            _batched_under_vmap(t) for t in update[:2] if t is not None):
        raise RuntimeError(
            "batch norm under torch.func.vmap got a batched input while its running "
            "statistics, which a training step updates in place, are not batched. Use "
            "eval mode (model.eval()) or track_running_stats=False inside vmap, or give "
            "each vmapped call its own running statistics (on our layers, set "
            "track_running_stats = False: torch.func.replace_all_batch_norm_modules_ does "
            "that for torch's layers only)")
    if update is not None and torch._is_functional_tensor(input) and not all(
            torch._is_functional_tensor(t) for t in update[:3] if t is not None):
        # (torch's own op has a rule of its own in the functionalization pass; ours would
        # meet an internal assert in the update, after num_batches_tracked had moved)
        raise RuntimeError(
            "batch norm under torch.func.functionalize got running statistics from outside "
            "the functionalized function, which a training step updates in place. Pass them "
            "in (torch.func.functional_call(model, {**params, **buffers}, args)), or use "
            "eval mode or track_running_stats=False there")
    try:
        input = densify(input)
        channels_last = is_channels_last(input)
    except RuntimeError:
        # vmap cannot answer for a memory format ("NYI: querying is_contiguous inside of
        # vmap for memory_format other than torch.contiguous_format"), and a layout is
        # not observable there: compute in the contiguous one.
        channels_last = False
    return _forward_by_primitives(input, weight, bias, residual, running_mean, running_var,
                                  eps, activation, slope, update, channels_last, portable,
                                  fast_update=False)[0]


def _batched_under_vmap(t: Tensor) -> bool:
    """Whether ``t`` is batched by a vmap at any level of functorch's wrappers (a
    ``grad`` inside a ``vmap`` wraps the batched tensor in another)."""
    f = torch._C._functorch
    while f.is_functorch_wrapped_tensor(t):
        if f.is_batchedtensor(t):
            return True
        t = f.get_unwrapped(t)
    return False


def densify(input: Tensor) -> Tensor:
    """The kernels need a dense input, so a 4-D/5-D one that is not but whose strides
    torch takes for channels_last (a channel slice or crop of a channels_last tensor, see
    ``portable.strided_channels_last``) is copied in that layout: y comes back
    channels_last, as torch's does for such a view."""
    if (input.dim() > 3 and not input.is_contiguous() and not is_channels_last(input)
            and portable.strided_channels_last(input)):
        return input.contiguous(memory_format=portable.CHANNELS_LAST[input.dim()])
    return input


def resolve_negative(t: Tensor | None) -> Tensor | None:
    """``t`` with its negation materialized where it is a negative view (``z.conj().imag``,
    ``torch._neg_view``): its memory holds the values' negations, and the kernels read
    memory by address. (The running buffers a training step updates are not passed
    here: the backends leave a negative view's update to torch ops, which write it.)"""
    return t.resolve_neg() if t is not None and t.is_neg() else t


def resolve_negatives(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """The tensors, negative views among them resolved (:func:`resolve_negative`); the
    calls without one, nearly all, pay one pass of ~0.07 µs checks."""
    for t in tensors:
        if t is not None and t.is_neg():
            return tuple(map(resolve_negative, tensors))
    return tensors


def _refuse_inference_tensors(input, weight, bias) -> None:
    """The error ``save_for_backward`` would raise, raised before the forward (and its
    running update) runs: a failed call changes nothing. (A check is ~0.2 µs: the bias
    is asked only without a weight, as both come from one module.)"""
    if (input.is_inference() or (weight is not None and weight.is_inference())
            or (weight is None and bias is not None and bias.is_inference())):
        raise RuntimeError(
            "Inference tensors cannot be saved for backward: an input, weight or bias "
            "made under torch.inference_mode() needs a gradient here. Make a normal "
            "tensor of it with .clone() outside inference_mode, or run the call under "
            "torch.no_grad() or torch.inference_mode()")


def _all_inference(*tensors) -> bool:
    """Every tensor given (None aside) was made under torch.inference_mode(): autograd
    never sees them, so torch's evaluation of them outside it records no graph (in
    training it raises, as :func:`_refuse_inference_tensors` does)."""
    return all(t is None or t.is_inference() for t in tensors)


def saveable_residual(residual: Tensor) -> Tensor:
    """The residual a fused activation keeps to recompute its input in backward, or a
    normal copy of it where it was made under inference_mode (autograd cannot save such
    a tensor outside it): torch's add then activation never saves it, so it works there."""
    if residual.is_inference() and not torch.is_inference_mode_enabled():
        return residual.clone()
    return residual


def refuse_inference_buffers(update) -> None:
    """torch's error for an in-place update of an inference tensor outside inference mode:
    our eager running update writes by address on the CPU, past torch's own check. Each
    of the three buffers is asked: through the functional form they need not come
    together from one module."""
    running_mean, running_var, num_batches_tracked, _ = update
    if (((running_mean is not None and running_mean.is_inference())
         or (running_var is not None and running_var.is_inference())
         or (num_batches_tracked is not None and num_batches_tracked.is_inference()))
            and not torch.is_inference_mode_enabled()):
        raise RuntimeError(
            "Inplace update to inference tensor outside InferenceMode is not allowed: the "
            "running statistics were made under torch.inference_mode(). Build the layer "
            "outside inference_mode, or run this training step under it")


def batch_norm(input, weight, bias, residual, running_mean, running_var, eps, activation,
               slope, update=None) -> Tensor:
    """Local batch norm of an (N, C, *) input: y, differentiable in input, weight, bias
    and residual. See :func:`batch_norm_op`. ``update``: None, or, in training,
    ``(running_mean, running_var, num_batches_tracked, momentum)`` to move towards the
    batch statistics (:func:`update_running_stats`; inside the kernels where the
    backend can)."""
    compiling = torch.compiler.is_compiling()
    if update is not None and not compiling:
        refuse_inference_buffers(update)
    # Compiling, dynamo answers for the transforms from what it traces: a torch.func jvp
    # or grad inside a compiled function reaches here, and our custom op has no rules
    # for them (a compiled jvp's tangent came back zero).
    if _transforms_active() if compiling else needs_composed(input):
        return _composed(input, weight, bias, residual, running_mean, running_var, eps,
                         activation, slope, update)
    input = densify(input)
    # (compiling, dynamo cannot trace is_neg, and AOTAutograd hands the op values)
    if not compiling:
        input, weight, bias, residual, running_mean, running_var = resolve_negatives(
            input, weight, bias, residual, running_mean, running_var)
    if not compiling and torch.is_grad_enabled() and (
            input.requires_grad or (weight is not None and weight.requires_grad)
            or (bias is not None and bias.requires_grad)
            or (residual is not None and residual.requires_grad)) and not (
            update is None and running_mean is not None
            and _all_inference(input, weight, bias, residual, running_mean, running_var)):
        _refuse_inference_tensors(input, weight, bias)
        if residual is not None and activation != "none":
            residual = saveable_residual(residual)
        return _eager_apply(input, weight, bias, residual, running_mean, running_var, eps,
                            activation, slope, update)
    channels_last = is_channels_last(input)
    if not compiling:
        # nothing to differentiate: autograd.Function.apply alone costs about as much as
        # torch's whole batch norm on a small input (~15-40 µs on the 2-core CPU machine)
        return _forward(input, weight, bias, residual, running_mean, running_var, eps,
                        activation, slope, update, channels_last, need_stats=False)[0]
    x = to_kernel_view(input, channels_last)
    r = to_kernel_view(residual, channels_last) if residual is not None else None
    y, mean, var = batch_norm_op(x, weight, bias, r, running_mean, running_var, eps,
                                 activation, slope)
    if update is not None:
        _update_from_batch(update, mean, var, x)
    return from_kernel_view(y, input.shape, channels_last)
