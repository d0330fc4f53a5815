"""The Triton backend's four primitives against ``backends.portable`` and float64.

On a GPU these run on CUDA with larger shapes and the production tile sizes. Without one
they run on CPU tensors through Triton's interpreter (conftest sets TRITON_INTERPRET=1
before triton is imported) on a few tiny shapes, with tiles shrunk so that every code path
still runs: several partials per channel, several tiles per program, ragged tails.
Every buffer the backend allocates is poisoned with NaN, so an element a kernel forgets
to write fails the comparison.
"""

import pytest
import torch

from batchnorm import backends
from batchnorm.backends import portable
from tolerances import TOLERANCES, assert_close

if "triton" not in backends.available():
    pytest.skip("triton is not installed", allow_module_level=True)

import triton
import triton.language as tl

import batchnorm.backends.triton as tb  # noqa: E402
from batchnorm.backends.triton._elementwise import _tile, _tiles
from batchnorm.backends.triton._reduce import _rect_ncl, _rows_mc

# NumPy (the interpreter) warns when masked-off lanes of a tile overflow exp(); those lanes
# are never stored.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# (kernel view shape): (N, C, L) and (M, C). On the CPU they are tiny (the interpreter
# runs every program in Python); ragged on purpose: nothing is a multiple of a tile.
# On CUDA the cost is compilation (one per dtype, activation, flag and tile shape), so the
# elementwise tests sweep dtypes with one activation and activations with one dtype.
if CUDA:
    # (4097, 100): C no multiple of 16 in blocks of 32 (the merges' tiles; see CONFIG's
    # merge_warps)
    SHAPES = [(16, 32, 1000), (128, 7, 49), (2, 5, 70001), (4097, 100), (1000, 2048)]
    DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
else:
    SHAPES = [(3, 5, 37), (6, 3, 1), (50, 12)]
    DTYPES = [torch.float32, torch.bfloat16]

SMALL_TILES = dict(reduce_tile=64, elem_tile=64, block_c=8, merge_block_p=4, merge_block_c=4,
                   programs_per_sm=8)


def _id(shape):
    return {2: "MC", 3: "NCL"}.get(len(shape), "") + "x".join(map(str, shape))


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    """Poisoned allocations everywhere; tiny tiles under the interpreter."""
    if not CUDA:
        for key, value in SMALL_TILES.items():
            monkeypatch.setitem(tb.CONFIG, key, value)
    monkeypatch.setattr(tb, "torch", _PoisonTorch())
    yield


