"""torch.autograd.gradcheck / gradgradcheck (float64) of the analytic backward.

Every activation, with and without the residual, in training (batch statistics: the
gradient flows through the mean and variance) and in evaluation; then double backward,
and a gradient penalty compared with torch's unfused layer.
"""

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import batchnorm
from batchnorm import backends
from batchnorm.functional import activation_module, batch_norm

ACTS = ("none", "relu", "leaky_relu", "silu", "gelu", "gelu_tanh", "sigmoid", "tanh")


def _inputs(shape, gen, device, with_residual, channels_last=False):
    c = shape[1]
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5 + 0.3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(c, generator=gen, dtype=torch.float64) * 0.5 + 1
    b = torch.randn(c, generator=gen, dtype=torch.float64) * 0.5
    r = torch.randn(shape, generator=gen, dtype=torch.float64) if with_residual else None
    out = [t.to(device).requires_grad_() if t is not None else None for t in (x, w, b, r)]
    return out


def _skip_unless_float64(backend, x):
    supports = getattr(backends.get(backend.name), "supports", None)  # portable: everything
    if supports is not None and not supports(x.detach()):
        pytest.skip(f"backend {backend.name} does not compute float64")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("activation", ACTS)
def test_gradcheck(backend, gen, activation, with_residual, training):
    if backend.interpreted and (not training or activation not in ("none", "gelu")
                                or with_residual != (activation == "gelu")):
        pytest.skip("Triton interpreter: two cases (fast mode)")
    shape = (3, 2, 4)
    x, w, b, r = _inputs(shape, gen, backend.device, with_residual)
    _skip_unless_float64(backend, x)
    rm = torch.randn(2, generator=gen, dtype=torch.float64).to(backend.device)
    rv = (torch.rand(2, generator=gen, dtype=torch.float64) + 0.5).to(backend.device)
    act = activation_module(activation, 0.2)

    def fn(x, w, b, *rest):
        res = rest[0] if rest else None
        if training:  # no running statistics: gradcheck calls this many times
            return batch_norm(x, None, None, w, b, True, activation=act, residual=res)
        return batch_norm(x, rm, rv, w, b, False, activation=act, residual=res)

    inputs = (x, w, b) + ((r,) if r is not None else ())
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-7, fast_mode=backend.interpreted)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_4d_layouts(backend, gen, layout):
    if backend.interpreted and layout == "contiguous":
        pytest.skip("Triton interpreter: one 4-D case")
    x, w, b, r = _inputs((2, 3, 2, 3), gen, backend.device, True, layout == "channels_last")
    _skip_unless_float64(backend, x)
    fn = lambda x, w, b, r: batch_norm(x, None, None, w, b, True, activation="silu", residual=r)  # noqa: E731
    assert gradcheck(fn, (x, w, b, r), eps=1e-6, atol=1e-7, fast_mode=backend.interpreted)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ["none", "leaky_relu", "silu", "gelu", "gelu_tanh",
                                        "sigmoid", "tanh"])
