"""The rank side of tests/test_distributed.py: one process per rank, gloo on localhost.

    python tests/_distributed_workers.py SCENARIO[+SCENARIO...] RANK WORLD DIR [TIMEOUT_S]

The process group rendezvous through a file store in DIR (no port to pick); a scenario's
inputs come from DIR/SCENARIO.pt, written by the test, and each rank writes
DIR/rank{RANK}.pt, ``{scenario: result}``. Several scenarios share one group: starting a
rank (importing torch) is what costs most on a small machine. Kept in a file of its own
so that a rank imports only torch and batchnorm, not pytest.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as TF
from torch import nn

import batchnorm
from batchnorm import distributed as bd

# BN_DIST_DEVICE=cuda: NCCL, one GPU per rank (the CUDA runs of the exact scenario).
DEVICE = os.environ.get("BN_DIST_DEVICE", "cpu")


def init(rank: int, world: int, directory: str, timeout_s: float) -> None:
    torch.set_num_threads(1)  # ranks share the machine's cores
    backend = "gloo"
    if DEVICE == "cuda":
        torch.cuda.set_device(rank)
        backend = "nccl"
    dist.init_process_group(backend, init_method=f"file://{directory}/store", rank=rank,
                            world_size=world, timeout=timedelta(seconds=timeout_s))


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if DEVICE == "cuda" else \
        torch.device("cpu")


def to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_cpu(v) for v in value]
    return value


def rank_slice(t, sizes, rank):
    start = sum(sizes[:rank])
    return t[start:start + sizes[rank]]


class CollectiveCounter:
    """Counts the collectives SyncBatchNorm makes (patched at its call sites)."""

    def __init__(self):
        self.calls = 0
        self._gather, self._reduce = bd._all_gather_flat, dist.all_reduce

        def gather(*a, **k):
            self.calls += 1
            return self._gather(*a, **k)

        def reduce(*a, **k):
            self.calls += 1
            return self._reduce(*a, **k)

        bd._all_gather_flat, bd.dist.all_reduce = gather, reduce


# ---------------------------------------------------------------------------------------
# exact: every case of the test against one BatchNorm over the concatenated batch


def run_case(case, rank, world):
    sizes = case["sizes"]
    dev = device()
    dtype = case["dtype"] if case.get("rank_dtypes") is None else case["rank_dtypes"][rank]
    layer = bd.SyncBatchNorm(case["C"], **case["kwargs"]).to(dev, dtype)
    if case["affine_init"] is not None and layer.weight is not None:
        with torch.no_grad():
            layer.weight.copy_(case["affine_init"][0])
            if layer.bias is not None:
                layer.bias.copy_(case["affine_init"][1])
    out = {"steps": []}
    for step in case["steps"]:
        x = rank_slice(step["x"], sizes, rank).to(dev, dtype, copy=True).requires_grad_()
        dy = rank_slice(step["dy"], sizes, rank).to(dev, dtype)
        res = step.get("residual")
        res = rank_slice(res, sizes, rank).to(dev, copy=True).requires_grad_() \
            if res is not None else None
        if case["channels_last"]:
            fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            x = x.detach().to(memory_format=fmt).requires_grad_()
            if res is not None:
                res = res.detach().to(memory_format=fmt).requires_grad_()
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        try:
            y = layer(x, res)
        except ValueError as e:
            out["error"] = str(e)
            out["unchanged"] = all(torch.equal(before[k], v)
                                   for k, v in layer.state_dict().items())
            return out
        (y * dy).sum().backward()
        out["steps"].append({
            "y": y.detach(), "dx": x.grad,
            "dres": res.grad if res is not None else None,
            "dw": layer.weight.grad.clone() if layer.weight is not None else None,
            "db": layer.bias.grad.clone() if layer.bias is not None else None,
            "channels_last_kept": (not case["channels_last"]) or y.is_contiguous(
                memory_format=torch.channels_last if y.dim() == 4 else torch.channels_last_3d),
        })
        layer.zero_grad()
    out["state"] = {k: v.clone() for k, v in layer.state_dict().items()}
    return out


def scenario_exact(rank, world, directory):
    cases = torch.load(os.path.join(directory, "exact.pt"), weights_only=False)
    return {name: to_cpu(run_case(case, rank, world)) for name, case in cases.items()}


# ---------------------------------------------------------------------------------------
# ddp: a small CNN under DistributedDataParallel


def make_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        batchnorm.BatchNorm2d(4, activation="relu"),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.BatchNorm2d(6),  # torch's, converted too
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 6 * 6, 10),
        batchnorm.BatchNorm1d(10, momentum=None),
    )


def train(model, batches, loss_scale=1.0, lr=0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for x, target in batches:
        opt.zero_grad()
        loss = TF.cross_entropy(model(x), target, reduction="sum") * loss_scale
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses


def scenario_ddp(rank, world, directory):
    data = torch.load(os.path.join(directory, "ddp.pt"), weights_only=False)
    results = {}
    for name, sizes in data["runs"].items():
        model = bd.convert_sync_batchnorm(make_cnn())
        ddp = nn.parallel.DistributedDataParallel(model)
        n = sum(sizes)
        # DDP averages gradients over ranks: a rank's loss is its share of the global mean.
        batches = [(rank_slice(x, sizes, rank), rank_slice(t, sizes, rank))
                   for x, t in data["batches"]]
        losses = train(ddp, batches, loss_scale=world / n)
        counter = CollectiveCounter()
        model.eval()
        with torch.no_grad():
            eval_out = ddp.module(data["batches"][0][0])
        results[name] = {"state": {k: v.clone() for k, v in model.state_dict().items()},
                         "losses": losses, "eval_out": eval_out,
                         "eval_collectives": counter.calls}
        bd._all_gather_flat, bd.dist.all_reduce = counter._gather, counter._reduce
    return results


# ---------------------------------------------------------------------------------------
# fail: one rank raises in the middle of a step and stays alive; the others must not hang


def scenario_fail(rank, world, directory):
    layer = bd.SyncBatchNorm(3)
    x = torch.randn(4, 3, 5)
    layer(x).sum().backward()  # one good step: the group works
    start = time.monotonic()
    try:
        if rank == world - 1:
            raise RuntimeError("injected failure on the last rank")
        layer(x).sum().backward()
    except Exception as e:  # noqa: BLE001 - report what the rank saw, whatever it is
        elapsed = time.monotonic() - start
        if rank == world - 1:
            time.sleep(120)  # a failed rank that lingers: the test kills it
        return {"error": f"{type(e).__name__}: {e}", "elapsed": elapsed}
    return {"error": None, "elapsed": time.monotonic() - start}


SCENARIOS = {"exact": scenario_exact, "ddp": scenario_ddp, "fail": scenario_fail}


def main(argv):
    scenario, rank, world, directory = argv[1], int(argv[2]), int(argv[3]), argv[4]
    timeout_s = float(argv[5]) if len(argv) > 5 else 60.0
    init(rank, world, directory, timeout_s)
    result = {name: SCENARIOS[name](rank, world, directory) for name in scenario.split("+")}
    torch.save(result, os.path.join(directory, f"rank{rank}.pt"))
    if "fail" not in result:
        dist.barrier()
        dist.destroy_process_group()
    else:
        os._exit(0)  # the group may be broken: skip the teardown that would wait on peers


if __name__ == "__main__":
    main(sys.argv)
