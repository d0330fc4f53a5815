"""SyncBatchNorm against one BatchNorm over the concatenated batch, on gloo (CPU).

Ranks are separate processes on localhost (tests/_distributed_workers.py). Each group of
processes is started once per module and runs every case; the cases are then checked
one test each, here, against the local oracle.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

import batchnorm
from batchnorm import distributed as bd

sys.path.insert(0, os.path.dirname(__file__))
import _distributed_workers as workers

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

WORKER = os.path.join(os.path.dirname(__file__), "_distributed_workers.py")


def launch(scenario, world, directory, timeout_s=60.0, wait_s=120.0, wait_for=None,
           device="cpu"):
    """Start ``world`` ranks, wait for those in ``wait_for`` (all by default), kill the rest.

    Returns (return codes, stderr texts, seconds until the awaited ranks ended).
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               PYTHONWARNINGS="ignore", BN_DIST_DEVICE=device)
    procs = [subprocess.Popen([sys.executable, WORKER, scenario, str(r), str(world),
                               str(directory), str(timeout_s)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    start = time.monotonic()
    awaited = range(world) if wait_for is None else wait_for
    codes, errs = [None] * world, [""] * world
    try:
        for r in awaited:
            _, errs[r] = procs[r].communicate(timeout=max(1.0, wait_s - (time.monotonic() - start)))
            codes[r] = procs[r].returncode
    except subprocess.TimeoutExpired:
        pass  # reported below with every rank's stderr
    elapsed = time.monotonic() - start
    for r, p in enumerate(procs):
        if p.poll() is None:
            p.kill()
        if codes[r] is None:
            errs[r] = f"[rank {r} killed after {elapsed:.0f} s]\n" + p.communicate()[1]
    return codes, errs, elapsed


def load_ranks(directory, world):
    return [torch.load(os.path.join(directory, f"rank{r}.pt"), weights_only=False)
            for r in range(world)]


def close(actual, expected, rtol=1e-5, what=""):
    """Relative to the largest magnitude: 1e-5 of the tensor's scale, elementwise."""
    assert actual.shape == expected.shape, what
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol,
                               atol=rtol * max(scale, 1e-30), msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------------------
# Exactness: outputs, gradients and running statistics

SIZES = {2: [3, 5], 3: [4, 1, 0]}


def _case(seed, sizes, shape, *, dtype=torch.float32, loc=0.0, scale=1.0, residual=False,
          channels_last=False, steps=2, affine_init=True, global_one=False, rank_dtypes=None,
          **kwargs):
    n = sum(sizes)
    c = shape[0]
    g = torch.Generator().manual_seed(seed + 1000 * len(sizes))
    mk = lambda: torch.randn((n, *shape), generator=g, dtype=torch.float64)
    step_data = []
    for _ in range(steps):
        # Per-channel offsets, so that channels differ; the data lives at `loc`.
        offset = torch.randn(c, generator=g, dtype=torch.float64).view(1, c, *[1] * (len(shape) - 1))
        step = {"x": (loc + scale * (mk() + offset)).to(dtype), "dy": mk().to(dtype)}
        if residual:
            step["residual"] = mk().to(dtype)
        step_data.append(step)
    init = None
    if affine_init and kwargs.get("affine", True):
        init = (1 + 0.5 * torch.randn(c, generator=g, dtype=torch.float64),
                torch.randn(c, generator=g, dtype=torch.float64))
    return {"sizes": sizes, "C": c, "kwargs": kwargs, "dtype": dtype, "steps": step_data,
            "channels_last": channels_last, "affine_init": init, "global_one": global_one,
            "rank_dtypes": rank_dtypes}


def cases(world):
    s = SIZES[world]
    one = [0] * world
    one[-1] = 1
    return {
        "2d_relu_residual": _case(1, s, (3, 4, 5), residual=True, activation="relu"),
        "nc": _case(2, s, (6,)),
        "ncl_leaky": _case(3, s, (4, 7), activation=nn.LeakyReLU(0.2), momentum=0.3),
        "3d_silu_cumulative": _case(4, s, (2, 3, 2, 4), activation="silu", momentum=None),
        "channels_last_gelu_residual": _case(5, s, (5, 3, 4), residual=True, activation="gelu",
                                             channels_last=True),
        "channels_last_3d": _case(6, s, (3, 2, 3, 2), channels_last=True),
        "no_affine_no_running": _case(7, s, (3, 6), affine=False, track_running_stats=False),
        "no_bias_eps0": _case(8, s, (3, 5), bias=False, eps=0.0),
        # mean 1e6, spread 1: Σx² − (Σx)²/n would lose every digit, and so would a
        # float32 mean (spaced 0.06 there); the merge keeps the mean wide.
        "mean_1e6_float32": _case(9, s, (3, 4, 4), loc=1e6),
        "mean_1e6_float64": _case(10, s, (3, 4, 4), dtype=torch.float64, loc=1e6),
        "mean_1e6_float64_nc": _case(11, s, (4,), dtype=torch.float64, loc=1e6, activation="tanh"),
        "all_empty": _case(12, [0] * world, (3,), steps=1),
        "global_batch_of_one": _case(13, one, (3,), steps=1, global_one=True),
        # each rank's layer and input in its own dtype: the backward's all_reduce summed
        # in each rank's, so the ranks sent 8 and 16 bytes a number and gloo aborted the
        # float32 rank's process (found by a probe)
        "mixed_dtypes": _case(14, s, (3, 4), activation="relu", rank_dtypes=[
            (torch.float32, torch.float64, torch.float32)[r] for r in range(world)]),
    }


def oracle(case, batch_norm_dtype=None):
    """One of our local BatchNorm layers over the concatenated batch, step by step."""
    dtype = batch_norm_dtype or case["dtype"]
    dims = len(case["steps"][0]["x"].shape)
    cls = {2: batchnorm.BatchNorm1d, 3: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d,
           5: batchnorm.BatchNorm3d}[dims]
    layer = cls(case["C"], **case["kwargs"]).to(dtype)
    if case["affine_init"] is not None:
        with torch.no_grad():
            layer.weight.copy_(case["affine_init"][0])
            if layer.bias is not None:
                layer.bias.copy_(case["affine_init"][1])
    out = []
    for step in case["steps"]:
        x = step["x"].to(dtype, copy=True).requires_grad_()
        res = step.get("residual")
        res = res.to(dtype, copy=True).requires_grad_() if res is not None else None
        y = layer(x, res)
        (y * step["dy"].to(dtype)).sum().backward()
        out.append({"y": y.detach(), "dx": x.grad, "dres": res.grad if res is not None else None,
                    "dw": layer.weight.grad.clone() if layer.weight is not None else None,
                    "db": layer.bias.grad.clone() if layer.bias is not None else None})
        layer.zero_grad()
    return out, layer.state_dict()


# NCCL needs a GPU per rank: with two GPUs the 2-rank cases run on CUDA too.
RUNS = [(2, "cpu"), (3, "cpu")] + ([(2, "cuda")] if torch.cuda.device_count() >= 2 else [])

DDP_RUNS = {"uneven_3_5": [3, 5], "empty_rank_8_0": [8, 0]}


def ddp_batches():
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(8, 1, 6, 6, generator=g) * 2 + 1,
             torch.randint(0, 10, (8,), generator=g)) for _ in range(4)]


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    """Each (world, device) group is started once per module; the CPU 2-rank group runs
    the DDP scenario too."""
    started = {}

    def get(world, device):
        if (world, device) not in started:
            directory = tmp_path_factory.mktemp(f"group{world}{device}")
            scenarios = ["exact"]
            inputs = {"exact": cases(world)}
            if (world, device) == (2, "cpu"):
                scenarios.append("ddp")
                inputs["ddp"] = {"runs": DDP_RUNS, "batches": ddp_batches()}
            for name, value in inputs.items():
                torch.save(value, directory / f"{name}.pt")
            codes, errs, _ = launch("+".join(scenarios), world, directory, device=device)
            assert codes == [0] * world, "\n".join(errs)
            started[world, device] = (inputs, load_ranks(directory, world))
        return started[world, device]

    return get


@pytest.fixture(scope="module", params=RUNS, ids=lambda r: f"{r[0]}ranks-{r[1]}")
def exact_run(request, groups):
    world, device = request.param
    inputs, ranks = groups(world, device)
    return world, inputs["exact"], [r["exact"] for r in ranks]


CASE_NAMES = list(cases(2))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_sync_equals_batchnorm_over_concatenated_batch(exact_run, name):
    _, all_cases, ranks = exact_run
    case = all_cases[name]
    results = [r[name] for r in ranks]
    if case["global_one"]:
        # One value per channel in the whole batch: every rank refuses, nothing changes.
        for res in results:
            assert "Expected more than 1 value per channel" in res["error"]
            assert res["unchanged"]
        return
    expected, expected_state = oracle(case)
    sizes = case["sizes"]
    for i, exp in enumerate(expected):
        got = [r["steps"][i] for r in results]
        for key in ("y", "dx", "dres"):
            if exp[key] is None:
                assert all(g[key] is None for g in got)
                continue
            for rank, g in enumerate(got):
                close(g[key], workers.rank_slice(exp[key], sizes, rank),
                      what=f"step {i} {key} rank {rank}")
            close(torch.cat([g[key] for g in got]), exp[key], what=f"step {i} {key}")
        for key in ("dw", "db"):
            if exp[key] is None:
                continue
            close(sum(g[key] for g in got), exp[key], what=f"step {i} {key} summed")
        assert all(g["channels_last_kept"] for g in got)
    for rank, res in enumerate(results):
        assert res["state"].keys() == expected_state.keys()
        for key, value in expected_state.items():
            if value.is_floating_point():
                close(res["state"][key], value, what=f"{key} rank {rank}")
            else:
                assert torch.equal(res["state"][key], value), key
        if case["rank_dtypes"] is not None:
            continue  # each rank rounds the statistics to its own dtype
        # Every rank holds the very same statistics (merged in the same order).
        for key, value in results[0]["state"].items():
            assert torch.equal(res["state"][key], value), key


def test_large_mean_matches_float64(exact_run):
    """float32 at mean 1e6 is as close to the float64 truth as a local float32 layer."""
    _, all_cases, ranks = exact_run
    case = all_cases["mean_1e6_float32"]
    truth, truth_state = oracle(case, batch_norm_dtype=torch.float64)
    y = torch.cat([r["mean_1e6_float32"]["steps"][-1]["y"] for r in ranks])
    close(y, truth[-1]["y"], rtol=1e-5, what="y")
    state = ranks[0]["mean_1e6_float32"]["state"]
    close(state["running_var"], truth_state["running_var"], rtol=1e-5, what="running_var")


@pytest.mark.parametrize("first", [True, False], ids=["inf-rank-first", "inf-rank-second"])
def test_an_infinite_rank_mean_merges_to_torchs_infinite_mean(first):
    """The ranks' statistics merge around the first non-empty rank's mean; an infinite
    one (a +inf in that rank's part of the channel) made the merged mean inf − inf = NaN,
    where torch's layer on the whole batch gives +inf (found by a probe)."""
    from batchnorm import ops
    x = torch.randn(5, 2, dtype=torch.float64)
    x[1, 0] = float("inf")
    parts = [x[:2], x[2:]] if first else [x[2:], x[:2]]
    counts = torch.tensor([[len(p)] * 2 for p in parts], dtype=torch.float64)
    means = torch.stack([p.mean(0) for p in parts])
    m2s = torch.stack([((p - p.mean(0)) ** 2).sum(0) for p in parts])
    total, mean, _ = ops.chan_combine(counts, means, m2s)
    assert total.tolist() == [5, 5] and mean[0].item() == float("inf")
    torch.testing.assert_close(mean[1], x[:, 1].mean())


# ---------------------------------------------------------------------------------------
# DDP training, evaluation without collectives

@pytest.fixture(scope="module")
def ddp_run(groups):
    inputs, ranks = groups(2, "cpu")
    return inputs["ddp"]["batches"], [r["ddp"] for r in ranks]


@pytest.mark.parametrize("run", list(DDP_RUNS))
def test_ddp_training_matches_single_process(ddp_run, run):
    batches, ranks = ddp_run
    model = workers.make_cnn()
    losses = workers.train(model, batches, loss_scale=1.0 / len(batches[0][1]))
    model.eval()
    with torch.no_grad():
        eval_out = model(batches[0][0])
    expected = model.state_dict()
    for rank, res in enumerate(ranks):
        got = res[run]
        total = torch.stack(ranks[0][run]["losses"]) + torch.stack(ranks[1][run]["losses"])
        close(total / 2, torch.stack(losses), rtol=1e-4, what="loss")
        for key, value in expected.items():
            if value.is_floating_point():
                close(got["state"][key], value, rtol=1e-4, what=f"{key} rank {rank}")
            else:
                assert torch.equal(got["state"][key], value), key
        close(got["eval_out"], eval_out, rtol=1e-4, what="eval output")
        assert got["eval_collectives"] == 0


# ---------------------------------------------------------------------------------------
# A failing rank does not hang the others

FAIL_TIMEOUT_S = 10


def test_failed_rank_makes_the_others_fail_within_the_timeout(tmp_path):
    codes, errs, elapsed = launch("fail", 2, tmp_path, timeout_s=FAIL_TIMEOUT_S, wait_s=90,
                                  wait_for=[0])
    assert codes[0] == 0, errs[0]
    survivor = torch.load(tmp_path / "rank0.pt", weights_only=False)["fail"]
    assert survivor["error"] is not None, "the surviving rank finished a step alone"
    # It waited at most the group's timeout (plus scheduling slack), then raised.
    assert survivor["elapsed"] < FAIL_TIMEOUT_S + 15, survivor
    assert elapsed < 80


# ---------------------------------------------------------------------------------------
# Single process: no group, world of one, conversion


def _bn_model():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(),
        batchnorm.BatchNorm2d(3, activation=nn.LeakyReLU(0.3), momentum=None),
        nn.SyncBatchNorm(3),
        nn.Flatten(2), batchnorm.BatchNorm1d(3, bias=False), nn.Unflatten(2, (4, 4)),
    )


