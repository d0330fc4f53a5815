"""The numba CPU backend's primitives against the portable ones computed in float64.

The shared parity suite (``backend`` fixture) runs the whole module stack on this backend;
these tests reach into the primitives and kernels themselves: both kernel views, every
activation, residual and absent weight/bias, large means, constant channels, outputs
poisoned with NaN before the kernels write them, and the split-within-a-channel parallel
path that few channels with a large N·L take.
"""

import os

import numpy as np
import pytest
import torch

pytest.importorskip("numba")

import batchnorm
from batchnorm.backends import cpu, portable  # noqa: E402
from batchnorm.backends import cpu_kernels as K  # noqa: E402
from batchnorm.backends.portable import ACTIVATIONS  # noqa: E402

from tolerances import assert_close  # noqa: E402

# (N, C, L) and (M, C) views; the small ones take the serial build, the big ones the
# parallel build with a channel cut into pieces (C = 2 < the 16 tasks wanted).
SMALL = {"ncl": (4, 3, 50), "mc": (64, 5)}
LARGE = {"ncl": (3, 2, 50_000), "mc": (140_000, 2)}
# (N, C, L) arrays of short rows that run the MC kernels as wide rows (cpu._wide_rows)
WIDE = {"small": (32, 8, 9), "large": (2048, 16, 9)}
SLOPE = 0.2


def _data(shape, dtype, gen, loc=0.0, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + loc).to(dtype)


def _case(shape, dtype, seed, with_affine=True, with_residual=False, loc=0.0):
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = _data(shape, dtype, gen, loc=loc, scale=2.0)
    dy = _data(shape, dtype, gen)
    w = _data((c,), torch.float32, gen) if with_affine else None
    b = _data((c,), torch.float32, gen) if with_affine else None
    r = _data(shape, dtype, gen) if with_residual else None
    return x, dy, w, b, r


def _d(t):
    return None if t is None else t.double()


def _stats_for(x):
    """mean (acc dtype, for the elementwise primitives) and invstd, from float64 stats."""
    mean, m2 = portable.stats(x.double())
    n = x.numel() // x.shape[1]
    invstd = torch.rsqrt(m2 / n + 1e-5)
    acc = portable.acc_dtype(x.dtype)
    return mean.to(acc), invstd.to(acc), n


