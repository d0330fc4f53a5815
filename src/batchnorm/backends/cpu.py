"""The CPU backend: the four primitives as numba kernels (``cpu_kernels.py``).

Same signatures and conventions as ``portable.py``. Tensors cross into numba as zero-copy
NumPy views of contiguous CPU tensors in the primitives, and as addresses in the fused
entry points ops calls for local batch norm (see there). Tensor-sized outputs (y, dx)
come from ``cpu_buffers``: memory allocated by torch and kept for reuse once no tensor
refers to it, because faulting in fresh pages cost more than the kernels (see there);
they are returned without a copy.

Dtypes: the fused entry points take float32, float64, float16 and bfloat16, through one
family of kernels (``cpu_kernels``, "Data types": 16-bit data as its bit patterns,
converted value by value, float32 arithmetic). The primitives, which SyncBatchNorm and
ops' general path call, convert float16/bfloat16 tensors to float32 by torch on the way
in and the outputs back on the way out (``_HALF``): correct, with float32 accumulation,
but two extra passes over memory. Empty tensors go to the portable functions.

Work split: a reduction (statistics, backward_reduce) over an NCL view is cut into
ranges of whole rows read in memory order when rows are short, else into ``pieces`` per
channel, and over an MC view into ``blocks`` of rows; an elementwise kernel
takes flat ranges of an NCL view (many short rows or a piece of a long one) or blocks of
rows of an MC view; the serial build (small tensors) runs one task. An NCL array with
short rows goes to the fused entry points' MC kernels as rows of C·L values
(``_wide_rows``). The counts depend only on the shape, never on the thread count, so
results are bitwise reproducible on one type of CPU, whatever the thread count (numba
compiles for the host CPU, and the reductions may be reordered to its vector width: a
generic x86-64 build gave other last bits in the backward).
"""

from __future__ import annotations

import os
import threading

import numba
import numpy as np
import torch
from torch import Tensor

from . import cpu_buffers as buffers
from . import cpu_kernels as K
from . import portable

_DTYPES = (torch.float32, torch.float64)
# Every tensor the kernels write names its device: a default device (``with
# torch.device("meta")``, ``torch.set_default_device("cuda")``) would hand them its addresses.
_CPU = torch.device("cpu")
_HALF = (torch.float16, torch.bfloat16)
DEVICES = ("cpu",)
# Enough tasks that both cores (and a few more, for balance) have work when C is small.
_TASKS = 16
# Below this many elements per piece the loop is too short to pay for a task.
_MIN_PIECE = 4096
# Fewest rows a block of an MC reduction (see _splits).
_MC_BLOCK_ROWS = 64
# Below this many elements the serial build runs: waking the worker threads costs more
# than the work. Measured 2026-11-27 on the 2-core machine, module forward+backward steps
# interleaved with torch's: serial was faster at 65,536 elements (BN 286 against 350 µs on
# (16,64,8,8)) and 131,072 (364 against 406 µs), parallel from 262,144 (643 against 668
# µs on (16,64,16,16)). The worker threads (numba's OpenMP pool) and torch's own OpenMP
# pool spin-wait for work after each parallel region and take the cores from each other,
# which is why the crossover sits this high.
SERIAL_BELOW = 1 << 18


def _build(numel: int) -> int:
    """0 (the parallel build) or 1 (the serial one, below SERIAL_BELOW)."""
    return 0 if numel >= SERIAL_BELOW else 1


# The parallel builds run on numba's thread pool (GNU OpenMP where numba has no TBB),
# which knows neither fork nor torch's thread setting: a fork child of a process that
# used the pool is killed when it enters a parallel loop ("fork() called from a process
# already using GNU OpenMP, this is unsafe"; a DataLoader worker that runs the model,
# say), and the pool kept every core under torch.set_num_threads(1). So the parallel
# build runs only where torch would run threads too, on as many as torch would.
_forked_child = False


def _note_fork() -> None:
    global _forked_child
    _forked_child = True


os.register_at_fork(after_in_child=_note_fork)