def _outputs(model, x):
    """Train- and eval-mode outputs of a copy (the model's own state is left as it is)."""
    model = copy.deepcopy(model)
    model.train()
    train_out = model(x)
    model.eval()
    with torch.no_grad():
        eval_out = model(x)
    return train_out.detach(), eval_out


def test_convert_and_revert_keep_outputs_state_and_mode():
    torch.manual_seed(1)
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    model = _bn_model().double()
    model(x)  # non-trivial running statistics
    params = {id(p) for p in model.parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model[1].eval()  # mixed training modes are kept layer by layer
    modes = [m.training for m in model.modules()]
    original_out = _outputs(model, x)

    synced = bd.convert_sync_batchnorm(model)
    assert [type(m) for m in synced if isinstance(m, bd._BatchNorm)] == [bd.SyncBatchNorm] * 4
    assert [m.training for m in synced.modules()] == modes
    assert {id(p) for p in synced.parameters()} == params
    assert synced[3].activation == "leaky_relu" and synced[3].activation_slope == 0.3
    assert synced[6].bias is None
    synced_out = _outputs(synced, x)

    reverted = bd.revert_sync_batchnorm(bd.convert_sync_batchnorm(synced))  # twice: one origin
    assert [type(reverted[i]) for i in (1, 3, 4, 6)] == [
        batchnorm.BatchNorm2d, batchnorm.BatchNorm2d, bd.BatchNormNd, batchnorm.BatchNorm1d]
    assert [m.training for m in reverted.modules()] == modes
    assert {id(p) for p in reverted.parameters()} == params
    assert reverted.state_dict().keys() == state.keys()
    assert all(torch.equal(reverted.state_dict()[k], v) for k, v in state.items())
    reverted_out = _outputs(reverted, x)

    # Ours to ours: bitwise. Against torch's layers of the original: to float64 rounding.
    for got, sync, orig in zip(reverted_out, synced_out, original_out):
        assert torch.equal(got, sync)
        close(got, orig, rtol=1e-10)


def test_convert_sync_batchnorm_is_also_a_classmethod_as_torchs():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))
    assert bd.SyncBatchNorm.convert_sync_batchnorm(model) is model
    assert type(model[1]) is bd.SyncBatchNorm


