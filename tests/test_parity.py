"""Parity with ``torch.nn.BatchNorm1d/2d/3d``, step by step, on every backend.

Each case builds our layer and torch's with the same arguments and the same random
parameters and running statistics, runs several training steps on fresh random data and
then an evaluation step, and compares after every step: the output (values, dtype and
memory format), the gradients of input, weight and bias, the running statistics and
``num_batches_tracked``. The fused activations and residual are compared with the float64
reference and with torch's layer followed by torch's activation; half inputs with float32
parameters (as autocast produces) with the reference on the same half input.

Where torch's CUDA layer disagrees with its CPU layer, torch on the CPU is the oracle.
On the H200 on 2026-12-04 (``benchmarks/torch_cuda_quirks.py``), in fp32: cuDNN left
strided running buffers (functional API) unchanged, and with channels-last input a +inf
in dy gave NaN weight and bias gradients (cuDNN) and a +inf in x a NaN running mean,
where the CPU gives ±inf.
"""

import contextlib
import copy
import itertools

import numpy as np
import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import reference as ref
from batchnorm.functional import activation_module
from conftest import make_input, np64, torch_batchnorm
from tolerances import assert_close

SHAPES = {"1d-NC": (6, 3), "1d-NCL": (4, 3, 5), "2d": (3, 3, 4, 5), "3d": (2, 3, 3, 2, 4)}
CLASS = {"1d-NC": "BatchNorm1d", "1d-NCL": "BatchNorm1d", "2d": "BatchNorm2d",
         "3d": "BatchNorm3d"}
PARAMS = {"affine": dict(affine=True), "nobias": dict(affine=True, bias=False),
          "noaffine": dict(affine=False)}
# (track_running_stats, momentum); momentum does nothing without running statistics.
TRACKING = [(True, 0.1), (True, None), (True, 0.0), (True, 1.0), (False, 0.1)]
TRAIN_STEPS = 3


def _grid():
    """Every rank, parameter set, dtype and layout with the default momentum; the other
    momenta and track_running_stats=False on contiguous data (they only change C-sized
    arithmetic), each with a different parameter set."""
    cases = []
    for rank, params, dtype, layout in itertools.product(
            SHAPES, PARAMS, (torch.float64, torch.float32),
            ("contiguous", "channels_last", "strided")):
        if not (layout == "channels_last" and rank == "1d-NC"):
            cases.append((rank, params, True, 0.1, dtype, layout))
    others = [("affine", True, None), ("noaffine", True, 0.0), ("nobias", True, 1.0),
              ("affine", False, 0.1)]
    for rank, (params, track, momentum), dtype in itertools.product(
            SHAPES, others, (torch.float64, torch.float32)):
        cases.append((rank, params, track, momentum, dtype, "contiguous"))
    cases += [("2d", "affine", True, None, torch.float32, "channels_last"),
              ("3d", "noaffine", False, 0.1, torch.float64, "channels_last"),
              ("1d-NCL", "affine", True, None, torch.float32, "strided")]
    params = []
    for rank, p, track, momentum, dtype, layout in cases:
        # The Triton interpreter is slow: it runs float32 with the usual configurations.
        light = dtype == torch.float32 and p == "affine" and layout != "strided"
        params.append(pytest.param(
            rank, p, track, momentum, dtype, layout, light,
            id=f"{rank}-{p}-track{int(track)}-m{momentum}-{str(dtype)[6:]}-{layout}"))
    return params


def _pair(rank, params, track, momentum, dtype, device, gen, eps=1e-5):
    """Our layer and torch's, with equal random parameters and running statistics."""
    kwargs = dict(eps=eps, momentum=momentum, track_running_stats=track, device=device,
                  dtype=dtype, **PARAMS[params])
    ours = getattr(batchnorm, CLASS[rank])(SHAPES[rank][1], **kwargs)
    theirs = torch_batchnorm(getattr(nn, CLASS[rank]), SHAPES[rank][1], **kwargs)
    c = SHAPES[rank][1]
    with torch.no_grad():
        for name in ("weight", "bias"):
            if getattr(theirs, name) is not None:
                value = torch.randn(c, generator=gen, dtype=torch.float64) * 0.5 + 1.0
                getattr(theirs, name).copy_(value)
                getattr(ours, name).copy_(value)
        if track:
            rm = torch.randn(c, generator=gen, dtype=torch.float64)
            rv = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
            for m in (ours, theirs):
                m.running_mean.copy_(rm)
                m.running_var.copy_(rv)
    return ours, theirs


def _step(module, x_leaf, x, dy):
    """Forward and backward of one step: (y, dx, dweight, dbias), gradients reset first."""
    module.zero_grad(set_to_none=True)
    if x_leaf.grad is not None:
        x_leaf.grad = None
    y = module(x)
    y.backward(dy)
    grads = [x_leaf.grad] + [None if p is None else p.grad for p in (module.weight, module.bias)]
    return (y, *grads)


def _assert_state_equal(ours, theirs, dtype, msg):
    for name in ("running_mean", "running_var"):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert (a is None) == (b is None), f"{msg}: {name} None-ness differs"
        if a is not None:
            assert a.dtype == b.dtype
            assert_close(a, b, dtype, msg=f"{msg}: {name}")
    a, b = ours.num_batches_tracked, theirs.num_batches_tracked
    assert (a is None) == (b is None)
    if a is not None:
        assert a.dtype == torch.long and a.item() == b.item(), f"{msg}: num_batches_tracked"


def _expected_strides(x):
    """Our output keeps a dense input's layout; a non-dense input gives a contiguous one."""
    if x.is_contiguous() or x.dim() < 3:
        return torch.empty(x.shape).stride()
    if x.movedim(1, -1).is_contiguous():
        return x.stride()
    return torch.empty(x.shape).stride()


