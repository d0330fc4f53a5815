"""Host time of the triton backend's training step, measured on a machine without a GPU.

    PYTHONPATH=src python benchmarks/triton_host_time.py [--shape 8,64,7,7] [--cl]
        [--steps 2000] [--eval] [--profile] [--parts]

Small inputs are host-bound on a GPU: the step takes as long as the CPU needs to enqueue
it. This runs the step on CPU tensors through Triton's real launch path (JIT binding,
cache lookup, the direct launches of ``backends/triton/_launch.py``) with a stand-in CUDA
driver (``tests/fake_cuda_driver.py``) whose launcher does nothing: everything a GPU
machine's host does per step but the driver's launch call itself (a few µs a launch) and
the CUDA allocator. Kernels compile for sm_90 on the first step (ptxas of the triton
wheel). Prints the minimum, 10th percentile and median of a step, with the direct launches
on and off (interleaved runs of ``--steps`` steps each), and one launch alone; pin it to a
core (``taskset -c 1``) on a shared machine. ``--parts``: where a training step's time goes,
with the launches stubbed out (the module's forward, the two backend hooks alone, the
backward), next to a bare ``autograd.Function`` step that does nothing (the floor of any
Python autograd node).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import fake_cuda_driver  # noqa: E402  (before triton: unsets TRITON_INTERPRET)
import torch  # noqa: E402
from gpu_host_profile import BareFunction  # this folder

import batchnorm  # noqa: E402
from batchnorm import backends  # noqa: E402

LAUNCHES = [0]


def _count(*_args):
    LAUNCHES[0] += 1


def _timed(step, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return sorted(times)


def _line(name: str, times: list[float]) -> str:
    return (f"{name:34s} min {times[0] * 1e6:7.1f}  p10 {times[len(times) // 10] * 1e6:7.1f}  "
            f"median {times[len(times) // 2] * 1e6:7.1f} µs")


def _parts(tb, module, x, dy, args) -> None:
    """Minimum times of a training step's pieces, the launches stubbed out."""
    w, b = module.weight.detach(), module.bias.detach()
    state = (module.running_mean, module.running_var, module.num_batches_tracked, 0.1)
    xd = x.detach()
    _, mean, var, _, saved = tb.batch_norm_forward(xd, w, b, None, None, None, 1e-5, "relu",
                                                   0.0, state, args.cl)

    def backward_only():
        y = module(x)
        t = time.perf_counter()
        y.backward(dy)
        return time.perf_counter() - t

    real_launch, tb.launch = tb.launch, lambda *a, **k: None
    try:
        pieces = {
            "step, launches stubbed": lambda: module(x).backward(dy),
            "module forward": lambda: module(x),
            "forward hook": lambda: tb.batch_norm_forward(
                xd, w, b, None, None, None, 1e-5, "relu", 0.0, state, args.cl),
            "backward hook": lambda: tb.batch_norm_backward(
                dy, xd, w, b, None, mean, var, 1e-5, True, "relu", 0.0, True, True, False,
                args.cl, saved=saved),
            "bare Function step": lambda: BareFunction.apply(x, module.weight,
                                                      module.bias).backward(dy),
        }
        for name, fn in pieces.items():
            for _ in range(100):
                fn()
            print(_line(name, _timed(fn, args.steps)))
        for _ in range(100):
            backward_only()
        print(_line("backward alone", sorted(backward_only() for _ in range(args.steps))))
    finally:
        tb.launch = real_launch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="8,64,7,7")
    ap.add_argument("--cl", action="store_true", help="channels_last input")
    ap.add_argument("--eval", action="store_true", help="evaluation forward (no grad)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="cProfile of 300 steps")
    ap.add_argument("--parts", action="store_true", help="a training step's pieces")
    args = ap.parse_args(argv)
    fake_cuda_driver.install(_count)
    import batchnorm.backends.triton as tb
    from batchnorm.backends.triton import _launch

    # CPU tensors stand in for CUDA ones: the backend, forced below, must take them (it
    # refuses other devices' tensors unless interpreted, and the stand-in is no interpreter)
    tb.DEVICES = ("cuda", "cpu")
    shape = tuple(int(v) for v in args.shape.split(","))
    module = batchnorm.BatchNorm2d(shape[1], activation="relu") if len(shape) == 4 else \
        batchnorm.BatchNorm1d(shape[1], activation="relu")
    fmt = torch.channels_last if args.cl else torch.contiguous_format
    x = torch.randn(shape).contiguous(memory_format=fmt)
    dy = torch.randn(shape).contiguous(memory_format=fmt)
    if args.eval:
        module.eval()

        def step():
            with torch.no_grad():
                module(x)
    else:
        x.requires_grad_()

        def step():
            x.grad = None
            module(x).backward(dy)

    direct = _launch.DIRECT
    with backends.using("triton"):
        t = time.time()
        step()
        print(f"{shape} {'channels_last' if args.cl else 'contiguous'} "
              f"{'eval' if args.eval else 'BN+ReLU train step'}: first step (compiles) "
              f"{time.time() - t:.1f} s")
        for r in range(args.rounds):
            for on in ([True, False] if direct else [False]):
                _launch.DIRECT = on
                for _ in range(50):
                    step()
                LAUNCHES[0] = 0
                times = _timed(step, args.steps)
                print(_line(f"step, direct launches {'on ' if on else 'off'} "
                            f"({LAUNCHES[0] / args.steps:.0f} launches)", times))
        _launch.DIRECT = direct
        # one normalize launch alone, through the backend's launcher
        geometry = tb.geometry(x.shape, args.cl)
        rows = torch.zeros(4, shape[1])
        y, w = torch.empty_like(x), module.weight.detach()
        mean_k, invstd, bias_k = rows[0], rows[1], rows[2]

        def one():
            tb._launch_normalize(x, y, geometry, None, mean_k, invstd, w, bias_k, 1, 0.0, 0.0)
        for on in ([True, False] if direct else [False]):
            _launch.DIRECT = on
            for _ in range(200):
                one()
            print(_line(f"one launch, direct {'on ' if on else 'off'}", _timed(one, 5000)))
        _launch.DIRECT = direct
        if args.parts and not args.eval:
            _parts(tb, module, x, dy, args)
        if args.profile:
            import cProfile
            import pstats
            profile = cProfile.Profile()
            profile.runcall(lambda: [step() for _ in range(300)])
            pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