def test_convert_a_single_layer_returns_a_new_one():
    x = torch.randn(3, 4, 2, 3, 2)
    bn = batchnorm.BatchNorm3d(4, activation="relu")
    sync = bd.convert_sync_batchnorm(bn, process_group=None)
    assert isinstance(sync, bd.SyncBatchNorm) and sync.weight is bn.weight
    back = bd.revert_sync_batchnorm(sync)
    assert type(back) is batchnorm.BatchNorm3d and back.activation == "relu"
    outs = [_outputs(m, x) for m in (bn, sync, back)]
    assert all(torch.equal(a, b) for out in outs[1:] for a, b in zip(out, outs[0]))
    with pytest.raises(ValueError, match="uninitialized"):
        bd.convert_sync_batchnorm(batchnorm.LazyBatchNorm2d())


def test_convert_and_revert_keep_a_frozen_layer_frozen():
    """A frozen layer keeps its running statistics through both conversions, and unfreeze
    afterwards still gives back what freeze(affine=True) took."""
    x = torch.randn(8, 4, 3, 3) * 3 + 2
    model = nn.Sequential(batchnorm.BatchNorm2d(4), nn.BatchNorm2d(4))
    batchnorm.freeze(model, affine=True)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    synced = bd.convert_sync_batchnorm(model)
    assert all(m.frozen for m in synced)
    synced(x)
    reverted = bd.revert_sync_batchnorm(synced)
    assert all(m.frozen for m in reverted)
    reverted(x)
    assert all(torch.equal(reverted.state_dict()[k], v) for k, v in before.items())
    batchnorm.unfreeze(reverted)
    assert all(p.requires_grad for p in reverted.parameters())
    assert not any(m.frozen for m in reverted)