class _PoisonTorch:
    """``torch`` as the backend sees it, except that new float tensors are full of NaN."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def empty(self, *args, **kwargs):
        return self._poison(torch.empty(*args, **kwargs))

    def empty_like(self, *args, **kwargs):
        return self._poison(torch.empty_like(*args, **kwargs))


def _data(shape, dtype, mean=0.0, std=1.0):
    """Fresh random data whose channels have different means and spreads."""
    c = shape[1]
    per = [1, c] + [1] * (len(shape) - 2)
    offset = torch.randn(c, dtype=torch.float64).view(per) * 3 + mean
    spread = torch.rand(c, dtype=torch.float64).view(per) * 2 + 0.5
    return (torch.randn(shape, dtype=torch.float64) * spread * std + offset).to(dtype).to(DEVICE)


def _params(c, dtype=torch.float32):
    w = (torch.randn(c, dtype=torch.float64) + 1).to(dtype).to(DEVICE)
    b = torch.randn(c, dtype=torch.float64).to(dtype).to(DEVICE)
    return w, b


def _batch_stats(x):
    """Batch mean and invstd (eps 1e-5) from the portable backend, in the acc dtype (as
    ops hands them to the elementwise primitives)."""
    mean, m2 = portable.stats(x)
    count = x.numel() // x.shape[1]
    return mean.to(m2.dtype), torch.rsqrt(m2 / count + 1e-5), count


def _acc_tol(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------
# stats


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_stats(shape, dtype):
    x = _data(shape, dtype)
    mean, m2 = tb.stats(x)
    assert mean.dtype == portable.mean_dtype(x) and m2.dtype == portable.acc_dtype(dtype)
    ref_mean, ref_m2 = portable.stats(x.double())  # float64 on the same (rounded) input
    acc = _acc_tol(dtype)
    assert_close(mean, ref_mean, dtype=acc, scale=10)
    assert_close(m2, ref_m2, dtype=acc, scale=10)


@pytest.mark.parametrize("shape", SHAPES[:2] + SHAPES[-1:], ids=_id)
def test_stats_large_mean(shape):
    """Mean 1e6, spread 1: raw Σx² − (Σx)²/n would lose every digit of m2 in float32."""
    x = _data(shape, torch.float32, mean=1e6)
    mean, m2 = tb.stats(x)
    ref_mean, ref_m2 = portable.stats(x.double())
    # the float64 mean keeps what a float32 one would round (its spacing at 1e6 is 0.06)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-11, atol=0)
    torch.testing.assert_close(m2.double(), ref_m2, rtol=1e-4, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES[:1] + SHAPES[-1:], ids=_id)
def test_stats_constant_channels(shape, dtype):
    """A constant channel has mean == its value and m2 == 0, exactly, at any magnitude."""
    x = _data(shape, dtype)
    values = torch.tensor([1e6 + 0.5, -3.7, 0.1, 123.456], dtype=dtype)
    c = shape[1]
    for i in range(min(c, 4)):
        x[:, i] = values[i].to(DEVICE)
    mean, m2 = tb.stats(x)
    expected = values[: min(c, 4)].to(mean.dtype).to(DEVICE)
    assert torch.equal(mean[: min(c, 4)], expected)
    assert torch.equal(m2[: min(c, 4)], torch.zeros_like(expected))


def _assert_reductions(x, mean, invstd, count, w, b, r, dy):
    """float32 stats and backward_reduce (relu, residual) against float64."""
    ref_mean, ref_m2 = portable.stats(x.double())
    got_mean, got_m2 = tb.stats(x)
    assert_close(got_mean, ref_mean, dtype=torch.float32, scale=10)
    assert_close(got_m2, ref_m2, dtype=torch.float32, scale=10)
    sums = tb.backward_reduce(dy, x, mean, invstd, w, b, r, "relu", 0.0)
    ref = portable.backward_reduce(*_f64(dy, x, mean, invstd, w, b, r), "relu", 0.0)
    for got, want in zip(sums, ref):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * count ** 0.5)


@pytest.mark.skipif(not CUDA, reason="under the interpreter every test already uses tiny tiles")
@pytest.mark.parametrize("shape", [(8, 6, 3000), (3000, 40)], ids=_id)
def test_tiny_tiles_compiled(shape, monkeypatch):
    """Compiled kernels with tiles small enough that every program loops over many tiles
    and every merge over many partials: the paths production tiles reach only on big data."""
    for key, value in dict(reduce_tile=256, elem_tile=256, block_c=16, merge_block_p=8,
                           merge_block_c=8, programs_per_sm=1).items():
        monkeypatch.setitem(tb.CONFIG, key, value)
    x, mean, invstd, count, w, b, r, dy = _case(shape, torch.float32, True, True)
    _assert_reductions(x, mean, invstd, count, w, b, r, dy)


def test_stats_empty_and_deterministic():
    x = torch.empty((0, 4, 5), device=DEVICE)
    mean, m2 = tb.stats(x)
    assert torch.equal(mean, torch.zeros(4, device=DEVICE)) and torch.equal(m2, mean)
    x = _data(SHAPES[0], torch.float32)
    a, b = tb.stats(x), tb.stats(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --------------------------------------------------------------------------------------
# normalize, backward_reduce, backward_elementwise


ACT_CASES = [  # (activation, slope, weight/bias given, residual given)
    ("none", 0.0, True, False),
    ("relu", 0.0, True, True),
    ("leaky_relu", 0.2, False, True),
    ("silu", 0.0, True, False),
]
if CUDA:
    ACT_CASES += [("gelu", 0.0, True, True), ("gelu_tanh", 0.0, False, False),
                  ("sigmoid", 0.0, True, True), ("tanh", 0.0, True, False)]
    ELEM_CASES = ([(shape, dtype, ACT_CASES[1]) for shape in SHAPES for dtype in DTYPES]
                  + [(shape, torch.float32, case) for shape in (SHAPES[0], SHAPES[3])
                     for case in ACT_CASES if case[0] != "relu"])
else:
    ELEM_CASES = [(shape, dtype, case) for shape in SHAPES for dtype in DTYPES
                  for case in ACT_CASES]


def _elem_id(case):
    shape, dtype, (act, *_rest) = case
    return f"{_id(shape)}-{str(dtype)[6:]}-{act}"


def _case(shape, dtype, affine, with_residual, param_dtype=torch.float32):
    x = _data(shape, dtype)
    mean, invstd, count = _batch_stats(x)
    w, b = _params(shape[1], param_dtype) if affine else (None, None)
    r = _data(shape, dtype) if with_residual else None
    dy = _data(shape, dtype)
    return x, mean, invstd, count, w, b, r, dy


def _f64(*ts):
    return [t.double() if t is not None else None for t in ts]


@pytest.mark.parametrize("case", ELEM_CASES, ids=_elem_id)
def test_normalize(case):
    shape, dtype, (act, slope, affine, res) = case
    x, mean, invstd, _, w, b, r, _ = _case(shape, dtype, affine, res)
    y = tb.normalize(x, mean, invstd, w, b, r, act, slope)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, portable.normalize(x, mean, invstd, w, b, r, act, slope), scale=2)
    expected = portable.normalize(*_f64(x, mean, invstd, w, b, r), act, slope)
    assert_close(y, expected, dtype=dtype, scale=2)


@pytest.mark.parametrize("case", ELEM_CASES, ids=_elem_id)
def test_backward(case):
    shape, dtype, (act, slope, affine, res) = case
    """backward_reduce, then backward_elementwise with batch and with fixed statistics."""
    x, mean, invstd, count, w, b, r, dy = _case(shape, dtype, affine, res)
    sums = tb.backward_reduce(dy, x, mean, invstd, w, b, r, act, slope)
    ref = portable.backward_reduce(*_f64(dy, x, mean, invstd, w, b, r), act, slope)
    acc = _acc_tol(dtype)
    # Sums of count terms of size ~1 with random signs: they are ~√count in size, and the
    # rounding of the accumulation grows with √count too; so atol does, rtol does not.
    rtol, atol = TOLERANCES[acc]
    for got, want in zip(sums, ref):
        assert got.dtype == portable.acc_dtype(dtype)
        torch.testing.assert_close(got.double(), want, rtol=10 * rtol,
                                   atol=10 * atol * count ** 0.5)

    for train in (True, False):
        s = sums if train else (None, None)
        dx, dres = tb.backward_elementwise(dy, x, mean, invstd, w, b, r, *s, count, act, slope,
                                           res)
        assert dx.dtype == dtype
        want_dx, want_dres = portable.backward_elementwise(
            *_f64(dy, x, mean, invstd, w, b, r), *_f64(*s), count, act, slope, res)
        # dx subtracts per-channel means of dz: its error scales with dz, not with dx.
        assert_close(dx, want_dx, dtype=dtype, scale=4)
        if res:
            assert dres.dtype == r.dtype
            assert_close(dres, want_dres, dtype=dtype, scale=2)
        else:
            assert dres is None


@pytest.mark.parametrize("shape", [SHAPES[2] if CUDA else SHAPES[0], SHAPES[-1]], ids=_id)
def test_persistent_grid(shape, monkeypatch):
    """A grid capped at a few programs per SM, each looping over tiles, gives the same bits."""
    x, mean, invstd, count, w, b, r, dy = _case(shape, torch.float32, True, True)
    args = (x, mean, invstd, w, b, r, "silu", 0.0)
    sums = tb.backward_reduce(dy, *args)
    y, (dx, dr) = tb.normalize(*args), tb.backward_elementwise(dy, *args[:6], *sums, count,
                                                               "silu", 0.0, True)
    geometry = tb.geometry(x.shape, False)
    n_tiles = tb._plans.elem_plan(geometry, x.device)["grid"][0]
    monkeypatch.setitem(tb.CONFIG, "elem_programs_per_sm", 1)
    assert tb._plans.elem_plan(geometry, x.device)["grid"][0] < n_tiles  # several tiles per program
    assert torch.equal(tb.normalize(*args), y)
    dx2, dr2 = tb.backward_elementwise(dy, *args[:6], *sums, count, "silu", 0.0, True)
    assert torch.equal(dx2, dx) and torch.equal(dr2, dr)


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[-1]], ids=_id)
def test_pipelined_reductions(shape, stages, monkeypatch):
    """Stage 1's loop with its loads pipelined (CONFIG reduce_stages) gives the same sums
    (the same arithmetic per element; the compiler may lay the tile out differently over
    the threads, so the last additions may round differently)."""
    if not CUDA:
        pytest.skip("the interpreter runs tl.range(num_stages=...) as a plain loop")
    x, mean, invstd, count, w, b, r, dy = _case(shape, torch.float32, True, True)
    want = (*tb.stats(x), *tb.backward_reduce(dy, x, mean, invstd, w, b, r, "silu", 0.0))
    monkeypatch.setitem(tb.CONFIG, "reduce_stages", stages)
    got = (*tb.stats(x), *tb.backward_reduce(dy, x, mean, invstd, w, b, r, "silu", 0.0))
    n = (x.numel() // x.shape[1]) ** 0.5
    for g_, w_ in zip(got, want):
        assert_close(g_, w_, dtype=torch.float32, scale=4 * n)


def test_float64_exact():
    """float64 stays float64 throughout (LeakyReLU's slope too, though a GPU passes
    runtime floats as float32)."""
    shape = SHAPES[0]
    x, mean, invstd, count, w, b, r, dy = _case(shape, torch.float64, True, True,
                                                 param_dtype=torch.float64)
    act, slope = "leaky_relu", 0.01
    y = tb.normalize(x, mean, invstd, w, b, r, act, slope)
    torch.testing.assert_close(y, portable.normalize(x, mean, invstd, w, b, r, act, slope),
                               rtol=1e-12, atol=1e-12)
    sums = tb.backward_reduce(dy, x, mean, invstd, w, b, r, act, slope)
    dx, dres = tb.backward_elementwise(dy, x, mean, invstd, w, b, r, *sums, count, act, slope,
                                       True)
    want = portable.backward_elementwise(dy, x, mean, invstd, w, b, r,
                                         *portable.backward_reduce(dy, x, mean, invstd, w, b,
                                                                   r, act, slope),
                                         count, act, slope, True)
    torch.testing.assert_close(dx, want[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dres, want[1], rtol=1e-12, atol=1e-12)


def test_half_weights_and_zero_variance():
    """Input-dtype weights; invstd == 0 (a constant channel with eps = 0) gives y = bias
    and dx = 0, never NaN."""
    shape = SHAPES[0]
    x, mean, invstd, count, w, b, r, dy = _case(shape, torch.bfloat16, True, False,
                                                 param_dtype=torch.bfloat16)
    invstd = invstd.clone()
    invstd[0] = 0
    y = tb.normalize(x, mean, invstd, w, b, None, "relu", 0.0)
    assert_close(y, portable.normalize(x, mean, invstd, w, b, None, "relu", 0.0), scale=2)
    assert torch.equal(y[:, 0], torch.relu(b[0]).expand_as(y[:, 0]))
    sums = tb.backward_reduce(dy, x, mean, invstd, w, b, None, "relu", 0.0)
    dx, _ = tb.backward_elementwise(dy, x, mean, invstd, w, b, None, *sums, count, "relu", 0.0,
                                    False)
    assert torch.equal(dx[:, 0], torch.zeros_like(dx[:, 0]))
    assert not dx.isnan().any()


# --------------------------------------------------------------------------------------
# selection and the end-to-end module


def test_supports(monkeypatch):
    x = torch.zeros(2, 3, device=DEVICE)
    assert tb.supports(x)
    assert not tb.supports(x.long())
    if not CUDA:
        monkeypatch.setattr(tb, "_INTERPRET", False)
        assert not tb.supports(x)
    else:
        assert backends.select(x) is tb


MODULE_SHAPES = [(8, 16, 20, 20)] if CUDA else [(3, 4, 5, 6)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "CL"])
@pytest.mark.parametrize("shape", MODULE_SHAPES, ids=_id)
def test_module_parity(shape, channels_last):
    """batchnorm.BatchNorm2d (+ fused ReLU) on the triton backend == torch's BN then ReLU."""
    import batchnorm

    torch.manual_seed(0)
    ours = batchnorm.BatchNorm2d(shape[1], activation="relu").to(DEVICE)
    theirs = torch.nn.BatchNorm2d(shape[1]).to(DEVICE)
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.copy_(torch.linspace(0.5, 1.5, shape[1]))
            m.bias.copy_(torch.linspace(-0.2, 0.3, shape[1]))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = _data(shape, torch.float32).contiguous(memory_format=fmt)
    dy = torch.randn(shape, device=DEVICE)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    with backends.using("triton"):
        for _ in range(2):  # twice: the running statistics move as torch's do
            y1 = ours(x1)
    for _ in range(2):
        y2 = torch.relu(theirs(x2))
    assert y1.is_contiguous(memory_format=fmt)
    assert_close(y1, y2, scale=2)
    with backends.using("triton"):
        y1.backward(dy)
    y2.backward(dy)
    assert_close(x1.grad, x2.grad, scale=4)
    assert_close(ours.weight.grad, theirs.weight.grad, scale=10)
    assert_close(ours.bias.grad, theirs.bias.grad, scale=10)
    assert_close(ours.running_mean, theirs.running_mean)
    assert_close(ours.running_var, theirs.running_var)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)


# (input shape, channels_last)
FUSED_CASES = [((4, 3, 50), False), ((2, 5, 7, 9), False), ((2, 5, 7, 9), True),
               ((300, 24), False)] if not CUDA else [
    ((8, 32, 64, 64), False), ((8, 32, 64, 64), True), ((64, 256, 7, 7), False),
    ((64, 256, 7, 7), True), ((4096, 100), False)]


@pytest.mark.parametrize("dtype", [torch.float32] + ([] if CUDA else [torch.float64]),
                         ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape, channels_last", FUSED_CASES,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple)
                         else ("CL" if v else ""))
