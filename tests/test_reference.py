"""The float64 reference against torch itself: the oracle must be right before it judges.

No backend is involved: torch's ``nn.BatchNorm*`` (float64) and torch's autograd check
reference.forward / backward / update_running, and torch's activations check
reference.activate / activation_grad.
"""

import doctest
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from batchnorm import reference as ref
from conftest import np64, torch_batchnorm

TOL = dict(rtol=1e-10, atol=1e-10)
SHAPES = [(7, 3), (4, 3, 5), (3, 2, 4, 3), (2, 3, 2, 3, 2)]
TORCH_CLASS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _close(a, b, **tol):
    np.testing.assert_allclose(a, b, **(tol or TOL))


def test_module_imports_nothing_from_the_package():
    with open(ref.__file__) as f:
        source = f.read()
    assert "from ." not in source and "import batchnorm" not in source
    assert "import torch" not in source


def test_docstring_example_runs():
    failures, tried = doctest.testmod(ref, verbose=False)
    assert tried >= 3 and failures == 0


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{len(s)}d")
@pytest.mark.parametrize("params", ["affine", "nobias", "noaffine"])
@pytest.mark.parametrize("momentum", [0.1, None, 0.0, 1.0])
def test_training_steps_and_eval_match_torch(shape, params, momentum, gen):
    c = shape[1]
    kwargs = dict(momentum=momentum, dtype=torch.float64, affine=params != "noaffine",
                  bias=params == "affine")
    theirs = torch_batchnorm(TORCH_CLASS[len(shape)], c, **kwargs)
    with torch.no_grad():
        if theirs.weight is not None:
            theirs.weight.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
        if theirs.bias is not None:
            theirs.bias.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
    rm, rv, nbt = np.zeros(c), np.ones(c), 0
    for step in range(4):
        training = step < 3
        theirs.train(training)
        x = (torch.randn(shape, generator=gen, dtype=torch.float64) * (step + 1) + step)
        x.requires_grad_()
        dy = torch.randn(shape, generator=gen, dtype=torch.float64)
        y = theirs(x)
        params_t = [p for p in (theirs.weight, theirs.bias) if p is not None]
        grads = torch.autograd.grad(y, [x] + params_t, dy)

        yr, cache = ref.forward(np64(x), np64(theirs.weight), np64(theirs.bias),
                                training=training, running_mean=rm, running_var=rv,
                                eps=theirs.eps)
        gr = ref.backward(np64(dy), cache)
        if training:
            rm, rv, nbt = ref.update_running(rm, rv, nbt, cache["mean"], cache["var"],
                                             cache["count"], momentum)
        _close(yr, np64(y))
        _close(gr["dx"], np64(grads[0]))
        expected = [g for g in (gr["dweight"], gr["dbias"]) if g is not None]
        assert len(expected) == len(params_t)
        for got, want in zip(expected, grads[1:]):
            _close(got, np64(want))
        _close(rm, np64(theirs.running_mean))
        _close(rv, np64(theirs.running_var))
        assert nbt == theirs.num_batches_tracked.item()


@pytest.mark.parametrize("activation", ref.ACTIVATIONS)
def test_activation_and_its_derivative_match_torch(activation, gen):
    z = torch.randn(200, generator=gen, dtype=torch.float64) * 4
    z = torch.cat([z, torch.tensor([-40.0, -1e-3, 1e-3, 40.0], dtype=torch.float64)])
    z.requires_grad_()
    module = {"none": nn.Identity(), "relu": nn.ReLU(), "leaky_relu": nn.LeakyReLU(0.3),
              "silu": nn.SiLU(), "gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"),
              "sigmoid": nn.Sigmoid(), "tanh": nn.Tanh()}[activation]
    y = module(z)
    (dz,) = torch.autograd.grad(y.sum(), z)
    _close(ref.activate(np64(z), activation, 0.3), np64(y), rtol=1e-12, atol=1e-14)
    _close(ref.activation_grad(np64(z), activation, 0.3), np64(dz), rtol=1e-12, atol=1e-14)


def test_unknown_activation_raises():
    with pytest.raises(ValueError, match="unknown activation"):
        ref.activate(np.zeros(2), "relu6")
    with pytest.raises(ValueError, match="unknown activation"):
        ref.activation_grad(np.zeros(2), "relu6")


@pytest.mark.parametrize("activation,training",
                         list(itertools.product(ref.ACTIVATIONS, [True, False])))