@pytest.mark.parametrize("shape", [(6, 3), (6, 3, 5), (4, 3, 2, 5), (2, 3, 2, 3, 2)])
def test_without_a_process_group_it_is_batchnorm(shape):
    assert not dist.is_initialized()
    torch.manual_seed(2)
    x = torch.randn(shape, requires_grad=True)
    sync, local = bd.SyncBatchNorm(3, activation="silu"), bd.BatchNormNd(3, activation="silu")
    y_sync, y_local = sync(x), local(x)
    assert torch.equal(y_sync, y_local)
    assert torch.equal(sync.running_var, local.running_var)
    with pytest.raises(ValueError, match="at least 2D"):
        sync(torch.randn(3))


def test_world_of_one_is_batchnorm(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1)
    try:
        torch.manual_seed(3)
        x = torch.randn(4, 3, 5, 5, requires_grad=True)
        sync, local = bd.SyncBatchNorm(3), batchnorm.BatchNorm2d(3)
        y = sync(x)
        g_sync = torch.autograd.grad(y.square().sum(), x)[0]
        y_local = local(x)
        g_local = torch.autograd.grad(y_local.square().sum(), x)[0]
        assert torch.equal(y, y_local) and torch.equal(g_sync, g_local)
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            sync(torch.randn(1, 3))
    finally:
        dist.destroy_process_group()