def test_fused_merges(shape, channels_last, dtype, monkeypatch):
    """A training step is four launches where each reduction's last program of a channel
    block merges the block (CONFIG's fused_merge_max), six with the merges launched apart,
    and both give the same outputs, gradients, running statistics and count; the
    counters are 0 again after each launch. Many partials a block, to merge in several
    steps; on a GPU the step runs 20 times and must repeat itself bit for bit (a program
    merging before the others' partials were visible would not)."""
    import batchnorm

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = _data(shape, dtype, mean=100.0).contiguous(memory_format=fmt)
    dy = _data(shape, dtype).contiguous(memory_format=fmt)
    launched = []
    real_launch = tb.launch
    monkeypatch.setattr(tb, "launch", lambda fn, *a, **k: launched.append(fn.__name__) or
                        real_launch(fn, *a, **k))
    if not CUDA:
        monkeypatch.setitem(tb.CONFIG, "merge_block_p", 2)  # several merge steps
    results = {}
    for fused in (True, False):
        monkeypatch.setitem(tb.CONFIG, "fused_merge_max", 1 << 30 if fused else 0)
        torch.manual_seed(0)
        layer = batchnorm.BatchNorm1d if len(shape) < 4 else batchnorm.BatchNorm2d
        m = layer(shape[1], activation="relu").to(DEVICE, dtype)
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
        runs = []
        for _ in range(20 if CUDA else 1):
            launched.clear()
            xg = x.clone().requires_grad_()
            with backends.using("triton"):
                y = m(xg)
                y.backward(dy)
            runs.append([t.detach().clone() for t in (
                y, xg.grad, m.weight.grad, m.bias.grad, m.running_mean, m.running_var)])
            m.weight.grad = m.bias.grad = None
            m.running_mean.zero_(), m.running_var.fill_(1)
        assert launched == (["stats_fused_" + ("mc" if channels_last or len(shape) == 2
                                               else "ncl"), "normalize_kernel",
                             "backward_fused_" + ("mc" if channels_last or len(shape) == 2
                                                  else "ncl"), "backward_kernel"]
                            if fused else [
                                "stats_partial_" + ("mc" if channels_last or len(shape) == 2
                                                    else "ncl"), "stats_finalize",
                                "normalize_kernel", "backward_partial_" + (
                                    "mc" if channels_last or len(shape) == 2 else "ncl"),
                                "sum_partials_centred", "backward_kernel"]), launched
        assert int(m.num_batches_tracked) == len(runs)
        for run in runs[1:]:
            assert all(torch.equal(a, b) for a, b in zip(run, runs[0]))
        results[fused] = runs[0]
    assert all(int(t.abs().sum()) == 0 for t in tb._COUNTERS.values())
    for got, want in zip(results[True], results[False]):
        torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 1e-12,
                                   atol=1e-5 if dtype == torch.float32 else 1e-12)


def test_a_captured_step_runs_the_eager_kernels(monkeypatch):
    """During a CUDA graph capture a training step launches the kernels of the eager steps
    before it (the merges in stage 1, on counters of the capture's own), not the merges
    apart: those would be loaded inside the capture, which fails on drivers before CUDA
    12.3. Same bits as the eager step; the cached counters are not touched. (Under the
    interpreter the capture is what ``_capturing`` says.)"""
    import batchnorm

    x = _data((4, 3, 50), torch.float32, mean=10.0)
    dy = _data((4, 3, 50), torch.float32)
    monkeypatch.setitem(tb.CONFIG, "fused_merge_max", 1 << 30)
    launched = []
    real_launch = tb.launch
    monkeypatch.setattr(tb, "launch", lambda fn, *a, **k: launched.append(fn.__name__) or
                        real_launch(fn, *a, **k))
    results = []
    for capturing in (False, True):
        monkeypatch.setattr(tb, "_capturing", lambda x, capturing=capturing: capturing)
        m = batchnorm.BatchNorm1d(3, activation="relu").to(DEVICE)
        xg = x.clone().requires_grad_()
        launched.clear()
        counters = {k: v.clone() for k, v in tb._COUNTERS.items()}
        with backends.using("triton"):
            m(xg).backward(dy)
        assert launched == ["stats_fused_ncl", "normalize_kernel", "backward_fused_ncl",
                            "backward_kernel"]
        if capturing:
            assert counters.keys() == tb._COUNTERS.keys()
            assert all(torch.equal(v, counters[k]) for k, v in tb._COUNTERS.items())
        results.append((xg.grad, m.weight.grad, m.running_mean, m.running_var))
    for eager, captured in zip(*results):
        assert torch.equal(captured, eager)


def test_a_failed_fused_launch_leaves_no_ticket(monkeypatch):
    """A fused launch that raises part way leaves every counter at 0, so the next step's
    merges run when they should. Under the interpreter the programs run one by one: here
    the last program's merge fails (a merge tile of 3 partials, no power of two) after
    every program took its ticket; on a GPU the launch fails to compile, before any."""
    import batchnorm

    x = _data((4, 3, 50), torch.float32)
    monkeypatch.setitem(tb.CONFIG, "fused_merge_max", 1 << 30)
    monkeypatch.setitem(tb.CONFIG, "merge_block_p", 3)
    monkeypatch.setitem(tb.CONFIG, "merge_block_c", 1)
    with backends.using("triton"), pytest.raises(Exception):  # noqa: B017 (Triton's own)
        batchnorm.BatchNorm1d(3).to(DEVICE)(x)
    assert all(int(t.abs().sum()) == 0 for t in tb._COUNTERS.values())
    monkeypatch.setitem(tb.CONFIG, "merge_block_p", 4)
    with backends.using("triton"):
        y = batchnorm.BatchNorm1d(3).to(DEVICE)(x)
    assert_close(y, torch.nn.BatchNorm1d(3).to(DEVICE)(x), scale=2)


def test_fused_merge_bounds(monkeypatch):
    """The last program merges alone: only blocks of at most fused_merge_max partial
    values; its tile keeps 8 values a thread in the stage-1 plan's warps; the plans carry
    the answer for their configuration."""
    cfg = {**tb.CONFIG, "merge_block_p": 64, "merge_block_c": 32, "fused_merge_max": 16384}
    merge_p = tb._plans.fused_merge_p
    assert merge_p(False, 33, 128, 8, cfg) == 64  # NCL: one channel a block
    cfg["fused_merge_max"] = 128 * 33
    assert merge_p(True, 33, 128, 8, cfg) == 16
    assert merge_p(True, 33, 128, 4, cfg) == 8
    assert merge_p(True, 34, 128, 8, cfg) == 0
    cfg["fused_merge_max"] = 0
    assert merge_p(False, 33, 1, 8, cfg) == 0
    g = tb.geometry(torch.Size((4096, 8)), False)
    for limit in (0, 1 << 30):
        monkeypatch.setitem(tb.CONFIG, "fused_merge_max", limit)
        plan = tb._plans.reduce_plan(g, torch.device(DEVICE))
        assert plan["P"] > 1 and (plan["merge_p"] > 0) == (limit > 0)


def test_lasting_counters_come_from_a_thread_of_their_own(monkeypatch):
    """The fused merges' cached counters are allocated off the calling thread, whose
    allocations torch.compile's CUDA graphs may send to a pool they later take back; an
    error there is raised on the calling thread."""
    import threading

    threads = []

    class Recording(_PoisonTorch):
        def empty(self, *args, **kwargs):
            threads.append(threading.get_ident())
            return super().empty(*args, **kwargs)

    monkeypatch.setattr(tb, "torch", Recording())
    counters = tb._lasting_counters(5, torch.int32, torch.device("cpu"))
    assert torch.equal(counters, torch.zeros(5, dtype=torch.int32))
    assert threads and threading.get_ident() not in threads

    class Failing(_PoisonTorch):
        def empty(self, *args, **kwargs):
            raise RuntimeError("out of memory, say")

    monkeypatch.setattr(tb, "torch", Failing())
    with pytest.raises(RuntimeError, match="out of memory, say"):
        tb._lasting_counters(5, torch.int32, torch.device("cpu"))


