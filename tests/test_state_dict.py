"""state_dict is torch's, both ways: keys, dtypes, version metadata, old checkpoints."""

import copy
import io

import pytest
import torch
from torch import nn

import batchnorm
from conftest import torch_batchnorm

PAIRS = [(batchnorm.BatchNorm1d, nn.BatchNorm1d, (6, 3, 4)),
         (batchnorm.BatchNorm2d, nn.BatchNorm2d, (4, 3, 3, 3)),
         (batchnorm.BatchNorm3d, nn.BatchNorm3d, (2, 3, 2, 3, 2))]
CONFIGS = {"default": {}, "noaffine": dict(affine=False), "nobias": dict(bias=False),
           "notrack": dict(track_running_stats=False), "cumulative": dict(momentum=None)}


def _train(module, shape, gen, steps=3):
    module.train()
    for step in range(steps):
        x = (torch.randn(shape, generator=gen) * (step + 1) + step).requires_grad_()
        (module(x) ** 2).sum().backward()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return module


def _outputs(module, x):
    """Eval and train outputs; the train step runs on a copy, leaving module as it was."""
    with torch.no_grad():
        return module.eval()(x), copy.deepcopy(module).train()(x.clone())


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("ours_cls,torch_cls,shape", PAIRS, ids=["1d", "2d", "3d"])
def test_ours_to_torch_and_back(ours_cls, torch_cls, shape, config, gen):
    kwargs = CONFIGS[config]
    ours = _train(ours_cls(3, **kwargs), shape, gen)
    sd = ours.state_dict()
    theirs = torch_batchnorm(torch_cls, 3, **kwargs)
    assert list(sd.keys()) == list(theirs.state_dict().keys())
    assert sd._metadata[""]["version"] == theirs.state_dict()._metadata[""]["version"]
    for k, v in sd.items():
        assert v.dtype == theirs.state_dict()[k].dtype, k
    theirs.load_state_dict(sd)
    x = torch.randn(shape, generator=gen) * 2 + 1
    ours_eval = _outputs(ours, x)[0]
    theirs_eval = _outputs(theirs, x)[0]
    torch.testing.assert_close(ours_eval, theirs_eval, rtol=1e-5, atol=1e-5)

    back = ours_cls(3, **kwargs)
    back.load_state_dict(theirs.state_dict())
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    x = torch.randn(shape, generator=gen)
    for a, b in zip(_outputs(back, x), _outputs(ours, x)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("config", ["default", "cumulative", "nobias"])
def test_torch_checkpoint_into_ours(config, gen):
    kwargs = CONFIGS[config]
    theirs = _train(torch_batchnorm(nn.BatchNorm2d, 3, **kwargs), (4, 3, 3, 3), gen)
    buffer = io.BytesIO()
    torch.save(theirs.state_dict(), buffer)
    buffer.seek(0)
    ours = batchnorm.BatchNorm2d(3, **kwargs)
    ours.load_state_dict(torch.load(buffer, weights_only=True))
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 3
    # Training continues from the loaded state the same way (momentum=None included).
    x = torch.randn(4, 3, 3, 3, generator=gen) + 3
    for a, b in zip(_outputs(ours, x), _outputs(theirs, x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        ours.train()(x)
        theirs.train()(x)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 4


@pytest.mark.parametrize("prefix", ["", "block.0."])
def test_version1_checkpoint_without_num_batches_tracked(prefix, gen):
    """Checkpoints saved before num_batches_tracked existed (state_dict version 1)."""
    old = nn.Sequential(nn.Sequential(_train(nn.BatchNorm2d(3), (4, 3, 2, 2), gen)))
    model_prefix = "0.0."
    sd = old.state_dict()
    del sd[model_prefix + "num_batches_tracked"]
    sd._metadata[model_prefix[:-1]]["version"] = 1
    if prefix == "":
        sd = type(sd)({k[len(model_prefix):]: v for k, v in sd.items()})
        sd._metadata = {"": {"version": 1}}
        ours = batchnorm.BatchNorm2d(3)
        target = ours
    else:
        ours = nn.ModuleDict({"block": nn.Sequential(batchnorm.BatchNorm2d(3))})
        sd = type(sd)({"block.0." + k[len(model_prefix):]: v for k, v in sd.items()})
        sd._metadata = {"block.0": {"version": 1}}
        target = ours["block"][0]
    target.num_batches_tracked.fill_(5)
    result = ours.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(target.running_mean, old[0][0].running_mean)
    assert torch.equal(target.running_var, old[0][0].running_var)
    # As torch: the layer keeps the count it had (a fresh layer's 0).
    ref = nn.BatchNorm2d(3)
    ref.num_batches_tracked.fill_(5)
    ref.load_state_dict(type(sd)({k.split(".")[-1]: v for k, v in sd.items()}), strict=True)
    assert target.num_batches_tracked.item() == ref.num_batches_tracked.item() == 5
    fresh = batchnorm.BatchNorm2d(3)
    fresh.load_state_dict(type(sd)({k.split(".")[-1]: v for k, v in sd.items()}), strict=True)
    assert fresh.num_batches_tracked.item() == 0


def test_state_dict_without_num_batches_tracked_at_version2_is_missing():
    """Only old (version < 2) checkpoints get the default: a current one must be whole."""
    sd = batchnorm.BatchNorm2d(3).state_dict()
    del sd["num_batches_tracked"]
    result = batchnorm.BatchNorm2d(3).load_state_dict(sd, strict=False)
    assert result.missing_keys == ["num_batches_tracked"]
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        batchnorm.BatchNorm2d(3).load_state_dict(sd, strict=True)


def test_model_of_torch_layers_loads_into_model_of_ours(gen):
    def build(bn):
        return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), bn(4), nn.ReLU(),
                             nn.Conv2d(4, 4, 3), bn(4))
    torch.manual_seed(0)
    theirs = build(nn.BatchNorm2d)
    _train(theirs, (2, 2, 5, 5), gen)
    ours = build(batchnorm.BatchNorm2d)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 2, 5, 5, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x), rtol=1e-5, atol=1e-5)
