"""Compile the CPU kernels before their first use, on every core (``batchnorm compile``).

numba compiles each kernel for its argument types on the first call and keeps the machine
code in its on-disk cache (``__pycache__`` beside ``cpu_kernels.py``, or
``NUMBA_CACHE_DIR``), where every later process finds it. A fresh install meets a few
hundred such compilations, kernels and the helpers they share, one after another (182
cache entries after ``batchnorm compile`` alone, 2026-12-03). They do not depend on each
other, so :func:`precompile` runs them in several processes at once.

Measured with a cold cache on the 2-core Intel Xeon, 2026-12-03 (the figures the README
points to), nothing else running: :func:`precompile` took 242.5 s, each group 20-45 s;
with every kernel cached it takes about 10 s. The same 242.8 s before float16 and bfloat16
ran the float kernels (they had kernels of their own); before the kernels' task walks and
per-channel helpers were compiled once per process rather than inlined into every kernel
(``cpu_kernels``, "Variants") it took 444.5-463.2 s, and 210-261 s before the 16-bit
groups. In a fresh clone (``make demo && make test``, 9 min 24 s in all) :func:`precompile`
took 251.4 s and the suite 3 min 27 s in two pytest-xdist workers.

The work is cut into groups, one per kernel view (NCL, MC), build (parallel, serial) and
dtype (float32, float64, float16, bfloat16: one family of kernels compiled per dtype). A
group calls the fused entry points (training and evaluation forward, both backwards) and
the four primitives on a tensor whose plan is that view and build, as the modules and
SyncBatchNorm call them, which compiles exactly the variants they will use (the 16-bit
primitives convert to float32: the float32 groups compile theirs). Groups of one view and
build share numba functions (a kernel's variants of the four dtypes live under one cache
index), and numba rewrites an index without a lock: two processes saving entries of one
function at once can leave the index naming the other entry's file. So the worker
processes take one lock around each cache save.
"""

from __future__ import annotations

import multiprocessing
import os
import time

import torch

from . import cpu

_VIEWS = ("mc", "ncl")
# Serial groups first: a process's first groups compile the helpers every group shares
# (28-46 s a serial group, 20-31 s a parallel one, 2026-12-03).
_BUILDS = (1, 0)
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
GROUPS = [(v, b, d) for b in _BUILDS for v in _VIEWS for d in _DTYPES]


def _shape(view: str, build: int) -> tuple[int, ...]:
    """A shape whose kernel plan is ``(view, build)`` (see ``cpu._kernel_plan``)."""
    rows = cpu.SERIAL_BELOW // 4 if build == 0 else 6
    return (rows, 4) if view == "mc" else (4, 4, rows // 4 if build == 0 else 3)


def compile_group(view: str, build: int, dtype: torch.dtype) -> None:
    """Compile (or load from the cache) every kernel variant one group runs."""
    threads = torch.get_num_threads()
    if build == 0 and threads < 2:  # the parallel build runs only where torch threads
        torch.set_num_threads(2)    # (cpu._build_now); the workers run with one
    try:
        _run_group(view, build, dtype)
    finally:
        torch.set_num_threads(threads)


def _run_group(view: str, build: int, dtype: torch.dtype) -> None:
    shape = _shape(view, build)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    dy = torch.randn(shape, generator=gen, dtype=dtype)
    assert cpu._kernel_plan(x, False)[:2] == (view, build)
    c = shape[1]
    wide = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype  # (autocast)
    w, b = torch.ones(c, dtype=wide), torch.zeros(c, dtype=wide)
    running = (torch.zeros(c, dtype=wide), torch.ones(c, dtype=wide),
               torch.zeros((), dtype=torch.long), 0.1)
    for rm, rv, update in ((None, None, running), (running[0], running[1], None)):
        _, mean, var, _, _ = cpu.batch_norm_forward(x, w, b, x, rm, rv, 1e-5, "relu", 0.0,
                                                    update)
        cpu.batch_norm_backward(dy, x, w, b, x, mean, var, 1e-5, rm is None, "relu", 0.0,
                                True, True, True)
    if wide is not dtype:
        return  # (16-bit primitives convert to float32 and run the float32 group's kernels)
    # the primitives, as SyncBatchNorm and the general path call them
    count = x.numel() // c
    mean, m2 = cpu.stats(x)  # the mean in float64
    var = m2 / count
    cpu.update_running_stats(*running[:3], mean, var, count, 0.1)
    mean, invstd = mean.to(dtype), torch.rsqrt(var + 1e-5)
    cpu.normalize(x, mean, invstd, w, b, x, "relu", 0.0)
    sum_dz, sum_dzx = cpu.backward_reduce(dy, x, mean, invstd, w, b, x, "relu", 0.0)
    cpu.backward_elementwise(dy, x, mean, invstd, w, b, x, sum_dz, sum_dzx, count, "relu",
                             0.0, True)


_lock = None


def _save_under_lock_possible() -> bool:
    from numba.core import caching
    return callable(getattr(getattr(caching, "IndexDataCacheFile", None), "save", None))


def lock_cache_saves(lock) -> None:
    """Make this process save numba cache entries under ``lock`` (a context manager the
    other processes that compile share), so that no two rewrite one index at once (see
    the module docstring). Needs :func:`_save_under_lock_possible`."""
    global _lock
    _lock = lock
    from numba.core import caching
    save = caching.IndexDataCacheFile.save

    def locked_save(self, key, data):
        with _lock:
            return save(self, key, data)

    caching.IndexDataCacheFile.save = locked_save


def _init_worker(lock) -> None:
    torch.set_num_threads(1)  # compiling is single-threaded; the data is tiny
    lock_cache_saves(lock)


def _timed(group) -> tuple[tuple, float]:
    t0 = time.perf_counter()
    compile_group(*group)
    return group, time.perf_counter() - t0


def precompile(jobs: int | None = None, report=None, groups=GROUPS) -> float:
    """Compile the kernels of ``groups`` into numba's cache, ``jobs`` processes at once
    (the number of cores by default; 1, or a numba whose cache class this module does not
    know, compiles in this process). ``report(group, seconds)`` is called as each group
    finishes. Returns the wall-clock seconds."""
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(groups)))
    if jobs > 1 and not _save_under_lock_possible():
        jobs = 1
    t0 = time.perf_counter()
    if jobs == 1:
        results = map(_timed, groups)
        for group, seconds in results:
            if report is not None:
                report(group, seconds)
        return time.perf_counter() - t0
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(jobs, initializer=_init_worker, initargs=(ctx.Lock(),)) as pool:
        for group, seconds in pool.imap_unordered(_timed, groups):
            if report is not None:
                report(group, seconds)
    return time.perf_counter() - t0