@pytest.mark.skipif(not CUDA, reason="torch.compile's CUDA graphs need a GPU")
def test_reduce_overhead_warms_up_after_graphs_ran(monkeypatch):
    """Under torch.compile(mode="reduce-overhead") a function warms up with its
    allocations sent to the graphs' pool; one that warms up after other graphs ran met
    the fused merges' counters for the first time there (and grew them), and the next
    recording takes back what the pool gave after its checkpoint. The counters come
    from elsewhere, so each call gives the eager values."""
    from torch._dynamo.utils import counters

    import batchnorm

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setitem(tb.CONFIG, "fused_merge_max", 1 << 30)
    tb._COUNTERS.clear()
    # evaluation (no reduction) first, then batch statistics of 64 and of 2048 channels
    # (NCHW: a counter per channel, more than the 1024 first allocated)
    evaluate = batchnorm.BatchNorm2d(64).to(DEVICE).eval()
    small = batchnorm.BatchNorm2d(64, track_running_stats=False).to(DEVICE)
    large = batchnorm.BatchNorm2d(2048, track_running_stats=False).to(DEVICE)
    compiled = {m: torch.compile(m, mode="reduce-overhead") for m in (evaluate, small, large)}
    xs = {evaluate: _data((8, 64, 7, 7), torch.float32),
          small: _data((8, 64, 7, 7), torch.float32),
          large: _data((8, 2048, 7, 7), torch.float32)}
    main = torch._C._cuda_getCurrentRawStream(torch.cuda.current_device())
    with backends.using("triton"):
        for _ in range(3):
            compiled[evaluate](xs[evaluate])
        for step in range(4):
            for m in (evaluate, small, large):
                got = compiled[m](xs[m] + step).clone()
                torch.testing.assert_close(got, m(xs[m] + step), rtol=1e-5, atol=1e-5)
    torch.cuda.synchronize()
    # CUDA graphs ran (inductor did not skip them), and warmed up on a stream of their own
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    assert any(key[1] != main for key in tb._COUNTERS), list(tb._COUNTERS)
    assert all(int(t.abs().sum()) == 0 for t in tb._COUNTERS.values())


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_cuda_graph_capture():
    """A training step (forward, backward, running-statistics update) captures in a CUDA
    graph: nothing on the path reads a device value on the host."""
    import batchnorm

    m = batchnorm.BatchNorm2d(16, activation="relu").to(DEVICE)
    x = _data((8, 16, 10, 10), torch.float32).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    dy = torch.randn_like(x)

    def step():
        y = m(x)
        grads = torch.autograd.grad(y, (x, m.weight, m.bias), dy)
        # Detached: an autograd graph kept alive from an uncaptured step pins the leaves'
        # AccumulateGrad nodes to the default stream, and capture then fails (torch 2.11).
        return tuple(t.detach() for t in (y, *grads))

    with backends.using("triton"):
        expected = step()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        tracked = int(m.num_batches_tracked)
        graph.replay()
        torch.cuda.synchronize()
    for got, want in zip(captured, expected):
        torch.testing.assert_close(got, want)
    assert int(m.num_batches_tracked) == tracked + 1


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[-1]], ids=_id)
def test_fused_forward_matches_ops(shape, dtype, affine, monkeypatch):
    """batch_norm_forward (stats + the C-sized math in one kernel + normalize) gives what
    ops computes from the primitives and torch ops, large means included."""
    from batchnorm import ops

    x = _data(shape, dtype, mean=1e4 if dtype != torch.bfloat16 else 0.0)
    w, b = _params(shape[1]) if affine else (None, None)
    r = _data(shape, dtype)
    args = (x, w, b, r, None, None, 1e-5, "silu", 0.0)
    with backends.using("triton"):
        y, mean, var, updated, saved = tb.batch_norm_forward(*args)
        assert not updated and [row.shape for row in saved] == [(shape[1],)] * 4
        monkeypatch.delattr(tb, "batch_norm_forward")
        y2, mean2, var2 = ops._batch_norm_forward(*args)
    assert mean.dtype == mean2.dtype and var.dtype == var2.dtype and y.dtype == dtype
    torch.testing.assert_close(mean, mean2, rtol=1e-12, atol=0)
    assert_close(var, var2, dtype=var.dtype)
    assert_close(y, y2, scale=2)


def test_fused_forward_declines():
    """Empty inputs and strided running buffers are left to ops."""
    x = _data(SHAPES[0], torch.float32)
    c = x.shape[1]
    rm, rv = torch.zeros(c, 2, device=DEVICE)[:, 0], torch.ones(c, 2, device=DEVICE)[:, 1]
    assert tb.batch_norm_forward(x, None, None, None, rm, rv, 1e-5, "none", 0.0) is None
    empty = torch.empty((0, c, 3), device=DEVICE)
    assert tb.batch_norm_forward(empty, None, None, None, None, None, 1e-5, "none", 0.0) is None


@pytest.mark.parametrize("buffers", [torch.float32, torch.float64], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[-1]], ids=_id)
def test_fused_eval_matches_ops(shape, affine, buffers, monkeypatch):
    """Evaluation in two launches (the coefficients from the running buffers, normalize)
    gives what ops computes with torch ops, the mean and var as ops copies them (the var
    in the acc dtype, a float64 mean kept float64), and its backward with or without the
    saved rows alike."""
    from batchnorm import ops

    x = _data(shape, torch.float32)
    c = x.shape[1]
    w, b = _params(c) if affine else (None, None)
    rm = (torch.randn(c, dtype=torch.float64) * 3 + 1e4).to(buffers).to(DEVICE)
    rv = (torch.rand(c, dtype=torch.float64) + 0.5).to(buffers).to(DEVICE)
    args = (x, w, b, None, rm, rv, 1e-5, "relu", 0.0)
    with backends.using("triton"):
        y, mean, var, updated, saved = tb.batch_norm_forward(*args)
        assert not updated
        monkeypatch.delattr(tb, "batch_norm_forward")
        y2, mean2, var2 = ops._batch_norm_forward(*args)
    assert mean.dtype == mean2.dtype == buffers and var.dtype == torch.float32
    assert torch.equal(mean, mean2) and torch.equal(var, var2)
    assert_close(y, y2, scale=2)
    dy = _data(shape, torch.float32)
    with_saved = tb.batch_norm_backward(dy, x, w, b, None, mean, var, 1e-5, False, "relu", 0.0,
                                        True, True, False, saved=saved)
    without = tb.batch_norm_backward(dy, x, w, b, None, mean, var, 1e-5, False, "relu", 0.0,
                                     True, True, False)
    for got, want in zip(with_saved, without):
        assert (got is None and want is None) or torch.equal(got, want)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_custom_op_outputs_alias_nothing(training):
    """``batchnorm::batch_norm`` on the triton backend passes ``torch.library.opcheck``:
    its outputs share storage with no input nor with each other (the evaluation's mean
    and var were two rows of one buffer: torch refused them in a direct call, under
    torch.compile and in opcheck's test_schema), and it traces (aot_eager) as it runs."""
    from batchnorm import ops

    x = _data((2, 3, 5), torch.float32).requires_grad_()
    w, b = (t.requires_grad_() for t in _params(3))
    rm, rv = (None, None) if training else (torch.randn(3, device=DEVICE),
                                            torch.rand(3, device=DEVICE) + 0.5)
    with backends.using("triton"):
        _, mean, var = ops.batch_norm_op(x, w, b, None, rm, rv, 1e-5, "relu", 0.0)
        assert mean.untyped_storage().data_ptr() != var.untyped_storage().data_ptr()
        torch.library.opcheck(ops.batch_norm_op, (x, w, b, None, rm, rv, 1e-5, "relu", 0.0))


@pytest.mark.parametrize("case", [
    (torch.float32, torch.float32, True, False, "relu"),
    (torch.bfloat16, torch.float32, True, True, "leaky_relu"),
    (torch.float32, torch.float64, False, True, "silu"),
    (torch.float64, torch.float32, True, False, "none"),
    (torch.float16, torch.float16, False, False, "gelu"),
], ids=["f32", "bf16-res", "f64-buffers", "f64", "f16-buffers"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[-1]], ids=_id)
def test_eval_for_y_alone_is_one_launch(shape, case, monkeypatch):
    """When the caller keeps y alone (no autograd), evaluation normalizes straight from
    the running buffers: one launch instead of two, and the same y (values equal, the
    sign of a zero aside). Not for a float64 running mean on narrower data, which the
    two launches split for the kernels (rounded, it moves outputs by up to 0.03/std)."""
    dtype, buffers, affine, residual, act = case
    x = _data(shape, dtype, mean=1e3 if dtype != torch.bfloat16 else 0.0)
    c = x.shape[1]
    w, b = _params(c, torch.float32 if dtype == torch.bfloat16 else dtype) if affine else (
        None, None)
    r = _data(shape, dtype) if residual else None
    rm = (torch.randn(c, dtype=torch.float64) * 3 + 1e3).to(buffers).to(DEVICE)
    rv = (torch.rand(c, dtype=torch.float64) + 0.5).to(buffers).to(DEVICE)
    before = rm.clone(), rv.clone()
    args = (x, w, b, r, rm, rv, 1e-3, act, 0.1)
    launched = []
    real_launch = tb.launch
    monkeypatch.setattr(tb, "launch", lambda fn, *a, **k: launched.append(fn) or
                        real_launch(fn, *a, **k))
    with backends.using("triton"):
        y2, *_ = tb.batch_norm_forward(*args)
        assert len(launched) == 2
        launched.clear()
        y, mean, var, updated, saved = tb.batch_norm_forward(*args, need_stats=False)
    wide_mean = buffers == torch.float64 != dtype
    assert launched == ([tb._reduce.prepare, tb._elementwise.normalize_kernel] if wide_mean
                        else [tb._elementwise.normalize_running_kernel])
    assert wide_mean or (mean is None and var is None and saved is None)
    assert not updated
    assert y.dtype == dtype and y.stride() == x.stride()
    assert torch.equal(y, y2)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[-1]], ids=_id)
def test_fused_backward_saved_rows(shape, dtype):
    """The rows the training forward saves are bit for bit those the backward's prologue
    recomputes from (mean, var): the same backward either way."""
    x = _data(shape, dtype, mean=1e4)
    c = x.shape[1]
    w, b = _params(c)
    r, dy = _data(shape, dtype), _data(shape, dtype)
    y, mean, var, _, saved = tb.batch_norm_forward(x, w, b, r, None, None, 1e-5, "silu", 0.0)
    for training in (True, False):
        call = (dy, x, w, b, r, mean, var, 1e-5, training, "silu", 0.0, True, True, True)
        for got, want in zip(tb.batch_norm_backward(*call, saved=saved),
                             tb.batch_norm_backward(*call)):
            assert torch.equal(got, want)


@pytest.mark.parametrize("momentum", [0.1, 0.0, 1.0])
@pytest.mark.parametrize("tracked", [True, False], ids=["nbt", "no-nbt"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[-1]], ids=_id)
def test_fused_forward_running_update(shape, tracked, momentum):
    """With a fixed momentum the statistics' second stage moves the running buffers (and
    num_batches_tracked, once) bit for bit as the separate launch does."""
    x = _data(shape, torch.float32, mean=1e4)
    c = x.shape[1]
    count = x.numel() // c
    state = [torch.randn(c, device=DEVICE), torch.rand(c, device=DEVICE) + 0.5,
             torch.tensor(3, device=DEVICE) if tracked else None]
    ref = [t.clone() if t is not None else None for t in state]
    _, mean, var, updated, _ = tb.batch_norm_forward(x, None, None, None, None, None, 1e-5,
                                                     "none", 0.0, (*state, momentum))
    assert updated
    assert tb.update_running_stats(*ref, mean, var, count, momentum)
    for got, want in zip(state, ref):
        assert (got is None and want is None) or torch.equal(got, want)