def test_a_rank_outside_the_group_runs_local_batchnorm(tmp_path, monkeypatch):
    """torch.distributed answers -1 for the size of a group this rank is not in; the
    module then normalizes locally, as torch's SyncBatchNorm does, and the functional form,
    which only the group's ranks may call, says so."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1)
    try:
        monkeypatch.setattr(bd.dist, "get_world_size", lambda group=None: -1)
        assert bd.world_size(object()) == -1
        torch.manual_seed(5)
        x = torch.randn(4, 3, 5)
        sync, local = bd.SyncBatchNorm(3, activation="relu"), bd.BatchNormNd(3, activation="relu")
        assert torch.equal(sync(x), local(x))
        assert torch.equal(sync.running_mean, local.running_mean)
        with pytest.raises(ValueError, match="not a member of process_group"):
            bd.sync_batch_norm(x, None, None, None, None, 0.1, 1e-5)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_sync_path_keeps_no_bias_without_an_activation(tmp_path, dtype):
    """As torch's SyncBatchNorm: an optimizer step on the bias between forward and backward
    is no in-place error. The synchronized path kept the bias (and, in float64, its
    centred copy, which is the bias itself there)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1)
    try:
        torch.manual_seed(6)
        x = torch.randn(4, 3, 2, 2, dtype=dtype, requires_grad=True)
        sync = bd.SyncBatchNorm(3).to(dtype)
        y = bd.sync_batch_norm(x, sync.running_mean, sync.running_var, sync.weight,
                               sync.bias, sync.momentum, sync.eps)
        with torch.no_grad():
            sync.bias.add_(1)
        dy = torch.randn(x.shape, dtype=dtype)
        (gx,) = torch.autograd.grad(y, x, dy)
        local = batchnorm.BatchNorm2d(3).to(dtype)
        (gx_local,) = torch.autograd.grad(local(x), x, dy)
        close(gx, gx_local, what="dx")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_sync_path_residual_gradient_does_not_share_the_callers_gradient(tmp_path, layout):
    """Without an activation the residual's gradient is dy: the synchronized path took the
    residual through a view made outside its Function, whose backward handed on a view
    of the caller's dy, which autograd kept as r.grad (a second backward then added into
    the caller's tensor)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1)
    try:
        torch.manual_seed(7)
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        x = torch.randn(2, 3, 4, 4).to(memory_format=fmt).requires_grad_()
        r = torch.randn(2, 3, 4, 4, requires_grad=True)
        dy = torch.randn(2, 3, 4, 4).to(memory_format=fmt)
        sync = bd.SyncBatchNorm(3)
        for _ in range(2):
            y = bd.sync_batch_norm(x, sync.running_mean, sync.running_var, sync.weight,
                                   sync.bias, sync.momentum, sync.eps, residual=r)
            assert y.is_contiguous(memory_format=fmt)
            y.backward(dy)
        close(r.grad, 2 * dy, what="r.grad")
        assert r.grad.untyped_storage().data_ptr() != dy.untyped_storage().data_ptr()
    finally:
        dist.destroy_process_group()


GROUP_OF_ONE = [("gloo", "cpu")] + ([("nccl", "cuda")] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("pg_backend,device", GROUP_OF_ONE, ids=[d for _, d in GROUP_OF_ONE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_sync_path_through_a_group_of_one(tmp_path, pg_backend, device, dtype):
    """The collective path itself (forced: the module would go local) on each device's
    process-group backend, against the local layer: both collectives are identities."""
    dist.init_process_group(pg_backend, init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1)
    try:
        torch.manual_seed(4)
        shape = (6, 8, 5, 7)
        x = (torch.randn(shape, device=device) * 3 + 100).to(dtype)
        x = x.to(memory_format=torch.channels_last).requires_grad_()
        res = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(shape, device=device, dtype=dtype)
        local = batchnorm.BatchNorm2d(8, activation="relu", device=device)
        sync = bd.SyncBatchNorm(8, activation="relu", device=device)
        y_local = local(x, res)
        grads_local = torch.autograd.grad((y_local * dy).sum(), (x, res, local.weight, local.bias))
        y_sync = bd.sync_batch_norm(x, sync.running_mean, sync.running_var, sync.weight,
                                    sync.bias, sync.momentum, sync.eps, "relu", 0.0, res,
                                    sync.num_batches_tracked)
        grads_sync = torch.autograd.grad((y_sync * dy).sum(), (x, res, sync.weight, sync.bias))
        assert y_sync.is_contiguous(memory_format=torch.channels_last)
        rtol = 1e-5 if dtype == torch.float32 else 5e-3
        close(y_sync, y_local, rtol=rtol, what="y")
        for name, a, b in zip(("dx", "dres", "dweight", "dbias"), grads_sync, grads_local):
            close(a, b, rtol=rtol, what=name)
        for key, value in local.state_dict().items():
            if value.is_floating_point():
                close(sync.state_dict()[key], value, rtol=1e-5, what=key)
            else:
                assert torch.equal(sync.state_dict()[key], value)
    finally:
        dist.destroy_process_group()


def test_sync_path_keeps_a_strided_channels_last_input_channels_last(tmp_path):
    """A channel slice of a channels_last tensor comes back channels_last, as from the
    local layer and torch's."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1)
    try:
        torch.manual_seed(6)
        x = torch.randn(2, 6, 3, 3).to(memory_format=torch.channels_last)[:, 1:5]
        sync, local = bd.SyncBatchNorm(4), batchnorm.BatchNorm2d(4)
        y = bd.sync_batch_norm(x, sync.running_mean, sync.running_var, sync.weight, sync.bias,
                               sync.momentum, sync.eps)
        y_local = local(x)
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert y_local.is_contiguous(memory_format=torch.channels_last)
        close(y, y_local, rtol=1e-6, what="y")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("problem", ["inference_buffers", "torch_func"])
