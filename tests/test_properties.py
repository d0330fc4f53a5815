"""Property tests (hypothesis) against the float64 reference, on every backend.

Random shapes, values, scales and activations; constant channels, which must normalize to
exactly 0 at any magnitude (and, with eps = 0, give exactly ``bias`` and zero gradients);
large means, where float32 must stay within 1e-5 of the float64 computation on the same
float32 input. Also the seed's example with eps = 0, which torch refuses.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import batchnorm
from batchnorm import reference as ref
from conftest import np64
from tolerances import assert_close

ACTS = ("none", "relu", "leaky_relu", "silu", "gelu", "gelu_tanh", "sigmoid", "tanh")
MODULES = {2: batchnorm.BatchNorm1d, 3: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d,
           5: batchnorm.BatchNorm3d}


def _settings(backend, examples):
    """Fewer examples under the Triton interpreter, which is slow."""
    return settings(max_examples=max(3, examples // 5) if backend.interpreted else examples,
                    deadline=None, derandomize=False,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@st.composite
def shapes(draw, max_side=4):
    """(N, C, *) with at least 2 values per channel (training needs them)."""
    rank = draw(st.integers(2, 5))
    dims = [draw(st.integers(1, max_side)) for _ in range(rank)]
    if np.prod(dims) // dims[1] < 2:
        dims[0] += 1
    return tuple(dims)


def _module(shape, device, dtype, **kwargs):
    return MODULES[len(shape)](shape[1], device=device, dtype=dtype, **kwargs)


def _relayout(x, layout):
    """The same values as ``x`` in another memory layout, differentiable back to x."""
    if layout == "channels_last" and x.dim() >= 3:
        return x.movedim(1, -1).contiguous().movedim(-1, 1)
    if layout == "strided":
        return x.repeat_interleave(2, dim=-1)[..., ::2]
    return x


def _random_params(bn, rng):
    with torch.no_grad():
        for p in (bn.weight, bn.bias):
            if p is not None:
                p.copy_(torch.from_numpy(rng.normal(0.5, 1.0, p.shape[0])))


def test_random_shapes_values_and_activations(backend):
    @_settings(backend, 40)
    @given(shape=shapes(), seed=st.integers(0, 2**32 - 1),
           dtype=st.sampled_from([torch.float64, torch.float32]),
           offset=st.floats(-1e3, 1e3), log_scale=st.floats(-2, 2),
           activation=st.sampled_from(ACTS), momentum=st.sampled_from([0.1, None, 0.5]),
           eps=st.sampled_from([1e-5, 1e-3, 0.0]), with_residual=st.booleans(),
           layout=st.sampled_from(["contiguous", "channels_last", "strided"]))
    def check(shape, seed, dtype, offset, log_scale, activation, momentum, eps,
              with_residual, layout):
        rng = np.random.default_rng(seed)
        x_np = rng.normal(offset, 10**log_scale, shape)
        x = torch.from_numpy(x_np).to(dtype).to(backend.device).requires_grad_()
        x_in = _relayout(x, layout)
        r = (torch.from_numpy(rng.normal(0, 1, shape)).to(dtype).to(backend.device)
             if with_residual else None)
        dy = torch.from_numpy(rng.normal(0, 1, shape)).to(dtype).to(backend.device)
        bn = _module(shape, backend.device, dtype, momentum=momentum, eps=eps,
                     activation=activation)
        _random_params(bn, rng)
        y = bn(x_in, r)
        y.backward(dy)

        yr, cache = ref.forward(np64(x), np64(bn.weight), np64(bn.bias), eps=eps,
                                activation=activation, slope=0.01, residual=np64(r))
        gr = ref.backward(np64(dy), cache)
        rm, rv, nbt = ref.update_running(np.zeros(shape[1]), np.ones(shape[1]), 0,
                                         cache["mean"], cache["var"], cache["count"], momentum)
        dev = backend.device
        # The output is O(|w|·|x̂|); its gradient is O(|w|·invstd·|dy|): tolerances scale so.
        assert_close(y, torch.from_numpy(yr).to(dev), dtype, scale=10)
        ginv = float(np.max(np.abs(np64(bn.weight)) * cache["invstd"]) + 1)
        assert_close(x.grad, torch.from_numpy(gr["dx"]).to(dev), dtype, scale=10 * ginv)
        # The parameter gradients are sums of n terms: rounding grows about as √n.
        sums = 10 * math.sqrt(cache["count"])
        assert_close(bn.weight.grad, torch.from_numpy(gr["dweight"]).to(dev), dtype, scale=sums)
        assert_close(bn.bias.grad, torch.from_numpy(gr["dbias"]).to(dev), dtype, scale=sums)
        spread = float(np.max(np.abs(cache["mean"])) + 1)
        assert_close(bn.running_mean, torch.from_numpy(rm).to(dev), dtype, scale=spread)
        assert_close(bn.running_var, torch.from_numpy(rv).to(dev), dtype,
                     scale=float(np.max(rv)) + 1)
        assert bn.num_batches_tracked.item() == nbt == 1

    check()


# ---------------------------------------------------------------------------------------
# Constant channels and eps = 0


def test_constant_channels_are_exactly_bias(backend):
    """A constant channel normalizes to exactly 0 at any magnitude (torch's CPU float32
    gives |y| up to ~105 for a channel of constant 1e7); with eps = 0 too, where its
    gradients with respect to x and weight are exactly 0."""

    @_settings(backend, 40)
    @given(shape=shapes(), seed=st.integers(0, 2**32 - 1),
           dtype=st.sampled_from([torch.float64, torch.float32]),
           value=st.one_of(st.sampled_from([1e7, -1e7, 1e6, 3.3e-8, 0.1, 1.0]),
                           st.floats(-1e30, 1e30, allow_subnormal=False)),
           eps=st.sampled_from([0.0, 1e-5]), data=st.data())
    def check(shape, seed, dtype, value, eps, data):
        rng = np.random.default_rng(seed)
        c = shape[1]
        constant = data.draw(st.lists(st.booleans(), min_size=c, max_size=c))
        x_np = rng.normal(0, 1, shape)
        for ch, is_const in enumerate(constant):
            if is_const:
                x_np[:, ch] = value
        x = torch.from_numpy(x_np).to(dtype).to(backend.device).requires_grad_()
        bn = _module(shape, backend.device, dtype, eps=eps)
        _random_params(bn, rng)
        y = bn(x)
        dy = torch.from_numpy(rng.normal(0, 1, shape)).to(dtype).to(backend.device)
        y.backward(dy)
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
        for ch, is_const in enumerate(constant):
            if not is_const:
                continue
            assert (y[:, ch] == bn.bias[ch]).all(), f"channel {ch}: {y[:, ch].flatten()[:4]}"
            assert bn.running_mean[ch].item() == pytest.approx(0.1 * x[0, ch].flatten()[0].item(),
                                                               rel=1e-6)
            if eps == 0:
                assert (x.grad[:, ch] == 0).all()
                assert bn.weight.grad[ch].item() == 0

    check()


def test_seed_example_with_eps_zero(backend):
    """The article's example runs as written (torch 2.13 refuses eps = 0 in training)."""
    data = torch.ones(2, 2, 3, 4, device=backend.device)
    data[0][0][0][0] = 25
    bn = batchnorm.BatchNorm2d(num_features=2, eps=0, momentum=0, device=backend.device)
    data.requires_grad_()
    out = bn(data)
    assert round(out[0, 0, 0, 0].item(), 4) == 4.7958
    assert out[0, 0, 0, 0].item() == pytest.approx(23 ** 0.5, rel=1e-6)
    assert torch.allclose(out[:, 0].flatten()[1:], torch.tensor(-(23 ** -0.5)), rtol=1e-6)
    assert (out[:, 1] == 0).all()  # the constant channel: exactly bias, no NaN
    assert bn.running_mean.tolist() == [0, 0] and bn.running_var.tolist() == [1, 1]
    assert bn.num_batches_tracked.item() == 1
    out.backward(torch.randn_like(out))
    assert torch.isfinite(data.grad).all() and (data.grad[:, 1] == 0).all()
    assert bn.weight.grad[1].item() == 0

    theirs = torch.nn.BatchNorm2d(num_features=2, eps=0, momentum=0)
    try:
        theirs(data.detach().cpu())
    except (ValueError, RuntimeError):
        pass
    else:
        pytest.fail("torch accepted eps=0 in training: update the README's difference list")