def test_gradgradcheck(backend, gen, activation, training):
    """Double backward (create_graph=True): the backward is itself differentiable."""
    if backend.interpreted:
        pytest.skip("Triton interpreter: too slow; double backward runs portable's ops "
                    "after this backend's forward, checked by test_gradient_penalty")
    x, w, b, r = _inputs((3, 2, 3), gen, backend.device, activation != "none")
    _skip_unless_float64(backend, x)
    rm = torch.randn(2, generator=gen, dtype=torch.float64).to(backend.device)
    rv = (torch.rand(2, generator=gen, dtype=torch.float64) + 0.5).to(backend.device)

    def fn(x, w, b, *rest):
        res = rest[0] if rest else None
        return batch_norm(x, None if training else rm, None if training else rv, w, b,
                          training, activation=activation, residual=res)

    inputs = (x, w, b) + ((r,) if r is not None else ())
    assert gradgradcheck(fn, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_double_backward_reaches_bias_and_residual_through_relu(backend, gen, activation):
    """x's gradient through a fused relu depends on the bias and the residual only
    through the unit's on/off mask: their second derivative is 0, and torch's backward
    ops (threshold_backward, leaky_relu_backward) give that 0. Ours gave no gradient at
    all (a select with no path to them), and autograd.grad asking for them raised."""
    if backend.interpreted:
        pytest.skip("Triton interpreter: too slow; double backward runs portable's ops "
                    "after this backend's forward")
    x0 = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64)
    _skip_unless_float64(backend, x0)
    r0, v = torch.randn_like(x0), torch.randn_like(x0)
    f = nn.ReLU() if activation == "relu" else nn.LeakyReLU(0.01)
    ours = batchnorm.BatchNorm2d(3, activation=activation, dtype=torch.float64)
    theirs = nn.BatchNorm2d(3, dtype=torch.float64)
    theirs.load_state_dict(ours.state_dict())
    results = []
    for bn in (ours.to(backend.device), theirs.to(backend.device)):
        x, r = (t.clone().to(backend.device).requires_grad_() for t in (x0, r0))
        y = bn(x, r) if bn is ours else f(bn(x) + r)
        (gx,) = torch.autograd.grad((y * v.to(backend.device)).sum(), x, create_graph=True)
        results.append(torch.autograd.grad(gx.sum(), (bn.bias, r, bn.weight, x)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("activation", ["none", "silu", "tanh"])
def test_gradient_penalty_matches_torch(backend, gen, activation, dtype):
    """A WGAN-GP style loss, ‖∂out/∂x‖², differentiated once more, against torch's
    BatchNorm2d followed by torch's activation."""
    if backend.interpreted and (activation != "silu" or dtype != torch.float64):
        pytest.skip("Triton interpreter: one case")
    shape = (4, 3, 3, 3)
    # float32 with a mean far from 0: the float64 mean's correction is differentiated too.
    x0 = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1
          + 300 * (dtype == torch.float32)).to(dtype)
    v = torch.randn(shape, generator=gen, dtype=dtype)
    if dtype == torch.float64:
        _skip_unless_float64(backend, x0)
    w0 = torch.randn(3, generator=gen, dtype=dtype) * 0.5 + 1
    b0 = torch.randn(3, generator=gen, dtype=dtype)
    results = []
    for make in (lambda: batchnorm.BatchNorm2d(3, activation=activation, dtype=dtype),
                 lambda: nn.BatchNorm2d(3, dtype=dtype)):
        bn = make().to(backend.device)
        with torch.no_grad():
            bn.weight.copy_(w0)
            bn.bias.copy_(b0)
        x = x0.clone().to(backend.device).requires_grad_()
        y = bn(x)
        if isinstance(bn, nn.BatchNorm2d) and activation != "none":
            y = activation_module(activation, 0.0)(y)
        (gx,) = torch.autograd.grad((y * v.to(backend.device)).sum(), x, create_graph=True)
        penalty = (gx * gx).sum()
        penalty.backward()
        results.append((y.detach(), gx.detach(), x.grad, bn.weight.grad, bn.bias.grad))
    for ours, theirs in zip(*results):
        if theirs is None:
            assert ours is None or torch.count_nonzero(ours) == 0
        else:
            tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(
                rtol=1e-4, atol=1e-4 * theirs.abs().max().item())
            torch.testing.assert_close(ours, theirs, **tol)


def test_a_hessian_that_vanishes_stays_near_zero_in_float32(backend):
    """Σ ∂(Σy²)/∂x is 0 for every x (a channel's dx sums to 0), so its gradient is too.
    The statistics' graph ran through their shift, the channel's first value, where
    d mean/d x0 = 1 − (n−1)/n cancels in float32: 6e-5 there on this data, 1e-3 at
    n = 8192 (torch's: 9e-8)."""
    if backend.interpreted:
        pytest.skip("Triton interpreter: the shape is too large for it")
    gen = torch.Generator().manual_seed(0)  # data on which the cancellation shows
    shape = (4, 3, 32, 32)
    x = (torch.randn(shape, generator=gen) * 3 + 1).to(backend.device).requires_grad_()
    bn = batchnorm.BatchNorm2d(3).to(backend.device)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=gen)
        bn.bias.uniform_(-1, 1, generator=gen)
    (gx,) = torch.autograd.grad(bn(x).pow(2).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(gx.sum(), x)
    assert h.abs().max().item() < 1e-6