def test_fused_forward_running_update_declines():
    """The cumulative average (momentum None) is left to ops' separate launch; float64
    buffers with float32 data are updated in the kernel."""
    x = _data(SHAPES[0], torch.float32)
    c = x.shape[1]
    for momentum, buffers, done in ((None, torch.float32, False), (0.1, torch.float64, True)):
        state = [torch.zeros(c, dtype=buffers, device=DEVICE),
                 torch.ones(c, dtype=buffers, device=DEVICE), torch.tensor(3, device=DEVICE)]
        before = [t.clone() for t in state]
        out = tb.batch_norm_forward(x, None, None, None, None, None, 1e-5, "none", 0.0,
                                    (*state, momentum))
        assert out[3] == done
        assert all(torch.equal(a, b) for a, b in zip(state, before)) != done


def test_fused_hooks_any_layout():
    """The hooks read tensors by address: strided weight and bias, a dy expanded from a
    scalar, a residual in another memory format give what contiguous ones give."""
    shape = (3, 4, 5, 6)
    x = _data(shape, torch.float32).contiguous(memory_format=torch.channels_last)
    c = shape[1]
    wide = _data((c, 2), torch.float32)
    w, b = wide[:, 0], wide[:, 1]
    w_plain, b_plain = w.contiguous(), b.contiguous()
    r = _data(shape, torch.float32)  # NCHW against a channels-last x
    got = tb.batch_norm_forward(x, w, b, r, None, None, 1e-5, "relu", 0.0, None, True)
    want = tb.batch_norm_forward(x, w_plain, b_plain,
                                 r.contiguous(memory_format=torch.channels_last), None, None,
                                 1e-5, "relu", 0.0, None, True)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    for g_, w_ in zip(got[:3] + got[4], want[:3] + want[4]):
        assert torch.equal(g_, w_)
    _, mean, var, _, saved = want
    dy = torch.ones((), device=DEVICE).expand(shape)
    got = tb.batch_norm_backward(dy, x, w, b, r, mean, var, 1e-5, True, "relu", 0.0, True,
                                 True, True, True, saved=saved)
    want = tb.batch_norm_backward(
        dy.contiguous(memory_format=torch.channels_last), x, w_plain, b_plain,
        r.contiguous(memory_format=torch.channels_last), mean, var, 1e-5, True, "relu", 0.0,
        True, True, True, True, saved=saved)
    for g_, w_ in zip(got, want):
        assert torch.equal(g_, w_)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="residual has shape"):
        tb.batch_norm_forward(x, w, b, r[:, :, :2], None, None, 1e-5, "relu", 0.0, None, True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[-1]], ids=_id)
def test_fused_backward_matches_ops(shape, dtype, training, monkeypatch):
    """batch_norm_backward (C-sized prologue + reduce + centred merge + elementwise) gives
    what ops computes from the primitives and torch ops, from a float64 large mean."""
    from batchnorm import ops

    x = _data(shape, dtype, mean=1e4 if dtype != torch.bfloat16 else 0.0)
    c = x.shape[1]
    w, b = _params(c)
    r, dy = _data(shape, dtype), _data(shape, dtype)
    mean64, m2 = portable.stats(x)
    var = m2 / (x.numel() // c)
    mean = mean64 if training else mean64.to(var.dtype)

    class Ctx:  # what _setup_context saves, for ops' unfused backward
        saved_tensors = (x, w, b, r, mean, var)
        needs_input_grad = (True, True, True, True)
        eager, eps, activation, slope = True, 1e-5, "silu", 0.0
        channels_last, backend = False, tb
        bias_dtype = b.dtype

    Ctx.training = training
    got = tb.batch_norm_backward(dy, x, w, b, r, mean, var, 1e-5, training, "silu", 0.0,
                                 True, True, True)
    with backends.using("triton"), torch.no_grad():
        monkeypatch.delattr(tb, "batch_norm_backward")
        dx, dw, db, dres = ops._batch_norm_backward(Ctx, dy, None, None)[:4]
    assert_close(got[0], dx, scale=4)
    assert_close(got[1], db, dtype=db.dtype, scale=10 * (x.numel() // c) ** 0.5)
    assert_close(got[2], dw, dtype=dw.dtype, scale=10 * (x.numel() // c) ** 0.5)
    assert_close(got[3], dres, scale=2)


def test_fused_backward_options():
    """Nothing computed that was not asked for; None for empty inputs."""
    x, mean, invstd, count, w, b, r, dy = _case(SHAPES[0], torch.float32, True, False)
    var = torch.ones_like(mean)
    dx, sdz, sdzx, dres = tb.batch_norm_backward(dy, x, w, b, None, mean, var, 1e-5, False,
                                                 "relu", 0.0, False, True, False)
    assert sdz is None and sdzx is None and dres is None and dx.shape == x.shape
    dx, sdz, sdzx, dres = tb.batch_norm_backward(dy, x, w, b, None, mean, var, 1e-5, False,
                                                 "relu", 0.0, True, False, False)
    assert dx is None and sdz.shape == sdzx.shape == mean.shape
    empty = torch.empty((0, 3, 4), device=DEVICE)
    assert tb.batch_norm_backward(empty, empty, None, None, None, mean[:3], var[:3], 1e-5,
                                  True, "none", 0.0, True, True, False) is None


@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "cumulative"])
def test_update_running_stats(momentum):
    """The one-launch running update == ops' torch version (float64 batch mean, float32
    buffers), num_batches_tracked included."""
    from batchnorm import ops

    c = 37
    mean = torch.randn(c, dtype=torch.float64, device=DEVICE) + 1e4
    var = torch.rand(c, device=DEVICE)
    state = [torch.randn(c, device=DEVICE), torch.rand(c, device=DEVICE),
             torch.tensor(3, device=DEVICE)]
    ref = [t.clone() for t in state]
    assert tb.update_running_stats(*state, mean, var, 1000, momentum)
    ops._update_running_stats_torch(*ref, mean, var, 1000, momentum)
    for got, want in zip(state, ref):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not tb.update_running_stats(None, None, None, mean, var, 1000, momentum)


# --------------------------------------------------------------------------------------
# Per-shape plans: every candidate the autotuner may pick computes the same, and the
# choice is made once, by the timer, without side effects


# On a GPU every candidate is a compilation (~20 a case): float32 only there.
@pytest.mark.parametrize("dtype", [torch.float32] + ([] if CUDA else [torch.bfloat16]),
                         ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[-1]], ids=_id)
def test_candidate_plans(shape, dtype):
    """Each pass with each of its candidate plans: the reductions within tolerance of
    float64, the elementwise passes bit for bit the default plan's."""
    x, mean, invstd, count, w, b, r, dy = _case(shape, dtype, True, True)
    c, acc, act = shape[1], torch.float32, tb.CODES["relu"]
    g = tb.geometry(x.shape, False)
    plans = {p: [plan for _, plan in tb._plans.candidates(p, g, x.device)]
             for p in tb._plans.PASSES}
    # the knobs move something even on tiny shapes (block_c only for (M, C) views)
    assert all(len(plans[p]) >= (3 if tb._plans.PASSES[p] else 2) for p in plans)
    ref_mean, ref_m2 = portable.stats(x.double())
    ref_sums = portable.backward_reduce(*_f64(dy, x, mean, invstd, w, b, r), "relu", 0.0)
    nan = float("nan")
    for plan in plans["stats"]:
        part = torch.full((tb.STATS_PLANES * plan["P"] * c,), nan, dtype=acc, device=DEVICE)
        got_mean = torch.full((c,), nan, dtype=portable.mean_dtype(x), device=DEVICE)
        got_m2 = torch.full((c,), nan, dtype=acc, device=DEVICE)
        tb._launch_stats_partials(x, g, plan, part)
        tb._launch_stats_merge(x, g, plan, part, got_mean, got_m2)
        assert_close(got_mean, ref_mean, dtype=acc, scale=10)
        assert_close(got_m2, ref_m2, dtype=acc, scale=10)
    for plan in plans["backward_reduce"]:
        part = torch.full((2 * plan["P"] * c,), nan, dtype=acc, device=DEVICE)
        sums = torch.full((2, c), nan, dtype=acc, device=DEVICE)
        tb._launch_backward_partials(dy, x, g, plan, part, mean, invstd, w, b, r, act, 0.0, 0.0)
        tb._launch_sum_partials(g, plan, part, sums[0], sums[1])
        for got, want in zip(sums, ref_sums):
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * count ** 0.5)
    sum_dz, sum_dzx = tb.backward_reduce(dy, x, mean, invstd, w, b, r, "relu", 0.0)
    outputs = []
    for y_plan, dx_plan in zip(plans["normalize"], plans["backward_elementwise"]):
        y, dx, dres = (torch.full_like(x, nan) for _ in range(3))
        tb._launch_normalize(x, y, g, r, mean, invstd, w, b, act, 0.0, 0.0, y_plan)
        tb._launch_backward_elementwise(dy, x, g, dx, dres, mean, invstd, w, b, r, sum_dz,
                                        sum_dzx, count, act, 0.0, 0.0, dx_plan)
        outputs.append((y, dx, dres))
    assert_close(outputs[0][0], portable.normalize(*_f64(x, mean, invstd, w, b, r), "relu", 0.0),
                 dtype=dtype, scale=2)
    for got in outputs[1:]:
        assert all(torch.equal(a, e) for a, e in zip(got, outputs[0]))


class _Timer:
    """The autotuner's timer: ``fastest`` (a pass -> candidate index, default the last)
    takes 1 ms, the others 2; counts its calls."""

    def __init__(self, fastest=None):
        self.fastest, self.calls = fastest or {}, []

    def __call__(self, run, plan, reps):
        self.calls.append(plan)
        for _ in range(reps):  # as the real one does
            run(plan)
        return 1.0 if self._is_fastest(plan) else 2.0

    def _is_fastest(self, plan):
        for pass_name, plans in self.candidates.items():
            if plan in plans:
                return plans.index(plan) == self.fastest.get(pass_name, len(plans) - 1)
        raise AssertionError(f"timed a plan that is no candidate: {plan}")


@pytest.fixture
def tuning(monkeypatch):
    """The autotuner on (for CPU tensors too, under the interpreter), with a fresh memory
    and a stand-in timer (on CUDA too: the choice must not depend on timing noise)."""
    plans = tb._plans
    monkeypatch.setitem(tb.CONFIG, "autotune", 1)
    monkeypatch.setitem(tb.CONFIG, "autotune_min_numel", 0)
    monkeypatch.setattr(plans, "TUNE_ON_CPU", True)
    monkeypatch.setattr(plans, "CHOSEN", {})
    monkeypatch.setattr(plans, "LOG", [])
    monkeypatch.setattr(plans, "ROUNDS", 1)
    monkeypatch.setattr(plans, "REPS", 1)
    timer = _Timer()
    monkeypatch.setattr(plans, "timer", timer)

    # the device as a tensor has it (cuda:0, not cuda): the plans are memoized on it, and
    # the tests pick candidates by identity
    device = torch.empty(0, device=DEVICE).device

    def expect(g, fastest=None):
        timer.candidates = {p: [plan for _, plan in plans.candidates(p, g, device)]
                            for p in plans.PASSES}
        timer.fastest = fastest or {}
        return timer
    return expect


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[-1]], ids=_id)
def test_autotune_keeps_the_fastest(shape, tuning):
    x = _data(shape, torch.float32)
    g = tb.geometry(x.shape, False)
    timer = tuning(g, {"stats": 2})
    mean, m2 = tb.stats(x)
    candidates = timer.candidates["stats"]
    assert len(timer.calls) == len(candidates)  # ROUNDS x each candidate
    assert tb._plans.chosen("stats", g, x) == candidates[2]
    entry = tb._plans.LOG[-1]
    labels = [label for label, _ in tb._plans.candidates("stats", g, x.device)]
    assert entry["pass_name"] == "stats" and entry["dtype"] == x.dtype
    assert list(entry["ms"]) == labels and entry["chosen"] == labels[2]
    again = tb.stats(x)
    assert len(timer.calls) == len(candidates)  # kept: not timed again
    assert torch.equal(again[0], mean) and torch.equal(again[1], m2)
    ref_mean, ref_m2 = portable.stats(x.double())
    assert_close(mean, ref_mean, dtype=torch.float32, scale=10)
    assert_close(m2, ref_m2, dtype=torch.float32, scale=10)


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "CL"])
def test_autotune_training_step(channels_last, tuning):
    """A module's first training step tunes all four passes (the last candidate of each
    wins) and still matches torch: the running statistics moved once, not once per
    candidate timed, and num_batches_tracked counts one step."""
    import batchnorm

    shape = MODULE_SHAPES[0]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ours = batchnorm.BatchNorm2d(shape[1], activation="relu").to(DEVICE)
    theirs = torch.nn.BatchNorm2d(shape[1]).to(DEVICE)
    x = _data(shape, torch.float32).contiguous(memory_format=fmt)
    dy = torch.randn(shape, device=DEVICE)
    timer = tuning(tb.geometry(x.shape, channels_last))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    with backends.using("triton"):
        y1 = ours(x1)
        y1.backward(dy)
    y2 = torch.relu(theirs(x2))
    y2.backward(dy)
    assert sorted(entry["pass_name"] for entry in tb._plans.LOG) == sorted(tb._plans.PASSES)
    assert all(entry["chosen"] == list(entry["ms"])[-1] for entry in tb._plans.LOG)
    assert len(timer.calls) == sum(map(len, timer.candidates.values()))
    assert_close(y1, y2, scale=2)
    assert_close(x1.grad, x2.grad, scale=4)
    assert_close(ours.weight.grad, theirs.weight.grad, scale=10)
    assert_close(ours.running_mean, theirs.running_mean)
    assert_close(ours.running_var, theirs.running_var)
    assert int(ours.num_batches_tracked) == 1


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "CL"])
def test_autotune_times_the_merges_the_step_runs(channels_last, tuning, monkeypatch):
    """Where a plan merges in stage 1 (fused_merge_max), the tuner times that kernel, not
    stage 1 and the merge apart (which the step never runs with that plan)."""
    import batchnorm

    monkeypatch.setitem(tb.CONFIG, "fused_merge_max", 1 << 30)
    shape = MODULE_SHAPES[0]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = _data(shape, torch.float32).contiguous(memory_format=fmt).requires_grad_()
    g = tb.geometry(x.shape, channels_last)
    timer = tuning(g)
    assert all(plan["merge_p"] for name in ("stats", "backward_reduce")
               for plan in timer.candidates[name])
    apart = []
    for name in ("_launch_stats_merge", "_launch_sum_partials"):
        monkeypatch.setattr(tb, name, lambda *a, _name=name, **k: apart.append(_name))
    m = batchnorm.BatchNorm2d(shape[1], activation="relu").to(DEVICE)
    with backends.using("triton"):
        m(x).backward(torch.randn(shape, device=DEVICE))
    assert len(timer.calls) == sum(map(len, timer.candidates.values()))
    assert not apart
    assert all(int(t.abs().sum()) == 0 for t in tb._COUNTERS.values())


