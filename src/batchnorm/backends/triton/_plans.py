"""Launch plans of the triton backend: tiles, warps and grids per input shape.

A plan is a pure function of a kernel view's geometry (:class:`Geometry`), the device (its
SM count) and a configuration (the keys of :data:`CONFIG`). ``CONFIG`` holds the defaults.
With ``CONFIG["autotune"]`` on (the default), the first time a pass meets a shape on a GPU
(geometry, dtype and device) it times a few configurations around the defaults on the
device and keeps the fastest for that shape: the best tiles differ by shape (an H200's
section E of ``benchmarks/triton_dev.py``, 2026-11-27: half the programs per SM took the
channels-last statistics from 0.157 to 0.134 ms but twice as many helped NCHW; a
persistent grid halved normalize on (8192, 4096) and changed nothing elsewhere).

What tuning may and may not do:
* only side-effect-free launches are timed: stage 1 of a reduction with its plain merge
  into scratch buffers, and the elementwise passes, whose outputs the real launch then
  writes again; the running update is never part of it, so it is applied once;
* it synchronizes with the host, once per shape; never while a CUDA graph is being
  captured (the defaults are used then, and the shape is tuned on a later call);
* a reduction's plan changes the order of its additions, so its last bits: under
  ``torch.use_deterministic_algorithms(True)`` the reductions keep the defaults (bits
  that depend only on the shape, dtype and GPU model); the elementwise passes compute the
  same bits with every plan and are always tuned.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable
from typing import NamedTuple

import torch

CONFIG = {
    # Time candidate plans per shape on the GPU the first time it is met (see above); 0
    # uses the values below everywhere. Inputs of fewer elements than autotune_min_numel
    # keep the defaults: their passes take a few µs, within the timing's noise, and their
    # steps are bound by the host's time anyway.
    "autotune": 1,
    "autotune_min_numel": 1 << 20,
    # Stage-1 reductions: aim for this many programs per SM in total, each walking tiles of
    # reduce_tile elements (accumulators live in registers: 2 per element of the tile).
    "programs_per_sm": 8,
    "reduce_tile": 4096,
    "reduce_warps": 8,
    # Tiles in flight in stage 1's loop (num_stages of its tl.range): 1 is a plain loop;
    # 2-3 pipeline the loads through shared memory. Unmeasured on a GPU: the channels-last
    # reductions ran at 50-64% of the copy bandwidth on an H200 (2026-11-27), and section E
    # of benchmarks/triton_dev.py compares 2 and 3.
    "reduce_stages": 1,
    # (M, C) views: tiles loaded per loop step before their additions (1 or 2); 2 doubles
    # the bytes in flight without doubling the accumulators. Unmeasured on a GPU; an
    # autotuner candidate.
    "reduce_unroll": 1,
    # Elementwise passes: tiles of elem_tile elements; one per program when
    # elem_programs_per_sm is 0, else a persistent grid of that many programs per SM.
    "elem_tile": 4096,
    "elem_warps": 8,
    # ... over (M, C) views (channels-last, BatchNorm1d): 4 warps took backward_elementwise
    # on (256,256,56,56) bf16 CL from 0.517 to 0.295 ms, on (8192,4096) bf16 from 0.132 to
    # 0.119, and normalize on (8192,4096) from 0.085 to 0.062 (H200, section E of
    # benchmarks/triton_dev.py, 2026-11-27); over NCL views they were 1-3% slower.
    "elem_warps_cl": 4,
    "elem_programs_per_sm": 0,
    # Widest channel block of an (M, C) tile; rows fill the rest of the tile.
    "block_c": 128,
    # Stage-2 merges: [merge_block_p, <= merge_block_c] tiles (taller and narrower with few
    # channels: merge_launch), one program per channel block, merge_warps warps. 8 warps,
    # not 4: a 2048-value tile at 16 values a thread, with two loads at offsets apart by a
    # number of channels that is no multiple of 16, crashes Triton 3.9's compiler for
    # sm_90 (a segmentation fault in make_llir; C = 24 in 512 partials,
    # tests/fake_cuda_launches.py; Triton 3.6 compiles it); at 8 values a thread it compiles.
    "merge_block_p": 64,
    "merge_block_c": 32,
    "merge_warps": 8,
    # A training step's reductions merge in their stage-1 launch (the last program of a
    # channel block merges the block's partials: two launches a step fewer, which is host
    # time on small inputs) where a block has at most this many partial values (P times
    # the block's channels: the last program walks them alone, in [merge tile]-sized
    # steps, while a separate merge spreads them over narrower blocks); 0: never.
    "fused_merge_max": 16384,
}


def apply_env_config() -> None:
    """``BATCHNORM_TRITON_CONFIG="reduce_tile=8192,autotune=0"``: CONFIG values, read at import."""
    spec = os.environ.get("BATCHNORM_TRITON_CONFIG", "")
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in CONFIG:
            raise ValueError(f"BATCHNORM_TRITON_CONFIG: unknown key {key!r}; known: {sorted(CONFIG)}")
        try:
            CONFIG[key] = int(value)
        except ValueError:
            raise ValueError(
                f"BATCHNORM_TRITON_CONFIG: {key} wants an integer, got {value!r}") from None


apply_env_config()


class Geometry(NamedTuple):
    """A kernel view's sizes: ``(M, C)`` with the channels innermost (``cl``; ``l`` is 1),
    or ``(N, C, L)``. The kernels read tensors by address, so any tensor whose memory is
    laid out as that view will do: the view itself, or the input as given (contiguous, or
    channels-last dense), which saves the view calls of a step."""
    cl: bool
    n: int
    c: int
    l: int


@functools.lru_cache(maxsize=4096)
def geometry(shape: torch.Size, channels_last: bool) -> Geometry:
    """Of a kernel view (2-D or 3-D, ``channels_last`` False) or of an (N, C, *) input whose
    memory is contiguous, or channels-last dense when ``channels_last``."""
    c = shape[1]
    if len(shape) == 2 or channels_last:
        return Geometry(True, math.prod(shape) // c if c else 0, c, 1)
    return Geometry(False, shape[0], c, math.prod(shape[2:]))


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 2  # interpreter: a few programs per channel, enough to exercise the merge
    return torch.cuda.get_device_properties(device).multi_processor_count


def np2(n: int) -> int:
    # Not triton.next_power_of_2: in Triton 3.9 that is a wrapped constexpr function costing
    # ~20 µs a call on the host, which is per launch.
    return 1 << (max(int(n), 1) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# The kernels index rows, columns and tiles in int32 (pid, and the sizes Triton passes as
# int32 below 2^31) and form element offsets in int64. Where a plan's row or column
# indices (including a loop's last increment and a tile's ragged end) could pass
# _I32_MAX, its "I64" flag (a constexpr) makes the kernel do that index arithmetic in
# int64 too; otherwise the kernels are compiled as before (the common case).
_I32_MAX = (1 << 31) - 1


def _memoized(fn):
    """Memoize a plan on (geometry, device, configuration values)."""
    cache = {}

    def wrapper(g: Geometry, device: torch.device, cfg: dict = CONFIG):
        key = (g, device, tuple(cfg.values()))
        plan = cache.get(key)
        if plan is None:
            if len(cache) > 4096:
                cache.clear()
            plan = cache[key] = fn(g, device, cfg)
        return plan
    wrapper.__wrapped__ = fn
    return wrapper


@_memoized
def reduce_plan(g: Geometry, device: torch.device, cfg: dict) -> dict:
    """Stage 1 of a reduction: the tile, and the split of each channel's values over P
    programs (``[P, C]`` partials); ``merge_p``: see :func:`fused_merge_p`."""
    tile = cfg["reduce_tile"]
    target = cfg["programs_per_sm"] * sm_count(device)
    common = dict(warps=cfg["reduce_warps"], stages=cfg["reduce_stages"])
    if g.cl:
        m, c = g.n, g.c
        block_c = min(np2(c), cfg["block_c"])
        block_m = min(max(tile // block_c, 1), np2(m))
        unroll = cfg["reduce_unroll"] if m > block_m else 1
        step = block_m * unroll  # a program's rows are whole loop steps
        ncb = cdiv(c, block_c)
        per_cb = max(1, cdiv(target, ncb))
        rows = cdiv(cdiv(m, step), per_cb) * step
        p = cdiv(m, rows)
        # the last program's end p·rows, and its loop's last increment past it
        i64 = p * rows + step > _I32_MAX
        return dict(P=p, grid=(p * ncb,), rows=rows, ncb=ncb, shift_stride=1,
                    BLOCK_M=block_m, BLOCK_C=block_c, unroll=unroll, I64=i64,
                    merge_p=fused_merge_p(True, p, block_c, common["warps"], cfg), **common)
    n, c, length = g.n, g.c, g.l
    block_l = min(np2(length), tile)
    block_n = min(max(tile // block_l, 1), np2(n))
    nb, lb = cdiv(n, block_n), cdiv(length, block_l)
    per_channel = max(1, cdiv(target, c))
    k = max(1, (nb * lb) // per_channel)  # tiles per program
    kl = min(lb, k)
    kn = max(1, k // kl)
    cols, rows = kl * block_l, kn * block_n
    p_l, p_n = cdiv(length, cols), cdiv(n, rows)
    # the last programs' ends and their loops' last increments; a program's count
    i64 = max(p_n * rows + block_n, p_l * cols + block_l, rows * cols) > _I32_MAX
    return dict(P=p_n * p_l, grid=(p_n * p_l * c,), rows=rows, cols=cols, p_l=p_l,
                shift_stride=length, BLOCK_N=block_n, BLOCK_L=block_l, I64=i64,
                merge_p=fused_merge_p(False, p_n * p_l, 1, common["warps"], cfg), **common)


@_memoized
def elem_plan(g: Geometry, device: torch.device, cfg: dict) -> dict:
    """(R, K, C), the tile and the grid of the elementwise passes."""
    tile = cfg["elem_tile"]
    if g.cl:
        r, k = g.n, g.c
        block_k = min(np2(k), cfg["block_c"])
    else:
        r, k = g.n * g.c, g.l
        block_k = min(np2(k), tile)
    block_r = min(max(tile // block_k, 1), np2(r))
    n_tiles = cdiv(r, block_r) * cdiv(k, block_k)
    persistent = cfg["elem_programs_per_sm"] * sm_count(device)
    grid = (min(n_tiles, persistent) if persistent > 0 else n_tiles,)
    # the kernels' tl.cdiv(R, BLOCK_R) forms R + BLOCK_R − 1 (as far as a ragged last
    # tile's rows reach), and their tile loop's last increment is n_tiles − 1 + grid
    i64 = max(r + block_r, k + block_k, n_tiles + grid[0]) > _I32_MAX
    return dict(R=r, K=k, C=g.c, grid=grid, BLOCK_R=block_r, BLOCK_K=block_k, CL=g.cl,
                I64=i64, warps=cfg["elem_warps_cl" if g.cl else "elem_warps"])


def merge_launch(c: int, p: int) -> tuple[tuple[int], dict]:
    """Grid and tile (``BLOCK_P``, ``BLOCK_C``, ``num_warps``) of a stage-2 merge of
    ``p`` partials of ``c`` channels, from CONFIG's merge keys."""
    return _merge_launch(c, p, CONFIG["merge_block_p"], CONFIG["merge_block_c"],
                         CONFIG["merge_warps"])


