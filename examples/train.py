"""Train a small CNN on scikit-learn's 8x8 digits, in one process or several (CPU, gloo).

    python examples/train.py                                   # one process
    torchrun --nproc-per-node 2 examples/train.py --sync-bn    # 2 ranks, global batch stats
    python examples/train.py --torch-bn                        # torch's modules, to compare

The dataset (1797 images, 8x8, 10 classes) ships inside scikit-learn: nothing is
downloaded. Under torchrun each rank takes its share of every global batch (the global
batch size stays --batch-size), gradients are averaged by DistributedDataParallel, and
with --sync-bn the batch-norm statistics are those of the global batch, so two ranks
follow the single-process run closely. Without --sync-bn every rank normalizes with its
own half-batch, as plain DDP does.
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import batchnorm


def make_model(torch_bn: bool) -> nn.Module:
    def bn_relu(c):
        if torch_bn:
            return [nn.BatchNorm2d(c), nn.ReLU()]
        return [batchnorm.BatchNorm2d(c, activation="relu")]  # the ReLU fused into the BN

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), *bn_relu(16),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), *bn_relu(32),
        nn.MaxPool2d(2),                                           # 8x8 -> 4x4
        nn.Conv2d(32, 64, 3, padding=1, bias=False), *bn_relu(64),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 10),
    )


def load_digits_tensors(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixels 0..16
    y = torch.tensor(digits.target, dtype=torch.long)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=seed, stratify=y)
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = (model(x).argmax(1) == y).sum().item()
    model.train()
    return correct / len(y)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (tiny tensors: more threads only contend)")
    parser.add_argument("--sync-bn", action="store_true",
                        help="batchnorm.SyncBatchNorm: statistics over every rank's samples")
    parser.add_argument("--torch-bn", action="store_true",
                        help="torch.nn.BatchNorm2d + nn.ReLU instead of our fused layer")
    args = parser.parse_args(argv)

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    model = make_model(args.torch_bn)
    if args.sync_bn:
        # torch.nn.SyncBatchNorm refuses CPU tensors; ours converts torch's layers too.
        model = batchnorm.convert_sync_batchnorm(model)
    net = nn.parallel.DistributedDataParallel(model) if distributed else model

    x_train, y_train, x_test, y_test = load_digits_tensors(args.seed)
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, nesterov=True)
    steps = len(y_train) // args.batch_size  # drop the last incomplete batch
    per_rank = args.batch_size // world

    if rank == 0:
        bn = "torch" if args.torch_bn else "batchnorm"
        print(f"digits 8x8: {len(y_train)} train / {len(y_test)} test; {world} rank(s), "
              f"global batch {args.batch_size}, {bn} BatchNorm2d"
              f"{' -> SyncBatchNorm' if args.sync_bn else ''}")
    try:
        from tqdm import tqdm
    except ImportError:  # the progress bar is optional
        tqdm = None

    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        # Same permutation on every rank; each takes its slice of every global batch.
        order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(
            args.seed * 1000 + epoch))
        batches = range(steps)
        if rank == 0 and tqdm is not None:
            batches = tqdm(batches, desc=f"epoch {epoch}", leave=False, ncols=80)
        total = torch.zeros(2)  # loss sum, samples
        for i in batches:
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            idx = idx[rank * per_rank:(rank + 1) * per_rank]
            loss = F.cross_entropy(net(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += torch.tensor([loss.item() * len(idx), len(idx)])
        if distributed:
            dist.all_reduce(total)
        acc = accuracy(model, x_test, y_test)
        if rank == 0:
            print(f"epoch {epoch}: train loss {total[0] / total[1]:.4f}   "
                  f"test accuracy {acc:.4f}   ({time.perf_counter() - start:.1f} s)")
    if distributed:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