def test_autotune_skips_what_fails_and_where_it_must(tuning, monkeypatch):
    """A candidate that fails to launch is left out (the defaults must not fail); the
    reductions keep the defaults under deterministic algorithms; autotune=0 times nothing,
    nor does an input under autotune_min_numel."""
    x = _data(SHAPES[0], torch.float32)
    g = tb.geometry(x.shape, False)
    timer = tuning(g, {"normalize": 1})
    candidates = timer.candidates["normalize"]

    def run(plan):
        if plan is candidates[1]:
            raise RuntimeError("out of resources")
    # the failing candidate would have been the fastest; the rest are no faster than the
    # defaults
    assert tb._plans.choose("normalize", g, x, run) == candidates[0]
    assert candidates[1] not in timer.calls and len(timer.calls) == len(candidates) - 1

    def broken(plan):
        raise RuntimeError("the defaults fail")
    with pytest.raises(RuntimeError, match="the defaults fail"):
        tb._plans.choose("backward_elementwise", g, x, broken)

    timer.calls.clear()
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert tb._plans.choose("stats", g, x, run) == tb._plans.reduce_plan(g, x.device)
        assert not timer.calls and tb._plans.chosen("stats", g, x) is None  # tuned later
    finally:
        torch.use_deterministic_algorithms(deterministic)
    monkeypatch.setitem(tb.CONFIG, "autotune", 0)
    assert tb._plans.choose("stats", g, x, run) == tb._plans.reduce_plan(g, x.device)
    assert tb._plans.chosen("stats", g, x) is not None and not timer.calls
    monkeypatch.setitem(tb.CONFIG, "autotune", 1)  # an input under autotune_min_numel
    monkeypatch.setitem(tb.CONFIG, "autotune_min_numel", x.numel() + 1)
    assert tb._plans.choose("normalize", g, x, run) == tb._plans.elem_plan(g, x.device)
    assert tb._plans.chosen("normalize", g, x) is not None and not timer.calls


def test_deterministic_reductions_use_the_defaults_after_tuning(tuning, monkeypatch):
    """A shape whose reductions were tuned before ``torch.use_deterministic_algorithms(True)``
    runs them with the defaults' plans while it is on (their order of additions, so their
    bits, the same as in a process that never tuned), and with the tuned plans again after."""
    x = _data(SHAPES[0], torch.float32)
    g = tb.geometry(x.shape, False)
    tuning(g, {"stats": 2, "backward_reduce": 2})
    used = {}  # stage 1's launch -> the plan it last ran with (the real launch's)
    for name, at in (("_launch_stats_partials", 2), ("_launch_backward_partials", 3)):
        real = getattr(tb, name)
        monkeypatch.setattr(tb, name, lambda *a, _real=real, _at=at, _name=name, **k:
                            used.__setitem__(_name, a[_at]) or _real(*a, **k))
    mean, invstd, _ = _batch_stats(x)
    dy = _data(SHAPES[0], torch.float32)

    def both():
        tb.stats(x)
        tb.backward_reduce(dy, x, mean, invstd, None, None, None, "relu", 0.0)
        return list(used.values())
    default = tb._plans.reduce_plan(g, x.device)
    tuned = both()
    assert tuned[0] != default and tuned[1] != default
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert both() == [default, default]
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert both() == tuned


