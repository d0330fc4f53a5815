"""The least a Python-level batch norm can cost on a tiny input, against torch's own.

A bare module whose ``autograd.Function`` does nothing but hand addresses to the CPU
backend's own fused numba kernels (statistics, normalize and running update in the
forward; both backward passes in the backward) is timed against ``torch.nn.BatchNorm2d``
and ``batchnorm.BatchNorm2d`` on the seed's (2, 2, 3, 4) input, forward+backward per step.
The bare module checks nothing, keeps no layouts or activations and returns no state it
does not need: whatever our module costs above it is ours to remove; what it costs above
torch is the price of autograd running a Python node (torch's is C++) and of each torch
call made from Python.

    .venv/bin/python benchmarks/autograd_floor.py             # both cores
    taskset -c 1 .venv/bin/python benchmarks/autograd_floor.py  # one core: steadier
"""

import statistics
import time

import torch

from batchnorm.backends import cpu, cpu_kernels

P = time.perf_counter_ns
_F32, _F64 = torch.float32, torch.float64


class _Floor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, rm, rv, nbt):
        view, build, n, c, l_, rsplit, esplit, count, _ = cpu._kernel_plan(x, False)
        y = torch.empty_like(x)
        mean, var = torch.empty(c, dtype=_F64), torch.empty(c, dtype=_F32)
        cpu_kernels.FORWARD_TRAIN[view][build](
            x.data_ptr(), n, c, l_, rsplit, esplit, 1e-5, count, w.data_ptr(), b.data_ptr(),
            0, 0, 0.0, rm.data_ptr(), rv.data_ptr(), nbt.data_ptr(), 0.1, y.data_ptr(),
            mean.data_ptr(), var.data_ptr(), cpu._LIKE[_F32])
        ctx.save_for_backward(x, w, b, mean, var)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, b, mean, var = ctx.saved_tensors
        view, build, n, c, l_, rsplit, esplit, count, _ = cpu._kernel_plan(x, False)
        sum_dz, sum_dzx, dx = torch.empty(c), torch.empty(c), torch.empty_like(x)
        cpu_kernels.BACKWARD[view][build](
            dy.data_ptr(), x.data_ptr(), n, c, l_, mean.data_ptr(), var.data_ptr(), 1e-5,
            count, w.data_ptr(), b.data_ptr(), 0, 0, 0.0, rsplit, esplit, True, True, True,
            sum_dz.data_ptr(), sum_dzx.data_ptr(), dx.data_ptr(), 0, cpu._LIKE[_F32],
            cpu._LIKE[_F64])
        return dx, sum_dzx, sum_dz, None, None, None


class FloorBatchNorm2d(torch.nn.Module):
    """Float32, contiguous, training only: enough for the timing, nothing else."""

    def __init__(self, c):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(c))
        self.bias = torch.nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))
        self.register_buffer("num_batches_tracked", torch.tensor(0))

    def forward(self, x):
        p, b = self._parameters, self._buffers
        return _Floor.apply(x, p["weight"], p["bias"], b["running_mean"], b["running_var"],
                            b["num_batches_tracked"])


def main(shape=(2, 2, 3, 4), steps=3000, rounds=3):
    import batchnorm

    x = torch.randn(shape, requires_grad=True)
    dy = torch.randn(shape)
    c = shape[1]
    layers = {"torch": torch.nn.BatchNorm2d(c), "floor": FloorBatchNorm2d(c),
              "batchnorm": batchnorm.BatchNorm2d(c)}

    def run(m, n):
        steps_ns = []
        for _ in range(n):
            x.grad = None
            t0 = P()
            m(x).backward(dy)
            steps_ns.append(P() - t0)
        return min(steps_ns) / 1e3, statistics.median(steps_ns) / 1e3

    for m in layers.values():
        run(m, 300)
    print(f"forward+backward µs per step on {shape}, minimum / median of {steps} steps, "
          f"rounds interleaved; ratio = torch / that (minimum)")
    for _ in range(rounds):
        got = {k: run(m, steps) for k, m in layers.items()}
        torch_min = got["torch"][0]
        print("   ".join(f"{k} {lo:6.1f} / {med:6.1f} ({torch_min / lo:.2f})"
                         for k, (lo, med) in got.items()))


if __name__ == "__main__":
    main()