def _build_now(build: int) -> int:
    """``build``, or the serial one in a fork child, under torch.set_num_threads(1), or
    in a thread that may not use numba's pool now (see :func:`_pool_is_ours`); numba's
    threads for a parallel run are torch's number (at most numba's)."""
    if build == 1 or _forked_child:
        return 1
    threads = torch.get_num_threads()
    if threads < 2 or not _pool_is_ours():
        return 1
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    return 0


# numba's workqueue threading layer (its fallback where neither OpenMP nor TBB loads: a
# container without libgomp, say) aborts the process when two threads run parallel
# kernels at once ("Concurrent access has been detected"; measured: two threads running
# a BatchNorm2d's eval on (16,16,32,32)). There, one thread at a time owns the pool, the
# first to ask until it ends, and the others take the serial build (same results).
_one_thread_pool: bool | None = None  # the workqueue layer; None until first asked
_pool_owner: threading.Thread | None = None
_pool_lock = threading.Lock()


def _pool_is_ours() -> bool:
    global _one_thread_pool, _pool_owner
    if _one_thread_pool is None:
        with _pool_lock:
            if _one_thread_pool is None:
                _one_thread_pool = _threading_layer() == "workqueue"
    if not _one_thread_pool:
        return True
    me = threading.current_thread()
    if _pool_owner is me:
        return True
    with _pool_lock:
        if _pool_owner is None or not _pool_owner.is_alive():
            _pool_owner = me
            return True
    return False


def _threading_layer() -> str | None:
    """The threading layer numba's parallel kernels run on, started as their first call
    would start it; None where numba does not say."""
    try:
        from numba.np.ufunc import parallel
        parallel._launch_threads()
        return numba.threading_layer()
    except Exception:  # noqa: BLE001 (a private function of numba's, or no layer at all)
        return None


def _pick(builds, x: Tensor):
    return builds[_build_now(_build(x.numel()))]


def _view(x: Tensor) -> str:
    return "mc" if x.dim() == 2 else "ncl"


def supports(x: Tensor) -> bool:
    # No size threshold: measured 2026-11-27 on the 2-core machine, a module forward+backward
    # on (2, 2, 3, 4) takes ~0.45 ms here against ~0.95 ms on the portable backend, and on
    # (16, 64, 8, 8) ~0.65 ms against ~1.4 ms (a numba call costs a few µs, the portable
    # path a dozen torch ops); small tensors take the serial build (SERIAL_BELOW).
    return x.is_cpu and x.dtype in _ACC and x.numel() > 0


def _wide(t: Tensor | None) -> Tensor | None:
    return t.float() if t is not None and t.dtype in _HALF else t


_EMPTY = {}


def _empty(dtype: torch.dtype, ndim: int):
    """The size-0 array that stands for an absent tensor (one kernel serves both cases)."""
    key = (dtype, ndim)
    e = _EMPTY.get(key)
    if e is None:
        e = _EMPTY[key] = torch.empty((0,) * ndim, dtype=dtype, device=_CPU).numpy()
    return e


_NUMPY_TYPES = {torch.float32: "<f4", torch.float64: "<f8", torch.float16: "<f2",
                torch.int64: "<i8", torch.int32: "<i4", torch.bool: "|b1"}


class _Memory:
    """A CPU tensor's memory as NumPy reads it, by address (``np.asarray`` of this), with
    the tensor kept alive as the array's base. ``Tensor.numpy()`` would make the tensor's
    storage unresizable for good: FSDP frees a gathered parameter with ``resize_(0)``,
    which then raised "Trying to resize storage that is not resizable"."""

    __slots__ = ("__array_interface__", "tensor")


def _np(t: Tensor):
    """``t``'s memory as a NumPy array (about 1.1 µs, as ``.numpy()``'s 1.0: strides only
    where it is not contiguous); TypeError for what the kernels cannot read (as
    ``.numpy()`` refused it: another device, a dtype NumPy lacks). A negative view
    (``z.conj().imag``) is resolved first: its memory holds the values' negations."""
    if not t.is_cpu or t.dtype not in _NUMPY_TYPES:
        kinds = ", ".join(map(str, _NUMPY_TYPES))
        raise TypeError(f"the CPU kernels take CPU tensors of {kinds}; got a {t.dtype} "
                        f"tensor on {t.device}")
    if t.is_neg():
        t = t.resolve_neg()
    memory = _Memory()
    memory.__array_interface__ = {
        "data": (t.data_ptr(), False), "shape": t.shape, "version": 3,
        "typestr": _NUMPY_TYPES[t.dtype],
        "strides": None if t.is_contiguous() else tuple(
            s * t.element_size() for s in t.stride())}
    memory.tensor = t
    return np.asarray(memory)