@pytest.mark.skipif(not CUDA, reason="CUDA events and graphs need a GPU")
def test_autotune_on_the_device(monkeypatch):
    """With the real timer: a first step tunes with CUDA events and gives what the
    defaults give (within the reductions' rounding); a step captured in a CUDA graph
    tunes nothing (the defaults), and its shape is tuned on the next eager call."""
    import batchnorm

    monkeypatch.setattr(tb._plans, "CHOSEN", {})
    monkeypatch.setattr(tb._plans, "LOG", [])
    monkeypatch.setitem(tb.CONFIG, "autotune_min_numel", 0)
    m = batchnorm.BatchNorm2d(32, activation="relu").to(DEVICE)
    x = _data((16, 32, 24, 24), torch.bfloat16).contiguous(memory_format=torch.channels_last)
    x2 = _data((8, 32, 12, 12), torch.float32)
    with backends.using("triton"), torch.no_grad():
        monkeypatch.setitem(tb.CONFIG, "autotune", 0)
        plain = m(x).float()
        m(x2)  # compiles the defaults' kernels for x2 before the capture
        monkeypatch.setitem(tb.CONFIG, "autotune", 1)
        tuned = m(x).float()
        assert sorted(entry["pass_name"] for entry in tb._plans.LOG) == ["normalize", "stats"]
        assert all(len(entry["ms"]) > 1 for entry in tb._plans.LOG)
        assert_close(tuned, plain, dtype=torch.bfloat16, scale=2)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            m(x2)
        assert len(tb._plans.LOG) == 2
        graph.replay()
        m(x2)
        assert len(tb._plans.LOG) == 4


def test_config_from_the_environment(monkeypatch):
    """BATCHNORM_TRITON_CONFIG sets CONFIG values at import; unknown keys and values that
    are no integers are refused by name. (conftest sets autotune=0 for the suite.)"""
    assert tb.CONFIG["autotune"] == 0
    config = dict(tb.CONFIG)
    monkeypatch.setattr(tb._plans, "CONFIG", config)
    monkeypatch.setenv("BATCHNORM_TRITON_CONFIG", "reduce_tile=2048, autotune=1,")
    tb._plans.apply_env_config()
    assert config["reduce_tile"] == 2048 and config["autotune"] == 1
    monkeypatch.setenv("BATCHNORM_TRITON_CONFIG", "reduce_tiles=2048")
    with pytest.raises(ValueError, match="unknown key 'reduce_tiles'"):
        tb._plans.apply_env_config()
    monkeypatch.setenv("BATCHNORM_TRITON_CONFIG", "block_c=wide")
    with pytest.raises(ValueError, match="block_c wants an integer, got 'wide'"):
        tb._plans.apply_env_config()


def test_device_guard(monkeypatch):
    """A pass switches the current CUDA device only when x lives on another one."""
    class OnGpu:
        is_cuda = True

        def __init__(self, index):
            self.index = index

        def get_device(self):
            return self.index

    switched = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda index: switched.append(index) or index)
    assert tb._device_guard(torch.zeros(1)) is tb._NO_GUARD
    assert tb._device_guard(OnGpu(0)) is tb._NO_GUARD and not switched
    assert tb._device_guard(OnGpu(1)) == 1 and switched == [1]


def test_autotune_keeps_the_defaults_within_the_margin(tuning, monkeypatch):
    """A candidate 2% faster than the defaults (timing noise, as likely as not) does not
    replace them; 4% faster does."""
    x = _data(SHAPES[0], torch.float32)
    g = tb.geometry(x.shape, False)
    timer = tuning(g)
    candidates = timer.candidates["normalize"]
    for faster, want in ((0.98, 0), (0.96, 1)):
        monkeypatch.setattr(tb._plans, "CHOSEN", {})
        monkeypatch.setattr(tb._plans, "timer", lambda run, plan, reps, f=faster: (
            f if plan is candidates[1] else 1.0))
        assert tb._plans.choose("normalize", g, x, lambda plan: None) is candidates[want]


def test_autotune_repeats_short_passes(tuning, monkeypatch):
    """Each timing covers at least TIMED_MS of the defaults' time: a 0.01 ms pass is run
    10 times a timing after the defaults' first (REPS) timing, a 1 ms pass REPS times."""
    x = _data(SHAPES[0], torch.float32)
    g = tb.geometry(x.shape, False)
    tuning(g)
    monkeypatch.setattr(tb._plans, "ROUNDS", 2)
    monkeypatch.setattr(tb._plans, "REPS", 3)
    for ms, want in ((0.01, 10), (1.0, 3)):
        monkeypatch.setattr(tb._plans, "CHOSEN", {})
        reps = []
        monkeypatch.setattr(tb._plans, "timer", lambda run, plan, n, ms=ms, out=reps: (
            out.append(n) or ms))
        tb._plans.choose("normalize", g, x, lambda plan: None)
        assert reps[0] == 3 and set(reps[1:]) == {want}
        assert len(reps) == 2 * len(tb._plans.candidates("normalize", g, x.device))


def test_device_timer_waits_behind_a_spin(monkeypatch):
    """The device timer enqueues the runs behind a GPU spin longer than the host's
    enqueueing; where the spin ended first (the start event already reached), it times
    again behind a spin twice as long. (CUDA stand-ins: what is checked is the order of
    the calls and the lengths asked for.)"""
    plans = tb._plans
    events, calls = [], []

    class Event:
        reached = iter([True, False])  # the first spin ends too early, the second does not

        def __init__(self, enable_timing):
            events.append(self)

        def record(self):
            calls.append("record")

        def query(self):
            return next(Event.reached)

        def synchronize(self):
            calls.append("sync")

        def elapsed_time(self, other):
            return 6.0

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(plans, "_spin", lambda cycles: calls.append(("spin", cycles)))
    monkeypatch.setattr(plans, "_CYCLES_PER_MS", {0: 1000.0})
    monkeypatch.setattr(plans, "_HOST_MS_PER_RUN", [0.05])
    ms = plans.device_ms(lambda plan: calls.append("run"), {}, 3)
    assert ms == 2.0
    spin = 0.02 + 2 * 3 * 0.05
    assert calls == [("spin", int(spin * 1000)), "record", "run", "run", "run", "record", "sync",
                     ("spin", int((spin + 2 * 3 * 0.05) * 1000)), "record", "run", "run",
                     "run", "record", "sync"]


def test_merge_tiles():
    """Few channels: narrower channel blocks (more programs) and taller tiles of as many
    elements (fewer steps over the partials); many channels keep CONFIG's tile."""
    launch = tb._plans._merge_launch
    assert launch(256, 523, 64, 32, 8) == ((8,), {"BLOCK_P": 64, "BLOCK_C": 32, "num_warps": 8})
    assert launch(32, 1024, 64, 32, 8) == ((8,), {"BLOCK_P": 512, "BLOCK_C": 4, "num_warps": 8})
    assert launch(64, 1046, 64, 32, 8) == ((8,), {"BLOCK_P": 256, "BLOCK_C": 8, "num_warps": 8})
    assert launch(7, 3, 64, 32, 8) == ((2,), {"BLOCK_P": 4, "BLOCK_C": 4, "num_warps": 8})
    assert launch(1, 1, 64, 32, 8)[1]["BLOCK_C"] == 1


@pytest.mark.parametrize("shape", [(200, 12), (4, 6, 300)], ids=_id)
def test_merge_of_few_channels(shape, monkeypatch):
    """The narrowed merges (several partials per channel, several steps) give the sums."""
    for key, value in dict(merge_block_p=4, merge_block_c=16, programs_per_sm=32,
                           reduce_tile=64, block_c=8).items():  # on a GPU too
        monkeypatch.setitem(tb.CONFIG, key, value)
    x, mean, invstd, count, w, b, r, dy = _case(shape, torch.float32, True, True)
    plan = tb._plans.reduce_plan(tb.geometry(x.shape, False), x.device)
    grid, tile = tb._plans.merge_launch(shape[1], plan["P"])
    # narrowed and taller, and still several steps over the partials
    assert tile["BLOCK_C"] == 4 and plan["P"] > tile["BLOCK_P"] > 4, (plan["P"], tile)
    _assert_reductions(x, mean, invstd, count, w, b, r, dy)


# --------------------------------------------------------------------------------------
# Index arithmetic past 2^31 (kernel views of 2^31 elements or more)
#
# Such inputs cannot be allocated here, so these run the kernels' own index helpers (the
# first lines of every stage-1 program; the elementwise passes' tile count and tile) in
# probe kernels with the plans the planner makes for such geometries, and compare every
# program's (or the last tiles') indices with Python's integers. With the plans' I64 flag
# forced off they differ where int32 overflows (the interpreter wraps as a GPU does):
# what the flag is for.


@triton.jit
def _probe_rows_mc(out_ptr, M, ROWS, NCB, I64: tl.constexpr):
    pid = tl.program_id(0)
    cb, p, m0, m_end = _rows_mc(pid, M, ROWS, NCB, I64)
    out = out_ptr + pid.to(tl.int64) * 4
    tl.store(out, cb.to(tl.int64))
    tl.store(out + 1, p.to(tl.int64))
    tl.store(out + 2, m0.to(tl.int64))
    tl.store(out + 3, m_end.to(tl.int64))