def fused_merge_p(cl: bool, p: int, block_c: int, warps: int, cfg: dict = CONFIG) -> int:
    """``MERGE_P`` (the merge tile's partials) where a stage-1 launch of ``p`` partials of
    ``block_c`` channels a program (one over an (N, C, L) view) at ``warps`` warps should
    merge its own partials (see CONFIG's fused_merge_max), else 0."""
    block_c = block_c if cl else 1
    if p * block_c > cfg["fused_merge_max"]:
        return 0
    # at most 8 values a thread in the stage-1 plan's warps (see merge_warps: 16 crash
    # Triton 3.9's compiler for some channel counts)
    tile = min(cfg["merge_block_p"] * cfg["merge_block_c"], 8 * 32 * warps)
    return max(1, min(tile // block_c, np2(p)))


@functools.lru_cache(maxsize=1024)
def _merge_launch(c: int, p: int, block_p: int, block_c: int, warps: int):
    # One program per block of channels, looping over the partials in [BLOCK_P, BLOCK_C]
    # tiles; each step waits for its loads, so the merge is latency-bound. With few
    # channels (under 8 blocks; channels-last views then have ~1,000 partials) the blocks
    # narrow, down to 4 channels, and the tile grows taller by as much: more programs, and
    # fewer steps (C = 32: 8 programs of 2 steps instead of one of 16, each way).
    tile = block_p * block_c
    block_c = min(np2(c), block_c)
    while block_c > 4 and cdiv(c, block_c) < 8:
        block_c //= 2
    block_p = max(1, min(tile // block_c, np2(p)))
    return (cdiv(c, block_c),), {"BLOCK_P": block_p, "BLOCK_C": block_c, "num_warps": warps}


# --------------------------------------------------------------------------------------
# Per-shape choice

# The passes a plan is chosen for, and whether their plan decides a reduction's order.
PASSES = {"stats": True, "backward_reduce": True, "normalize": False,
          "backward_elementwise": False}


def variants(pass_name: str, cfg: dict) -> list[dict]:
    """The changes to ``cfg`` the autotuner times for a pass: none first, then one or two
    knobs moved, where the H200's section E (2026-11-27) saw a gain on some shape (and the
    reductions' two-tile loads, ``reduce_unroll``, not yet timed on a GPU)."""
    if PASSES[pass_name]:
        pps, tile, warps = cfg["programs_per_sm"], cfg["reduce_tile"], cfg["reduce_warps"]
        half = {"reduce_tile": max(tile // 2, 1), "reduce_warps": max(warps // 2, 1)}
        return [{}, {"programs_per_sm": max(pps // 2, 1)}, {"programs_per_sm": 2 * pps},
                half, {**half, "programs_per_sm": 2 * pps}, {"reduce_tile": 2 * tile},
                {"reduce_stages": 2 if cfg["reduce_stages"] == 1 else 1},
                {"reduce_unroll": 2 if cfg["reduce_unroll"] == 1 else 1},
                # fewer partials, as many bytes in flight: for few channels in (M, C) views,
                # whose merge is one program over all of them (no new compilation)
                {"reduce_unroll": 2 if cfg["reduce_unroll"] == 1 else 1,
                 "programs_per_sm": max(pps // 2, 1)},
                {"block_c": 2 * cfg["block_c"]}]
    other = {"elem_warps": 4 if cfg["elem_warps"] == 8 else 8,
             "elem_warps_cl": 4 if cfg["elem_warps_cl"] == 8 else 8}
    return [{}, other, {"block_c": 2 * cfg["block_c"]}, {"elem_tile": 2 * cfg["elem_tile"]},
            {"elem_programs_per_sm": 32 if cfg["elem_programs_per_sm"] == 0 else 0}]


def candidates(pass_name: str, g: Geometry, device: torch.device) -> list[tuple[str, dict]]:
    """``(label, plan)`` of the distinct plans :func:`variants` give for this geometry, the
    defaults (label "default") first; a label names the knobs a variant moved."""
    make = reduce_plan if PASSES[pass_name] else elem_plan
    out, plans = [], []
    for change in variants(pass_name, CONFIG):
        plan = make(g, device, {**CONFIG, **change})
        if plan not in plans:
            plans.append(plan)
            out.append((",".join(f"{k}={v}" for k, v in change.items()) or "default", plan))
    return out


# The host's time to enqueue one run(plan) (ms; the largest seen, capped), and the GPU's
# spin cycles per ms by device: see device_ms.
_HOST_MS_PER_RUN = [0.05]
_CYCLES_PER_MS: dict = {}
_spin = getattr(torch.cuda, "_sleep", None)  # a kernel that spins for a number of cycles


def _cycles_per_ms(device: int) -> float:
    cycles = _CYCLES_PER_MS.get(device)
    if cycles is None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        _spin(1000)  # loads the kernel
        start.record()
        _spin(1_000_000)
        end.record()
        end.synchronize()
        cycles = _CYCLES_PER_MS[device] = 1e6 / max(start.elapsed_time(end), 1e-3)
    return cycles


def device_ms(run: Callable[[dict], None], plan: dict, reps: int) -> float:
    """Milliseconds of one ``run(plan)`` on the current CUDA stream (CUDA events).

    The runs are enqueued behind a kernel that keeps the GPU spinning for longer than the
    host takes to enqueue them, so that they run back to back: a pass of a few tens of µs
    runs faster than the host enqueues it (two launches and an allocation), and events
    around host-bound launches would time the host, the same for every plan. Should the
    spin have ended before the host was done (the start event already reached), the
    timing is repeated behind a longer spin.
    """
    device = torch.cuda.current_device()
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if _spin is not None:
            spin_ms = 0.02 + 2 * reps * _HOST_MS_PER_RUN[0]
            _spin(int(spin_ms * _cycles_per_ms(device)))
        start.record()
        t = time.perf_counter()
        for _ in range(reps):
            run(plan)
        host_ms = (time.perf_counter() - t) * 1e3 / reps
        queued_behind = _spin is not None and not start.query()
        end.record()
        estimate = _HOST_MS_PER_RUN[0] * (1 if queued_behind else 2)
        _HOST_MS_PER_RUN[0] = min(max(estimate, host_ms), 1.0)
        end.synchronize()
        if queued_behind or _spin is None:
            break
    return start.elapsed_time(end) / reps


# How the autotuner times a plan (tests put a stand-in here), its rounds and least
# repetitions (more for short passes: each timing covers at least TIMED_MS of the
# defaults' device time, at most MAX_REPS runs; events resolve about a microsecond), and
# how much faster than the defaults a candidate must be to replace them (below that,
# timing noise would pick plans at random, and the defaults' bits are the same in every
# process).
timer = device_ms
ROUNDS, REPS, MAX_REPS = 3, 3, 32
TIMED_MS = 0.1
MARGIN = 0.97
# Tune CPU tensors too (the interpreter; for the tests of the tuning itself).
TUNE_ON_CPU = False

CHOSEN: dict = {}  # (pass, geometry, dtype, device, CONFIG values) -> plan
# What tuning did, for benchmarks and tests: dicts of pass, geometry, dtype, ms by label
# (candidates that failed to launch, e.g. out of shared memory, are left out) and the
# label chosen.
LOG: list = []


def _key(pass_name: str, g: Geometry, x: torch.Tensor) -> tuple:
    return pass_name, g, x.dtype, x.device, tuple(CONFIG.values())


def chosen(pass_name: str, g: Geometry, x: torch.Tensor):
    """The plan kept for this pass and shape, or None (then call :func:`choose`). Under
    deterministic algorithms a reduction gets the defaults' plan even where a plan was
    kept: a shape tuned before they were turned on would otherwise keep summing in its
    tuned order."""
    plan = CHOSEN.get(_key(pass_name, g, x))
    if plan is not None and PASSES[pass_name] and torch.are_deterministic_algorithms_enabled():
        return reduce_plan(g, x.device)
    return plan


def _static_default(x: torch.Tensor) -> bool:
    """Whether this process never tunes for x (the defaults can be kept for good)."""
    return (not CONFIG["autotune"] or x.numel() < CONFIG["autotune_min_numel"]
            or (not x.is_cuda and not TUNE_ON_CPU))


def _tunable_now(pass_name: str, x: torch.Tensor) -> bool:
    if PASSES[pass_name] and torch.are_deterministic_algorithms_enabled():
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def choose(pass_name: str, g: Geometry, x: torch.Tensor, run: Callable[[dict], None]) -> dict:
    """The plan for this pass and shape, kept for the next calls: the fastest candidate by
    ``run(plan)``, which must launch the pass with that plan on buffers it may overwrite
    (and nothing else), where it beats the defaults by ``MARGIN``, else the defaults. The
    defaults' plan where tuning is off, and, not kept (the shape is tuned on a later call),
    during a CUDA graph capture or, for reductions, under deterministic algorithms."""
    key = _key(pass_name, g, x)
    static = _static_default(x)
    if static or not _tunable_now(pass_name, x):
        plan = (reduce_plan if PASSES[pass_name] else elem_plan)(g, x.device)
        if static:
            CHOSEN[key] = plan
        return plan
    labelled = candidates(pass_name, g, x.device)
    ran = []
    for i, (_, plan) in enumerate(labelled):
        try:
            run(plan)  # compiles it
        except Exception:
            if i == 0:
                raise  # the defaults must work: a real error
            continue  # a variant the device cannot run (shared memory, registers)
        ran.append(i)
    times = dict.fromkeys(ran, math.inf)
    reps = 0
    for _ in range(ROUNDS):
        for i in ran:  # the defaults (i = 0) first
            times[i] = min(times[i], timer(run, labelled[i][1], reps or REPS))
            if not reps:
                reps = max(REPS, min(MAX_REPS, math.ceil(TIMED_MS / max(times[0], 1e-4))))
    best = min(ran, key=times.__getitem__)
    if times[best] > MARGIN * times[0]:  # ran[0] is 0: the defaults ran, or we raised
        best = 0
    if len(LOG) > 4096:
        LOG.clear()
    LOG.append({"pass_name": pass_name, "geometry": g, "dtype": x.dtype,
                "ms": {labelled[i][0]: times[i] for i in ran}, "chosen": labelled[best][0]})
    if len(CHOSEN) > 4096:
        CHOSEN.clear()
    CHOSEN[key] = plan = labelled[best][1]
    return plan