@pytest.mark.parametrize("rank,params,track,momentum,dtype,layout,light", _grid())
def test_matches_torch_over_steps(backend, gen, rank, params, track, momentum, dtype, layout,
                                  light):
    if backend.interpreted and not light:
        pytest.skip("Triton interpreter: only the light subset of the grid")
    ours, theirs = _pair(rank, params, track, momentum, dtype, backend.device, gen)
    shape = SHAPES[rank]
    # Gradient sums grow with the count; allow for float32 summation order.
    grad_scale = 1.0 if dtype == torch.float64 else 10.0
    for step in range(TRAIN_STEPS + 1):
        if step == TRAIN_STEPS:
            ours.eval()
            theirs.eval()
        leaf, x = make_input(shape, layout, dtype, backend.device, gen, mean=step)
        leaf_t = leaf.detach().clone().requires_grad_()
        x_t = leaf_t.as_strided(x.shape, x.stride(), x.storage_offset())
        dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(backend.device)
        y, dx, dw, db = _step(ours, leaf, x, dy)
        yt, dxt, dwt, dbt = _step(theirs, leaf_t, x_t, dy)
        msg = f"step {step} ({'eval' if step == TRAIN_STEPS else 'train'})"
        assert y.dtype == dtype and y.shape == yt.shape
        assert y.stride() == _expected_strides(x), f"{msg}: output layout {y.stride()}"
        assert_close(y, yt, dtype, msg=f"{msg}: output")
        assert_close(dx, dxt, dtype, scale=grad_scale, msg=f"{msg}: grad input")
        for ga, gb, name in ((dw, dwt, "weight"), (db, dbt, "bias")):
            assert (ga is None) == (gb is None), f"{msg}: grad {name} None-ness"
            if ga is not None:
                assert_close(ga, gb, dtype, scale=grad_scale, msg=f"{msg}: grad {name}")
        _assert_state_equal(ours, theirs, dtype, msg)


# ---------------------------------------------------------------------------------------
# Fused activation and residual

ACTS = ("none", "relu", "leaky_relu", "silu", "gelu", "gelu_tanh", "sigmoid", "tanh")


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_activation_matches_reference_and_torch(backend, gen, activation,
                                                      with_residual, training):
    if backend.interpreted and (not training or with_residual != (activation in (
            "relu", "silu", "gelu_tanh"))):
        pytest.skip("Triton interpreter: each activation once, in training")
    device, dtype, shape = backend.device, torch.float64, (3, 4, 3, 5)
    slope = 0.2
    act = activation_module(activation, slope)
    ours = batchnorm.BatchNorm2d(4, activation=act, device=device, dtype=dtype)
    theirs = nn.BatchNorm2d(4, device=device, dtype=dtype)
    with torch.no_grad():
        w = torch.randn(4, generator=gen, dtype=dtype) * 0.5 + 1
        b = torch.randn(4, generator=gen, dtype=dtype) * 0.5
        rm = torch.randn(4, generator=gen, dtype=dtype)
        rv = torch.rand(4, generator=gen, dtype=dtype) + 0.5
        for m in (ours, theirs):
            m.weight.copy_(w)
            m.bias.copy_(b)
            m.running_mean.copy_(rm)
            m.running_var.copy_(rv)
            m.train(training)
    x = (torch.randn(shape, generator=gen, dtype=dtype) * 2 + 1).to(device).requires_grad_()
    r = (torch.randn(shape, generator=gen, dtype=dtype).to(device).requires_grad_()
         if with_residual else None)
    dy = torch.randn(shape, generator=gen, dtype=dtype).to(device)

    y = ours(x, r)
    grads = torch.autograd.grad(y, [x, ours.weight, ours.bias] + ([r] if r is not None else []),
                                dy)

    # Oracle 1: the float64 reference.
    yr, cache = ref.forward(np64(x), np64(w), np64(b), training=training,
                            running_mean=np64(rm), running_var=np64(rv), eps=ours.eps,
                            activation=activation, slope=slope, residual=np64(r))
    gr = ref.backward(np64(dy), cache)
    assert_close(y, torch.from_numpy(yr).to(device), dtype)
    expected = [gr["dx"], gr["dweight"], gr["dbias"]] + ([gr["dresidual"]] if r is not None else [])
    for got, want, name in zip(grads, expected, ("x", "weight", "bias", "residual")):
        assert_close(got, torch.from_numpy(want).to(device), dtype, msg=f"grad {name}")

    # Oracle 2: torch's layer, the residual add and torch's activation, unfused.
    yt = theirs(x) + (r if r is not None else 0)
    yt = act(yt) if act is not None else yt
    extra = [r] if r is not None else []
    grads_t = torch.autograd.grad(yt, [x, theirs.weight, theirs.bias] + extra, dy)
    assert_close(y, yt, dtype)
    for got, want in zip(grads, grads_t):
        assert_close(got, want, dtype)
    if training:
        assert_close(ours.running_mean, theirs.running_mean, dtype)
        assert_close(ours.running_var, theirs.running_var, dtype)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_residual_in_another_layout(backend, gen, layout):
    """The residual's layout need not match the input's."""
    shape = (2, 3, 4, 3)
    _, x = make_input(shape, "channels_last", torch.float64, backend.device, gen)
    r_leaf, r = make_input(shape, layout, torch.float64, backend.device, gen)
    bn = batchnorm.BatchNorm2d(3, activation="relu", device=backend.device, dtype=torch.float64)
    y = bn(x.detach(), r)
    y.backward(torch.ones_like(y))
    yr, cache = ref.forward(np64(x), np64(bn.weight), np64(bn.bias), activation="relu",
                            residual=np64(r))
    assert_close(y, torch.from_numpy(yr).to(y.device), torch.float64)
    dres = torch.from_numpy(ref.backward(np.ones(shape), cache)["dresidual"])
    got = r_leaf.grad if r_leaf is r else r_leaf.grad[..., ::2]
    assert_close(got, dres.to(got.device), torch.float64)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_strided_parameters_and_buffers(backend, gen, layout, training):
    """Through the functional API weight, bias and the running buffers may be strided
    views: the kernels must not read them as if they were contiguous. Torch on the CPU
    is the oracle (the module docstring)."""
    shape = (3, 4, 3, 5)
    _, x = make_input(shape, layout, torch.float32, backend.device, gen)
    c = shape[1]
    params = torch.randn(c, 2, generator=gen).to(backend.device)
    buffers = torch.rand(c, 4, generator=gen).to(backend.device) + 0.5
    ours = [x.detach().clone().requires_grad_(), params.clone().requires_grad_(),
            buffers.clone()]
    theirs = [t.detach().cpu().clone().requires_grad_(t.requires_grad) for t in ours]
    outs = []
    for fn, (xi, p, buf) in ((batchnorm.functional.batch_norm, ours),
                             (torch.nn.functional.batch_norm, theirs)):
        # weight, bias, running mean and var: views of stride 2 and 4
        outs.append(fn(xi, buf[:, 0], buf[:, 2], p[:, 0], p[:, 1], training=training))
    assert ours[1][:, 0].stride() == (2,) and ours[2][:, 0].stride() == (4,)
    assert_close(outs[0].cpu(), outs[1], torch.float32)
    assert_close(ours[2].cpu(), theirs[2], torch.float32)  # the running statistics
    dy = torch.randn(shape, generator=gen)
    for y in outs:
        y.backward(dy.to(y.device))
    assert_close(ours[0].grad.cpu(), theirs[0].grad, torch.float32, scale=4)
    assert_close(ours[1].grad.cpu(), theirs[1].grad, torch.float32, scale=10)


