"""Where the host time of one eager training step goes, on a GPU.

    PYTHONPATH=src python3 benchmarks/gpu_host_profile.py [--steps 200] [--parts]

On the H200 check of 2026-11-27 the small rows of issue 4 were host-bound: enqueueing one
BN+ReLU forward+backward took 1.1-1.7 ms of CPU time against 0.2-0.6 ms of device time.
This runs such a step many times under cProfile (the device work is tiny next to it) and
prints the functions that cost the most host time, ours and torch's side by side.
``--parts`` (no profiler): the host time of a step's pieces on a small input, whose
device work is shorter still: our forward alone (with and without autograd), our
backward alone, one launch, a bare ``autograd.Function`` step on CUDA tensors (the floor
of any Python autograd node, whose backward the engine runs on its CUDA thread), and
torch's BN+ReLU step; then a step split at its backward call, the step with the
autograd engine on one thread and with the garbage collector off, a bare node that
launches six kernels, and one launch with none of our Python (Triton's compiled launcher)
against one torch kernel; last, steps with the autograd engine's threads and without
(the calling thread runs the backward), to tell which hand-over costs.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
import warnings

import torch

import batchnorm


class BareFunction(torch.autograd.Function):
    """The cheapest Python autograd node with batch norm's inputs: allocates its outputs."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


def _min_us(fn, steps: int, rounds: int = 3) -> float:
    """Least µs of ``fn`` over ``rounds`` of ``steps`` calls (the GPU drained between)."""
    best = float("inf")
    for _ in range(rounds):
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        best = min(best, (time.perf_counter() - t) / steps * 1e6)
        torch.cuda.synchronize()
    return best


def parts(steps: int) -> None:
    """Host µs of a step's pieces on (8, 64, 7, 7) channels_last float32."""
    import batchnorm.backends.triton as tb

    x = torch.randn(8, 64, 7, 7, device="cuda").contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    dy = torch.randn_like(x)
    ours = batchnorm.BatchNorm2d(64, activation="relu").cuda()
    theirs = torch.nn.Sequential(torch.nn.BatchNorm2d(64), torch.nn.ReLU()).cuda()

    def backward_only():
        y = ours(x)
        torch.cuda.synchronize()
        t = time.perf_counter()
        y.backward(dy)
        return time.perf_counter() - t

    def no_grad_forward():
        with torch.no_grad():
            ours(x)

    geometry = tb.geometry(x.shape, True)
    rows = torch.zeros(4, 64, device="cuda")
    y, w = torch.empty_like(x), ours.weight.detach()
    pieces = {
        "ours: step (fwd+bwd)": _step_fn(ours, x, dy),
        "torch: BN+ReLU step": _step_fn(theirs, x, dy),
        "bare Function step": lambda: BareFunction.apply(x, ours.weight,
                                                         ours.bias).backward(dy),
        "ours: forward (autograd)": lambda: ours(x),
        "ours: forward (no_grad)": no_grad_forward,
        "ours: one normalize launch": lambda: tb._launch_normalize(
            x, y, geometry, None, rows[0], rows[1], w, rows[2], 1, 0.0, 0.0),
        "torch.empty_like": lambda: torch.empty_like(x),
    }
    for name, fn in pieces.items():
        print(f"{name:30s} {_min_us(fn, steps):8.1f} µs")
    for _ in range(20):
        backward_only()
    print(f"{'ours: backward alone':30s} "
          f"{min(backward_only() for _ in range(steps)) * 1e6:8.1f} µs")
    _step_split(ours, theirs, x, dy, steps)


class LaunchingFunction(torch.autograd.Function):
    """A bare autograd node that launches three kernels each way, as a step of ours does
    (one normalize kernel, three times): Triton's launcher lets go of the GIL."""

    @staticmethod
    def forward(ctx, x, weight, bias, launch):
        ctx.save_for_backward(x, weight)
        ctx.launch = launch
        for _ in range(3):
            launch()
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        for _ in range(3):
            ctx.launch()
        return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight), None


