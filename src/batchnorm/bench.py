"""``batchnorm bench``: our modules against torch on this machine, in one process.

For each case of the table (a module, an input shape, dtype and memory format) and each
operation (forward; forward+backward; BN+ReLU forward+backward; BN+add+ReLU
forward+backward), torch eager (and ``torch.compile`` where asked) and our module are
timed *interleaved*: sample i of torch, then sample i of ours, the order alternating, so
that a slow moment of a shared machine hits both sides alike. Each side's time is the
median of ``repeats`` samples; a sample averages enough back-to-back calls to last a few
milliseconds (CPU: ``time.perf_counter``; CUDA: CUDA events around the calls, after
overwriting a 256 MB buffer to flush L2, as ``triton.testing.do_bench`` does).

What the columns mean
---------------------
* ``ratio`` = torch ms / our ms: above 1, we are faster.
* effective GB/s = the bytes the operation must move / time. Batch norm in training cannot
  do with fewer passes over the tensor-sized data than: forward 3 (read x for the
  statistics, read x and write y), backward 5 (read dy and x for the sums, read them again
  and write dx); a residual adds one read forward and, in backward, two reads and one
  write (its gradient). So forward 3|x|, forward+backward 8|x|, with a residual 12|x|.
* ``% copy`` = effective GB/s over the bandwidth of ``dst.copy_(src)`` on a tensor of the
  case's size (read + write), measured in the same run.
* peak memory of forward+backward: on CUDA ``torch.cuda.max_memory_allocated`` above what
  was allocated before; on CPU the running sum of the allocation events of torch's
  profiler (``profile_memory=True``) over one forward+backward, its maximum. Both count
  what torch's allocator hands out; the numba kernels allocate their outputs through
  torch, and only their C-sized scratch arrays (NumPy) are not counted. The CPU backend's
  reusable output buffers (``backends/cpu_buffers.py``) are released before the window,
  so the blocks the call takes are allocated inside it and counted as live to its end
  (an upper bound: a block a step frees is never seen freed).
* first call: the time of the first forward+backward of our module in this process: numba
  compiles the kernels then, or loads them from its on-disk cache (``cache hits``).

The CSV (``--csv``) is in long format, one row per (case, operation, implementation), with
the machine described on every row (it goes to :func:`results_dir`), including ``THP_MEM_ALLOC_ENABLE`` (torch's CPU
allocator takes transparent huge pages when it is 1; page faults of fresh outputs are a
large part of CPU times, so run the table under both settings).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

OPS = ("fwd", "fwd+bwd", "bn+relu fwd+bwd", "bn+add+relu fwd+bwd")
# tensor-sized passes each op must make (see the module docstring)
_PASSES = {"fwd": 3, "fwd+bwd": 8, "bn+relu fwd+bwd": 8, "bn+add+relu fwd+bwd": 12}



def results_dir() -> Path:
    """Where ``--csv`` writes: ``benchmarks/results`` of the source checkout this module
    runs from (an editable install, or ``PYTHONPATH=src``), else ``benchmarks/results``
    under the current directory (an installed wheel: never inside site-packages)."""
    here = Path(__file__).resolve()
    root = here.parents[2]
    if here.parent.parent.name == "src" and (root / "pyproject.toml").is_file():
        return root / "benchmarks" / "results"
    return Path.cwd() / "benchmarks" / "results"


@dataclass(frozen=True)
class Case:
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    param_dtype: torch.dtype = torch.float32
    compile: bool = False  # time torch.compile too

    @property
    def module_name(self) -> str:
        return {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}[len(self.shape)]

    @property
    def layout(self) -> str:
        return "channels_last" if self.channels_last else "contiguous"

    @property
    def label(self) -> str:
        dt = str(self.dtype).replace("torch.", "").replace("float", "f")
        lay = " CL" if self.channels_last else ""
        return f"{self.module_name[-2:]} {tuple(self.shape)} {dt}{lay}"


F32, BF16 = torch.float32, torch.bfloat16


def _with_compile(quick: bool, compile: bool | None) -> bool:
    """Whether a table's cases time torch.compile: ``compile`` None (the default) means
    the full table does and the quick one does not; True, both; False, neither."""
    return compile is True or (compile is None and not quick)


def cpu_cases(quick: bool = False, compile: bool | None = None) -> list[Case]:
    """The CPU table of issue 3; ``torch.compile`` (slow to compile on CPU) on a subset:
    (32, 256, 56, 56) contiguous and (2, 2, 3, 4). ``quick``: 5 of the cases, without
    torch.compile unless ``compile=True`` (see :func:`_with_compile`)."""
    with_compile = _with_compile(quick, compile)
    cases = []
    for shape in [(32, 64, 112, 112), (32, 256, 56, 56), (64, 512, 28, 28), (128, 2048, 7, 7)]:
        for cl in (False, True):
            cases.append(Case(shape, channels_last=cl,
                              compile=with_compile and shape == (32, 256, 56, 56) and not cl))
    cases += [Case((8192, 1024)), Case((256, 512, 64)), Case((8, 32, 16, 64, 64)),
              Case((2, 2, 3, 4), compile=with_compile), Case((16, 64, 8, 8))]
    if quick:
        keep = [((32, 256, 56, 56), False), ((32, 256, 56, 56), True), ((8192, 1024), False),
                ((2, 2, 3, 4), False), ((16, 64, 8, 8), False)]
        cases = [c for c in cases if (c.shape, c.channels_last) in keep]
    return cases


def parse_case(text: str, dtype: torch.dtype = F32, compile: bool = False) -> Case:
    """A case from ``--shape``: sizes separated by commas, ``:cl`` for channels-last
    (4-D or 5-D), e.g. ``64,64,4,4`` or ``32,256,56,56:cl``; ``compile``: time
    torch.compile too (``--compile-ops`` given)."""
    sizes, _, layout = text.partition(":")
    try:
        shape = tuple(int(v) for v in sizes.split(","))
    except ValueError:
        raise ValueError(f"--shape {text!r}: expected sizes separated by commas, such as "
                         f"64,64,4,4 (add :cl for channels-last)") from None
    if not 2 <= len(shape) <= 5 or min(shape) < 1:
        raise ValueError(f"--shape {text!r}: a batch norm input has 2 to 5 dimensions, each "
                         f"at least 1")
    if math.prod(shape) >= 1 << 60:
        raise ValueError(f"--shape {text!r}: {math.prod(shape)} elements, more than a tensor "
                         f"can hold")
    if layout not in ("", "cl") or (layout == "cl" and len(shape) < 4) or (
            not layout and text.endswith(":")):
        raise ValueError(f"--shape {text!r}: the only layout suffix is :cl, for a 4-D or 5-D "
                         f"shape")
    if math.prod(shape) // shape[1] < 2:
        raise ValueError(f"--shape {text!r}: one value per channel; the bench trains, and "
                         f"batch statistics need at least 2 (a larger batch or more pixels)")
    # torch's CPU layer takes 16-bit inputs with float32 parameters (autocast's mix), but
    # refuses float64 inputs with them: float64 cases get float64 parameters
    param_dtype = torch.float64 if dtype == torch.float64 else F32
    return Case(shape, dtype, channels_last=layout == "cl", param_dtype=param_dtype,
                compile=compile)


def cuda_cases(quick: bool = False, compile: bool | None = None) -> list[Case]:
    """The GPU table of issue 4: bf16 inputs (float32 weights) unless noted; torch.compile
    on every case. ``quick``: 3 of the cases, without torch.compile unless ``compile=True``
    (see :func:`_with_compile`)."""
    c = _with_compile(quick, compile)
    cases = [
        Case((256, 64, 112, 112), BF16, True, compile=c),
        Case((256, 256, 56, 56), BF16, True, compile=c),
        Case((256, 256, 56, 56), BF16, False, compile=c),
        Case((256, 256, 56, 56), F32, False, compile=c),
        Case((256, 512, 28, 28), BF16, True, compile=c),
        Case((256, 1024, 14, 14), BF16, True, compile=c),
        Case((256, 2048, 7, 7), BF16, True, compile=c),
        Case((8, 32, 512, 512), BF16, True, compile=c),
        Case((8, 32, 512, 512), F32, False, compile=c),
        Case((8192, 4096), BF16, compile=c),
    ]
    if quick:
        cases = [cases[1], cases[3], cases[-1]]
    return cases


# ---------------------------------------------------------------------------------------
# Machine description


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
        return text[text.index("[") + 1:text.index("]")]
    except (OSError, ValueError):
        return ""


def machine(device: torch.device) -> dict:
    try:
        import numba
        numba_version = numba.__version__
    except ImportError:
        numba_version = ""
    info = {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device.type,
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else _cpu_model()),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "numba_version": numba_version,
        "python": platform.python_version(),
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", ""),
        "kernel_thp": _thp_mode(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else "",
    }
    return info


# ---------------------------------------------------------------------------------------
# Timing


class _Timer:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            self._flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def sample(self, fn, inner: int) -> float:
        """ms per call, averaged over ``inner`` back-to-back calls."""
        if self.cuda:
            self._flush.zero_()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / inner
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) * 1e3 / inner

    def calibrate(self, fn, target_ms: float) -> int:
        """Calls per sample so that a sample lasts about ``target_ms``."""
        self.sync()
        one = max(self.sample(fn, 1), 1e-3)
        return max(1, min(1000, int(target_ms / one)))


def interleaved(timer: _Timer, fns: dict, repeats: int, target_ms: float,
                warmup: int = 2) -> dict[str, list[float]]:
    """``repeats`` samples of every function, taken in turn (order alternating)."""
    inner = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        inner[name] = timer.calibrate(fn, target_ms)
    samples = {name: [] for name in fns}
    names = list(fns)
    for i in range(repeats):
        for name in (names if i % 2 == 0 else names[::-1]):
            timer.sync()
            samples[name].append(timer.sample(fns[name], inner[name]))
    return samples


def copy_bandwidth(timer: _Timer, numel: int, dtype: torch.dtype, repeats: int) -> float:
    """GB/s of ``dst.copy_(src)`` (bytes read + written), median of ``repeats``."""
    src = torch.randn(numel, device=timer.device).to(dtype)
    dst = torch.empty_like(src)
    s = interleaved(timer, {"copy": lambda: dst.copy_(src)}, repeats, 20.0)["copy"]
    return 2 * src.numel() * src.element_size() / (statistics.median(s) * 1e6)


@contextlib.contextmanager
def _stderr_silenced():
    """File descriptor 2 to /dev/null for the duration (C++ logging included)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _release_cpu_buffers() -> None:
    try:
        from .backends import cpu_buffers
    except ImportError:
        return
    cpu_buffers.release()