def test_fused_backward_matches_torch_autograd(activation, training, gen):
    """The analytic backward with activation and residual against autograd through
    torch's unfused ops."""
    shape = (4, 3, 5)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_()
    w = torch.randn(3, generator=gen, dtype=torch.float64).requires_grad_()
    b = torch.randn(3, generator=gen, dtype=torch.float64).requires_grad_()
    r = torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_()
    rm = torch.randn(3, generator=gen, dtype=torch.float64)
    rv = torch.rand(3, generator=gen, dtype=torch.float64) + 0.5
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    act = {"none": nn.Identity(), "relu": nn.ReLU(), "leaky_relu": nn.LeakyReLU(0.2),
           "silu": nn.SiLU(), "gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"),
           "sigmoid": nn.Sigmoid(), "tanh": nn.Tanh()}[activation]
    y = act(torch.nn.functional.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5)
            + r)
    grads = torch.autograd.grad(y, [x, w, b, r], dy)
    yr, cache = ref.forward(np64(x), np64(w), np64(b), training=training, running_mean=np64(rm),
                            running_var=np64(rv), activation=activation, slope=0.2,
                            residual=np64(r))
    gr = ref.backward(np64(dy), cache)
    _close(yr, np64(y))
    for key, got in zip(("dx", "dweight", "dbias", "dresidual"), grads):
        _close(gr[key], np64(got))


def test_without_weight_or_bias_the_gradients_are_none(gen):
    x = np64(torch.randn(5, 2, generator=gen, dtype=torch.float64))
    _, cache = ref.forward(x, None, None)
    g = ref.backward(np.ones_like(x), cache)
    assert g["dweight"] is None and g["dbias"] is None and g["dresidual"] is None
    _, cache = ref.forward(x, np.ones(2), None)
    g = ref.backward(np.ones_like(x), cache)
    assert g["dweight"] is not None and g["dbias"] is None


def test_seed_example():
    x = np.ones((2, 2, 3, 4))
    x[0, 0, 0, 0] = 25
    y, cache = ref.forward(x, np.ones(2), np.zeros(2), eps=0.0)
    assert cache["mean"].tolist() == [2.0, 1.0] and cache["var"].tolist() == [23.0, 0.0]
    assert y[0, 0, 0, 0] == pytest.approx(23**0.5, rel=1e-15)
    assert round(y[0, 0, 0, 0], 4) == 4.7958
    assert (y[:, 1] == 0).all() and np.isfinite(y).all()
    g = ref.backward(np.random.default_rng(0).normal(size=x.shape), cache)
    assert (g["dx"][:, 1] == 0).all() and g["dweight"][1] == 0
    rm, rv, nbt = ref.update_running(np.zeros(2), np.ones(2), 0, cache["mean"], cache["var"],
                                     cache["count"], momentum=0.1)
    np.testing.assert_allclose(rm, [0.2, 0.1])
    np.testing.assert_allclose(rv, [3.3, 0.9])
    assert nbt == 1


def test_constant_channel_is_exact_at_any_magnitude():
    x = np.full((3, 2, 4), 0.1)
    x[:, 1] = np.random.default_rng(1).normal(size=(3, 4))
    for value in (0.1, 1e7, -3e15, 1e-30):
        x[:, 0] = value
        mean, var, n = ref.batch_stats(x)
        assert mean[0] == value and var[0] == 0 and n == 12


def test_momentum_none_is_the_plain_average(gen):
    means = [np.random.default_rng(i).normal(size=3) for i in range(5)]
    variances = [np.random.default_rng(10 + i).uniform(1, 2, size=3) for i in range(5)]
    rm, rv, nbt = np.zeros(3), np.ones(3), 0
    for m, v in zip(means, variances):
        rm, rv, nbt = ref.update_running(rm, rv, nbt, m, v, 10, None)
    _close(rm, np.mean(means, axis=0), rtol=1e-14)
    _close(rv, np.mean(variances, axis=0) * 10 / 9, rtol=1e-14)
    assert nbt == 5


def test_eval_needs_running_statistics():
    with pytest.raises(ValueError, match="running_mean"):
        ref.forward(np.ones((2, 2)), training=False)


def test_update_running_needs_two_values():
    with pytest.raises(ValueError, match="at least 2 values"):
        ref.update_running(np.zeros(2), np.ones(2), 0, np.zeros(2), np.zeros(2), 1, 0.1)


@pytest.mark.parametrize("first", [np.inf, -np.inf, np.nan])
def test_a_channel_whose_first_value_is_not_finite_is_summed_around_zero(first):
    """The library's rule (README "Numerics"): an infinite first value gives torch's ±inf
    mean, not inf − inf = NaN; a NaN gives NaN either way."""
    x = np.array([[[first, 1.0, 2.0], [1.0, 2.0, 3.0]]])
    mean, _, _ = ref.batch_stats(x)
    want = torch.from_numpy(x).mean((0, 2)).numpy()
    np.testing.assert_array_equal(mean, want)