# ---------------------------------------------------------------------------------------
# Large means


def test_large_mean_float32_matches_float64(backend):
    """float32 data with mean up to 1e6 and std ~1: the output stays within 1e-5 relative
    error of the float64 computation on the same float32 input (torch's CPU: 1.6e-2)."""

    @_settings(backend, 25)
    @given(shape=shapes(max_side=6), seed=st.integers(0, 2**32 - 1),
           mean=st.floats(1e4, 1e6), sign=st.sampled_from([1, -1]),
           std=st.floats(0.5, 4), train=st.booleans())
    def check(shape, seed, mean, sign, std, train):
        rng = np.random.default_rng(seed)
        if np.prod(shape) // shape[1] < 8:
            shape = (shape[0] + 8,) + shape[1:]
        x = torch.from_numpy(rng.normal(sign * mean, std, shape)).float().to(backend.device)
        x.requires_grad_()
        bn = _module(shape, backend.device, torch.float32)
        _random_params(bn, rng)
        if not train:
            with torch.no_grad():
                xd = x.double()
                dims = [0] + list(range(2, len(shape)))
                bn.running_mean.copy_(xd.mean(dims))
                bn.running_var.copy_(xd.var(dims))
            bn.eval()
        y = bn(x)
        dy = torch.from_numpy(rng.normal(0, 1, shape)).float().to(backend.device)
        y.backward(dy)
        yr, cache = ref.forward(np64(x), np64(bn.weight), np64(bn.bias), training=train,
                                running_mean=np64(bn.running_mean),
                                running_var=np64(bn.running_var))
        gr = ref.backward(np64(dy), cache)

        def rel(got, want, scale=None):
            scale = np.max(np.abs(want)) if scale is None else scale
            return float(np.max(np.abs(np64(got) - want) / scale))

        # In eval the reference uses the same float32 running statistics the layer has.
        assert rel(y, yr) < 1e-5
        # Gradients are sums that may cancel: measure errors against the sums of the
        # magnitudes of their terms.
        axes = (0,) + tuple(range(2, len(shape)))
        dy64, xhat = np64(dy), cache["xhat"]
        term_scale = np.abs(dy64 * xhat).sum(axes)
        assert rel(bn.weight.grad, gr["dweight"], term_scale) < 1e-5
        assert rel(bn.bias.grad, gr["dbias"], np.abs(dy64).sum(axes)) < 1e-5
        per_channel = [1, -1] + [1] * (len(shape) - 2)
        dx_scale = (np.abs(np64(bn.weight)) * cache["invstd"]).reshape(per_channel) * (
            np.abs(dy64) + (np.abs(xhat) + 1) * (term_scale / cache["count"]).reshape(per_channel))
        assert rel(x.grad, gr["dx"], dx_scale) < 1e-4

    check()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_float64_running_mean_on_float32_data_is_not_rounded_in_eval(backend, gen, layout):
    """A ``.double()`` layer evaluating float32 data of mean 1e6: its float64 running mean
    is used as it is (split for the kernels), not rounded to float32, which moved every
    output by up to 0.03/std (1.7e-2 here) and the weight's gradient by 0.8."""
    x = torch.randn(16, 3, 4, 4, generator=gen, dtype=torch.float64) + 1e6
    x = _relayout(x.float(), layout).to(backend.device).requires_grad_()
    bn = batchnorm.BatchNorm2d(3, activation="relu", device=backend.device,
                               dtype=torch.float64)
    with torch.no_grad():
        # a mean that float32 cannot hold: 1e6 + a fraction of its 0.0625 spacing
        bn.running_mean.copy_(x.double().mean((0, 2, 3)) + 0.0219)
        bn.running_var.copy_(x.double().var((0, 2, 3)))
        bn.weight.uniform_(0.5, 2.0, generator=gen)
    bn.eval()
    y = bn(x)
    dy = torch.randn(y.shape, generator=gen).to(backend.device)
    y.backward(dy)
    yr, cache = ref.forward(np64(x), np64(bn.weight), np64(bn.bias), training=False,
                            running_mean=np64(bn.running_mean),
                            running_var=np64(bn.running_var), activation="relu")
    gr = ref.backward(np64(dy), cache)
    assert np.max(np.abs(np64(y) - yr)) < 1e-5 * np.max(np.abs(yr))
    assert np.max(np.abs(np64(bn.weight.grad) - gr["dweight"])) < 1e-5 * np.max(
        np.abs(np64(dy)).sum((0, 2, 3)))
    assert np.max(np.abs(np64(x.grad) - gr["dx"])) < 1e-5 * np.max(np.abs(gr["dx"]))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_float64_running_statistics_keep_their_digits_in_a_float32_step(backend, gen,
                                                                        compiled):
    """A ``.double()`` layer training on float32 data: its float64 running statistics
    move by float64 arithmetic, so with momentum 0 they stay bit for bit (the torch-ops
    update, which the portable backend and torch.compile run, rounded running_var to
    float32: 1/3 became 0.3333333432674408)."""
    bn = batchnorm.BatchNorm2d(3, momentum=0.0, device=backend.device, dtype=torch.float64)
    with torch.no_grad():
        bn.running_mean.fill_(1 / 3)
        bn.running_var.fill_(1 / 3)
    x = torch.randn(4, 3, 2, 2, generator=gen).to(backend.device)
    run = torch.compile(bn, backend="eager", fullgraph=True) if compiled else bn
    run(x)
    assert torch.equal(bn.running_mean, torch.full_like(bn.running_mean, 1 / 3))
    assert torch.equal(bn.running_var, torch.full_like(bn.running_var, 1 / 3))
    assert int(bn.num_batches_tracked) == 1