def peak_memory(device: torch.device, fn) -> int:
    """Bytes allocated at the peak of one call of ``fn`` above what was allocated before."""
    if device.type == "cuda":
        getattr(fn, "reset", lambda: None)()
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile
    getattr(fn, "reset", lambda: None)()
    _release_cpu_buffers()
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    # Some torch builds log two lines to stderr as the profiler starts and stops (per
    # row, dozens in a table); only those two calls are silenced, never ``fn``.
    with _stderr_silenced():
        prof.__enter__()
    try:
        fn()
    finally:
        with _stderr_silenced():
            prof.__exit__(None, None, None)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


# ---------------------------------------------------------------------------------------
# The functions timed


def _modules(case: Case, device: torch.device, activation):
    import batchnorm
    c = case.shape[1]
    theirs = getattr(torch.nn, case.module_name)(c, device=device, dtype=case.param_dtype)
    ours = getattr(batchnorm, case.module_name)(c, device=device, dtype=case.param_dtype,
                                                activation=activation)
    return theirs.train(), ours.train()


def _input(case: Case, device: torch.device, gen: torch.Generator, requires_grad=False):
    x = torch.randn(case.shape, device=device, generator=gen).to(case.dtype)
    if case.channels_last:
        fmt = torch.channels_last if len(case.shape) == 4 else torch.channels_last_3d
        x = x.to(memory_format=fmt)
    return x.requires_grad_(requires_grad)


