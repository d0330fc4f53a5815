"""The least a Python-level batch norm can cost on a tiny input, against torch's own.

A module whose autograd.Function forward and backward do nothing but hand the tensors to
a numba function (no checks, no statistics, no running update) is timed against
torch.nn.BatchNorm2d on the seed's (2, 2, 3, 4) input, forward and backward separately.
Whatever our module costs above the prototype is ours to remove; what the prototype costs
above torch is the price of autograd running a Python Function (torch's node is C++).

    .venv/bin/python benchmarks/autograd_floor.py
"""

import time

import numba
import numpy as np
import torch

P = time.perf_counter


@numba.njit
def _forward_kernel(x, w, b, rm, rv, counter, y, mean, var):
    y[:] = x


@numba.njit
def _backward_kernel(dy, x, w, b, mean, var, dx, s1, s2):
    dx[:] = dy


class _Floor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, buffers):
        rm, rv, nbt = buffers
        y = torch.empty_like(x)
        mean, var = np.empty(x.shape[1]), np.empty(x.shape[1], np.float32)
        xn, wn, bn = x.detach().numpy(), w.detach().numpy(), b.detach().numpy()
        _forward_kernel(xn, wn, bn, rm.numpy(), rv.numpy(), nbt.view(1).numpy(), y.numpy(),
                        mean, var)
        ctx.save_for_backward(x, w, b)
        ctx.arrays = (xn, wn, bn, mean, var)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, b = ctx.saved_tensors
        xn, wn, bn, mean, var = ctx.arrays
        dx = torch.empty_like(x)
        s1, s2 = np.empty(x.shape[1], np.float32), np.empty(x.shape[1], np.float32)
        _backward_kernel(dy.contiguous().numpy(), xn, wn, bn, mean, var, dx.numpy(), s1, s2)
        return dx, torch.from_numpy(s2), torch.from_numpy(s1), None


class FloorBatchNorm2d(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(c))
        self.bias = torch.nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))
        self.register_buffer("num_batches_tracked", torch.tensor(0))

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError("4D input expected")
        return _Floor.apply(x, self.weight, self.bias,
                            (self.running_mean, self.running_var, self.num_batches_tracked))


def main(shape=(2, 2, 3, 4), steps=3000, rounds=3):
    import batchnorm

    x = torch.randn(shape, requires_grad=True)
    dy = torch.randn(shape)
    c = shape[1]
    layers = {"torch": torch.nn.BatchNorm2d(c), "floor": FloorBatchNorm2d(c),
              "batchnorm": batchnorm.BatchNorm2d(c)}

    def run(m, n):
        f = b = 0.0
        for _ in range(n):
            x.grad = None
            t0 = P()
            y = m(x)
            t1 = P()
            y.backward(dy)
            f += t1 - t0
            b += P() - t1
        return f / n * 1e6, b / n * 1e6

    for m in layers.values():
        run(m, 300)
    print(f"forward / backward µs per step on {shape} (interleaved rounds)")
    for _ in range(rounds):
        print("   ".join(f"{k} {f:6.1f} / {b:6.1f}" for k, (f, b) in
                         ((k, run(m, steps)) for k, m in layers.items())))


if __name__ == "__main__":
    main()