# ---------------------------------------------------------------------------------------
# Half inputs with float32 parameters (autocast style)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", ["none", "silu"])
def test_half_input_float32_params(backend, gen, dtype, layout, activation):
    if backend.interpreted and activation != "none":
        pytest.skip("Triton interpreter: the activation is covered in float32")
    shape = (4, 3, 4, 4)
    leaf, x = make_input(shape, layout, dtype, backend.device, gen)
    bn = batchnorm.BatchNorm2d(3, activation=activation, device=backend.device)  # float32
    with torch.no_grad():
        bn.weight.copy_(torch.randn(3, generator=gen) * 0.5 + 1)
        bn.bias.copy_(torch.randn(3, generator=gen) * 0.5)
    r = torch.randn(shape, generator=gen).to(dtype).to(backend.device)
    dy = torch.randn(shape, generator=gen).to(dtype).to(backend.device)
    y = bn(x, r)
    y.backward(dy)
    assert y.dtype == dtype and leaf.grad.dtype == dtype
    assert bn.weight.grad.dtype == torch.float32 and bn.running_mean.dtype == torch.float32
    assert y.stride() == x.stride()

    yr, cache = ref.forward(np64(x), np64(bn.weight), np64(bn.bias), activation=activation,
                            residual=np64(r))
    gr = ref.backward(np64(dy), cache)
    dev = backend.device
    assert_close(y, torch.from_numpy(yr).to(dev), dtype)
    assert_close(leaf.grad, torch.from_numpy(gr["dx"]).to(dev), dtype, scale=2)
    # Parameter gradients are float32 sums of exact products of half values.
    assert_close(bn.weight.grad, torch.from_numpy(gr["dweight"]).to(dev), dtype)
    assert_close(bn.bias.grad, torch.from_numpy(gr["dbias"]).to(dev), dtype)
    rm, rv, nbt = ref.update_running(np.zeros(3), np.ones(3), 0, cache["mean"], cache["var"],
                                     cache["count"], 0.1)
    assert_close(bn.running_mean, torch.from_numpy(rm).to(dev), torch.float32)
    assert_close(bn.running_var, torch.from_numpy(rv).to(dev), torch.float32)
    assert bn.num_batches_tracked.item() == nbt == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_half_layer_half_running_buffers(backend, gen, dtype, layout):
    """A ``.half()``/``.bfloat16()`` layer: parameters and running buffers in the half
    dtype, two training steps then eval, against the float64 reference rounded where the
    layer stores."""
    if backend.interpreted and dtype == torch.bfloat16:
        pytest.skip("Triton interpreter: its float64/float32 -> bfloat16 conversions are not "
                    "a GPU's (see README, GPU backend); a GPU runs this case")
    shape = (6, 3, 4, 4)
    bn = batchnorm.BatchNorm2d(3, device=backend.device, dtype=dtype)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(3, generator=gen) * 0.5 + 1)
        bn.bias.copy_(torch.randn(3, generator=gen) * 0.5)
    rm, rv = np.zeros(3), np.ones(3)
    for step in range(2):
        _, x = make_input(shape, layout, dtype, backend.device, gen)
        y = bn(x)
        yr, cache = ref.forward(np64(x), np64(bn.weight), np64(bn.bias))
        assert y.dtype == dtype and bn.running_mean.dtype == dtype
        assert_close(y, torch.from_numpy(yr).to(backend.device), dtype)
        rm, rv, _ = ref.update_running(rm, rv, step, cache["mean"], cache["var"],
                                       cache["count"], 0.1)
        # the reference keeps float64 buffers: compare, then carry on from what the layer
        # stored, as the layer does
        assert_close(bn.running_mean, torch.from_numpy(rm).to(backend.device), dtype)
        assert_close(bn.running_var, torch.from_numpy(rv).to(backend.device), dtype)
        rm, rv = np64(bn.running_mean), np64(bn.running_var)
    assert bn.num_batches_tracked.item() == 2
    bn.eval()
    y = bn(x)
    yr, _ = ref.forward(np64(x), np64(bn.weight), np64(bn.bias), training=False,
                        running_mean=rm, running_var=rv)
    assert_close(y, torch.from_numpy(yr).to(backend.device), dtype)


