"""Inference benchmark hook: an eval model against its :func:`fold`-ed form."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from ..modules import BatchNorm2d
from .fold import fold


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = BatchNorm2d(c, activation="relu")
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = BatchNorm2d(c, activation="relu")

    def forward(self, x):
        return self.bn2(self.conv2(self.bn1(self.conv1(x))), residual=x)


def small_resnet(channels: int = 32, blocks: int = 2, classes: int = 10) -> nn.Module:
    """A small ResNet-style CNN of our layers (stem, residual blocks, pooled head)."""
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1, bias=False), BatchNorm2d(channels, activation="relu"),
        *[_Block(channels) for _ in range(blocks)],
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))


def _randomize_stats(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)


def benchmark_fold(device="cpu", repeats: int = 30, batch: int = 8, size: int = 32,
                   channels: int = 32, blocks: int = 2) -> dict:
    """Median forward time of the eval model and of its folded form, interleaved, under
    ``torch.no_grad()``; ``ratio`` = eval / folded (> 1: folding is faster). Also checks
    that both give the same output (``max_rel_diff``)."""
    torch.manual_seed(0)
    model = small_resnet(channels, blocks).to(device).eval()
    _randomize_stats(model)
    folded, report = fold(model)
    x = torch.randn(batch, 3, size, size, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def timed(m):
        sync()
        t0 = time.perf_counter()
        m(x)
        sync()
        return time.perf_counter() - t0

    with torch.no_grad():
        ref, out = model(x), folded(x)
        for _ in range(3):
            timed(model), timed(folded)
        t_eval, t_fold = [], []
        for _ in range(repeats):
            t_eval.append(timed(model))
            t_fold.append(timed(folded))
    eval_ms = statistics.median(t_eval) * 1e3
    fold_ms = statistics.median(t_fold) * 1e3
    return {
        "name": "fold", "device": str(device), "shape": (batch, 3, size, size),
        "channels": channels, "blocks": blocks, "folded": len(report.folded),
        "eval_ms": eval_ms, "folded_ms": fold_ms, "ratio": eval_ms / fold_ms,
        "max_rel_diff": ((out - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item(),
    }