def _param(t: Tensor | None, dtype: torch.dtype):
    """A per-channel tensor in ``dtype`` (the acc dtype), or the size-0 stand-in. (A
    strided 1-D tensor is fine: numba compiles a strided variant.)"""
    if t is None:
        return _empty(dtype, 1)
    if t.dtype is not dtype:
        t = t.to(dtype)
    return _np(t)


def _mean(t: Tensor):
    """The primitives' mean as the kernels take it: float64 whatever its dtype, so that a
    kernel has one variant per data dtype (``cpu_kernels._prologue``: mode 0 rounds it to
    the acc dtype, as the primitives define it)."""
    if t.dtype is torch.float32:
        # NumPy widens 64 values in ~1 µs, torch's .to in ~5 (measured on the 2-core machine)
        return _np(t).astype(np.float64)
    return _param(t, torch.float64)


def _like(t: Tensor | None, x: Tensor):
    """A tensor-sized input (dy, residual) as an array laid out as the kernel view x, or
    the size-0 stand-in."""
    if t is None:
        return _empty(x.dtype, x.dim())
    if t.dtype != x.dtype or t.stride() != x.stride():
        t = torch.empty_like(x).copy_(t)
    return _np(t)


def _reduce_split(x: Tensor) -> int:
    """Tasks of a reduction: row ranges (NCL with short rows), pieces per channel (NCL
    with long rows) or row blocks (MC)."""
    return _splits(x.shape)[0]


def _elementwise_split(x: Tensor) -> int:
    """Flat ranges (NCL) or row blocks (MC) of an elementwise kernel."""
    return _splits(x.shape)[1]


_SPLITS: dict = {}