def _functions(case: Case, op: str, device: torch.device, compile: bool) -> dict:
    """{'torch': fn, 'ours': fn[, 'torch.compile': fn if ``compile``]} for one op, on fresh
    data."""
    gen = torch.Generator(device=device).manual_seed(0)
    relu = op != "fwd" and op != "fwd+bwd"
    add = op == "bn+add+relu fwd+bwd"
    backward = op != "fwd"
    tbn, obn = _modules(case, device, "relu" if relu else None)
    x = _input(case, device, gen, requires_grad=backward)
    r = _input(case, device, gen, requires_grad=True) if add else None
    dy = _input(case, device, gen) if backward else None

    def torch_fwd(x):
        y = tbn(x)
        if add:
            y = y + r
        return torch.relu(y) if relu else y

    def ours_fwd(x):
        return obn(x, r) if add else obn(x)

    def step(forward):
        if not backward:
            return lambda: forward(x)

        def reset():
            x.grad = None
            if r is not None:
                r.grad = None

        def fn():
            reset()
            forward(x).backward(dy)
        # peak_memory clears the gradients before it starts counting: freeing the last
        # call's gradients inside the window would hide one tensor of the peak
        fn.reset = reset
        return fn

    fns = {"torch": step(torch_fwd), "ours": step(ours_fwd)}
    if compile:
        ctbn = _modules(case, device, None)[0]

        def compiled_body(x):
            y = ctbn(x)
            if add:
                y = y + r
            return torch.relu(y) if relu else y
        # Dynamo caches by code object, and compiled_body's is the same for every case
        # and op: without a reset the 9th graph met its recompile limit (8), and from then
        # on torch.compile ran compiled_body eagerly (the torch.compile column of the
        # 2026-12-04 H200 tables' last two rows timed eager torch). See also
        # _fail_on_recompile_limit.
        torch._dynamo.reset()
        fns["torch.compile"] = step(torch.compile(compiled_body))
    return fns


