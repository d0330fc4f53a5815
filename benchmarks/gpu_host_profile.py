"""Where the host time of one eager training step goes, on a GPU.

    PYTHONPATH=src python3 benchmarks/gpu_host_profile.py [--steps 200]

On the H200 check of 2026-11-27 the small rows of issue 4 were host-bound: enqueueing one
BN+ReLU forward+backward took 1.1-1.7 ms of CPU time against 0.2-0.6 ms of device time.
This runs such a step many times under cProfile (the device work is tiny next to it) and
prints the functions that cost the most host time, ours and torch's side by side.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

import batchnorm


def _step_fn(module, x, dy):
    def step():
        y = module(x)
        y.backward(dy)
    return step


def _host_ms(step, steps: int) -> float:
    """CPU time per step to enqueue it (the device queue is drained between rounds)."""
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    host = (time.perf_counter() - start) / steps * 1e3
    torch.cuda.synchronize()
    return host


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--shape", default="256,2048,7,7")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
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
              f"{_host_ms(step, args.steps):.3f}")
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