def _splits(shape) -> tuple[int, int]:
    """(reduce, elementwise) splits of a kernel view's shape, computed once per shape (a
    dict lookup costs less than the arithmetic's Python calls, which count on small
    tensors)."""
    got = _SPLITS.get(shape)
    if got is None:
        numel = 1
        for s in shape:
            numel *= s
        if _build(numel) == 1:
            # the serial build: one task, no partials to merge (in 16 row blocks the MC
            # kernels' forward on (64, 1024) took 67-69 µs against 46, measured)
            got = (1, 1)
        elif len(shape) == 2:
            m, c = shape
            # a reduction's row block sums into float64 partials of a whole row, zeroed and
            # folded afterwards: blocks of fewer than _MC_BLOCK_ROWS rows spend more on
            # those than they win (the forward, statistics then normalize, of (64, 4096)
            # and (256, 2048) took 1.3-2.8x as long with 16 blocks as with 2, measured)
            got = (max(min(2, m), min(_TASKS, m // _MC_BLOCK_ROWS, (m * c) // _MIN_PIECE)),
                   max(1, min(4 * _TASKS, m, (m * c) // _MIN_PIECE)))
        else:
            n, c, l_ = shape
            # reductions: tasks of whole rows where rows are short (K._BLK or less), else
            # pieces per channel; elementwise kernels: flat ranges (rows need not align)
            reduce = (max(1, min(_TASKS, n * c, (n * c * l_) // _MIN_PIECE)) if l_ <= K._BLK
                      else max(1, min(-(-_TASKS // c), (n * l_) // _MIN_PIECE)))
            got = (reduce, max(1, min(4 * _TASKS, (n * c * l_) // _MIN_PIECE)))
        if len(_SPLITS) > 4096:  # shapes of a long-running process with varying batches
            _SPLITS.clear()
        _SPLITS[shape] = got
    return got


def stats(x: Tensor) -> tuple[Tensor, Tensor]:
    if x.numel() == 0:
        return portable.stats(x)
    x = _wide(x).contiguous()
    c = x.shape[1]
    # the mean in float64 (portable.mean_dtype): a float32 mean of data near 1e6 is
    # spaced 0.0625 apart; the kernel computes it in float64 anyway
    mean = torch.empty(c, dtype=torch.float64, device=_CPU)
    m2 = torch.empty(c, dtype=x.dtype, device=_CPU)
    kernel = _pick(K.STATS[_view(x)], x)
    kernel(_np(x), _reduce_split(x), _np(mean), _np(m2))
    return mean, m2


# The primitives pass (mean, invstd) as they are: mode 0 of the kernels' prologue.
_MODE_GIVEN = 0


def normalize(x, mean, invstd, weight, bias, residual, activation: str, slope: float) -> Tensor:
    if x.numel() == 0:
        return portable.normalize(x, mean, invstd, weight, bias, residual, activation, slope)
    if x.dtype in _HALF:
        y = normalize(x.float(), mean, invstd, weight, bias, _wide(residual), activation, slope)
        return y.to(x.dtype)
    x = x.contiguous()
    acc = x.dtype
    y = buffers.empty_like(x)
    kernel = _pick(K.NORMALIZE[_view(x)], x)
    kernel(_np(x), _mean(mean), _param(invstd, acc), 0.0, 1.0, _MODE_GIVEN,
           _param(weight, acc), _param(bias, acc), _like(residual, x), K.ACT_CODES[activation],
           float(slope), _elementwise_split(x), _np(y), _empty(acc, 1))
    return y


def backward_reduce(dy, x, mean, invstd, weight, bias, residual, activation: str, slope: float):
    if x.numel() == 0:
        return portable.backward_reduce(dy, x, mean, invstd, weight, bias, residual,
                                        activation, slope)
    if x.dtype in _HALF:
        return backward_reduce(dy.float(), x.float(), mean, invstd, weight, bias,
                               _wide(residual), activation, slope)
    x = x.contiguous()
    acc = x.dtype
    c = x.shape[1]
    sum_dz = torch.empty(c, dtype=acc, device=_CPU)
    sum_dzx = torch.empty(c, dtype=acc, device=_CPU)
    kernel = _pick(K.REDUCE[_view(x)], x)
    kernel(_like(dy, x), _np(x), _mean(mean), _param(invstd, acc), 0.0, 1.0, _MODE_GIVEN,
           _param(weight, acc), _param(bias, acc),
           _like(residual if activation != "none" else None, x), K.ACT_CODES[activation],
           float(slope), _reduce_split(x), _np(sum_dz), _np(sum_dzx))
    return sum_dz, sum_dzx


def backward_elementwise(
    dy, x, mean, invstd, weight, bias, residual, sum_dz, sum_dz_xhat, count: int,
    activation: str, slope: float, want_dresidual: bool,
):
    if x.numel() == 0:
        return portable.backward_elementwise(dy, x, mean, invstd, weight, bias, residual,
                                             sum_dz, sum_dz_xhat, count, activation, slope,
                                             want_dresidual)
    if x.dtype in _HALF:
        dx, dres = backward_elementwise(dy.float(), x.float(), mean, invstd, weight, bias,
                                        _wide(residual), sum_dz, sum_dz_xhat, count,
                                        activation, slope, want_dresidual)
        if dres is not None:
            dres = dres.to(residual.dtype if residual is not None else x.dtype)
        return dx.to(x.dtype), dres
    x = x.contiguous()
    acc = x.dtype
    return _elementwise(dy, x, _mean(mean), _param(invstd, acc), 0.0, _MODE_GIVEN,
                        weight, bias, residual, sum_dz, sum_dz_xhat, count, activation, slope,
                        want_dresidual)


def _elementwise(dy, x, mean_np, v_np, eps, mode, weight, bias, residual, sum_dz, sum_dzx,
                 count, activation, slope, want_dresidual):
    acc = x.dtype
    dx = buffers.empty_like(x)
    dres = kernel_dres = None
    if want_dresidual:
        rdtype = residual.dtype if residual is not None else x.dtype
        if activation == "none":
            dres = dy.to(rdtype, copy=True)  # d(z)/d(residual) = 1: dz is dy itself
        else:
            dres = kernel_dres = buffers.empty_like(x)
    kernel = _pick(K.ELEMENTWISE[_view(x)], x)
    kernel(_like(dy, x), _np(x), mean_np, v_np, float(eps), float(max(count, 1)), mode,
           _param(weight, acc), _param(bias, acc),
           _like(residual if activation != "none" else None, x),
           _param(sum_dz, acc), _param(sum_dzx, acc), K.ACT_CODES[activation], float(slope),
           _elementwise_split(x), _np(dx),
           _empty(acc, x.dim()) if kernel_dres is None else _np(kernel_dres))
    if kernel_dres is not None and residual is not None and dres.dtype != residual.dtype:
        dres = dres.to(residual.dtype)
    return dx, dres


# ---------------------------------------------------------------------------------------
# Fused entry points for ops.py: the same primitives, with the C-sized math between them
# (invstd, the float64 mean's split, the backward's correction) done inside the kernels'
# prologue instead of by a dozen torch ops on [C] tensors, which cost more than the whole
# computation for small inputs. They return None for what they do not take (halves,
# empty tensors): ops then runs its general path.


# The fused entry points take tensors as the caller has them, (N, C, *) contiguous or
# channels-last (``channels_last``), kernel views included, and hand the kernels each
# tensor's address and the kernel view's shape (``cpu_kernels``: a NumPy view costs ~2 µs
# a tensor, an address ~0.2 µs).


def _rows_of_channels(shape, channels_last: bool) -> bool:
    """Whether the kernel view of a dense x of this shape is (M, C): channels-last data, a
    2-D input, or an (N, C, 1..) input, whose memory is that of (N, C) (BatchNorm after
    global pooling): as (N, C, 1) rows of one value each it ran 10x slower than torch
    (measured on (4096, 256, 1, 1))."""
    return channels_last or len(shape) == 2 or shape.numel() == shape[0] * shape[1]


_PLANS: dict = {}


def _wide_rows(n: int, c: int, l_: int) -> bool:
    """Whether an (n, c, l) array runs the MC kernels as n rows of c·l values (see
    cpu_kernels, "Channels-last tiles") rather than as n·c rows of l.

    NCL rows shorter than 32 run mostly outside LLVM's vectorized loop; wide rows pay
    for tiles of per-channel coefficients c·l long, built once a call. Measured
    2026-11-28 on the 2-core machine, module forward+backward, wide rows against NCL rows
    (steps of both interleaved in one process, medians of 9): 0.55-0.58x the time on
    (16, 8192, 2, 2), (16, 4096, 2, 2), (32, 1024, 3, 3) and (64, 2048, 3, 3), 0.61x on
    (128, 512, 4, 4), 0.66-0.68x on (32, 2048, 3, 3), (32, 512, 3, 3) and
    (128, 256, 5, 5), 0.73x on (32, 4096, 3, 3), 0.78x on (16, 2048, 3, 3), 0.82-0.91x on
    (32, 1024, 4, 4), (64, 1024, 4, 4), (16, 4096, 3, 3), (16, 512, 4, 4) and
    (32, 512, 5, 5). They lose with few rows (1.10-1.11x on (8, 512, 4, 4) and
    (8, 256, 3, 3)), and where the tiles outgrow the caches with rows of more than a few
    values: 1.06-1.09x on (16, 1024, 4, 4), 1.30-1.35x on (16, 1024, 5, 5),
    (32, 1024, 5, 5), (16, 2048, 4, 4) and (32, 2048, 5, 5). Rows of at most WIDE_SHORT
    values gain even from tiles past the caches. Kernels alone (forward + backward):
    0.55x on (64, 256, 4, 4) and (128, 512, 4, 4), 0.77x on (16, 2048, 3, 3), 1.39x on
    (16, 1024, 4, 4)."""
    if l_ >= WIDE_BELOW or n < WIDE_MIN_ROWS:
        return False
    if l_ <= WIDE_SHORT:
        return c * l_ <= WIDE_MAX_COLUMNS_SHORT
    return c * l_ <= (WIDE_MAX_COLUMNS if n < 2 * WIDE_MIN_ROWS else 2 * WIDE_MAX_COLUMNS)


# The bounds of _wide_rows (measured; see there): rows shorter than WIDE_BELOW values, at
# least WIDE_MIN_ROWS of them, at most WIDE_MAX_COLUMNS values a row (twice that from
# twice the rows), or WIDE_MAX_COLUMNS_SHORT where rows hold at most WIDE_SHORT values.
# Measured with float32 data; 16-bit data takes the same plan (its training forward on
# (64, 256, 4, 4) bfloat16 as wide rows took 0.77x the time of 1d9ef8b's 16-bit kernels,
# which ran NCL rows; minimums of 6 alternating processes, 2026-12-03).
WIDE_BELOW = 32
WIDE_MIN_ROWS = 16
WIDE_MAX_COLUMNS = 8192
WIDE_SHORT = 9
WIDE_MAX_COLUMNS_SHORT = 36864


def _kernel_plan(x: Tensor, channels_last: bool):
    """``(view, build, n, c, l, rsplit, esplit, count, pooled)`` of a dense x: the kernel
    view is (n, c, l) ("ncl"), or rows ("mc") of c channels (l = 1; see
    _rows_of_channels) or of c·l values (wide rows; see _wide_rows); build 0 (parallel)
    or 1 (serial, below SERIAL_BELOW); the splits as _splits; count = values per channel,
    a float; pooled: whether outputs of x's size come from ``cpu_buffers``. Kept per
    shape: the arithmetic's Python calls cost more than a small kernel."""
    key = (x.shape, channels_last, x.dtype)
    plan = _PLANS.get(key)
    if plan is None:
        shape = x.shape
        c, numel = shape[1], shape.numel()
        if _rows_of_channels(shape, channels_last):
            view, n, l_ = "mc", numel // c, 1
        else:
            n, l_ = shape[0], numel // (shape[0] * c)
            view = "mc" if _wide_rows(n, c, l_) else "ncl"
        splits = _splits((n, c * l_) if view == "mc" else (n, c, l_))
        plan = (view, _build(numel), n, c, l_, *splits, float(numel // c),
                numel * x.element_size() >= buffers.MIN_BYTES)
        if len(_PLANS) > 4096:  # shapes of a long-running process with varying batches
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def _dense(x: Tensor, channels_last: bool) -> Tensor:
    return x if channels_last else x.contiguous()


def _out_like(x: Tensor, channels_last: bool, pooled: bool) -> Tensor:
    """An output of x's shape and memory format (reusable buffers when ``pooled``)."""
    if not pooled:
        return torch.empty_like(x)
    if not channels_last:
        return buffers.empty_like(x)
    # x is dense (contiguous or channels-last): its strides, as torch.empty_like gives
    return buffers.empty(x.shape, x.dtype, x.stride())


def _laid_out_as(t: Tensor | None, x: Tensor) -> Tensor | None:
    """A tensor-sized input (dy, residual) with x's dtype and strides (a copy if needed)."""
    if t is not None and (t.dtype != x.dtype or t.stride() != x.stride()):
        t = torch.empty_like(x).copy_(t)
    return t


def _vector(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A per-channel tensor as the kernels read it: ``dtype``, unit stride."""
    if t is None:
        return None
    if t.dtype is not dtype:
        return t.to(dtype, memory_format=torch.contiguous_format)
    return t if t.stride() == (1,) else t.contiguous()


def _at(t: Tensor | None) -> int:
    """The kernels' handle of a tensor: its address, 0 for an absent one."""
    return 0 if t is None else t.data_ptr()


# The kernels' dtype argument: a scalar of the data's type, for 16-bit data of its bit
# pattern's (see cpu_kernels, "Data types"); and the accumulation dtype.
_LIKE = {torch.float32: np.float32(0), torch.float64: np.float64(0),
         torch.bfloat16: K.HALF_LIKE["bfloat16"], torch.float16: K.HALF_LIKE["float16"]}
_ACC = {torch.float32: torch.float32, torch.float64: torch.float64,
        torch.bfloat16: torch.float32, torch.float16: torch.float32}


def batch_norm_forward(x, weight, bias, residual, running_mean, running_var, eps,
                       activation, slope, update=None, channels_last=False,
                       need_stats=True):
    """The ``batch_norm_forward`` hook (see ``backends/__init__.py``): ``(y, mean, var,
    updated, None)``, y in x's shape and memory format; mean in float64 in training. x is dense: contiguous, or channels-last
    (``ops.is_channels_last``) when ``channels_last``; the kernels read it by address.
    ``update`` (training only): ``(running_mean, running_var, num_batches_tracked,
    momentum)`` to move towards the batch statistics, done here after the normalize when
    the buffers suit the kernel (``updated`` True), else left to ops. In evaluation the
    returned mean and var are copies of the running buffers (ops saves them for backward,
    and the buffers may move before it runs), unless ``need_stats`` is False: the caller
    keeps y alone, the kernel reads the buffers themselves where their dtype and layout
    allow, and mean and var come back None.
    None for what it does not take (empty tensors, a residual of another dtype than
    16-bit data's)."""
    acc = _ACC.get(x.dtype)
    if acc is None or x.numel() == 0 or (
            running_mean is not None and portable.running_mean_dtype(running_mean, acc) != acc):
        # (the evaluation kernels take the mean in the accumulation dtype: a wider running
        # mean is split for them by ops' primitives path)
        return None
    if acc is not x.dtype and residual is not None and residual.dtype != x.dtype:
        return None  # (the kernels would read it in x's format)
    x = _dense(x, channels_last)
    view, build, n, c, l_, rsplit, esplit, count, pooled = _kernel_plan(x, channels_last)
    y = _out_like(x, channels_last, pooled)
    w, b = _vector(weight, acc), _vector(bias, acc)
    res = _laid_out_as(residual, x)
    code, like = K.ACT_CODES[activation], _LIKE[x.dtype]
    if running_mean is not None:
        mean = running_mean.to(acc, copy=need_stats).contiguous()
        var = running_var.to(acc, copy=need_stats).contiguous()
        K.FORWARD_EVAL[view][_build_now(build)](
            x.data_ptr(), n, c, l_, mean.data_ptr(), var.data_ptr(), float(eps), count, _at(w),
            _at(b), _at(res), code, float(slope), esplit, y.data_ptr(), like)
        return (y, mean, var, False, None) if need_stats else (y, None, None, False, None)
    mean = torch.empty(c, dtype=torch.float64, device=_CPU)
    var = torch.empty(c, dtype=acc, device=_CPU)
    running = _running_at(*update, acc) if update is not None else None
    rm, rv, counter, momentum = running or (0, 0, 0, 0.0)
    K.FORWARD_TRAIN[view][_build_now(build)](
        x.data_ptr(), n, c, l_, rsplit, esplit, float(eps), count, _at(w), _at(b),
        _at(res), code, float(slope), rm, rv, counter, momentum, y.data_ptr(),
        mean.data_ptr(), var.data_ptr(), like)
    return y, mean, var, running is not None, None


def batch_norm_backward(dy, x, weight, bias, residual, mean, var, eps, training: bool,
                        activation, slope, need_sums: bool, need_dx: bool,
                        want_dresidual: bool, channels_last=False, saved=None):
    """``(dx, Σdz, Σdz·x̂, dresidual)`` from the saved (mean, biased var), dx and
    dresidual in x's shape and memory format; dx (dresidual) None unless asked, the sums
    None unless ``need_sums`` (required in training). None for what it does not take.
    ``saved`` (what ``batch_norm_forward`` handed ops besides the statistics) is None
    here: the kernels recompute invstd in their prologue."""
    acc = _ACC.get(x.dtype)
    if acc is None or x.numel() == 0 or (not training and mean.dtype != acc):
        return None  # (a wider running mean: see batch_norm_forward)
    if (acc is not x.dtype and residual is not None and activation != "none"
            and residual.dtype != x.dtype):
        return None  # (see batch_norm_forward)
    x = _dense(x, channels_last)
    view, build, n, c, l_, rsplit, esplit, count, pooled = _kernel_plan(x, channels_last)
    dy = _laid_out_as(dy, x)
    res = _laid_out_as(residual, x) if activation != "none" else None
    w, b = _vector(weight, acc), _vector(bias, acc)
    # (mean, var) are those batch_norm_forward returned for this x (the same dtypes take
    # both): unit stride, var in the data's dtype, the mean in float64 in training and
    # in the data's dtype in evaluation
    need_sums = need_sums or training
    sum_dz = sum_dzx = dx = dres = None
    if need_sums:
        sum_dz, sum_dzx = (torch.empty(c, dtype=acc, device=_CPU),
                           torch.empty(c, dtype=acc, device=_CPU))
    if need_dx:
        dx = _out_like(x, channels_last, pooled)
        if want_dresidual:
            # activation != 'none' here: without one, ops uses dy itself as dresidual
            dres = _out_like(x, channels_last, pooled)
    K.BACKWARD[view][_build_now(build)](
        dy.data_ptr(), x.data_ptr(), n, c, l_, mean.data_ptr(), var.data_ptr(), float(eps),
        count, _at(w), _at(b), _at(res), K.ACT_CODES[activation], float(slope),
        rsplit, esplit, need_sums, need_dx, training, _at(sum_dz), _at(sum_dzx), _at(dx),
        _at(dres), _LIKE[x.dtype], mean.dtype is torch.float64)
    return dx, sum_dz, sum_dzx, dres


def _running_at(running_mean, running_var, num_batches_tracked, momentum, acc):
    """The kernels' handles of the running buffers, ``(running_mean, running_var, counter,
    momentum with -1 for None)``, or None where the kernel does not apply (ops then
    updates with torch ops): buffers of another dtype than the data's, on another device,
    strided, that require grad or are negative views."""
    if running_mean is None or running_var is None:
        return None
    counter = 0
    if num_batches_tracked is None:
        if momentum is None:
            return None
    elif (num_batches_tracked.dtype is not torch.int64 or not num_batches_tracked.is_cpu
          or num_batches_tracked.requires_grad or num_batches_tracked.is_neg()):
        return None
    else:
        counter = num_batches_tracked.data_ptr()
    for t in (running_mean, running_var):
        if (t.dtype is not acc or not t.is_cpu or t.requires_grad or t.stride() != (1,)
                or t.is_neg()):
            return None
    return (running_mean.data_ptr(), running_var.data_ptr(), counter,
            -1.0 if momentum is None else float(momentum))


def _running_arrays(running_mean, running_var, num_batches_tracked, momentum):
    """NumPy views for ``update_running``: (running_mean, running_var, counter, momentum
    with -1 for None), or None where the kernel does not apply (ops then updates with
    torch ops): float16/bfloat16 buffers (numba's float16 arithmetic is limited), another
    device, buffers that require grad or are negative views."""
    if (running_mean is None or running_var is None or running_mean.requires_grad
            or running_var.requires_grad or running_mean.is_neg() or running_var.is_neg()):
        return None  # (a negative view's memory cannot take the update by address)
    if num_batches_tracked is None:
        if momentum is None:
            return None
        counter = _NO_COUNTER
    elif num_batches_tracked.dtype is not torch.int64 or num_batches_tracked.is_neg():
        return None
    if running_mean.dtype not in _DTYPES or running_var.dtype not in _DTYPES:
        return None
    try:
        # _np refuses another device; a layout the kernel was not compiled for compiles a
        # variant
        if num_batches_tracked is not None:
            counter = _np(num_batches_tracked.view(1))
        return (_np(running_mean), _np(running_var), counter,
                -1.0 if momentum is None else float(momentum))
    except (RuntimeError, TypeError):
        return None


def update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, count,
                         momentum) -> bool:
    """``ops.update_running_stats`` in one kernel call; False (nothing done) where it does
    not apply: then ops runs its torch version."""
    if not isinstance(count, int):
        return False
    arrays = _running_arrays(running_mean, running_var, num_batches_tracked, momentum)
    if arrays is None:
        return False
    try:
        batch = (_np(mean), _np(var))
    except (RuntimeError, TypeError):
        return False
    K.update_running(*arrays[:3], *batch, float(count), arrays[3])
    return True


_NO_COUNTER = torch.empty(0, dtype=torch.int64, device=_CPU).numpy()
