"""Where torch's CUDA batch norm disagrees with its CPU one, and ours with either.

    PYTHONPATH=src python3 benchmarks/torch_cuda_quirks.py

The parity tests take torch on the CPU as the oracle where the two disagree
(tests/test_parity.py's docstring); this prints the cases on a card, torch's CUDA layer
with cuDNN on and off, so that the disagreement is measured, not assumed:
- the running buffers as strided views (functional API), one fp32 training step;
- a +inf in dy, the channel's weight and bias gradients;
- a +inf in x, the channel's running mean and variance after one training step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import batchnorm


def _input(layout: str, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 3, 5, generator=g) * 2 + 1
    x = x.to(device)
    return x.contiguous(memory_format=torch.channels_last) if layout == "CL" else x


def _fmt(t: torch.Tensor) -> str:
    return " ".join(f"{v:9.4f}" for v in t.detach().double().cpu().flatten().tolist())


def strided_buffers(layout: str) -> None:
    print(f"-- strided running buffers, fp32 {layout}: running_mean | running_var after a step")
    for name, device, cudnn, fn in (("torch cpu", "cpu", True, F.batch_norm),
                                    ("torch cuda", "cuda", True, F.batch_norm),
                                    ("torch cuda, no cudnn", "cuda", False, F.batch_norm),
                                    ("ours cuda", "cuda", True,
                                     batchnorm.functional.batch_norm)):
        buf = (torch.arange(16, dtype=torch.float32).reshape(4, 4) / 16 + 0.5).to(device)
        params = torch.ones(4, 2, device=device)
        with torch.backends.cudnn.flags(enabled=cudnn):
            fn(_input(layout, device), buf[:, 0], buf[:, 2], params[:, 0], params[:, 1],
               training=True)
        print(f"  {name:22s} {_fmt(buf[:, 0])} | {_fmt(buf[:, 2])}")


def infinite(layout: str, where: str) -> None:
    what = "weight.grad | bias.grad" if where == "dy" else "running_mean | running_var"
    print(f"-- +inf in {where}, fp32 {layout}: {what} (channel 2 is the one)")
    for name, device, cudnn, cls in (("torch cpu", "cpu", True, torch.nn.BatchNorm2d),
                                     ("torch cuda", "cuda", True, torch.nn.BatchNorm2d),
                                     ("torch cuda, no cudnn", "cuda", False,
                                      torch.nn.BatchNorm2d),
                                     ("ours cuda", "cuda", True, batchnorm.BatchNorm2d)):
        m = cls(4).to(device)
        x = _input(layout, device).clone(memory_format=torch.preserve_format)
        dy = torch.ones_like(x)
        (x if where == "x" else dy)[1, 2, 1, 3] = float("inf")
        x.requires_grad_()
        with torch.backends.cudnn.flags(enabled=cudnn):
            m(x).backward(dy)
        pair = (m.weight.grad, m.bias.grad) if where == "dy" else (m.running_mean,
                                                                   m.running_var)
        print(f"  {name:22s} {_fmt(pair[0])} | {_fmt(pair[1])}")


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "cuDNN",
          torch.backends.cudnn.version())
    for layout in ("NCHW", "CL"):
        strided_buffers(layout)
    for where in ("dy", "x"):
        for layout in ("NCHW", "CL"):
            infinite(layout, where)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