def test_sync_path_refuses_before_changing_anything(tmp_path, problem):
    """Running statistics made under inference_mode (our update writes by address, past
    torch's check: the local layer refuses them too) and a torch.func transform (the
    collective and our Function have no rules for it) are refused with a message that
    says so, before the collective and before any buffer moves."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1)
    try:
        x = torch.randn(4, 3, 5)
        if problem == "inference_buffers":
            with torch.inference_mode():
                sync = bd.SyncBatchNorm(3)
        else:
            sync = bd.SyncBatchNorm(3, track_running_stats=False)
        before = {k: v.clone() for k, v in sync.state_dict().items()}

        def step(x):
            return bd.sync_batch_norm(
                x, sync.running_mean, sync.running_var, sync.weight.detach(),
                sync.bias.detach(), sync.momentum, sync.eps,
                num_batches_tracked=sync.num_batches_tracked if sync.track_running_stats
                else None).square().sum()

        with pytest.raises(RuntimeError, match="inference_mode" if problem == "inference_buffers"
                           else "cannot run under torch.func"):
            step(x) if problem == "inference_buffers" else torch.func.grad(step)(x)
        assert all(torch.equal(v, before[k]) for k, v in sync.state_dict().items())
    finally:
        dist.destroy_process_group()


def test_sync_path_takes_a_residual_made_under_inference_mode(tmp_path):
    """As the local layer (test_errors.py): the residual, kept to recompute the
    activation's input, is kept as a normal copy where it was made under inference_mode
    (save_for_backward refused it, after the running statistics had moved)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1)
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(4, 3, 5, generator=gen)
        with torch.inference_mode():
            r = torch.randn(4, 3, 5, generator=gen)
        sync = bd.SyncBatchNorm(3, activation="relu")
        local = batchnorm.BatchNorm1d(3, activation="relu")
        local.load_state_dict(sync.state_dict())
        grads = []
        for m in (sync, local):
            x_ = x.clone().requires_grad_()
            m(x_, r).square().sum().backward()
            grads.append((x_.grad, m.weight.grad, m.running_mean))
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