def _drop_failing_compile(fns: dict, what: str) -> None:
    """Compile (the first call) before timing: where torch.compile fails on a row (a
    compiler error, the recompile limit), the row goes on without its torch.compile time,
    and says so, rather than the table stopping there (on a GPU lent for minutes)."""
    fn = fns.get("torch.compile")
    if fn is None:
        return
    try:
        with _fail_on_recompile_limit():
            fn()
    except Exception as e:  # noqa: BLE001 - any compiler failure: the row without it
        first = (str(e).strip().splitlines() or [""])[0][:200]
        print(f"batchnorm bench: torch.compile failed on {what} ({type(e).__name__}: "
              f"{first}); that row has no torch.compile time", file=sys.stderr, flush=True)
        del fns["torch.compile"]


def _fail_on_recompile_limit():
    """Where this torch has the setting: a torch.compile that meets dynamo's recompile
    limit raises instead of running eagerly under its label."""
    config = torch._dynamo.config
    if "fail_on_recompile_limit_hit" in getattr(config, "_config", {}):
        return config.patch(fail_on_recompile_limit_hit=True)
    return contextlib.nullcontext()


def _first_call_ms(device: torch.device) -> tuple[float, int, int]:
    """First forward+backward (BN+ReLU, both layouts) of our module in this process:
    numba compiles or loads from cache here. Returns (ms, cache hits, cache misses)."""
    import batchnorm
    t0 = time.perf_counter()
    for cl in (False, True):
        case = Case((4, 8, 16, 16), channels_last=cl)
        gen = torch.Generator(device=device).manual_seed(0)
        x = _input(case, device, gen, requires_grad=True)
        batchnorm.BatchNorm2d(8, device=device, activation="relu")(x).sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    ms = (time.perf_counter() - t0) * 1e3
    hits = misses = 0
    try:
        from .backends import cpu_kernels as K
        tables = [K.STATS, K.NORMALIZE, K.REDUCE, K.ELEMENTWISE, K.FORWARD_TRAIN,
                  K.FORWARD_EVAL, K.BACKWARD]
        for table in tables:
            for builds in table.values():
                for d in builds:
                    hits += sum(d.stats.cache_hits.values())
                    misses += sum(d.stats.cache_misses.values())
    except ImportError:
        pass
    return ms, hits, misses


# ---------------------------------------------------------------------------------------
# The table


@dataclass
class _Progress:
    total: int
    quiet: bool = False
    done: int = 0
    t0: float = field(default_factory=time.perf_counter)

    def step(self, text: str):
        self.done += 1
        if not self.quiet:
            el = time.perf_counter() - self.t0
            print(f"[{self.done}/{self.total} {el:5.0f}s] {text}", file=sys.stderr, flush=True)


def _sig(v: float, digits: int = 4) -> float:
    return float(f"{v:.{digits}g}")