# ---------------------------------------------------------------------------------------
# Empty batches


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4), (0, 3, 2, 2), (2, 3, 0, 4)])
def test_empty_batch_like_torch(backend, shape):
    """No values: an empty output, zero parameter gradients, the running statistics as
    they were and, as in torch, the batch counted in num_batches_tracked."""
    cls = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d"}[len(shape)]
    ours = getattr(batchnorm, cls)(3, momentum=None, device=backend.device)
    theirs = getattr(nn, cls)(3, momentum=None, device=backend.device)
    for m in (ours, theirs):
        x = torch.randn(shape, device=backend.device, requires_grad=True)
        y = m(x)
        y.sum().backward()
        assert y.shape == x.shape
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 1
    assert torch.equal(ours.running_mean, theirs.running_mean)
    assert torch.equal(ours.running_var, theirs.running_var)
    assert torch.equal(ours.weight.grad, theirs.weight.grad)
    assert torch.equal(ours.bias.grad, theirs.bias.grad)


# ---------------------------------------------------------------------------------------
# Views of channels_last tensors that are not dense


@pytest.mark.parametrize("view", ["channel_slice", "crop", "every_other", "3d_channel_slice",
                                  "every_other_of_odd_width", "3d_every_other_of_odd_depth"])
def test_non_dense_channels_last_views_keep_their_layout_like_torch(backend, gen, view):
    """A channel split (``chunk``), a crop or a strided slice of a channels_last tensor:
    y and dx in channels_last, as torch gives them, with torch's values. Except where
    torch reads the strides as not channels_last (c10's rule: every other column of a
    row of 5 leaves the rows 30 apart for 3 columns of stride 12): contiguous, as torch's
    (the stride order alone said channels_last)."""
    three_d = view.startswith("3d")
    shape, fmt = ((2, 6, 3, 4, 2), torch.channels_last_3d) if three_d else (
        (2, 6, 4, 6), torch.channels_last)
    if view.endswith("odd_width"):
        shape = (2, 6, 4, 5)
    if view.endswith("odd_depth"):
        shape = (2, 6, 3, 4, 5)
    base = torch.randn(shape, generator=gen, dtype=torch.float64).to(backend.device)
    base = base.to(memory_format=fmt)
    x = {"channel_slice": base[:, :3], "crop": base[:, 3:, 1:3],
         "every_other": base[:, 3:, :, ::2], "3d_channel_slice": base[:, :3],
         "every_other_of_odd_width": base[:, 3:, :, ::2],
         "3d_every_other_of_odd_depth": base[:, 3:, ..., ::2]}[view]
    if "odd" in view:
        fmt = torch.contiguous_format
    x = x.detach().requires_grad_()
    cls = "BatchNorm3d" if x.dim() == 5 else "BatchNorm2d"
    ours = getattr(batchnorm, cls)(3, device=backend.device, dtype=torch.float64)
    theirs = getattr(nn, cls)(3, device=backend.device, dtype=torch.float64)
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(backend.device)
    y, expected = ours(x), theirs(x)
    dx, = torch.autograd.grad(y, x, dy)
    dx_expected, = torch.autograd.grad(expected, x, dy)
    assert y.stride() == expected.stride() and y.is_contiguous(memory_format=fmt)
    assert dx.stride() == dx_expected.stride()
    assert_close(y, expected, torch.float64)
    assert_close(dx, dx_expected, torch.float64)
    assert_close(ours.running_var, theirs.running_var, torch.float64)