def _called_modules(traced: torch.fx.GraphModule) -> list:
    return [n.target for n in traced.graph.nodes if n.op == "call_module"]


def _fx_worker(rank, init_file, result_file):
    """Traced before the process group exists (a world of one), run under two ranks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), bd.SyncBatchNorm(4, activation="relu"))
    traced = torch.fx.symbolic_trace(model)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=2)
    try:
        # traced under the group too (the layer refused the Proxy there)
        assert _called_modules(torch.fx.symbolic_trace(model)) == ["0", "1"]
        gen = torch.Generator().manual_seed(rank)
        traced(torch.randn(5, 3, generator=gen) + rank)
        torch.save({k: v for k, v in traced.state_dict().items() if "1." in k},
                   f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_fx_traces_a_training_sync_layer_as_a_node_that_synchronizes(tmp_path):
    """torch.fx.symbolic_trace recorded the local batch norm node for our SyncBatchNorm
    (a model traced before init_process_group then ran each rank on its own statistics),
    and under an initialized group refused the Proxy. Torch's SyncBatchNorm is an FX leaf
    that synchronizes when it runs; ours is one call_module node, the layer deciding when
    it runs."""
    torch.manual_seed(0)  # the workers' Linear too
    model = nn.Sequential(nn.Linear(3, 4), bd.SyncBatchNorm(4, activation="relu"))
    traced = torch.fx.symbolic_trace(model)
    assert _called_modules(traced) == ["0", "1"]
    x = torch.randn(6, 3)
    torch.testing.assert_close(traced(x), copy.deepcopy(model)(x))  # a world of one: local
    torch.multiprocessing.spawn(_fx_worker, args=(str(tmp_path / "init"),
                                                  str(tmp_path / "sd")), nprocs=2)
    states = [torch.load(f"{tmp_path / 'sd'}.{rank}") for rank in range(2)]
    oracle = nn.Sequential(nn.Linear(3, 4), batchnorm.BatchNorm1d(4, activation="relu"))
    oracle[0].load_state_dict(model[0].state_dict())
    oracle(torch.cat([torch.randn(5, 3, generator=torch.Generator().manual_seed(r)) + r
                      for r in range(2)]))
    for state in states:
        torch.testing.assert_close(state["1.running_mean"], oracle[1].running_mean)
        torch.testing.assert_close(state["1.running_var"], oracle[1].running_var)


def test_sync_path_compiles_with_a_graph_break(tmp_path):
    """torch.compile runs the synchronized step outside its graph: dynamo traced into the
    collective and the CPU kernels' numba dispatchers, and failed there."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1)
    try:
        torch.manual_seed(7)
        x = torch.randn(4, 3, 5, 5)
        sync, local = bd.SyncBatchNorm(3, activation="relu"), batchnorm.BatchNorm2d(
            3, activation="relu")

        def step(layer, x):
            y = bd.sync_batch_norm(x, layer.running_mean, layer.running_var, layer.weight,
                                   layer.bias, layer.momentum, layer.eps, "relu", 0.0, None,
                                   layer.num_batches_tracked)
            return y * 2

        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = torch.compile(step)(sync, x1)
        y.square().sum().backward()
        y_local = local(x2) * 2
        y_local.square().sum().backward()
        close(y, y_local, rtol=1e-6, what="y")
        close(x1.grad, x2.grad, rtol=1e-5, what="dx")
        close(sync.running_var, local.running_var, rtol=1e-6, what="running_var")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_sync_path_under_checkpoint_moves_the_statistics_as_torch(tmp_path, reentrant):
    """torch.utils.checkpoint runs a layer's forward again in backward, and torch's batch
    norms (SyncBatchNorm too) update their running statistics in it: twice a step. The
    non-reentrant form stops its recomputation at the last saved tensor, before which our
    update did not run (once a step)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1)
    try:
        torch.manual_seed(8)
        x = torch.randn(8, 3) + 5
        sync, theirs = bd.SyncBatchNorm(3), nn.BatchNorm1d(3)

        def step(x):
            return bd.sync_batch_norm(x, sync.running_mean, sync.running_var, sync.weight,
                                      sync.bias, sync.momentum, sync.eps,
                                      num_batches_tracked=sync.num_batches_tracked)

        for f in (step, theirs):
            x_ = x.clone().requires_grad_()
            torch.utils.checkpoint.checkpoint(f, x_, use_reentrant=reentrant).sum().backward()
        assert sync.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 2
        close(sync.running_mean, theirs.running_mean, rtol=1e-6, what="running_mean")
        close(sync.running_var, theirs.running_var, rtol=1e-6, what="running_var")
    finally:
        dist.destroy_process_group()


def _dtensor_worker(rank, init_file, result_file):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_module, distribute_tensor
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
        results = {}
        for name, layer in (("ours", batchnorm.BatchNorm2d(3)), ("torch", nn.BatchNorm2d(3))):
            distribute_module(layer, mesh)
            xd = distribute_tensor(x, mesh, [Shard(0)]).requires_grad_()
            try:
                y = layer(xd)
            except NotImplementedError:
                # torch 2.11 has no sharding rule for its own batch norm: on one rank its
                # result is the plain tensor's
                assert name == "torch"
                layer, xd = nn.BatchNorm2d(3), x.clone().requires_grad_()
                y = layer(xd)
            y.square().sum().backward()
            results[name] = [getattr(t, "full_tensor", t.clone)()
                             for t in (y, xd.grad, layer.weight.grad, layer.running_var,
                                       layer.num_batches_tracked)]
        torch.save(results, result_file)
    finally:
        dist.destroy_process_group()


def test_a_dtensor_sharded_along_the_batch_trains(tmp_path):
    """An in-place op on the mean (its rounding's rest) raised for a DTensor sharded on
    dim 0, whose mean is a Partial sum, after the running statistics had moved."""
    pytest.importorskip("torch.distributed.tensor")
    torch.multiprocessing.spawn(_dtensor_worker, args=(str(tmp_path / "init"),
                                                       str(tmp_path / "out")), nprocs=1)
    results = torch.load(tmp_path / "out")
    for ours, theirs in zip(results["ours"], results["torch"]):
        torch.testing.assert_close(ours, theirs)


def test_the_synchronized_checks_refuse_a_nested_input_first():
    """The synchronized step's checks read input.shape[1] first: torch's internal errors
    (a strided nested tensor's sizes, a jagged one's symbolic size) instead of ours."""
    nested = torch.nested.nested_tensor([torch.randn(3, 4)] * 2, layout=torch.jagged)
    with pytest.raises(NotImplementedError, match="nested tensor"):
        bd._validate(nested, None, None, None, None, 0.1, 1e-5, None, None)