def test_the_torch_ops_update_averages_float64_buffers_in_float64():
    """The torch-ops running update (portable backend, torch.compile) given float32 batch
    statistics and float64 buffers, momentum=None: the cumulative average in float64, as
    the CPU kernels' (its factor 1/num_batches_tracked was float32: 4.5e-8 off after 3
    steps)."""
    from batchnorm import ops
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, generator=gen), torch.rand(4, generator=gen) + 0.5)
               for _ in range(3)]
    count = 37
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    nbt = torch.tensor(0)
    for mean, var in batches:
        ops._update_running_stats_torch(rm, rv, nbt, mean, var, count, None)
    want_m = sum(m.double() for m, _ in batches) / 3
    want_v = sum(v.double() * count / (count - 1) for _, v in batches) / 3
    torch.testing.assert_close(rm, want_m, rtol=0, atol=1e-15)
    torch.testing.assert_close(rv, want_v, rtol=0, atol=1e-15)


@pytest.mark.parametrize("value", [1e7, -3.0e6, 0.1])
def test_constant_1e7_float32_gives_exactly_bias(backend, gen, value):
    """The issue's example: torch's CPU float32 gives |y| up to ~105 for a channel of
    constant 1e7; ours gives exactly bias."""
    x = torch.full((8, 3, 5, 5), value, device=backend.device)
    x[:, 1] = torch.randn(8, 5, 5, generator=gen).to(backend.device)
    bn = batchnorm.BatchNorm2d(3, device=backend.device)
    with torch.no_grad():
        bn.bias.copy_(torch.randn(3, generator=gen))
    y = bn(x)
    for ch in (0, 2):
        assert (y[:, ch] == bn.bias[ch]).all()
    assert bn.running_var[0].item() == pytest.approx(0.9, rel=1e-7)  # 0.9·1 + 0.1·0