def run_table(device="cpu", quick: bool = False, repeats: int | None = None,
              compile: bool | None = None, cases: list[Case] | None = None,
              ops: tuple[str, ...] = OPS, progress: bool = True,
              target_ms: float | None = None, memory: bool = True,
              compile_ops: tuple[str, ...] | None = None,
              budget_s: float | None = None) -> list[dict]:
    """Time the table on ``device``; one dict per (case, op, implementation).

    ``cases`` defaults to the device's standard table (``cpu_cases``/``cuda_cases``, whose
    ``compile`` argument this passes on: None, the full table times torch.compile on its
    cases that have it and ``quick`` nowhere; True, the quick table too); ``compile=False``
    leaves torch.compile out, also of given ``cases``; ``compile_ops`` (default: every op)
    the ops it is timed for, in the cases that have it (compiling takes seconds a case and
    op); ``budget_s``: no case (its rows of every op in ``ops``) is started after that many
    seconds, and a case started before runs to its end (the rows of those done are
    returned; a time-limited run then still has a table). Each dict holds the machine description,
    the case, ``ms`` (median), ``ms_min``, ``ratio`` (torch eager ms / this row's ms for
    our rows, so > 1 means we are faster; 1 for torch's rows), ``gbps``, ``copy_gbps``,
    ``frac_copy`` and, for forward+backward rows, ``peak_bytes``. Each torch.compile
    timed starts from ``torch._dynamo.reset()``, which empties every compile cache of the
    process: functions the caller compiled before compile again afterwards.
    """
    device = torch.device(device)
    if cases is None:
        cases = (cuda_cases if device.type == "cuda" else cpu_cases)(quick, compile)
    if compile is False:
        cases = [Case(c.shape, c.dtype, c.channels_last, c.param_dtype, False) for c in cases]
    repeats = repeats or (5 if quick else 15)
    target_ms = target_ms or (5.0 if quick else 20.0)
    timer = _Timer(device)
    info = machine(device)
    prog = _Progress(len(cases) * len(ops) + 1, quiet=not progress)

    first_ms, hits, misses = _first_call_ms(device)
    prog.step(f"first call of our module: {first_ms:.0f} ms "
              f"(numba cache hits {hits}, misses {misses})")
    rows = [dict(info, case="first call", module="BatchNorm2d", shape="(4, 8, 16, 16)",
                 dtype="float32", layout="both", op="first fwd+bwd (compile or cache load)",
                 impl="ours", ms=round(first_ms, 3), ms_min="", repeats=1, ratio="",
                 gbps="", copy_gbps="", frac_copy="", peak_bytes="",
                 numba_cache_hits=hits, numba_cache_misses=misses)]
    copy_cache: dict[tuple, float] = {}
    for i, case in enumerate(cases):
        if budget_s is not None and time.perf_counter() - prog.t0 > budget_s:
            print(f"batchnorm bench: {budget_s:.0f} s spent; {len(cases) - i} of "
                  f"{len(cases)} cases left out", file=sys.stderr, flush=True)
            break
        numel = math.prod(case.shape)
        key = (numel, case.dtype)
        if key not in copy_cache:
            copy_cache[key] = copy_bandwidth(timer, numel, case.dtype, max(3, repeats // 3))
        copy_gbps = copy_cache[key]
        nbytes = numel * torch.empty((), dtype=case.dtype).element_size()
        for op in ops:
            fns = _functions(case, op, device, case.compile and (
                compile_ops is None or op in compile_ops))
            _drop_failing_compile(fns, f"{case.label} {op}")
            with _fail_on_recompile_limit():
                samples = interleaved(timer, fns, repeats, target_ms)
                peaks = {}
                if memory and op != "fwd":
                    for name, fn in fns.items():
                        peaks[name] = peak_memory(device, fn)
            med = {name: statistics.median(s) for name, s in samples.items()}
            for name, s in samples.items():
                gbps = _PASSES[op] * nbytes / (med[name] * 1e6)
                rows.append(dict(
                    info, case=case.label, module=case.module_name, shape=str(tuple(case.shape)),
                    dtype=str(case.dtype).replace("torch.", ""), layout=case.layout, op=op,
                    impl=name, ms=round(med[name], 4), ms_min=round(min(s), 4),
                    repeats=len(s), ratio=round(med["torch"] / med[name], 3),
                    gbps=_sig(gbps), copy_gbps=_sig(copy_gbps),
                    # (6 digits: judged against 0.85, and 4 would round 0.84996 up to it)
                    frac_copy=_sig(gbps / copy_gbps, 6), peak_bytes=peaks.get(name, ""),
                    numba_cache_hits="", numba_cache_misses=""))
            ratio = med["torch"] / med["ours"]
            prog.step(f"{case.label:<32} {op:<20} torch {med['torch']:9.3f} ms  "
                      f"ours {med['ours']:9.3f} ms  x{ratio:.2f}")
            del fns
    return rows


def format_table(rows: list[dict]) -> str:
    """The human table: one line per (case, op), ours against torch (and torch.compile)."""
    by = {}
    for r in rows:
        if r["case"] == "first call":
            continue
        by.setdefault((r["case"], r["op"]), {})[r["impl"]] = r
    head = (f"{'case':<32} {'op':<20} {'torch ms':>9} {'ours ms':>9} {'ratio':>6} "
            f"{'GB/s':>6} {'%copy':>6} {'compile':>9} {'vs comp':>7} {'peak MiB t/o':>13}")
    lines = [head, "-" * len(head)]
    for (case, op), d in by.items():
        t, o, c = d["torch"], d["ours"], d.get("torch.compile")
        peak = ""
        if t["peak_bytes"] != "" and o["peak_bytes"] != "":
            peak = f"{t['peak_bytes'] / 2**20:.0f}/{o['peak_bytes'] / 2**20:.0f}"
        comp = f"{c['ms']:9.3f}" if c else ""
        vs = f"{c['ms'] / o['ms']:7.2f}" if c else ""
        lines.append(
            f"{case:<32} {op:<20} {t['ms']:9.3f} {o['ms']:9.3f} {o['ratio']:6.2f} "
            f"{o['gbps']:6.1f} {100 * o['frac_copy']:5.0f}% {comp:>9} {vs:>7} {peak:>13}")
    first = [r for r in rows if r["case"] == "first call"]
    if first:
        f = first[0]
        lines.append(f"first forward+backward of our module in this process: {f['ms']:.0f} ms "
                     f"(numba cache hits {f['numba_cache_hits']}, misses "
                     f"{f['numba_cache_misses']})")
    return "\n".join(lines)


def write_csv(rows: list[dict], device: str, directory: Path | None = None,
              name: str = "") -> Path:
    """``<device>-<date>[-<name>[-<k>]][-thp<N>].csv`` in ``directory`` (default:
    :func:`results_dir`).

    A rerun of the table replaces that day's file; a named run (``--shape``) times
    shapes of its own, so it never overwrites an earlier one: the second of a day is
    ``-<name>-2``, and so on."""
    directory = results_dir() if directory is None else Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    day = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d")
    thp = f"-thp{os.environ['THP_MEM_ALLOC_ENABLE']}" if os.environ.get(
        "THP_MEM_ALLOC_ENABLE") else ""
    path = directory / f"{device}-{day}{'-' + name if name else ''}{thp}.csv"
    run = 2
    while name and path.exists():
        path = directory / f"{device}-{day}-{name}-{run}{thp}.csv"
        run += 1
    fields = list(rows[0].keys())
    for r in rows:
        for k in r:
            if k not in fields:
                fields.append(k)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pairs = [(f"{r['case']} · {r['op']}", r["ratio"], r["impl"]) for r in rows
             if r["impl"] in ("ours",) and r["case"] != "first call"]
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(pairs) + 1.5))
    labels = [p[0] for p in pairs][::-1]
    values = [p[1] for p in pairs][::-1]
    ax.barh(labels, values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("speedup over torch eager (torch ms / ours ms)")
    info = rows[0]
    ax.set_title(f"batchnorm vs torch {info['torch_version']} on {info['device_name']}\n"
                 f"{info['date']}, THP_MEM_ALLOC_ENABLE={info['THP_MEM_ALLOC_ENABLE'] or 'unset'}",
                 fontsize=9)
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------
# CLI


def _device_arg(text: str) -> str:
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: cpu or cuda (cuda:N for one GPU)")
    return text


def _at_least(low, kind):
    def parse(text: str):
        value = kind(text)  # a ValueError here: argparse says "invalid <kind> value"
        if not value >= low:  # NaN too
            raise argparse.ArgumentTypeError(f"{text!r}: at least {low}")
        return value
    parse.__name__ = kind.__name__
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=_device_arg,
                   default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device to run on: cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--quick", action="store_true",
                   help="a subset (5 CPU or 3 GPU cases), 5 repeats, no torch.compile unless "
                        "--compile-ops asks for it, and no SyncBatchNorm row (a minute "
                        "or two)")
    p.add_argument("--repeats", type=_at_least(1, int), default=None,
                   help="samples per side (median reported; default 15, --quick 5)")
    p.add_argument("--csv", action="store_true",
                   help="write <device>-<date>.csv (long format) into benchmarks/results/ "
                        "of the source checkout batchnorm runs from (editable install or "
                        "PYTHONPATH=src), else of the current directory")
    p.add_argument("--plot", action="store_true",
                   help="write a PNG chart beside the CSV (implies --csv; needs matplotlib)")
    p.add_argument("--no-compile", action="store_true",
                   help="leave torch.compile out (the full table times it on some cases)")
    p.add_argument("--compile-ops", default=None, metavar="OP[,OP...]",
                   help="time torch.compile for these ops only (of: " + ", ".join(OPS)
                        + "; default: all), in the table's cases that have it; with "
                          "--quick, in those of the subset; with --shape, on every shape "
                          "(--quick and --shape time torch.compile only when this is given)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--budget", type=_at_least(0.0, float), default=None, metavar="SECONDS",
                   help="start no case (one input: its rows of all 4 ops) after this many "
                        "seconds; one started before runs to its end, and the table has "
                        "the cases done")
    p.add_argument("--no-extras", action="store_true",
                   help="skip the inference (fold) row and, on the CPU, the SyncBatchNorm "
                        "row")
    p.add_argument("--shape", action="append", default=None, metavar="N,C,...[:cl]",
                   help="time these shapes instead of the table (repeatable; :cl for "
                        "channels-last); the CSV is then <device>-<date>-shapes[-k].csv, "
                        "never overwritten")
    p.add_argument("--dtype", default=None,
                   choices=["float32", "float64", "float16", "bfloat16"],
                   help="dtype of the --shape cases (default: float32)")