# ---------------------------------------------------------------------------------------
# A corrupted running variance


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nan_or_negative_running_var_gives_nan_like_torch(backend, gen, grad, dtype, layout):
    """Evaluation with running_var NaN or negative gives NaN on those channels, as torch
    does (the zero-variance rule covers var + eps == 0 only: it must not turn a model
    whose statistics went bad into one that quietly outputs its bias)."""
    ours = batchnorm.BatchNorm2d(4, device=backend.device, dtype=dtype).eval()
    theirs = nn.BatchNorm2d(4, device=backend.device, dtype=dtype).eval()
    for m in (ours, theirs):
        with torch.no_grad():
            m.running_var.copy_(torch.tensor([float("nan"), -1.0, 0.0, 2.0]))
            m.eps = 0.0 if m is ours else 1e-30  # torch refuses eps=0; ours: channel 2 -> bias
    _, x = make_input((3, 4, 2, 5), layout, dtype, backend.device, gen)
    with torch.set_grad_enabled(grad):
        y, expected = ours(x), theirs(x)
    assert y[:, :2].isnan().all() and expected[:, :2].isnan().all()
    assert torch.equal(y[:, 2], torch.zeros_like(y[:, 2]))  # bias 0: the eps = 0 rule
    assert_close(y[:, 3], expected[:, 3], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_infinite_running_mean_gives_torchs_infinities(backend, gen, dtype, layout):
    """Evaluation with a running mean of ±inf (a float16 model's running update that
    overflowed): torch gives ∓inf outputs and ∓inf weight gradients on that channel. The
    cpu kernels split the mean into its acc-dtype rounding and the remainder, inf − inf:
    every output of the channel was NaN (found by a probe of 16-bit extremes)."""
    ours = batchnorm.BatchNorm2d(3, device=backend.device).eval()
    theirs = nn.BatchNorm2d(3, device=backend.device).eval()
    for m in (ours, theirs):
        with torch.no_grad():
            m.running_mean.copy_(torch.tensor([float("inf"), float("-inf"), 0.5]))
    _, x = make_input((2, 3, 2, 3), layout, dtype, backend.device, gen)
    x.requires_grad_()
    xt = x.detach().float().requires_grad_()
    y, expected = ours(x), theirs(xt)
    assert torch.equal(y[:, :2].float(), expected[:, :2])
    assert_close(y[:, 2].float(), expected[:, 2], dtype)
    dy = torch.ones_like(y)
    y.backward(dy)
    expected.backward(dy.float())
    assert_close(x.grad.float(), xt.grad, dtype)
    assert torch.equal(ours.weight.grad[:2], theirs.weight.grad[:2])


@pytest.mark.parametrize("eps", [1e39, float("inf")], ids=["1e39", "inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_eps_over_float32s_range_gives_torchs_bias(backend, gen, eps, dtype, training):
    """An eps over float32's largest value makes invstd 0 in torch's float32 arithmetic:
    y is the bias, x's gradient 0. It reached the triton backend's float32 and float16
    kernels as the float32 pair (inf, -inf), whose sum is NaN: every output was NaN
    (found by a probe of the backend)."""
    x = torch.randn(4, 3, 5, generator=gen).to(dtype).to(backend.device).requires_grad_()
    dy = torch.randn(4, 3, 5, generator=gen).to(dtype).to(backend.device)
    w, b = torch.rand(3, generator=gen) + 0.5, torch.randn(3, generator=gen)
    rm, rv = torch.randn(3, generator=gen), torch.rand(3, generator=gen) + 0.5
    got, want = [], []
    for impl, out in ((batchnorm.functional.batch_norm, got),
                      (torch.nn.functional.batch_norm, want)):
        xi = x if impl is not torch.nn.functional.batch_norm else \
            x.detach().float().requires_grad_()
        wi, bi = w.to(backend.device).requires_grad_(), b.to(backend.device).requires_grad_()
        rmi, rvi = rm.to(backend.device), rv.to(backend.device)
        y = impl(xi, rmi, rvi, wi, bi, training, 0.1, eps)
        y.backward(dy.to(y.dtype))
        out += [y.detach().float(), xi.grad.float(), wi.grad, bi.grad, rmi, rvi]
    for name, a, e in zip(("y", "dx", "dweight", "dbias", "running_mean", "running_var"),
                          got, want):
        assert_close(a, e, dtype if name in ("y", "dx") else torch.float32, msg=name)


# ---------------------------------------------------------------------------------------
# An infinite upstream gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["inf", "-inf"])
def test_infinite_gradient_gives_torchs_parameter_grads(backend, gen, dtype, layout, sign):
    """An inf in dy (a loss that overflowed under float16 scaling) gives ±inf weight and
    bias gradients on its channel, as torch's, and leaves the other channels' gradients
    as they are. Ours were NaN: Σdz·x̂ is summed around the mean the kernels subtract and
    corrected by delta·Σdz (``ops.sum_dz_xhat_from_kernels``), inf − inf or 0·inf.
    Torch on the CPU is the oracle (the module docstring)."""
    ours = batchnorm.BatchNorm2d(4, device=backend.device, dtype=dtype)
    theirs = nn.BatchNorm2d(4, dtype=dtype)
    _, x = make_input((3, 4, 2, 5), layout, dtype, "cpu", gen)
    dy = torch.randn(x.shape, generator=gen, dtype=dtype)
    dy[1, 2, 1, 3] = sign * float("inf")
    grads = []
    for m in (ours, theirs):
        x_ = x.detach().to(m.weight.device).requires_grad_()
        m(x_).backward(dy.to(x_.device))
        grads.append((x_.grad.cpu(), m.weight.grad.cpu(), m.bias.grad.cpu()))
    (dx, wg, bg), (dx_t, wg_t, bg_t) = grads
    assert wg_t[2].isinf() and bg_t[2].isinf()  # the case torch defines
    assert torch.equal(wg[2], wg_t[2]) and torch.equal(bg[2], bg_t[2])
    keep = [0, 1, 3]
    assert_close(wg[keep], wg_t[keep], dtype)
    assert_close(bg[keep], bg_t[keep], dtype)
    assert_close(dx[:, keep], dx_t[:, keep], dtype)


# ---------------------------------------------------------------------------------------
# A NaN or infinite value in x or dy: torch's NaNs, infs and finite values, place by place


def _assert_same_values(actual, expected, dtype):
    """NaN where ``expected`` has NaN, the same infinities, the finite values close."""
    assert torch.equal(actual.isnan(), expected.isnan())
    inf = expected.isinf()
    assert torch.equal(actual.isinf(), inf) and torch.equal(actual[inf], expected[inf])
    finite = expected.isfinite()
    assert_close(actual[finite], expected[finite], dtype)


@pytest.mark.parametrize("where,value", [("x", "nan"), ("x", "inf"), ("x", "-inf"),
                                         ("dy", "nan"), ("dy", "inf"), ("dy", "-inf")])
@pytest.mark.parametrize("activation", [None, "relu", "leaky_relu", "sigmoid"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_a_nonfinite_value_gives_torchs_outputs_and_gradients(backend, gen, where, value,
                                                               activation, training, layout):
    """One NaN or ±inf in channel 2 of x or dy (a NaN in dy where the unit is off, an inf
    where it is on), against torch's layer then activation. Three ways ours differed:
    - relu's backward selects (torch's threshold_backward): a NaN pre-activation passes
      dy, and a NaN dy where the unit is off gives 0. The portable and Triton backends
      multiplied dy by a 0/1 mask: the channel's bias gradient was 0 or NaN;
    - in evaluation x's gradient is γ·r·dz whatever x is. The CPU kernels' x − mean
      times the zero training term made it NaN at a non-finite x;
    - an inf in dy reaches every dx of its channel in training, ±inf or NaN by the sign
      of x̂ in torch's. The cpu and Triton kernels' Σdz, corrected by shift·Σdz·x̂ for the
      float64 mean, was NaN (0·inf or inf − inf): every dx NaN.
    Torch on the CPU is the oracle (the module docstring)."""
    dtype = torch.float32
    ours = batchnorm.BatchNorm2d(4, activation=activation, device=backend.device,
                                 dtype=dtype).train(training)
    theirs = nn.BatchNorm2d(4, dtype=dtype).train(training)
    act = activation_module(activation or "none", 0.01) or nn.Identity()
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.copy_(torch.linspace(0.5, 1.5, 4))
            m.bias.copy_(torch.linspace(-0.3, 0.3, 4))
            m.running_mean.copy_(torch.linspace(-0.2, 0.2, 4))
            m.running_var.copy_(torch.linspace(0.5, 1.5, 4))
    _, x = make_input((3, 4, 2, 5), layout, dtype, "cpu", gen)
    dy = torch.randn(x.shape, generator=gen, dtype=dtype)
    x, bad = x.detach().clone(memory_format=torch.preserve_format), float(value)
    if where == "x":
        x[1, 2, 1, 3] = bad
    else:  # a NaN where the unit is off (the smallest pre-activation of channel 2), an
        # inf where it is on (the largest)
        with torch.no_grad():
            z = copy.deepcopy(theirs)(x)[:, 2].flatten()  # (theirs' statistics stay)
        spot = divmod((z.argmin() if value == "nan" else z.argmax()).item(), 10)
        dy[spot[0], 2, spot[1] // 5, spot[1] % 5] = bad
    got = []
    for m in (ours, theirs):
        x_ = x.to(m.weight.device).clone(memory_format=torch.preserve_format)
        x_.requires_grad_()
        y = m(x_) if m is ours else act(m(x_))
        y.backward(dy.to(x_.device))
        got.append([t.detach().cpu() for t in (y, x_.grad, m.weight.grad, m.bias.grad,
                                               m.running_mean, m.running_var)])
    for a, b in zip(*got):
        _assert_same_values(a, b, dtype)


# ---------------------------------------------------------------------------------------
# Gradients asked for only some inputs (frozen parameters, a first layer's input)


@pytest.mark.parametrize("wanted", ["x", "weight", "bias", "residual", "weight+residual"])
def test_partial_gradients(backend, gen, wanted):
    shape = (3, 3, 2, 4)
    ours = batchnorm.BatchNorm2d(3, activation="silu", device=backend.device,
                                 dtype=torch.float64)
    theirs = nn.BatchNorm2d(3, device=backend.device, dtype=torch.float64)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1).to(backend.device)
    r = torch.randn(shape, generator=gen, dtype=torch.float64).to(backend.device)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(backend.device)
    got = []
    for m in (ours, theirs):
        with torch.no_grad():
            m.weight.copy_(torch.linspace(0.5, 1.5, 3))
            m.bias.copy_(torch.linspace(-0.3, 0.3, 3))
        leaves = {"x": x.clone(), "residual": r.clone(), "weight": m.weight, "bias": m.bias}
        for name, t in leaves.items():
            t.requires_grad_(name in wanted.split("+"))
        if m is ours:
            y = m(leaves["x"], leaves["residual"])
        else:
            y = nn.functional.silu(m(leaves["x"]) + leaves["residual"])
        needed = [leaves[n] for n in wanted.split("+")]
        got.append(torch.autograd.grad(y, needed, dy))
    for a, b in zip(*got):
        assert_close(a, b, torch.float64)


# ---------------------------------------------------------------------------------------
# What autograd and version counters see (found by a probe of aliasing and in-place use)


@pytest.mark.parametrize("activation", ["none", "relu"])
def test_the_bias_changed_in_place_before_backward_as_torch(backend, gen, activation):
    """torch keeps no bias for backward: an optimizer step on the bias between forward
    and backward (the weight frozen, say) is fine. Ours kept it always, and raised
    "modified by an inplace operation"; with a fused activation the bias is needed
    (the pre-activation is recomputed), and that error is right, as the residual's is."""
    x = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64).to(backend.device)
    dy = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(backend.device)
    grads = []
    for cls in (batchnorm.BatchNorm2d, nn.BatchNorm2d):
        kw = {"activation": activation} if cls is batchnorm.BatchNorm2d else {}
        m = cls(3, device=backend.device, dtype=torch.float64, **kw)
        m.weight.requires_grad_(False)
        x_ = x.clone().requires_grad_()
        y = m(x_)
        with torch.no_grad():
            m.bias.add_(1)
        if cls is batchnorm.BatchNorm2d and activation != "none":
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                y.backward(dy)
            return
        y.backward(dy)
        grads.append((x_.grad, m.bias.grad))
    for a, b in zip(*grads):
        assert_close(a, b, torch.float64)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_the_residual_gradient_does_not_share_the_callers_gradient(backend, gen, layout):
    """Without an activation d(bn(x) + r)/dr is dy: torch's add hands on dy itself, which
    autograd copies into r.grad while the caller still holds it. The portable path handed
    on a view, which became r.grad as it was: changing dy afterwards changed r.grad."""
    x = make_input((2, 3, 4, 4), layout, torch.float32, backend.device, gen)[1]
    r = torch.zeros_like(x).requires_grad_()
    dy = make_input((2, 3, 4, 4), layout, torch.float32, backend.device, gen)[1].detach()
    m = batchnorm.BatchNorm2d(3, device=backend.device)
    m(x, residual=r).backward(dy)
    assert_close(r.grad, dy, torch.float32)
    assert r.grad.untyped_storage().data_ptr() != dy.untyped_storage().data_ptr()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("which", ["input", "residual", "weight", "bias", "running_mean",
                                   "running_var", "dy"])
def test_a_negative_view_is_read_as_its_values(backend, gen, which, training):
    """A negative view (``z.conj().imag``, ``torch._neg_view``) holds its values'
    negations in memory: the fused kernels read by address, and took the negations (y
    off by up to 9.5 on a (4,3,5,5) input), and updated negative running buffers in
    memory the other way. Torch on the CPU is the oracle; ours reads each such tensor at
    its values, and a negative running buffer it updates stays one. (torch is given
    plain tensors: its CPU kernel leaves a negative running_mean alone.)"""
    shape = (3, 3, 4, 2)
    dev = backend.device
    values = {"input": torch.randn(shape, generator=gen),
              "residual": torch.randn(shape, generator=gen),
              "weight": torch.randn(3, generator=gen), "bias": torch.randn(3, generator=gen),
              "running_mean": torch.randn(3, generator=gen),
              "running_var": torch.rand(3, generator=gen) + 0.5,
              "dy": torch.randn(shape, generator=gen)}

    def negative_view(t):  # a tensor whose values are t's, stored as their negations
        view = torch._neg_view(-t)
        assert view.is_neg()
        return view

    def run(fn, given, device, negate):
        x = given["input"].to(device).requires_grad_()
        r = given["residual"].to(device).requires_grad_()
        w = given["weight"].to(device).requires_grad_()
        b = given["bias"].to(device).requires_grad_()
        rm, rv = given["running_mean"].to(device), given["running_var"].to(device)
        if negate and which in ("running_mean", "running_var"):
            rm, rv = (negative_view(t) if name == which else t
                      for name, t in (("running_mean", rm), ("running_var", rv)))
        leaves = (x, r, w, b)
        args = [negative_view(t) if negate and name == which else t
                for name, t in zip(("input", "residual", "weight", "bias"), leaves)]
        y = fn(args[0], rm, rv, args[2], args[3], training=training, residual=args[1])
        dy = given["dy"].to(device)
        y.backward(negative_view(dy) if negate and which == "dy" else dy)
        return [y, *(t.grad for t in leaves), rm, rv]

    def theirs(x, rm, rv, w, b, training, residual):
        return torch.relu(torch.nn.functional.batch_norm(x, rm, rv, w, b, training)
                          + residual)

    def ours(x, rm, rv, w, b, training, residual):
        return batchnorm.functional.batch_norm(x, rm, rv, w, b, training,
                                               activation="relu", residual=residual)

    got = run(ours, values, dev, negate=True)
    want = run(theirs, values, "cpu", negate=False)
    assert got[5].is_neg() == (which == "running_mean")
    for name, g, w in zip(("y", "dx", "dresidual", "dweight", "dbias", "running_mean",
                           "running_var"), got, want):
        assert_close(g.cpu(), w, torch.float32, scale=4, msg=name)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_num_batches_tracked_version_moves_once_a_step_as_torchs(backend, gen, momentum):
    """torch's module adds 1 to num_batches_tracked with add_(1), which moves its version
    counter (code that watches buffers for updates relies on it); our kernels add it by
    address, which moved nothing."""
    x = torch.randn(2, 3, 4, 4, generator=gen).to(backend.device)
    versions = []
    for cls in (batchnorm.BatchNorm2d, nn.BatchNorm2d):
        m = cls(3, momentum=momentum, device=backend.device)
        before = m.num_batches_tracked._version
        for _ in range(2):
            m(x)
        m.eval()(x)
        versions.append(m.num_batches_tracked._version - before)
    assert versions == [2, 2]


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_a_negative_view_counter_counts_as_torchs(backend, gen, momentum):
    """A num_batches_tracked that is a negative view holds -count in memory: the fused
    kernels added 1 to that (5 -> 3 over two steps), and the float64-buffer update read a
    copy and never counted. The kernels leave such a counter to torch ops."""
    x = torch.randn(4, 3, 3, 3, generator=gen).to(backend.device)
    layers = []
    for cls in (batchnorm.BatchNorm2d, nn.BatchNorm2d):
        m = cls(3, momentum=momentum, device=backend.device)
        m.num_batches_tracked = torch._neg_view(-torch.tensor(5, device=backend.device))
        m(x), m(2 * x + 1)
        layers.append(m)
    ours, theirs = layers
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 7
    assert_close(ours.running_mean.cpu(), theirs.running_mean.cpu(), torch.float32)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_saved_tensors_given_back_as_negative_views_are_read_at_their_values(
        backend, gen, training):
    """A saved-tensor hook may unpack a negative view (``saved_tensors_hooks(lambda t:
    t.neg(), torch._neg_view)``): the fused backward read its memory (NaN dx on cpu)."""
    x = torch.randn(4, 3, 5, 5, generator=gen).to(backend.device)
    dy = torch.randn(4, 3, 5, 5, generator=gen).to(backend.device)
    weight = torch.randn(3, generator=gen)
    grads = []
    for hooks in (True, False):
        m = batchnorm.BatchNorm2d(3, activation="relu", device=backend.device).train(training)
        with torch.no_grad():
            m.weight.copy_(weight)
        leaf = x.clone().requires_grad_()
        with (torch.autograd.graph.saved_tensors_hooks(lambda t: t.neg(), torch._neg_view)
              if hooks else contextlib.nullcontext()):
            y = m(leaf)
        y.backward(dy)
        grads.append((leaf.grad, m.weight.grad))
    for got, want in zip(*grads):
        assert_close(got, want, torch.float32)


def test_a_training_step_under_inference_mode_updates_inference_buffers(backend, gen):
    """Inference tensors have no version counter: keeping the running statistics'
    counters (a torch-ops update) raised "Inference tensors do not track version counter"
    after the count had moved, where torch's layer trains."""
    x = torch.randn(4, 3, 3, 3, generator=gen).to(backend.device)
    for buffers in ("plain", "strided"):
        with torch.inference_mode():
            ours, theirs = (cls(3, device=backend.device)
                            for cls in (batchnorm.BatchNorm2d, nn.BatchNorm2d))
            if buffers == "strided":
                both = torch.stack([torch.zeros(3), torch.ones(3)], 1).to(backend.device)
                ours.running_mean, ours.running_var = both[:, 0], both[:, 1]
            ours(x), theirs(x)
        assert ours.num_batches_tracked.item() == 1
        assert_close(ours.running_mean, theirs.running_mean, torch.float32)
        assert_close(ours.running_var, theirs.running_var, torch.float32)


@pytest.mark.parametrize("layout", ["plain", "strided"])
def test_a_graph_that_saved_a_running_statistic_still_runs_backward_after_a_step(
        backend, gen, layout):
    """torch's kernel updates the running statistics without moving their version
    counters, so a graph that saved one (``w * bn.running_mean``) runs its backward after
    a training step; torch ops' ``copy_`` (the portable path, and strided buffers on
    Triton) moved them: "modified by an inplace operation"."""
    for cls in (batchnorm.BatchNorm2d, nn.BatchNorm2d):
        m = cls(4, device=backend.device)
        if layout == "strided":
            buffers = torch.stack([torch.zeros(4), torch.ones(4)], 1).to(backend.device)
            m.running_mean, m.running_var = buffers[:, 0], buffers[:, 1]
        w = torch.randn(4, generator=gen).to(backend.device).requires_grad_()
        z = (w * m.running_mean).sum() + (w * m.running_var).sum()
        before = m.running_mean.clone()
        m(torch.randn(3, 4, 3, 3, generator=gen).to(backend.device) * 3 + 2)
        assert not torch.equal(m.running_mean, before), cls
        z.backward()  # (it reads the statistics as they are now, as torch's does)
        assert_close(w.grad, m.running_mean + m.running_var, torch.float32)


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_an_expanded_running_statistic_is_refused_in_training_before_anything_moves(
        backend, gen, which):
    """A stride-0 running statistic cannot hold a value per channel: torch's kernel writes
    every channel's update to its one value, torch's in-place ops (the portable and triton
    paths) refuse it, after num_batches_tracked and the other statistic had moved. Refused
    before anything moves; evaluation reads it as torch does."""
    m = batchnorm.BatchNorm2d(3, device=backend.device)
    setattr(m, which, torch.ones(1, device=backend.device).expand(3))
    x = torch.randn(2, 3, 4, 4, generator=gen).to(backend.device)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=f"{which} is an expanded view.*{which}.clone()"):
        m(x)
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k
    t = nn.BatchNorm2d(3, device=backend.device).eval()
    setattr(t, which, getattr(m, which))
    assert_close(m.eval()(x), t(x), torch.float32)
    m.train()(x[:0])  # an empty batch writes no statistic: counted, as torch counts it
    assert m.num_batches_tracked.item() == 1


@pytest.mark.parametrize("slope", [0.1, 0.5, -0.5, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_leaky_relu_of_an_infinite_pre_activation_is_torchs(backend, dtype, slope):
    """The triton kernels took z·slope as z·hi + z·lo (the slope as a float32 pair):
    at z = −inf that is −inf·0 (NaN) for a slope float32 holds exactly, and −inf + inf
    for one whose lo has the other sign (0.1); torch's z·slope is ∓inf."""
    inf = float("inf")
    x = torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 0.5]], dtype=dtype, device=backend.device)
    r = torch.tensor([[-inf, inf], [0.0, -inf], [1.0, 0.0]], dtype=dtype, device=backend.device)
    act = nn.LeakyReLU(slope)
    y = batchnorm.batch_norm(x, None, None, training=True, activation=act, residual=r)
    assert_close(y, act(nn.functional.batch_norm(x, None, None, training=True) + r), dtype)
    mean, var = torch.zeros(2, dtype=dtype), torch.ones(2, dtype=dtype)
    x_eval = torch.tensor([[-inf, 1.0], [2.0, -inf]], dtype=dtype, device=backend.device)
    y = batchnorm.batch_norm(x_eval, mean.to(backend.device), var.to(backend.device),
                             training=False, activation=act)
    assert_close(y, act(x_eval / (1 + 1e-5) ** 0.5), dtype)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(2, 3, 4), (2, 3, 2, 3), (2, 3, 2, 2, 2)],
                         ids=["3d", "4d", "5d"])
