"""Batch statistics when a channel's first value (the shift both backends sum around) is a
far outlier: a "massive activation" at position 0 (a BOS token), or one bad sample first in
the batch. The numbers must not depend on where in the batch the outlier sits."""

import pytest
import torch
import torch.nn.functional as F

import batchnorm
from batchnorm.backends import portable

BACKENDS = ["portable"]
try:
    import numba  # noqa: F401
    BACKENDS.append("cpu")
except ImportError:  # pragma: no cover - the portable backend alone
    pass


def _outlier_first(shape, value, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x.view(shape[0], shape[1], -1)[0, :, 0] = value
    return x.float()


@pytest.mark.parametrize("value", [100.0, 1e3, 3e4])
def test_portable_mean_with_outlier_first(value):
    """The portable backend's shifted mean came back in float32, |mean − shift| large: its
    rounding put the mean 2e-5σ (100) to 5e-5σ (1e3) off, where torch's is 1e-10σ. The
    centred values' sum now corrects it (3e-8σ); m2 as before."""
    x = _outlier_first((64, 4, 2000), value, seed=11)
    mean, m2 = portable.stats(x)
    ref_mean, ref_m2 = portable.stats(x.double())
    sd = (ref_m2 / (x.numel() // x.shape[1])).sqrt()
    assert mean.dtype == torch.float64
    assert ((mean - ref_mean).abs() / sd).max() < 2e-7
    assert ((m2.double() - ref_m2).abs() / ref_m2).max() < 2e-6


def test_portable_stats_keep_inf_constant_and_empty():
    """The correction leaves inf to the mean (an inf not first: mean inf, m2 NaN), a
    constant channel exact, an empty batch zeros."""
    x = _outlier_first((8, 3, 50), 1e4, seed=12)
    x[:, 1] = 376_543.25
    x[7, 2, 49] = float("inf")
    mean, m2 = portable.stats(x)
    assert mean[1].item() == 376_543.25 and m2[1].item() == 0.0
    assert mean[2].item() == float("inf") and torch.isnan(m2[2])
    assert torch.isfinite(mean[0]) and torch.isfinite(m2[0])
    mean, m2 = portable.stats(x[:0])
    assert not mean.any() and not m2.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_bos_token_outlier_first(backend, channels_last):
    """BatchNorm over (N, C, L) with a large value at position 0 of sample 0: y was off by
    3e-4 of its range on the CPU backend (the variance by 6e-4), torch's by 1e-7; the
    same value at the last position was fine. Now both positions give torch's accuracy."""
    for first in (True, False):
        x = torch.randn(32, 16, 16, 32, generator=torch.Generator().manual_seed(13))
        if first:
            x[0, :, 0, 0] = 3000.0
        else:
            x[-1, :, -1, -1] = 3000.0
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        rm = torch.zeros(16, dtype=torch.float64)
        rv = torch.ones(16, dtype=torch.float64)
        with batchnorm.backends.using(backend):
            y = batchnorm.batch_norm(x, rm, rv, None, None, training=True, momentum=1.0,
                                     eps=1e-5)
        xd = x.double()
        ref = F.batch_norm(xd, None, None, None, None, True, 0.1, 1e-5)
        var = xd.var((0, 2, 3))
        assert ((y.double() - ref).abs().max() / ref.abs().max()) < 1e-6
        assert ((rv - var).abs() / var).max() < 2e-6


@pytest.mark.skipif("triton" not in batchnorm.backends.available(),
                    reason="triton is not installed")
@pytest.mark.parametrize("shape, channels_last, value", [
    ((16, 4, 8, 32), False, 3000.0),
    ((16, 4, 8, 32), True, 3000.0),
    ((512, 8), False, 3000.0),
    ((4, 3, 2000), False, 1e5),
    ((8, 4, 300), False, 1e4),
])
def test_triton_outlier_first(shape, channels_last, value):
    """The triton backend summed every value of a channel around its first one: with that
    an outlier, y was 7e-5 to 1e-3 of its range off and running_var 1.5e-4 to 2e-3 (torch
    1e-7 to 4e-6). Each lane of a tile now sums around its own first value: y within 1e-6,
    running_var 2.1e-6 (the outlier's own lane keeps ε·(its values) of the variance).
    Small shapes, as the interpreter runs them."""
    x = _outlier_first(shape, value, seed=14)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    rm = torch.zeros(c, dtype=torch.float64)
    rv = torch.ones(c, dtype=torch.float64)
    with batchnorm.backends.using("triton"):
        y = batchnorm.batch_norm(x, rm, rv, None, None, training=True, momentum=1.0,
                                 eps=1e-5)
    xd = x.double()
    ref = F.batch_norm(xd, None, None, None, None, True, 0.1, 1e-5)
    var = xd.var([0, *range(2, x.dim())])
    assert ((y.double() - ref).abs().max() / ref.abs().max()) < 5e-6
    assert ((rv - var).abs() / var).max() < 1e-5


@pytest.mark.skipif("triton" not in batchnorm.backends.available(),
                    reason="triton is not installed")
def test_triton_lane_merge_keeps_extremes():
    """What the per-lane merge must not break (each failed on its first version): a
    constant channel near float max (Σk·x / n overflowed: mean and m2 NaN), one ±inf
    past a channel's first value (mean ±inf, as torch's, not NaN), and constants whose
    one-ulp deviations are subnormal (m2 > 0 from Σk·δ² − n·δ²)."""
    from batchnorm.backends import triton as tb
    big = torch.tensor(3e38).item()  # as float32 holds it
    mean, m2 = tb.stats(torch.full((2, 3, 40), big))
    assert (mean == big).all() and (m2 == 0).all()
    mean, m2 = tb.stats(torch.full((40, 3), -big))
    assert (mean == -big).all() and (m2 == 0).all()
    for sign in (1.0, -1.0):
        x = torch.randn(2, 3, 50, generator=torch.Generator().manual_seed(15))
        x[1, 1, 20] = sign * float("inf")
        mean, m2 = tb.stats(x)
        assert mean[1].item() == sign * float("inf") and torch.isnan(m2[1])
        assert torch.isfinite(mean[[0, 2]]).all() and torch.isfinite(m2[[0, 2]]).all()
    vals = (torch.rand(64, generator=torch.Generator().manual_seed(16)) + 1) * 2.0 ** -54
    mean, m2 = tb.stats(vals[None, :].expand(37, 64).contiguous())
    assert torch.equal(mean.float(), vals) and not m2.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, channels_last, dtype", [
    ((4, 3, 5, 5), False, torch.float32),     # short rows
    ((4, 3, 5, 5), True, torch.float32),      # channels-last
    ((2, 3, 2000), False, torch.float32),     # long rows, in pieces
    ((64, 3), False, torch.float32),          # (N, C)
    ((64, 3, 4), False, torch.float32),       # wide rows
    ((4, 3, 5, 5), False, torch.float64),
    ((4, 3, 5, 5), False, torch.bfloat16),
    ((4, 3, 5, 5), True, torch.float16),
    ((64, 3), False, torch.bfloat16),
])
@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_infinite_first_value_gives_torchs_running_mean(backend, shape, channels_last, dtype,
                                                         value):
    """±inf as a channel's first value, the shift the CPU kernels sum around: every
    x − shift was inf − inf, so the mean and running_mean were NaN; torch's are ±inf
    (running_var NaN in both). The other channels are untouched."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(17)).to(dtype)
    x.view(shape[0], shape[1], -1)[0, 1, 0] = value
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    theirs = getattr(torch.nn, f"BatchNorm{len(shape) - 2 or 1}d")(3, dtype=torch.float64)
    ours = getattr(batchnorm, f"BatchNorm{len(shape) - 2 or 1}d")(3)
    theirs(x.double())
    with batchnorm.backends.using(backend):
        ours(x)
    assert ours.running_mean[1].item() == value
    assert torch.isnan(ours.running_var[1])
    keep = [0, 2]
    assert torch.allclose(ours.running_mean[keep].double(), theirs.running_mean[keep],
                          rtol=1e-2, atol=1e-3)
    assert torch.allclose(ours.running_var[keep].double(), theirs.running_var[keep],
                          rtol=1e-2)


@pytest.mark.skipif("triton" not in batchnorm.backends.available(),
                    reason="triton is not installed")
@pytest.mark.parametrize("shape", [(2, 3, 50), (40, 3), (2, 3, 2000)])
def test_triton_infinite_first_value(shape):
    """±inf as a channel's first value, the reference the Triton statistics sum around
    (stage 1) and add back (stage 2): the mean was NaN, torch's is ±inf."""
    from batchnorm.backends import triton as tb
    for value in (float("inf"), float("-inf")):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(18))
        x.view(shape[0], shape[1], -1)[0, 1, 0] = value
        mean, m2 = tb.stats(x)
        assert mean[1].item() == value and torch.isnan(m2[1])
        ref_mean, ref_m2 = portable.stats(x.double())
        assert torch.allclose(mean[[0, 2]].double(), ref_mean[[0, 2]], atol=1e-6)
        assert torch.allclose(m2[[0, 2]].double(), ref_m2[[0, 2]], rtol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("value", [1e19, 1e38])
def test_an_outlier_first_value_whose_squares_overflow_float32(backend, layout, value):
    """A channel's first value of 1e19 among zeros: the CPU kernels' float32 block of
    squared differences from it overflowed (15 x 1e38), and the channel read as of
    infinite variance (every output the bias; torch: var 3e35, y 5.57). At 1e38 the block
    of differences overflowed too: a mean of -inf and NaN outputs where torch's mean is
    3e36 and its variance inf (outputs 0). Both channels are now summed again."""
    if backend.name == "portable" and value == 1e38:
        pytest.skip("portable sums x - shift in float32: at 1e38 its mean overflows "
                    "(a known limit, README 'Numerics')")
    x = torch.zeros(8, 3, 2, 2)
    x[0, 0, 0, 0] = value
    x = x.to(backend.device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    ours = batchnorm.BatchNorm2d(3, device=backend.device)
    theirs = torch.nn.BatchNorm2d(3)  # float32 on the CPU: at 1e38 the variance is inf
    y = ours(x)
    y_ref = theirs(x.cpu())
    torch.testing.assert_close(y.cpu(), y_ref, rtol=1e-5, atol=1e-5)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(ours, name).cpu(), getattr(theirs, name),
                                   rtol=1e-5, atol=0)


def test_short_rows_of_many_samples_keep_their_statistics(backend):
    """(N, C, L) with a short L and a large N: torch's float32 sum over dims (0, 2) adds
    one value at a time, and the portable backend's variance was 150% off (an outlier as
    the first value: the shift it sums around is far from the mean)."""
    if backend.interpreted:
        pytest.skip("Triton interpreter: the shape is too large for it")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2 ** 18, 2, 2, generator=gen)
    x[0, :, 0] = 3000.0
    bn = batchnorm.BatchNorm1d(2, momentum=1.0).to(backend.device)
    y = bn(x.to(backend.device))
    x64 = x.double()
    mean, var = x64.mean((0, 2)), x64.var((0, 2))
    torch.testing.assert_close(bn.running_mean.cpu().double(), mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(bn.running_var.cpu().double(), var, rtol=1e-6, atol=0)
    expected = (x64 - mean.view(1, 2, 1)) / (x64.var((0, 2), unbiased=False).view(1, 2, 1)
                                             + bn.eps).sqrt()
    torch.testing.assert_close(y.cpu().double(), expected, rtol=0, atol=1e-3)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("value", [1e160, 1e300])
def test_float64_values_whose_squares_overflow(backend, layout, value):
    """float64 data past 1e154: after the CPU kernels summed the channel again around its
    mean, the square of the (rounding-sized) sum of differences overflowed as their sum of
    squares did, inf − inf: a NaN variance and NaN outputs where torch's variance is inf
    (outputs the bias). One channel an outlier among zeros, one all near the value."""
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(8, 2, 2, 2, dtype=torch.float64)
    x[0, 0, 0, 0] = value
    x[:, 1] = value * (1 + torch.rand(8, 2, 2, generator=gen, dtype=torch.float64))
    x = x.to(backend.device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    ours = batchnorm.BatchNorm2d(2, device=backend.device, dtype=torch.float64)
    theirs = torch.nn.BatchNorm2d(2, dtype=torch.float64)
    torch.testing.assert_close(ours(x).cpu(), theirs(x.cpu()))
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(ours, name).cpu(), getattr(theirs, name))