def test_eps_zero_in_eval_with_zero_running_variance(backend, gen):
    """eps = 0 and a running variance of 0 (a channel that was constant in training):
    that channel outputs bias in eval too, where torch gives inf or NaN."""
    bn = batchnorm.BatchNorm1d(3, eps=0.0, momentum=1.0, device=backend.device)
    x = torch.randn(6, 3, 4, generator=gen).to(backend.device)
    x[:, 1] = 2.5
    bn(x)
    assert bn.running_var[1].item() == 0
    bn.eval()
    with torch.no_grad():
        bn.bias.copy_(torch.randn(3, generator=gen))
    y = bn(torch.randn(2, 3, 4, generator=gen).to(backend.device))
    assert torch.isfinite(y).all() and (y[:, 1] == bn.bias[1]).all()


@settings(max_examples=300, deadline=None, derandomize=True)
@given(shape=st.lists(st.integers(0, 3), min_size=1, max_size=5),
       order=st.randoms(use_true_random=False), channels_last=st.booleans(),
       step=st.integers(1, 2))
def test_is_channels_last_is_the_moved_view_being_contiguous(shape, order, channels_last,
                                                             step):
    """``is_channels_last`` asks torch's memory-format flag for 4-D and 5-D tensors; it
    must agree with its definition, the channel-last view being contiguous, for
    channels-last and randomly permuted strides, size-1 and empty dimensions, and sliced
    last dimensions."""
    from batchnorm.backends.portable import is_channels_last

    dims = list(range(len(shape)))
    if channels_last and len(shape) >= 2:
        dims = [0, *range(2, len(shape)), 1]  # memory order: N, spatial..., C
    else:
        order.shuffle(dims)
    base = torch.empty([shape[d] for d in dims]).permute([dims.index(i) for i in range(len(shape))])
    x = base[..., ::step] if base.dim() else base
    want = x.dim() >= 3 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()
    assert is_channels_last(x) == want


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 1, 4, 5), (2, 3, 1, 1), (1, 3, 4, 5),
                                   (2, 3, 4, 1), (0, 3, 4, 5), (2, 3, 2, 4, 5), (2, 3, 1, 4, 1),
                                   (2, 3, 5)])
def test_is_channels_last_on_channels_last_tensors(shape):
    """The channels-last layouts themselves (size-1 and empty dimensions included), dense
    and sliced, against the definition."""
    from batchnorm.backends.portable import is_channels_last

    x = torch.empty(shape[0], *shape[2:], shape[1]).movedim(-1, 1)
    for t in (x, x[..., ::2], x[:, :1], x.contiguous()):
        want = t.dim() >= 3 and not t.is_contiguous() and t.movedim(1, -1).is_contiguous()
        assert is_channels_last(t) == want
    assert is_channels_last(x) == (not x.is_contiguous())