@pytest.mark.parametrize("view", ["ncl", "mc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", ["small", "large"])
def test_stats(view, dtype, size):
    shape = (SMALL if size == "small" else LARGE)[view]
    x, *_ = _case(shape, dtype, seed=1, loc=3.0)
    mean, m2 = cpu.stats(x)
    ref_mean, ref_m2 = portable.stats(x.double())
    assert mean.dtype == torch.float64 and m2.dtype == dtype
    assert_close(mean, ref_mean, dtype)
    assert_close(m2, ref_m2, dtype, scale=4)
    # the split into pieces depends on the shape only: bitwise reproducible
    mean2, m22 = cpu.stats(x)
    assert torch.equal(mean, mean2) and torch.equal(m2, m22)


@pytest.mark.parametrize("view", ["ncl", "mc"])
def test_stats_large_mean_and_constant_channel(view):
    shape = LARGE[view]
    gen = torch.Generator().manual_seed(2)
    x = (1e6 + torch.randn(shape, generator=gen, dtype=torch.float64)).float()
    const = 376_543.25  # exactly representable in float32
    if view == "ncl":
        x[:, 1] = const
    else:
        x[:, 1] = const
    mean, m2 = cpu.stats(x)
    ref_mean, ref_m2 = portable.stats(x.double())
    # the float32 data's own mean, to float64 precision; the raw Σx² − (Σx)²/n formula
    # would have lost every digit of m2 here
    torch.testing.assert_close(mean[0], ref_mean[0], rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(m2[0].double(), ref_m2[0], rtol=1e-5, atol=0)
    assert mean[1].item() == const and m2[1].item() == 0.0


@pytest.mark.parametrize("view", ["ncl", "mc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("variant", ["affine", "residual", "plain"])
def test_primitives_match_float64(view, dtype, activation, variant):
    shape = SMALL[view]
    x, dy, w, b, r = _case(shape, dtype, seed=3, with_affine=variant != "plain",
                           with_residual=variant == "residual")
    mean, invstd, n = _stats_for(x)
    args = (mean, invstd, w, b, r)
    d_args = (mean.double(), invstd.double(), _d(w), _d(b), _d(r))

    y = cpu.normalize(x, *args, activation, SLOPE)
    ref_y = portable.normalize(x.double(), *d_args, activation, SLOPE)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, ref_y, dtype, scale=2)

    sums = cpu.backward_reduce(dy, x, *args, activation, SLOPE)
    ref_sums = portable.backward_reduce(dy.double(), x.double(), *d_args, activation, SLOPE)
    for got, ref in zip(sums, ref_sums):
        assert got.dtype == portable.acc_dtype(dtype)
        assert_close(got, ref, dtype, scale=10 * n ** 0.5)

    for training in (True, False):
        s = sums if training else (None, None)
        rs = ref_sums if training else (None, None)
        want_dres = r is not None
        dx, dres = cpu.backward_elementwise(dy, x, *args, *s, n, activation, SLOPE, want_dres)
        ref_dx, ref_dres = portable.backward_elementwise(
            dy.double(), x.double(), *d_args, *rs, n, activation, SLOPE, want_dres)
        assert_close(dx, ref_dx, dtype, scale=10)
        if want_dres:
            assert_close(dres, ref_dres, dtype, scale=2)
        else:
            assert dres is None


@pytest.mark.parametrize("view", ["ncl", "mc"])
@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
def test_parallel_path_splits_channels(view, activation):
    """Two channels and a large N·L: every core works inside a channel."""
    shape = LARGE[view]
    assert np.prod(shape) >= cpu.SERIAL_BELOW
    assert cpu._reduce_split(torch.empty(shape)) > 1
    x, dy, w, b, r = _case(shape, torch.float32, seed=4, with_residual=True)
    mean, invstd, n = _stats_for(x)
    d_args = (mean.double(), invstd.double(), _d(w), _d(b), _d(r))
    y = cpu.normalize(x, mean, invstd, w, b, r, activation, SLOPE)
    assert_close(y, portable.normalize(x.double(), *d_args, activation, SLOPE), scale=2)
    sums = cpu.backward_reduce(dy, x, mean, invstd, w, b, r, activation, SLOPE)
    ref = portable.backward_reduce(dy.double(), x.double(), *d_args, activation, SLOPE)
    for got, want in zip(sums, ref):
        assert_close(got, want, torch.float32, scale=10 * n ** 0.5)
    dx, dres = cpu.backward_elementwise(dy, x, mean, invstd, w, b, r, *sums, n, activation,
                                        SLOPE, True)
    ref_dx, ref_dres = portable.backward_elementwise(
        dy.double(), x.double(), *d_args, *ref, n, activation, SLOPE, True)
    assert_close(dx, ref_dx, scale=10)
    assert_close(dres, ref_dres, scale=2)


@pytest.mark.parametrize("view", ["ncl", "mc"])
@pytest.mark.parametrize("build", [0, 1], ids=["parallel", "serial"])
@pytest.mark.parametrize("activation", ["none", "relu", "silu"])
def test_kernels_write_every_element(view, build, activation):
    """Outputs start as NaN: a skipped element (a wrong piece bound) shows up."""
    shape = LARGE[view] if build == 0 else SMALL[view]
    x, dy, w, b, r = _case(shape, torch.float32, seed=5, with_residual=True)
    mean, invstd, n = _stats_for(x)
    code = K.ACT_CODES[activation]
    xs = cpu._elementwise_split(x)
    rs = cpu._reduce_split(x)
    # mode 0: (mean, invstd) given, as the primitives pass them
    stats_args = (cpu._mean(mean), invstd.numpy(), 0.0, float(n), 0)
    wb = (w.numpy(), b.numpy())

    y = np.full(shape, np.nan, np.float32)
    K.NORMALIZE[view][build](x.numpy(), *stats_args, *wb, r.numpy(), code, SLOPE, xs, y,
                             np.empty(0, np.float32))
    assert not np.isnan(y).any()

    s1 = np.full(shape[1], np.nan, np.float32)
    s2 = np.full(shape[1], np.nan, np.float32)
    K.REDUCE[view][build](dy.numpy(), x.numpy(), *stats_args, *wb, r.numpy(), code, SLOPE, rs,
                          s1, s2)
    assert not np.isnan(s1).any() and not np.isnan(s2).any()

    dx = np.full(shape, np.nan, np.float32)
    # with no activation dresidual is dy itself: the wrapper copies it, the kernel does not
    want_dres = activation != "none"
    dres = np.full(shape if want_dres else (0,) * len(shape), np.nan, np.float32)
    K.ELEMENTWISE[view][build](dy.numpy(), x.numpy(), *stats_args, *wb, r.numpy(), s1, s2,
                               code, SLOPE, xs, dx, dres)
    assert not np.isnan(dx).any() and not np.isnan(dres).any()

    mean64 = np.full(shape[1], np.nan)
    m2 = np.full(shape[1], np.nan, np.float32)
    K.STATS[view][build](x.numpy(), rs, mean64, m2)
    assert not np.isnan(mean64).any() and not np.isnan(m2).any()


def test_parallel_and_serial_builds_agree():
    x, *_ = _case(LARGE["ncl"], torch.float32, seed=6)
    rs = cpu._reduce_split(x)
    out = []
    for build in (0, 1):
        mean = np.empty(2)
        m2 = np.empty(2, np.float32)
        K.STATS["ncl"][build](x.numpy(), rs, mean, m2)
        out.append((mean, m2))
    np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-12)
    np.testing.assert_allclose(out[0][1], out[1][1], rtol=1e-6)


def test_nan_propagates():
    x, dy, w, b, _ = _case(SMALL["ncl"], torch.float32, seed=7)
    x[1, 2, 3] = float("nan")
    mean, m2 = cpu.stats(x)
    assert torch.isnan(mean[2]) and torch.isnan(m2[2])
    assert not torch.isnan(mean[:2]).any()
    y = cpu.normalize(x, mean.float(), torch.ones(3), w, b, None, "relu", 0.0)
    assert torch.isnan(y[1, 2, 3])


def test_zero_invstd_gives_bias_and_zero_grad():
    """eps = 0 and a zero-variance channel: invstd == 0, output == bias, dx == 0."""
    x, dy, w, b, _ = _case(SMALL["mc"], torch.float32, seed=8)
    x[:, 0] = 5.0
    mean, m2 = cpu.stats(x)
    invstd = torch.where(m2 > 0, torch.rsqrt(m2 / x.shape[0]), torch.zeros_like(m2))
    y = cpu.normalize(x, mean.float(), invstd, w, b, None, "none", 0.0)
    assert torch.equal(y[:, 0], b[0].expand(x.shape[0]))
    sums = cpu.backward_reduce(dy, x, mean.float(), invstd, w, b, None, "none", 0.0)
    dx, _ = cpu.backward_elementwise(dy, x, mean.float(), invstd, w, b, None, *sums,
                                     x.shape[0], "none", 0.0, False)
    assert torch.equal(dx[:, 0], torch.zeros(x.shape[0]))
    assert not torch.isnan(dx).any()


def test_supports():
    assert cpu.supports(torch.empty(2, 3))
    assert cpu.supports(torch.empty(2, 3, 4, dtype=torch.float64))
    # halves run in the fused entry points as their bit patterns (cpu_kernels, "Data types")
    assert cpu.supports(torch.empty(2, 3, dtype=torch.bfloat16))
    assert cpu.supports(torch.empty(2, 3, dtype=torch.float16))
    assert not cpu.supports(torch.empty(2, 3, dtype=torch.int32))
    assert not cpu.supports(torch.empty(0, 3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_conversions_are_torchs(dtype):
    """The kernels' load and store of 16-bit data (``_load``, ``_store``) against torch's own
    conversions: every bit pattern widened, and float32 values (ties, subnormals, the
    largest finite values, overflow, inf, NaN) rounded to nearest even."""
    from numba import njit

    bits = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)
    halves = bits.view(dtype)
    like = cpu._LIKE[dtype]
    patterns = bits.numpy().astype(like.dtype)

    @njit
    def widen(a, out):
        for i in range(a.size):
            out[i] = K._load(a[i])

    @njit
    def narrow(a, out):
        for i in range(a.size):
            out[i] = K._store(a[i], out)

    wide = np.empty(patterns.size, np.float32)
    widen(patterns, wide)
    want = halves.float()
    same = (torch.from_numpy(wide) == want) | (want.isnan() & torch.from_numpy(wide).isnan())
    assert same.all()
    gen = torch.Generator().manual_seed(3)
    info = torch.finfo(dtype)
    values = torch.cat([
        torch.randn(20000, generator=gen) * 10.0 ** torch.randint(-8, 8, (20000,), generator=gen),
        want[~want.isnan()],  # exact: unchanged
        (want[:-1] + want[1:]) / 2,  # halfway between neighbours: ties and their signs
        torch.tensor([info.max * 1.01, -info.max * 1.01, float("inf"), float("-inf"),
                      float("nan"), info.tiny / 3, -info.tiny / 3, 1e-45])]).float()
    out = np.empty(values.numel(), like.dtype)
    narrow(values.numpy(), out)
    got = torch.from_numpy(out.astype(np.int16)).view(dtype)
    want = values.to(dtype)
    same = (got.view(torch.int16) == want.view(torch.int16)) | (got.isnan() & want.isnan())
    assert same.all(), values[~same][:5]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("view", ["ncl", "mc", "wide"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", ["none", "relu", "silu"])
@pytest.mark.parametrize("size", ["small", "large"])
def test_half_entry_points_match_float32(dtype, view, training, activation, size):
    """float16/bfloat16 data in the fused entry points (each kernel view and walk: NCL
    rows and pieces, MC, wide rows; the serial build below SERIAL_BELOW and the parallel
    one above) against the float32 entry points on the same values: y, dx and dresidual
    as float32's rounded to the data's format, the statistics, sums and running update
    as float32's."""
    shape = WIDE[size] if view == "wide" else (LARGE if size == "large" else SMALL)[view]
    x, dy, w, b, r = _case(shape, dtype, seed=11, with_residual=True, loc=3.0)
    assert cpu._kernel_plan(x, False)[0] == ("ncl" if view == "ncl" else "mc")
    wide = [t.float() for t in (x, dy, r)]
    c = shape[1]
    gen = torch.Generator().manual_seed(12)
    rm = torch.randn(c, generator=gen) if not training else None
    rv = torch.rand(c, generator=gen) + 0.5 if not training else None
    state = [torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5,
             torch.tensor(3)]
    ref_state = [t.clone() for t in state]
    got = cpu.batch_norm_forward(x, w, b, r, rm, rv, 1e-5, activation, SLOPE,
                                 (*state, 0.1) if training else None)
    want = cpu.batch_norm_forward(wide[0], w, b, wide[2], rm, rv, 1e-5, activation, SLOPE,
                                  (*ref_state, 0.1) if training else None)
    assert got is not None and got[3] == training
    assert got[0].dtype == dtype
    assert_close(got[0].float(), want[0].to(dtype).float(), dtype)
    for g_, w_ in zip(got[1:3] + tuple(state), want[1:3] + tuple(ref_state)):
        assert g_.dtype == w_.dtype
        assert_close(g_, w_, torch.float32, scale=10)
    _, mean, var = got[:3]
    got = cpu.batch_norm_backward(dy, x, w, b, r, mean, var, 1e-5, training, activation,
                                  SLOPE, True, True, activation != "none")
    want = cpu.batch_norm_backward(wide[1], wide[0], w, b, wide[2], want[1], want[2], 1e-5,
                                   training, activation, SLOPE, True, True,
                                   activation != "none")
    assert got is not None
    dx, sum_dz, sum_dzx, dres = got
    n = (x.numel() // c) ** 0.5
    assert_close(sum_dz, want[1], torch.float32, scale=20 * n)
    assert_close(sum_dzx, want[2], torch.float32, scale=20 * n)
    assert dx.dtype == dtype and dx.stride() == x.stride()
    # at ReLU's kink the two may take either side: compare away from it
    keep = (want[0].abs() > 1e-2) if activation == "relu" else torch.ones_like(dx, dtype=torch.bool)
    assert_close(dx.float()[keep], want[0].to(dtype).float()[keep], dtype, scale=2)
    assert (dres is None) == (activation == "none")
    if dres is not None:
        assert dres.dtype == dtype
        assert_close(dres.float()[keep], want[3].to(dtype).float()[keep], dtype, scale=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_half_constant_channel_and_far_first_value(dtype, channels_last):
    """16-bit data keeps the float kernels' statistics: a constant channel gives
    exactly 0 variance and y == bias at any magnitude, and a first value far from the
    channel's mean (summed again around the mean) costs no digits."""
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(8, 3, 40, 40, generator=gen, dtype=torch.float64)
    x[:, 0] = 60000.0 if dtype == torch.float16 else 3e38
    x[0, 1, 0, 0] = 3000.0  # an outlier first value
    x = x.to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.ones(3) * 2, torch.tensor([0.25, 0.0, 0.0])
    y, mean, var, _, _ = cpu.batch_norm_forward(x, w, b, None, None, None, 0.0, "none", SLOPE,
                                                None, channels_last)
    assert var[0] == 0 and mean[0] == x[0, 0, 0, 0].double()
    assert (y[:, 0] == 0.25).all()
    ref = x.double()[:, 1]
    torch.testing.assert_close(var[1].double(), ref.var(unbiased=False), rtol=1e-6, atol=0)


@pytest.mark.parametrize("view", ["ncl", "mc"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", ["none", "relu", "silu"])
@pytest.mark.parametrize("size", ["small", "large"])
def test_fused_entry_points_match_portable_ops(view, training, activation, size):
    """cpu.batch_norm_forward/backward (C-sized math in the kernels; one numba call per
    pass below SERIAL_BELOW, the parallel builds above) against the general ops path on
    the portable backend, on data with a large mean (the float64 mean's split), the
    running update included."""
    from batchnorm import backends, ops

    shape = (LARGE if size == "large" else SMALL)[view]
    x, dy, w, b, r = _case(shape, torch.float32, seed=9, with_residual=True, loc=1e4)
    c = shape[1]
    gen = torch.Generator().manual_seed(10)  # not the global generator: the same data in
    # every process, whatever ran before (under xdist that varies)
    rm = torch.randn(c, generator=gen) + 1e4 if not training else None
    rv = torch.rand(c, generator=gen) + 0.5 if not training else None
    state = [torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5,
             torch.tensor(3)]
    ref_state = [t.clone() for t in state]
    update = (*state, None) if training else None
    got = cpu.batch_norm_forward(x, w, b, r, rm, rv, 1e-5, activation, SLOPE, update)
    assert got[3] == training  # the update was done in the kernels
    got = got[:3]
    with backends.using("portable"):
        want = ops._batch_norm_forward(x, w, b, r, rm, rv, 1e-5, activation, SLOPE,
                                       (*ref_state, None) if training else None)
    for g_, w_ in zip(got, want):
        assert g_.dtype == w_.dtype
        assert_close(g_, w_, torch.float32, scale=20)
    for g_, w_ in zip(state, ref_state):
        torch.testing.assert_close(g_, w_, rtol=1e-6, atol=0)
    assert state[2].item() == (4 if training else 3)
    y, mean, var = got
    dx, sum_dz, sum_dzx, dres = cpu.batch_norm_backward(
        dy, x, w, b, r, mean, var, 1e-5, training, activation, SLOPE, True, True,
        activation != "none")
    count = x.numel() // c
    with backends.using("portable"):
        invstd = ops.invstd_from_var(var, 1e-5)
        mean_k, bias_k, shift = ops.centre_for_kernels(mean, invstd, w, b, torch.float32)
        ref_dz, ref_dzx = portable.backward_reduce(dy, x, mean_k, invstd, w, bias_k, r,
                                                   activation, SLOPE)
        if shift is not None:
            ref_dzx = ref_dzx - shift * ref_dz
        # dx as ops builds it: in training from the batch sums (Σdz moved to the kernels'
        # x̂' = x̂ + shift), in evaluation from dz alone (the sums are None there)
        ref_dx, ref_dres = portable.backward_elementwise(
            dy, x, mean_k, invstd, w, bias_k, r,
            ops.sum_dz_for_kernels(ref_dz, ref_dzx, shift) if training else None,
            ref_dzx if training else None, count, activation, SLOPE, activation != "none")
    n = count ** 0.5
    assert_close(sum_dz, ref_dz, torch.float32, scale=20 * n)
    assert_close(sum_dzx, ref_dzx, torch.float32, scale=20 * n)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    assert (dres is None) == (activation == "none")  # ops hands dy itself on as dresidual
    assert dres is None or dres.shape == x.shape
    if activation == "relu":
        # At ReLU's kink either side is right within the input's rounding: float32 data
        # at 1e4 is 1e-3 apart, so the two implementations may put a pre-activation
        # within ~1e-3 of 0 on different sides (seen once in 300,000 values). Compared
        # away from the kink, in float64.
        per_channel = (1, c) + (1,) * (x.dim() - 2)
        z = ((x.double() - mean.double().view(per_channel))
             * torch.rsqrt(var.double() + 1e-5).view(per_channel)
             * w.double().view(per_channel) + b.double().view(per_channel) + r.double())
        far = z.abs() > 1e-2
        dx, ref_dx, dres, ref_dres = dx[far], ref_dx[far], dres[far], ref_dres[far]
    # dx is O(1) (invstd·weight·dz); scale as test_primitives_match_float64's dx
    assert_close(dx, ref_dx, torch.float32, scale=20)
    if dres is not None:
        assert_close(dres, ref_dres, torch.float32, scale=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_entry_points_read_any_layout_by_address(dtype):
    """The fused hooks hand the kernels addresses, so whatever is not laid out as the
    kernels read it must be converted first: parameters that are strided views or of
    another dtype, running buffers of another dtype (left to ops: ``updated`` False),
    a dy expanded from a scalar (stride 0), a float32 mean in evaluation. The results
    are those of the same call on plain contiguous tensors of the data's dtype."""
    gen = torch.Generator().manual_seed(12)
    shape, c = (6, 4, 9), 4
    x = _data(shape, dtype, gen, loc=50.0)
    other = torch.float64 if dtype == torch.float32 else torch.float32
    wide = _data((c, 2), other, gen)
    w, b = wide[:, 0], wide[:, 1]  # stride 2, another dtype
    w_plain, b_plain = w.to(dtype).contiguous(), b.to(dtype).contiguous()
    assert w.stride() == (2,)

    state = [torch.zeros(c, dtype=other), torch.ones(c, dtype=other), torch.tensor(0)]
    got = cpu.batch_norm_forward(x, w, b, None, None, None, 1e-5, "relu", 0.0,
                                 (*state, 0.1))
    want = cpu.batch_norm_forward(x, w_plain, b_plain, None, None, None, 1e-5, "relu", 0.0)
    assert got[3] is False and state[2].item() == 0  # buffers of another dtype: ops updates
    for g_, w_ in zip(got[:3], want[:3]):
        assert torch.equal(g_, w_)

    y, mean, var, _, _ = want
    dy = torch.ones((), dtype=dtype).expand(shape)  # as y.sum().backward() gives
    got = cpu.batch_norm_backward(dy, x, w, b, None, mean, var, 1e-5, True, "relu", 0.0,
                                  True, True, False)
    want = cpu.batch_norm_backward(dy.contiguous(), x, w_plain, b_plain, None, mean, var, 1e-5,
                                   True, "relu", 0.0, True, True, False)
    for g_, w_ in zip(got, want):
        assert (g_ is None and w_ is None) or torch.equal(g_, w_)

    # evaluation: running statistics of another dtype, strided (narrower: a float64 mean
    # on float32 data is left to ops, which splits it for the kernels)
    narrow = torch.float16 if dtype == torch.float32 else torch.float32
    if dtype == torch.float32:
        assert cpu.batch_norm_forward(x, w, b, None, torch.zeros(c, dtype=torch.float64),
                                      torch.ones(c, dtype=torch.float64), 1e-5, "none",
                                      0.0) is None
    rm, rv = _data((c, 2), narrow, gen)[:, 0] + 50.0, torch.rand(c, 2, dtype=narrow)[:, 1] + 0.5
    got = cpu.batch_norm_forward(x, w, b, None, rm, rv, 1e-5, "none", 0.0)
    want = cpu.batch_norm_forward(x, w_plain, b_plain, None, rm.to(dtype).contiguous(),
                                  rv.to(dtype).contiguous(), 1e-5, "none", 0.0)
    assert torch.equal(got[0], want[0]) and got[1].dtype == dtype
    got = cpu.batch_norm_backward(dy, x, w, b, None, got[1], got[2], 1e-5, False, "none", 0.0,
                                  True, True, False)
    ref = portable.backward_elementwise(
        dy, x, rm.to(dtype), torch.rsqrt(rv.to(dtype) + 1e-5), w_plain, b_plain, None,
        None, None, x.numel() // c, "none", 0.0, False)[0]
    assert_close(got[0], ref, dtype)


@pytest.mark.parametrize("buffers", ["same", "other dtype", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eval_for_y_alone_reads_the_running_buffers(dtype, buffers):
    """When the caller keeps y alone, evaluation hands the kernel the running buffers
    themselves where their dtype and layout allow (no copies), and gives the same y; the
    buffers are not touched, and the statistics are not returned."""
    gen = torch.Generator().manual_seed(13)
    shape, c = (6, 4, 9), 4
    x = _data(shape, dtype, gen, loc=50.0)
    w, b = _data((c,), dtype, gen), _data((c,), dtype, gen)
    other = torch.float16 if dtype == torch.float32 else torch.float32  # (see above)
    rm = _data((c, 2), dtype if buffers != "other dtype" else other, gen)[:, 0] + 50.0
    rv = torch.rand(c, 2, dtype=rm.dtype)[:, 1] + 0.5
    if buffers != "strided":
        rm, rv = rm.contiguous(), rv.contiguous()
    before = rm.clone(), rv.clone()
    want = cpu.batch_norm_forward(x, w, b, None, rm, rv, 1e-5, "relu", 0.0)
    got = cpu.batch_norm_forward(x, w, b, None, rm, rv, 1e-5, "relu", 0.0, need_stats=False)
    assert torch.equal(got[0], want[0]) and got[1] is None and got[2] is None
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_running_update_matches_torch_ops(momentum, dtype):
    from batchnorm import ops

    gen = torch.Generator().manual_seed(10)
    mean = torch.randn(5, generator=gen, dtype=torch.float64)
    var = torch.rand(5, generator=gen, dtype=dtype)
    state = [torch.randn(5, generator=gen, dtype=dtype), torch.rand(5, generator=gen, dtype=dtype),
             torch.tensor(3)]
    ref = [t.clone() for t in state]
    assert cpu.update_running_stats(*state, mean, var, 17, momentum)
    ops._update_running_stats_torch(*ref, mean, var, 17, momentum)
    assert state[2].item() == ref[2].item() == 4
    for got, want in zip(state[:2], ref[:2]):
        torch.testing.assert_close(got, want, rtol=1e-6 if dtype == torch.float32 else 1e-12,
                                   atol=0)
    # what it does not take, it leaves to ops (and changes nothing)
    half = [torch.zeros(5, dtype=torch.float16), torch.ones(5, dtype=torch.float16), None]
    assert not cpu.update_running_stats(*half, mean, var, 17, 0.1)
    assert not cpu.update_running_stats(None, None, torch.tensor(0), mean, var, 17, 0.1)


@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 3, 1), (5, 2, 13), (1, 4, 9)])
@pytest.mark.parametrize("activation", ["none", "relu", "tanh"])
def test_ncl_splits_give_the_same_numbers(shape, activation):
    """Elementwise kernels cut the flat NCL array into ranges that start and end anywhere
    in a row, reductions cut a channel's rows into pieces: every count, serial and
    parallel, writes every element and gives the same numbers bit for bit."""
    x, dy, w, b, r = _case(shape, torch.float32, seed=8, with_residual=True)
    mean, invstd, n = _stats_for(x)
    code = K.ACT_CODES[activation]
    stats_args = (cpu._mean(mean), invstd.numpy(), 0.0, float(n), 0)
    wb = (w.numpy(), b.numpy())
    want_dres = activation != "none"
    results = []
    for build in (0, 1):
        for split in (1, 2, 3, 5, 8, 64):
            y = np.full(shape, np.nan, np.float32)
            K.NORMALIZE["ncl"][build](x.numpy(), *stats_args, *wb, r.numpy(), code, SLOPE,
                                      split, y, np.empty(0, np.float32))
            dx = np.full(shape, np.nan, np.float32)
            dres = np.full(shape if want_dres else (0, 0, 0), np.nan, np.float32)
            s1 = np.full(shape[1], np.nan, np.float32)
            s2 = np.full(shape[1], np.nan, np.float32)
            K.ELEMENTWISE["ncl"][build](dy.numpy(), x.numpy(), *stats_args, *wb, r.numpy(),
                                        np.ones(shape[1], np.float32),
                                        np.ones(shape[1], np.float32), code, SLOPE, split,
                                        dx, dres)
            # the reduction's pieces change the summation order: compared with a tolerance
            K.REDUCE["ncl"][build](dy.numpy(), x.numpy(), *stats_args, *wb, r.numpy(), code,
                                   SLOPE, min(split, n), s1, s2)
            mean64 = np.full(shape[1], np.nan)
            m2 = np.full(shape[1], np.nan, np.float32)
            K.STATS["ncl"][build](x.numpy(), min(split, n), mean64, m2)
            results.append((y, dx, dres, s1, s2, mean64, m2))
    ref_y = portable.normalize(x.double(), mean.double(), invstd.double(), _d(w), _d(b), _d(r),
                               activation, SLOPE)
    assert_close(torch.from_numpy(results[0][0]), ref_y, torch.float32, scale=2)
    ref_m, ref_m2 = portable.stats(x.double())
    for y, dx, dres, s1, s2, mean64, m2 in results:
        np.testing.assert_array_equal(y, results[0][0])
        np.testing.assert_array_equal(dx, results[0][1])
        np.testing.assert_array_equal(dres, results[0][2])
        np.testing.assert_allclose(s1, results[0][3], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(s2, results[0][4], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(mean64, ref_m.numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(m2, ref_m2.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(6, 5, 1, 1), (7, 3, 1), (4, 6, 1, 1, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("activation", ["none", "relu"])
def test_one_value_per_row_takes_the_channels_last_kernels(shape, channels_last, activation):
    """(N, C, 1, ...) holds the memory of (N, C): the fused hooks run the (M, C) kernels on
    it (rows of one value were 10x slower), in any memory format, with the numbers of
    the float64 reference, running statistics and gradients included."""
    import batchnorm
    from batchnorm import reference

    gen = torch.Generator().manual_seed(11)
    x = torch.randn(shape, generator=gen) * 3 + 1e3
    if channels_last and len(shape) in (4, 5):
        x = x.to(memory_format=torch.channels_last if len(shape) == 4
                 else torch.channels_last_3d)
    dy = torch.randn(shape, generator=gen)
    r = torch.randn(shape, generator=gen)
    c = shape[1]
    w, b = torch.randn(c, generator=gen), torch.randn(c, generator=gen)
    rm, rv, nbt = torch.randn(c), torch.rand(c) + 0.5, torch.tensor(0)
    got = cpu.batch_norm_forward(x, w, b, r, None, None, 1e-5, activation, SLOPE,
                                 (rm, rv, nbt, 0.1), channels_last and len(shape) > 3)
    y, mean, var, updated, _ = got
    assert updated and cpu._kernel_plan(x, channels_last and len(shape) > 3)[0] == "mc"

    module = {3: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d, 5: batchnorm.BatchNorm3d}
    with torch.no_grad():
        bn = module[len(shape)](c, activation=None if activation == "none" else activation)
        bn.weight.copy_(w)
        bn.bias.copy_(b)
    xg = x.clone().requires_grad_()
    rg = r.clone().requires_grad_()
    out = bn(xg, rg)
    out.backward(dy)
    ref_y, cache = reference.forward(x.numpy(), w.numpy(), b.numpy(), eps=1e-5,
                                     activation=activation, residual=r.numpy())
    assert_close(y, torch.from_numpy(ref_y), torch.float32, scale=4)
    assert_close(out.detach(), torch.from_numpy(ref_y), torch.float32, scale=4)
    ref_rm, ref_rv, _ = reference.update_running(np.zeros(c), np.ones(c), 0, cache["mean"],
                                                 cache["var"], cache["count"], 0.1)
    assert_close(bn.running_mean, torch.from_numpy(ref_rm), torch.float32, scale=4)
    assert_close(bn.running_var, torch.from_numpy(ref_rv), torch.float32, scale=4)
    grads = reference.backward(dy.numpy(), cache)
    assert_close(xg.grad, torch.from_numpy(grads["dx"]), torch.float32, scale=20)
    assert_close(rg.grad, torch.from_numpy(grads["dresidual"]), torch.float32, scale=4)
    assert_close(bn.weight.grad, torch.from_numpy(grads["dweight"]), torch.float32,
                 scale=20 * shape[0] ** 0.5)


@pytest.mark.parametrize("shape", [(8, 300), (5, 70), (7, 48), (128, 2048)],
                         ids=["300", "70", "48", "2048-parallel"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("activation", ["none", "relu"])
def test_wide_channels_few_rows(shape, affine, activation):
    """(M, C) with C in the hundreds or thousands and few rows (BatchNorm1d in an MLP):
    the per-channel prologue and the fold of the per-block partials dominate there (the
    last shape runs the parallel build in two row blocks); against the float64 reference,
    in training (running update included) and evaluation."""
    import batchnorm
    from batchnorm import reference

    gen = torch.Generator().manual_seed(14)
    c = shape[1]
    x = _data(shape, torch.float32, gen, loc=100.0, scale=2.0)
    dy = _data(shape, torch.float32, gen)
    bn = batchnorm.BatchNorm1d(c, affine=affine,
                               activation=None if activation == "none" else activation)
    if affine:
        with torch.no_grad():
            bn.weight.copy_(_data((c,), torch.float32, gen))
            bn.bias.copy_(_data((c,), torch.float32, gen))
    w = bn.weight.detach().double().numpy() if affine else None
    b = bn.bias.detach().double().numpy() if affine else None
    xg = x.clone().requires_grad_()
    y = bn(xg)
    y.backward(dy)
    ref_y, cache = reference.forward(x.double().numpy(), w, b, eps=1e-5, activation=activation)
    assert_close(y.detach(), torch.from_numpy(ref_y), torch.float32, scale=4)
    grads = reference.backward(dy.double().numpy(), cache)
    assert_close(xg.grad, torch.from_numpy(grads["dx"]), torch.float32, scale=20)
    if affine:
        n = shape[0] ** 0.5
        assert_close(bn.weight.grad, torch.from_numpy(grads["dweight"]), torch.float32,
                     scale=20 * n)
        assert_close(bn.bias.grad, torch.from_numpy(grads["dbias"]), torch.float32,
                     scale=20 * n)
    ref_rm, ref_rv, _ = reference.update_running(np.zeros(c), np.ones(c), 0, cache["mean"],
                                                 cache["var"], cache["count"], 0.1)
    assert_close(bn.running_mean, torch.from_numpy(ref_rm), torch.float32, scale=4)
    assert_close(bn.running_var, torch.from_numpy(ref_rv), torch.float32, scale=4)
    bn.eval()
    ref_e, _ = reference.forward(x.double().numpy(), w, b, training=False,
                                 running_mean=bn.running_mean.double().numpy(),
                                 running_var=bn.running_var.double().numpy(), eps=1e-5,
                                 activation=activation)
    assert_close(bn(x), torch.from_numpy(ref_e), torch.float32, scale=4)


@pytest.mark.parametrize("shape, blocks", [((64, 4096), 2), ((128, 2048), 2), ((512, 1024), 8),
                                           ((4096, 64), 16), ((3, 100_000), 2)])
def test_mc_reductions_keep_enough_rows_a_block(shape, blocks):
    """A parallel MC reduction's row blocks hold at least cpu._MC_BLOCK_ROWS rows (each
    block's float64 partials are a whole row), and there are always two to share."""
    assert np.prod(shape) >= cpu.SERIAL_BELOW
    assert cpu._splits(shape)[0] == blocks


@pytest.mark.parametrize("shape", [(40, 3, 5), (32, 6, 2, 3), (33, 4, 3, 2, 2), (256, 64, 4, 4),
                                   (16, 512, 3, 3), (32, 1024, 3, 3)],
                         ids=["1d", "2d", "3d", "2d-parallel", "2d-long-rows",
                              "2d-long-rows-parallel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
def test_short_rows_run_as_wide_rows(shape, dtype, activation):
    """(N, C, L) with short rows goes to the MC kernels as N rows of C·L values, each
    channel's coefficients spread over its L columns and its sums folded from them: the
    float64 reference's numbers, with a residual, data at a large mean, a constant channel
    (exactly the bias), the running update, the gradients and evaluation."""
    import batchnorm
    from batchnorm import reference

    gen = torch.Generator().manual_seed(15)
    c = shape[1]
    x = _data(shape, dtype, gen, loc=1e3, scale=2.0)
    x[:, 1] = 4321.5
    dy, r = _data(shape, dtype, gen), _data(shape, dtype, gen)
    n, l_ = shape[0], x.numel() // (shape[0] * c)
    assert cpu._kernel_plan(x, False)[:5] == ("mc", cpu._build(x.numel()), n, c, l_)
    module = {3: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d, 5: batchnorm.BatchNorm3d}
    bn = module[len(shape)](c, activation=None if activation == "none" else activation,
                            dtype=dtype)
    with torch.no_grad():
        bn.weight.copy_(_data((c,), dtype, gen))
        bn.bias.copy_(_data((c,), dtype, gen))
    w, b = bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy()
    xg, rg = x.clone().requires_grad_(), r.clone().requires_grad_()
    y = bn(xg, rg)
    y.backward(dy)
    ref_y, cache = reference.forward(x.double().numpy(), w, b, eps=1e-5, activation=activation,
                                     residual=r.double().numpy())
    assert_close(y.detach(), torch.from_numpy(ref_y), dtype, scale=4)
    if activation == "none":
        # x̂ == 0 exactly on the constant channel: y = bias + residual
        torch.testing.assert_close(y.detach()[:, 1], bn.bias.detach()[1] + r[:, 1],
                                   rtol=0, atol=0)
    grads = reference.backward(dy.double().numpy(), cache)
    scale = 20 * (x.numel() // c) ** 0.5
    assert_close(xg.grad, torch.from_numpy(grads["dx"]), dtype, scale=20)
    assert_close(rg.grad, torch.from_numpy(grads["dresidual"]), dtype, scale=4)
    assert_close(bn.weight.grad, torch.from_numpy(grads["dweight"]), dtype, scale=scale)
    assert_close(bn.bias.grad, torch.from_numpy(grads["dbias"]), dtype, scale=scale)
    ref_rm, ref_rv, _ = reference.update_running(np.zeros(c), np.ones(c), 0, cache["mean"],
                                                 cache["var"], cache["count"], 0.1)
    assert_close(bn.running_mean, torch.from_numpy(ref_rm), dtype, scale=4)
    assert_close(bn.running_var, torch.from_numpy(ref_rv), dtype, scale=4)
    bn.eval()
    ref_e, _ = reference.forward(x.double().numpy(), w, b, training=False,
                                 running_mean=bn.running_mean.double().numpy(),
                                 running_var=bn.running_var.double().numpy(), eps=1e-5,
                                 activation=activation, residual=r.double().numpy())
    assert_close(bn(x, r), torch.from_numpy(ref_e), dtype, scale=4)


@pytest.mark.parametrize("shape, wide", [
    ((15, 3, 5), False), ((16, 3, 5), True), ((32, 3, 32), False), ((32, 3, 31), True),
    ((16, 512, 16), True), ((16, 513, 16), False), ((32, 1024, 16), True),
    ((32, 1025, 16), False), ((16, 4096, 9), True), ((16, 4097, 9), False),
    ((16, 1024, 10), False)])
def test_which_short_rows_run_as_wide_rows(shape, wide):
    """The bounds of ``cpu._wide_rows``: rows shorter than WIDE_BELOW, at least
    WIDE_MIN_ROWS rows, at most WIDE_MAX_COLUMNS values a row (twice that from twice
    the rows), WIDE_MAX_COLUMNS_SHORT for rows of at most WIDE_SHORT values;
    channels-last input is (M, C) already."""
    assert (cpu.WIDE_BELOW, cpu.WIDE_MIN_ROWS, cpu.WIDE_MAX_COLUMNS, cpu.WIDE_SHORT,
            cpu.WIDE_MAX_COLUMNS_SHORT) == (32, 16, 8192, 9, 36864)
    x = torch.empty(shape)
    view, _, n, c, l_ = cpu._kernel_plan(x, False)[:5]
    assert (view == "mc") == wide and (n, c, l_) == shape
    x4 = torch.empty(*shape, 1).to(memory_format=torch.channels_last)
    view4, _, *ncl4 = cpu._kernel_plan(x4, True)[:5]
    assert view4 == "mc" and ncl4 == [shape[0] * shape[2], shape[1], 1]


# Shapes of the three statistics walks: NCL rows longer than K._BLK (pieces), NCL rows of
# K._BLK or fewer (rows in memory order), MC (tiles); serial and parallel builds.
OUTLIER_SHAPES = [(4, 2, 20_000), (4, 2, 50_000), (64, 4, 256), (256, 4, 512),
                  (16_384, 4), (140_000, 2)]


@pytest.mark.parametrize("shape", OUTLIER_SHAPES, ids=str)
@pytest.mark.parametrize("outlier", [100.0, 1e3, -3e4, 1e6])
def test_stats_outlier_first_value(shape, outlier):
    """A far outlier as a channel's first value, i.e. as its shift: the float32 block sums
    of (x − shift)² were of the order of n·outlier², and their rounding cost m2 up to
    1e-3 of its value ((4, 2, 50000) with 1e6: 4e-3). The channel is now summed again
    around its mean: m2 to float32 precision, the mean to float64's."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    first = (0,) * len(shape)
    x[first[:1] + (slice(None),) + first[2:]] = outlier
    # a constant channel beside it (exact at any magnitude) and one at a large mean
    x[(slice(None), 1)] = 376_543.25
    x = x.float()
    mean, m2 = cpu.stats(x)
    ref_mean, ref_m2 = portable.stats(x.double())
    n = x.numel() // x.shape[1]
    keep = [c for c in range(x.shape[1]) if c != 1]
    sd = (ref_m2[keep] / n).sqrt()
    assert ((mean[keep] - ref_mean[keep]).abs() / sd).max() < 1e-8
    assert ((m2[keep].double() - ref_m2[keep]).abs() / ref_m2[keep]).max() < 1e-6
    assert mean[1].item() == 376_543.25 and m2[1].item() == 0.0
    again = cpu.stats(x)
    assert torch.equal(mean, again[0]) and torch.equal(m2, again[1])


@pytest.mark.parametrize("shape", OUTLIER_SHAPES, ids=str)
def test_stats_outlier_first_keeps_nan_and_inf(shape):
    """The second pass around the mean leaves NaN and inf as the first pass had them: a
    NaN anywhere gives NaN; an inf (not first) an infinite mean and a NaN m2."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    first = (0,) * len(shape)
    x[first[:1] + (slice(None),) + first[2:]] = 1e4  # every channel's shift far
    last = tuple(s - 1 for s in shape)
    x[last[:1] + (0,) + last[2:]] = float("nan")
    x[last[:1] + (1,) + last[2:]] = float("inf")
    mean, m2 = cpu.stats(x.float())
    assert torch.isnan(mean[0]) and torch.isnan(m2[0])
    assert mean[1].item() == float("inf") and torch.isnan(m2[1])
    assert torch.isfinite(mean[2:]).all() and torch.isfinite(m2[2:]).all()


def test_the_parallel_build_runs_only_where_torch_would_thread(monkeypatch):
    """numba's pool ignored torch.set_num_threads: under set_num_threads(1) the layer
    still ran (and started) numba's worker threads on every core."""
    import numba
    monkeypatch.setattr(cpu, "_forked_child", False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert cpu._build_now(0) == 1
        torch.set_num_threads(2)
        assert cpu._build_now(0) == 0
        assert numba.get_num_threads() == min(2, numba.config.NUMBA_NUM_THREADS)
    finally:
        torch.set_num_threads(threads)
    assert cpu._build_now(1) == 1


def _forward_in_fork_child(conn, x):
    # one torch thread, as a DataLoader worker sets: torch's own OpenMP pool can hang in a
    # fork child otherwise, with or without this library
    torch.set_num_threads(1)
    with torch.no_grad():
        conn.send((cpu._forked_child, batchnorm.BatchNorm2d(x.shape[1])(x).numpy()))
    conn.close()


def test_a_fork_child_runs_the_serial_build():
    """A fork child of a process that had run the parallel build (numba's GNU OpenMP pool)
    was killed on entering a parallel loop: "fork() called from a process already using
    GNU OpenMP, this is unsafe" (a DataLoader worker running the model, say). It now runs
    the serial build, with the same numbers."""
    import multiprocessing
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    if torch.get_num_threads() < 2:
        pytest.skip("one torch thread: the parallel build never runs here")
    x = torch.randn(4, 8, 128, 64)  # parallel-sized (cpu.SERIAL_BELOW)
    assert cpu._build(x.numel()) == 0
    with torch.no_grad():
        want = batchnorm.BatchNorm2d(8)(x)
    ctx = multiprocessing.get_context("fork")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_forward_in_fork_child, args=(theirs, x))
    child.start()
    got = ours.recv() if ours.poll(120) else None
    child.join(30)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0 and got is not None, child.exitcode
    assert got[0] and torch.equal(torch.from_numpy(got[1]), want)


def test_two_threads_on_numbas_workqueue_layer(tmp_path):
    """numba's workqueue threading layer (where neither OpenMP nor TBB loads) aborts the
    process when two threads run parallel kernels at once; there one thread at a time
    keeps the pool and the others run the serial build, with the same results. In a
    process of its own, as the layer is chosen once a process."""
    import subprocess
    import sys
    script = tmp_path / "workqueue.py"
    script.write_text(
        "import threading, numba, torch, batchnorm\n"
        "from batchnorm.backends import cpu\n"
        "torch.manual_seed(0)\n"
        "x = torch.randn(16, 16, 32, 32)\n"
        "assert x.numel() >= cpu.SERIAL_BELOW\n"
        "bn = batchnorm.BatchNorm2d(16).eval()\n"
        "with batchnorm.backends.using('cpu'), torch.no_grad():\n"
        "    want = bn(x)\n"
        "    assert numba.threading_layer() == 'workqueue'\n"
        "    bad = []\n"
        "    def run():\n"
        "        for _ in range(30):\n"
        "            if not torch.equal(bn(x), want):\n"
        "                bad.append(1)\n"
        "    threads = [threading.Thread(target=run) for _ in range(3)]\n"
        "    [t.start() for t in threads]\n"
        "    [t.join() for t in threads]\n"
        "assert not bad\n"
        "print('ok')\n")
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300, env=env, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", (out.returncode, out.stderr)


def test_the_primitives_leave_the_callers_tensors_resizable():
    """torch's Tensor.numpy() makes a storage unresizable for good: the primitives handed
    the kernels the layer's weight, the input and the running buffers that way, and FSDP,
    which frees a gathered weight with resize_(0), raised "Trying to resize storage that is
    not resizable" under SyncBatchNorm (whose step runs the primitives)."""
    gen = torch.Generator().manual_seed(0)
    x, dy, residual = (torch.randn(2, 4, 9, generator=gen) for _ in range(3))  # (N, C, L)
    weight, bias = torch.rand(4, generator=gen) + 0.5, torch.randn(4, generator=gen)
    mean, m2 = cpu.stats(x)
    invstd = (m2 / 18 + 1e-5).rsqrt()
    cpu.normalize(x, mean, invstd, weight, bias, residual, "relu", 0.0)
    sums = cpu.backward_reduce(dy, x, mean, invstd, weight, bias, residual, "relu", 0.0)
    cpu.backward_elementwise(dy, x, mean, invstd, weight, bias, residual, *sums, 18, "relu",
                             0.0, True)
    running = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    counter = torch.tensor(0)
    assert cpu.update_running_stats(*running, counter, mean, m2 / 18, 18, None)
    for t in (x, dy, residual, weight, bias, mean, invstd, *running, counter):
        assert t.untyped_storage().resizable()
    layer = batchnorm.BatchNorm1d(4)  # float64 running buffers: the primitives, too
    layer.running_mean, layer.running_var = running
    x.requires_grad_()
    layer(x).sum().backward()
    for t in (x, layer.weight, *running, x.grad, layer.weight.grad):
        assert t.untyped_storage().resizable()


def test_negative_views_are_read_as_their_values():
    """A tensor with the negative bit (``z.conj().imag``) holds its values' negations:
    handed by address, the primitives read them with the wrong sign (a layer with float64
    running buffers on float32 data was 2.8 off in eval) and updated such running buffers
    in memory the other way (Tensor.numpy() used to refuse them)."""
    gen = torch.Generator().manual_seed(0)

    def negative(n, dtype=torch.complex64):
        t = torch.randn(n, dtype=dtype, generator=gen).conj().imag
        assert t.is_neg()
        return t

    x = torch.randn(4, 3, 5, generator=gen)
    for training in (False, True):
        ours, theirs = batchnorm.BatchNorm1d(3), torch.nn.BatchNorm1d(3, dtype=torch.float64)
        running_mean = negative(3, torch.complex128)
        ours.running_mean, ours.running_var = running_mean, torch.rand(3, dtype=torch.float64) + 1
        theirs.running_mean = running_mean.resolve_neg().clone()
        theirs.running_var = ours.running_var.clone()
        ours.weight = torch.nn.Parameter(negative(3))
        theirs.weight = torch.nn.Parameter(ours.weight.detach().resolve_neg().double())
        ours.train(training), theirs.train(training)
        with batchnorm.backends.using("cpu"):
            y = ours(x)
        torch.testing.assert_close(y.double(), theirs(x.double()), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.running_mean, theirs.running_mean)