def extra_rows(device: torch.device, quick: bool, info: dict, sync: bool) -> list[dict]:
    """The two rows outside the table: inference, an eval model against the same model
    folded by :func:`batchnorm.fold` (issue 6), and, on the CPU, a SyncBatchNorm step on 2
    gloo ranks against a local BatchNorm step on the same per-rank input (issue 5)."""
    from .tools import benchmark_fold

    rows = []
    empty = dict(ms_min="", gbps="", copy_gbps="", frac_copy="", peak_bytes="",
                 numba_cache_hits="", numba_cache_misses="")
    fold = benchmark_fold(device=device.type, repeats=10 if quick else 30)
    for impl, ms in (("eval model", fold["eval_ms"]), ("folded", fold["folded_ms"])):
        rows.append(dict(info, **empty, case="inference: small ResNet, eval vs folded",
                         module="tools.fold", shape=str(fold["shape"]), dtype="float32",
                         layout="contiguous", op="inference", impl=impl, ms=round(ms, 4),
                         repeats=10 if quick else 30,
                         ratio=round(fold["eval_ms"] / ms, 3)))
    if sync and device.type == "cpu":
        from .distributed import benchmark_sync_step

        res = benchmark_sync_step(repeats=5 if quick else 20)
        for impl, ms in (("local BatchNorm", res["local_ms"]), ("SyncBatchNorm", res["sync_ms"])):
            rows.append(dict(info, **empty,
                             case=f"SyncBatchNorm, {res['world_size']} gloo ranks",
                             module="SyncBatchNorm", shape=str(tuple(res["shape"])),
                             dtype="float32", layout="contiguous", op="fwd+bwd step",
                             impl=impl, ms=round(ms, 3), repeats=res["repeats"],
                             ratio=round(res["local_ms"] / ms, 3)))
    return rows