@triton.jit
def _probe_rect_ncl(out_ptr, N, C, L, ROWS, COLS, P_L, I64: tl.constexpr):
    pid = tl.program_id(0)
    c, p, n0, n_end, l0, l_end = _rect_ncl(pid, N, C, L, ROWS, COLS, P_L, I64)
    out = out_ptr + pid.to(tl.int64) * 6
    tl.store(out, c.to(tl.int64))
    tl.store(out + 1, p.to(tl.int64))
    tl.store(out + 2, n0.to(tl.int64))
    tl.store(out + 3, n_end.to(tl.int64))
    tl.store(out + 4, l0.to(tl.int64))
    tl.store(out + 5, l_end.to(tl.int64))


@triton.jit
def _probe_tiles(out_ptr, R, K, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                 I64: tl.constexpr):
    # the last tiles of an elementwise kernel's loop, its tile index as wide as there
    pid = tl.program_id(0)
    R, K, n_tiles = _tiles(R, K, BLOCK_R, BLOCK_K, I64)
    rows, cols, mask, off = _tile(n_tiles - 1 - pid, R, K, BLOCK_R, BLOCK_K)
    out = out_ptr + pid.to(tl.int64) * 7
    tl.store(out, n_tiles.to(tl.int64))
    tl.store(out + 1, tl.min(rows.to(tl.int64), axis=0))
    tl.store(out + 2, tl.max(rows.to(tl.int64), axis=0))
    tl.store(out + 3, tl.min(cols.to(tl.int64), axis=0))
    tl.store(out + 4, tl.min(tl.min(off, axis=1), axis=0))
    tl.store(out + 5, tl.max(tl.max(off, axis=1), axis=0))
    tl.store(out + 6, tl.sum(tl.sum(mask.to(tl.int64), axis=1), axis=0))


def _stage1_indices(g, plan, i64):
    """Every stage-1 program's indices by the kernels' helper, and by Python."""
    programs = plan["grid"][0]
    if g.cl:
        got = torch.empty((programs, 4), dtype=torch.int64)
        _probe_rows_mc[(programs,)](got, g.n, plan["rows"], plan["ncb"], I64=i64)
        want = []
        for pid in range(programs):
            p = pid // plan["ncb"]
            want.append((pid % plan["ncb"], p, p * plan["rows"],
                         min(p * plan["rows"] + plan["rows"], g.n)))
    else:
        got = torch.empty((programs, 6), dtype=torch.int64)
        _probe_rect_ncl[(programs,)](got, g.n, g.c, g.l, plan["rows"], plan["cols"],
                                     plan["p_l"], I64=i64)
        want = []
        for pid in range(programs):
            p = pid // g.c
            n0, l0 = p // plan["p_l"] * plan["rows"], p % plan["p_l"] * plan["cols"]
            want.append((pid % g.c, p, n0, min(n0 + plan["rows"], g.n), l0,
                         min(l0 + plan["cols"], g.l)))
    return got, torch.tensor(want, dtype=torch.int64)


@pytest.mark.skipif(CUDA, reason="the interpreter's int32 arithmetic; compiled: "
                                  "benchmarks/triton_compile_check.py")
@pytest.mark.parametrize("g", [
    tb.Geometry(True, 2**32 + 5, 3, 1),    # (M, C): M >= 2^31 rows
    tb.Geometry(True, 2**31 - 3, 1, 1),    # ... just under: the last program's end passes it
    tb.Geometry(False, 2**31 + 9, 2, 3),   # (N, C, L): N >= 2^31
    tb.Geometry(False, 3, 2, 2**32 + 1),   # L >= 2^31
], ids=["MC-2^32", "MC-2^31-3", "NCL-N", "NCL-L"])
def test_reduction_indices_past_int32(g):
    plan = tb._plans.reduce_plan(g, torch.device("cpu"))
    assert plan["I64"]
    got, want = _stage1_indices(g, plan, True)
    assert torch.equal(got, want)
    assert int(want[:, -1].max()) == (g.n if g.cl else g.l)  # the last values covered
    got, want = _stage1_indices(g, plan, False)  # int32: wrong where it matters
    assert not torch.equal(got, want)


@pytest.mark.skipif(CUDA, reason="the interpreter's int32 arithmetic; compiled: "
                                  "benchmarks/triton_compile_check.py")
@pytest.mark.parametrize("g, overflows", [
    # sizes from 2^31 on are int64 arguments, and the arithmetic with them int64 anyway
    (tb.Geometry(True, 2**32 + 5, 3, 1), False),   # (M, C): rows R = M
    (tb.Geometry(False, 2**30 + 1, 2, 3), False),  # (N, C, L): rows R = N·C
    (tb.Geometry(False, 1, 1, 2**31 + 5), False),  # columns K = L
    # just under: tl.cdiv(R, BLOCK_R) forms R + BLOCK_R − 1
    (tb.Geometry(True, 2**31 - 3, 5, 1), True),
    (tb.Geometry(False, 1, 1, 2**31 - 3), True),
], ids=["MC-2^32", "NCL-rows", "NCL-L", "MC-2^31-3", "NCL-L-2^31-3"])
def test_elementwise_indices_past_int32(g, overflows):
    plan = tb._plans.elem_plan(g, torch.device("cpu"))
    assert plan["I64"]
    r, k, br, bk = plan["R"], plan["K"], plan["BLOCK_R"], plan["BLOCK_K"]
    nkb = tb.cdiv(k, bk)
    n_tiles = tb.cdiv(r, br) * nkb
    want = []
    for t in range(n_tiles - 1, n_tiles - 5, -1):  # the last tiles, the ragged ones too
        r0, k0 = t // nkb * br, t % nkb * bk
        inside = (min(r0 + br, r) - r0) * (min(k0 + bk, k) - k0)
        want.append((n_tiles, r0, r0 + br - 1, k0, r0 * k + k0,
                     (r0 + br - 1) * k + k0 + bk - 1, inside))
    want = torch.tensor(want, dtype=torch.int64)

    def probe(i64):
        got = torch.empty((4, 7), dtype=torch.int64)
        _probe_tiles[(4,)](got, r, k, br, bk, i64)
        return got
    assert torch.equal(probe(True), want)
    assert torch.equal(probe(False), want) != overflows  # int32 where it fits, only there


def test_index_width_flag_off_for_common_shapes():
    """Below 2^31 the kernels keep their int32 index arithmetic (the compiled code of
    every shape that fits)."""
    for g in [tb.Geometry(True, 256 * 56 * 56, 256, 1), tb.Geometry(False, 256, 256, 3136),
              tb.Geometry(True, 2**31 // 64 - 4096, 64, 1), tb.Geometry(False, 2, 3, 2**30)]:
        assert not tb._plans.reduce_plan(g, torch.device("cpu"))["I64"], g
        assert not tb._plans.elem_plan(g, torch.device("cpu"))["I64"], g


@pytest.mark.parametrize("eps", [1e-50, 1e-40, 1e300 * 1e10], ids=["1e-50", "1e-40", "inf"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_float64_eps_outside_float32s_range_is_not_lost(eps, training):
    """The kernels take eps as a float32 pair: below float32's normal range it was
    rounded or became 0 (a zero-variance float64 channel then gave 0 where torch gives
    1/√eps, found by a probe). Such an eps takes the primitives' path, whose invstd is
    torch's."""
    import batchnorm
    x = torch.tensor([[2.5, 1.0], [2.5, 3.0], [2.5, 5.0]], dtype=torch.float64,
                     device=DEVICE, requires_grad=True)
    stats = [torch.zeros(2, dtype=torch.float64, device=DEVICE), torch.zeros(
        2, dtype=torch.float64, device=DEVICE)]
    dy = torch.tensor([[1.0, 2.0], [4.0, -1.0], [9.0, 3.0]], dtype=torch.float64,
                      device=DEVICE)
    got = []
    for name in ("triton", "portable"):
        x.grad = None
        rm, rv = (t.clone() for t in stats)
        with backends.using(name):
            y = batchnorm.functional.batch_norm(x, rm, rv, None, None, training, 0.1, eps)
            y.backward(dy)
        got.append((y.detach(), x.grad.clone(), rm, rv))
    for a, b in zip(*got):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["float16", "float32"])
def test_tanh_near_zero_keeps_its_precision_and_sign(dtype):
    """tanh was 1 − 2/(e^{2z} + 1), whose error near 0 is an ulp of 1: 1-2 ulps of float16
    outputs under 1e-3 (85-98 of 192 in a probe), and tanh(−tiny) came out +0. Near 0 the
    kernels now sum the odd series: float16 outputs are the correctly rounded ones."""
    mag = torch.logspace(-7, 1, 400, dtype=torch.float64)
    # (no −0.0: the normalize's + bias makes it +0 before the activation, as torch's)
    x = torch.cat([mag, -mag, torch.zeros(1, dtype=torch.float64)]).to(dtype)
    x = x.reshape(-1, 1).to(DEVICE)
    rows = [torch.tensor([v], dtype=torch.float32, device=DEVICE) for v in (0.0, 1.0, 1.0, 0.0)]
    y = tb.normalize(x, rows[0], rows[1], rows[2], rows[3], None, "tanh", 0.0)
    want = torch.tanh(x.double())
    assert torch.equal(torch.signbit(y), torch.signbit(want))
    if dtype == torch.float16:
        assert torch.equal(y, want.to(dtype))
    else:  # near 0 within an ulp (the series' float32 rounding); away from it the exp
        # form, within float32's tolerance
        small = x.abs() < 0.01
        torch.testing.assert_close(y[small], want[small].to(dtype), rtol=2.4e-7, atol=0)
        assert_close(y, want.to(dtype))