def test_a_saved_tensor_hook_may_give_a_channels_last_input_back_contiguous(
        backend, gen, shape, training):
    """save_on_cpu(pin_memory=True), or any pack hook that makes a contiguous copy: the
    CPU and Triton backwards read the unpacked x as channels-last by its address (dx off
    by 0.8, dweight by 24, silently)."""
    leaf, x = make_input(shape, "channels_last", torch.float32, backend.device, gen)
    r = torch.randn(shape, generator=gen).to(backend.device).requires_grad_()
    dy = torch.randn(shape, generator=gen).to(backend.device)
    cls = {3: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d, 5: batchnorm.BatchNorm3d}
    grads = []
    for contiguous in (True, False):
        bn = cls[len(shape)](3, activation="relu").to(backend.device).train(training)
        with torch.autograd.graph.saved_tensors_hooks(
                (lambda t: t.contiguous()) if contiguous else (lambda t: t), lambda t: t):
            y = bn(x, r)
        grads.append(torch.autograd.grad(y, (leaf, r, bn.weight, bn.bias), dy))
    for with_hook, without in zip(*grads):
        torch.testing.assert_close(with_hook, without)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_a_residual_alone_needs_no_saved_input(backend, gen, training):
    """Only the residual needs a gradient (frozen parameters, an input without one): its
    gradient is dy, and nothing is kept, so an in-place change of x before backward is no
    error, as with torch's bn(x) + r (we kept x and raised)."""
    x = torch.randn(2, 3, 2, 2, generator=gen).to(backend.device)
    r = torch.randn(2, 3, 2, 2, generator=gen).to(backend.device).requires_grad_()
    bn = batchnorm.BatchNorm2d(3).to(backend.device).train(training).requires_grad_(False)
    y = bn(x, r)
    x.add_(1)
    dy = torch.randn(2, 3, 2, 2, generator=gen).to(backend.device)
    y.backward(dy)
    torch.testing.assert_close(r.grad, dy)


@pytest.mark.parametrize("shape", [(2, 1, 3, 4), (2, 1, 2, 2, 3)], ids=["4d", "5d"])
def test_an_input_broadcast_along_the_channels_gives_torchs_layout(backend, shape):
    """Stride 0 on C passed for a channels-last order (a channel slice of a channels_last
    tensor): the output came back channels_last where torch's is contiguous."""
    x = torch.randn(shape).to(backend.device).expand(shape[0], 5, *shape[2:])
    cls = batchnorm.BatchNorm2d if len(shape) == 4 else batchnorm.BatchNorm3d
    theirs = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm3d)(5).to(backend.device)
    y, expected = cls(5).to(backend.device)(x), theirs(x)
    assert y.stride() == expected.stride()
    torch.testing.assert_close(y, expected)