def _step_split(ours, theirs, x, dy, steps: int) -> None:
    """A step's host time split at the backward call (medians over ``steps`` steps, each
    run back to back as in training), and the whole step where the autograd engine runs
    the backward on the calling thread (no hand-over to its CUDA thread), with the
    garbage collector off, and for a bare node that launches as many kernels as ours."""
    import gc

    import batchnorm.backends.triton as tb

    geometry = tb.geometry(x.shape, True)
    rows = torch.zeros(4, x.shape[1], device="cuda")
    out, w = torch.empty_like(x), ours.weight.detach()

    def one_launch():
        tb._launch_normalize(x, out, geometry, None, rows[0], rows[1], w, rows[2], 1, 0.0, 0.0)

    def split(module):
        fwd, bwd = [], []
        for i in range(steps + 20):
            t0 = time.perf_counter()
            y = module(x)
            t1 = time.perf_counter()
            y.backward(dy)
            t2 = time.perf_counter()
            if i >= 20:
                fwd.append(t1 - t0)
                bwd.append(t2 - t1)
        torch.cuda.synchronize()
        return sorted(fwd)[len(fwd) // 2] * 1e6, sorted(bwd)[len(bwd) // 2] * 1e6

    step = _step_fn(ours, x, dy)
    torch.cuda.set_sync_debug_mode("warn")  # torch's calls that wait for the device
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    print(f"{'ours: synchronizing calls':30s} {len(caught)} a step",
          *(str(warning.message).splitlines()[0] for warning in caught[:3]))
    for name, module in (("ours", ours), ("torch", theirs)):
        f, b = split(module)
        print(f"{name + ': step split, medians':30s} forward {f:7.1f}  backward {b:7.1f} µs")
    with torch.autograd.set_multithreading_enabled(False):
        print(f"{'ours: step, one thread':30s} {_min_us(step, steps):8.1f} µs")
        f, b = split(ours)
        print(f"{'ours: one thread, split':30s} forward {f:7.1f}  backward {b:7.1f} µs")
    gc.disable()
    try:
        print(f"{'ours: step, gc off':30s} {_min_us(step, steps):8.1f} µs")
    finally:
        gc.enable()
    bare = lambda: LaunchingFunction.apply(x, ours.weight, ours.bias,
                                           one_launch).backward(dy)
    print(f"{'bare Function, 6 launches':30s} {_min_us(bare, steps):8.1f} µs")
    with torch.autograd.set_multithreading_enabled(False):
        print(f"{'the same, one thread':30s} {_min_us(bare, steps):8.1f} µs")
    try:
        _launch_floor(steps)
    except Exception as e:  # noqa: BLE001  (a diagnostic: the lines above stand)
        print(f"launch floor: {type(e).__name__}: {e}")
    _threads(ours, theirs, x, dy, steps)


class StashingFunction(BareFunction):
    """:class:`BareFunction` whose backward keeps its results in :data:`STASH` as well,
    emptied by the calling thread before the next step: none of the tensors it made in
    Python (each with a Python object) dies on the autograd engine's CUDA thread, which
    would take the GIL there to free it."""

    @staticmethod
    def backward(ctx, dy):
        grads = BareFunction.backward(ctx, dy)
        STASH.extend(grads)
        return grads


class NodeKeepingFunction(BareFunction):
    """:class:`BareFunction` whose node (ctx) the calling thread keeps until the next step:
    the engine's CUDA thread then never frees it (a Python node's destructor takes the
    GIL), should it hold the last reference after the backward returns."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        STASH.append(ctx)
        return BareFunction.forward(ctx, x, weight, bias)


STASH: list = []


def _threads(ours, theirs, x, dy, steps: int) -> None:
    """Whether the hand-overs between the calling thread and the autograd engine's CUDA
    thread make a step slow (2026-12-04, H200: ours 863 µs a step, 341 with the engine on
    the calling thread): medians of steps run back to back, with the engine's threads and
    without (torch's step too); after a 1 ms busy wait before each step (the CUDA thread
    done with the last one, this core kept busy) and after a 1 ms sleep (done with it,
    this core idle: a slow forward then points at the core, not the other thread); with the parameters' gradients set to None before each step
    (autograd then keeps ours instead of adding them in and freeing them on its thread);
    and a bare node whose results are freed by the calling thread (:class:`StashingFunction`)
    or whose node it keeps (:class:`NodeKeepingFunction`) against one whose results and
    node may die on the CUDA thread."""

    def median_us(step, pause=0.0, split=False, sleep=0.0):
        for _ in range(20):
            step()
        torch.cuda.synchronize()
        whole, forward = [], []
        for _ in range(steps):
            if pause:
                t = time.perf_counter()
                while time.perf_counter() - t < pause:
                    pass
            if sleep:
                time.sleep(sleep)
            t0 = time.perf_counter()
            if split:
                y = ours(x)
                forward.append(time.perf_counter() - t0)
                y.backward(dy)
            else:
                step()
            whole.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        med = (sorted(whole)[len(whole) // 2] * 1e6,)
        return med + ((sorted(forward)[len(forward) // 2] * 1e6,) if split else ())

    def fresh_grads(module):
        def step():
            module.zero_grad(set_to_none=True)
            x.grad = None
            module(x).backward(dy)
        return step

    def stash_step(function):
        def step():
            STASH.clear()
            function.apply(x, ours.weight, ours.bias).backward(dy)
        return step

    bare = lambda: BareFunction.apply(x, ours.weight, ours.bias).backward(dy)
    rows = {
        "torch step": lambda: median_us(_step_fn(theirs, x, dy)),
        "ours step": lambda: median_us(_step_fn(ours, x, dy)),
        "ours after 1 ms wait": lambda: median_us(_step_fn(ours, x, dy), pause=1e-3),
        "ours (step, forward)": lambda: median_us(_step_fn(ours, x, dy), split=True),
        "ours (step, fwd) after wait": lambda: median_us(_step_fn(ours, x, dy), pause=1e-3,
                                                         split=True),
        "ours (step, fwd) after sleep": lambda: median_us(_step_fn(ours, x, dy), sleep=1e-3,
                                                          split=True),
        "ours, grads set to None": lambda: median_us(fresh_grads(ours)),
        "torch, grads set to None": lambda: median_us(fresh_grads(theirs)),
        "bare node": lambda: median_us(bare),
        "bare node, results stashed": lambda: median_us(stash_step(StashingFunction)),
        "bare node, node kept": lambda: median_us(stash_step(NodeKeepingFunction)),
    }
    def switching(interval):
        """ours, with the interpreter's GIL switch interval at ``interval`` s (default
        0.005): a thread waiting for the GIL asks the holder to drop it after that long,
        so a hand-over that waits on the GIL moves with it."""
        def measure():
            default = sys.getswitchinterval()
            sys.setswitchinterval(interval)
            try:
                return median_us(_step_fn(ours, x, dy), split=True)
            finally:
                sys.setswitchinterval(default)
        return measure

    rows["ours (step, fwd), switch 1e-5"] = switching(1e-5)
    rows["ours (step, fwd), switch 0.1"] = switching(0.1)
    print(f"{'threads (medians, µs)':30s} {'engine threads':>16s} {'one thread':>16s}")
    for name, measure in rows.items():
        with torch.autograd.set_multithreading_enabled(True):
            multi = measure()
        with torch.autograd.set_multithreading_enabled(False):
            single = measure()
        print(f"{name:30s} {' '.join(f'{v:7.1f}' for v in multi):>16s} "
              f"{' '.join(f'{v:7.1f}' for v in single):>16s}", flush=True)


def _launch_floor(steps: int) -> None:
    """One launch with none of our Python: a one-store Triton kernel through its compiled
    launcher (as ``_launch.launch`` calls it), against one torch kernel (an in-place add
    on a 1-element tensor). Tells Triton's launcher and the driver apart from our code."""
    import triton
    import triton.language as tl

    @triton.jit
    def touch(p):
        tl.store(p, 1.0)

    buf = torch.zeros(1, device="cuda")
    compiled = touch[(1,)](buf)
    stream = torch.cuda.current_stream().cuda_stream

    def raw():
        compiled.run(1, 1, 1, stream, compiled.function, compiled.packed_metadata, None,
                     None, None, buf)

    print(f"{'triton: compiled launcher call':30s} {_min_us(raw, steps):8.1f} µs")
    print(f"{'torch: one add_ kernel':30s} {_min_us(lambda: buf.add_(1.0), steps):8.1f} µs")

    # The launcher asks the driver about each tensor's address (cuPointerGetAttribute),
    # and takes an int as it is: what eight pointer arguments cost it either way
    # (_launch.launch hands over addresses since session 23).
    @triton.jit
    def touch8(p0, p1, p2, p3, p4, p5, p6, p7):
        tl.store(p0, 1.0)

    bufs = [torch.zeros(1, device="cuda") for _ in range(8)]
    compiled8 = touch8[(1,)](*bufs)
    addresses = [b.data_ptr() for b in bufs]

    def raw8(args):
        return lambda: compiled8.run(1, 1, 1, stream, compiled8.function,
                                     compiled8.packed_metadata, None, None, None, *args)
    print(f"{'triton: 8 tensor arguments':30s} {_min_us(raw8(bufs), steps):8.1f} µs")
    print(f"{'triton: 8 addresses (ints)':30s} {_min_us(raw8(addresses), steps):8.1f} µs")


def _step_fn(module, x, dy):
    def step():
        y = module(x)
        y.backward(dy)
    return step



def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--shape", default="256,2048,7,7")
    ap.add_argument("--parts", action="store_true", help="a step's pieces, no profiler")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    if args.parts:
        parts(args.steps)
        return 0
    shape = tuple(int(s) for s in args.shape.split(","))
    c = shape[1]
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    dy = torch.randn_like(x)
    ours = batchnorm.BatchNorm2d(c, activation="relu").cuda() if x.dim() == 4 else \
        batchnorm.BatchNorm1d(c, activation="relu").cuda()
    theirs = torch.nn.Sequential(
        torch.nn.BatchNorm2d(c) if x.dim() == 4 else torch.nn.BatchNorm1d(c),
        torch.nn.ReLU()).cuda()
    for name, module in (("ours", ours), ("torch", theirs)):
        step = _step_fn(module, x, dy)
        print(f"{name:6s} host ms per BN+ReLU fwd+bwd step on {shape} bf16: "
              f"{_min_us(step, args.steps, rounds=1) / 1e3:.3f}")
    step = _step_fn(ours, x, dy)
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(args.steps):
        step()
    profile.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(30)
    print(out.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