def format_extra(rows: list[dict]) -> str:
    """The extra rows, under a line that says what their ratio is (of the rows present)."""
    impls = {r["impl"] for r in rows}
    ratios = []
    if "folded" in impls:
        ratios.append("eval ms / folded ms")
    if "SyncBatchNorm" in impls:
        ratios.append("local ms / SyncBatchNorm ms (1.3x slower = 0.77)")
    lines = ["ratio = " + "; ".join(ratios)] if ratios else []
    for r in rows:
        lines.append(f"{r['case']:<42} {r['shape']:<20} {r['impl']:<16} {r['ms']:9.3f} ms  "
                     f"x{r['ratio']:.2f}")
    return "\n".join(lines)


def run(args) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("batchnorm bench: --device cuda but no GPU is visible", file=sys.stderr)
        return 2
    if args.no_compile and args.compile_ops is not None:
        print("batchnorm bench: --no-compile and --compile-ops ask for opposite things",
              file=sys.stderr)
        return 2
    if args.plot:  # before the run: it writes the CSV, then the chart
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("batchnorm bench: --plot needs matplotlib (pip install matplotlib)",
                  file=sys.stderr)
            return 2
    if args.csv or args.plot:  # before the run too: not a table lost at its end
        directory = results_dir()
        try:
            directory.mkdir(parents=True, exist_ok=True)
            writable = os.access(directory, os.W_OK)
        except OSError:
            writable = False
        if not writable:
            print(f"batchnorm bench: --csv and --plot write into {directory}, which this "
                  f"user cannot write", file=sys.stderr)
            return 2
    # None: the table's own choice (the full table times torch.compile on some cases,
    # --quick nowhere); --compile-ops asks for it, --quick and --shape included
    compile = False if args.no_compile else (True if args.compile_ops is not None else None)
    cases = None
    if args.dtype is not None and not args.shape:
        print(f"batchnorm bench: --dtype {args.dtype} applies to --shape cases; the table "
              f"keeps its own dtypes", file=sys.stderr)
    if args.shape:
        try:
            cases = [parse_case(text, getattr(torch, args.dtype or "float32"),
                                compile=compile is True) for text in args.shape]
        except ValueError as e:
            print(f"batchnorm bench: {e}", file=sys.stderr)
            return 2
    compile_ops = None
    if args.compile_ops is not None:
        compile_ops = tuple(op.strip() for op in args.compile_ops.split(",") if op.strip())
        unknown = [op for op in compile_ops if op not in OPS]
        if unknown or not compile_ops:
            print(f"batchnorm bench: --compile-ops {args.compile_ops!r}: ops are "
                  f"{', '.join(OPS)}", file=sys.stderr)
            return 2
    try:
        rows = run_table(device, quick=args.quick, repeats=args.repeats,
                         compile=compile, memory=not args.no_memory,
                         cases=cases, compile_ops=compile_ops, budget_s=args.budget)
    except (MemoryError, RuntimeError) as e:
        # a --shape larger than this machine holds: the allocator's words, not a traceback
        # (torch.OutOfMemoryError, CUDA's, is a RuntimeError; the CPU allocator raises a
        # plain RuntimeError)
        if not (isinstance(e, MemoryError) or "out of memory" in str(e)
                or "can't allocate memory" in str(e)):
            raise
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"batchnorm bench: not enough memory on {device} for this table "
              f"({first_line}); try smaller --shape sizes", file=sys.stderr)
        return 2
    extras = [] if args.no_extras or cases else extra_rows(device, args.quick,
                                                           machine(device),
                                                           sync=not args.quick)
    info = rows[0]
    print(f"batchnorm bench on {info['device_name']} ({info['cpu_count']} CPUs, torch "
          f"{info['torch_version']}, {info['torch_threads']} threads), {info['date']}, "
          f"THP_MEM_ALLOC_ENABLE={info['THP_MEM_ALLOC_ENABLE'] or 'unset'} "
          f"(kernel THP: {info['kernel_thp']}), load {info['load_avg_1m']}")
    print("ratio = torch eager ms / ours ms (> 1: we are faster); GB/s = bytes that must "
          "move / our time; %copy = that over dst.copy_(src) in this run; vs comp = "
          "torch.compile ms / ours ms")
    print(format_table(rows))
    if extras:
        print(format_extra(extras))
    load, cpus = info["load_avg_1m"], info["cpu_count"]
    if device.type == "cpu" and isinstance(load, float) and cpus and load >= cpus:
        # other processes held the cores: both sides' times wait on them, unevenly
        print(f"batchnorm bench: the load average was {load} at the start, for {cpus} "
              f"CPUs: other processes held them, so these times and ratios are unreliable; "
              f"run again on an idle machine", file=sys.stderr)
    if args.csv or args.plot:
        path = write_csv(rows + extras, device.type, name="shapes" if cases else "")
        print(f"wrote {path}")
        if args.plot:
            print(f"wrote {plot(rows, path.with_suffix('.png'))}")
    return 0
