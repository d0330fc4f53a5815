"""convert/revert, fold, freeze, recalibrate, conventions and the fold benchmark hook, on
small models written here: a ResNet-style CNN, an MLP with BatchNorm1d, a 3d conv block."""

import contextlib
import copy
import gc
import importlib
import io
import sys
import warnings
import weakref

import numpy as np
import pytest
import torch
from conftest import TORCH_HAS_BIAS_KWARG
from tolerances import assert_close
from torch import nn

import batchnorm
from batchnorm import backends, tools
from batchnorm.tools import ChannelAffine, FusedActivation
from batchnorm.tools.freeze import _FrozenBatchNorm


@pytest.fixture(autouse=True)
def portable_backend():
    # The tools are backend-independent (the parity suite covers the backends); the
    # portable one needs no JIT compilation, which keeps these tests fast.
    with backends.using("portable"):
        yield

# ---------------------------------------------------------------------------------------
# Models


class Block(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + (x if self.down is None else self.down(x)))


def resnet():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        Block(8, 8), Block(8, 12, stride=2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5))


def mlp():
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Linear(16, 16), nn.BatchNorm1d(16), nn.GELU(),
                         nn.Linear(16, 3))


def block3d():
    return nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d(4), nn.SiLU(),
                         nn.ConvTranspose3d(4, 6, 2, stride=2, groups=2), nn.BatchNorm3d(6),
                         nn.LeakyReLU(0.2))


class Untraceable(nn.Module):
    """Control flow on a tensor's value: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(3, 5, 3), nn.BatchNorm1d(5), nn.Tanh())
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return self.body(self.bn(x))


# The untraceable model is paired by nn.Sequential order, which warns (tested on its own).
FALLBACK_WARNS = pytest.mark.filterwarnings("ignore:.*does not trace with torch.fx")

MODELS = {
    "resnet": (resnet, (4, 3, 8, 8)),
    "mlp": (mlp, (8, 6)),
    "block3d": (block3d, (2, 2, 4, 4, 4)),
    "untraceable": (Untraceable, (4, 3, 10)),
}


def make(name, dtype=torch.float32):
    torch.manual_seed(0)
    factory, shape = MODELS[name]
    model = factory().to(dtype)
    randomize(model)
    return model, torch.randn(shape, dtype=dtype)


def randomize(model):
    """Statistics and affine parameters away from their defaults, so that mistakes show."""
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "running_var", None) is not None:
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2)
                if getattr(m, "num_batches_tracked", None) is not None:
                    m.num_batches_tracked.fill_(3)
            if tools._common.is_any_bn(m) and isinstance(getattr(m, "weight", None), torch.Tensor):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)


def outputs_and_grads(model, x):
    x = x.clone().requires_grad_()
    y = model(x)
    torch.manual_seed(1)
    y.backward(torch.randn_like(y))
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return y.detach(), x.grad, grads


def assert_same(a, b, scale=1.0):
    ya, xa, ga = a
    yb, xb, gb = b
    assert_close(yb, ya, scale=scale)
    assert_close(xb, xa, scale=scale)
    assert ga.keys() == gb.keys()
    for n in ga:
        assert_close(gb[n], ga[n], scale=scale, msg=n)


def bns(model):
    return [m for m in model.modules() if tools._common.is_any_bn(m)]


# ---------------------------------------------------------------------------------------
# convert / revert


@FALLBACK_WARNS
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_convert_same_outputs_gradients_and_state(name, mode):
    ref, x = make(name, torch.float64)
    ref.train(mode == "train")
    ours = batchnorm.convert(copy.deepcopy(ref))
    assert not any(tools._common.is_torch_bn(m) for m in ours.modules())
    assert ours.training == ref.training
    assert all(not m.training for m in bns(ours)) == (mode == "eval")
    assert_same(outputs_and_grads(ref, x), outputs_and_grads(ours, x))
    sd_ref, sd_ours = ref.state_dict(), ours.state_dict()
    assert sd_ref.keys() == sd_ours.keys()  # running stats updated alike in train mode
    for k in sd_ref:
        torch.testing.assert_close(sd_ours[k], sd_ref[k], msg=k)


def test_convert_fuses_only_activations_that_consume_one_bn():
    model, _ = make("resnet")
    batchnorm.convert(model)
    acts = {n: m.activation for n, m in model.named_modules() if tools._common.is_our_bn(m)}
    assert acts == {"1": "relu", "3.bn1": "relu", "3.bn2": "none", "4.bn1": "relu",
                    "4.bn2": "none", "4.down.1": "none"}
    fused = {n: m.bn_name for n, m in model.named_modules() if isinstance(m, FusedActivation)}
    assert fused == {"2": "1", "3.relu1": "3.bn1", "4.relu1": "4.bn1"}
    assert isinstance(model[3].relu2, nn.ReLU)  # after the residual add: not a BN's output


def test_convert_fuses_through_sequential_when_fx_fails():
    model, _x = make("untraceable")
    assert tools._common.trace(model) is None
    with pytest.warns(UserWarning, match="does not trace with torch.fx"):
        batchnorm.convert(model)
    assert model.body[1].activation == "tanh" and isinstance(model.body[2], FusedActivation)
    assert model.bn.activation == "none"


class _InnerOutputs(nn.Module):
    """Walks its Sequential itself and returns an output from inside it (the batch norm's
    or the convolution's), and does not trace (a branch on a shape value)."""

    def __init__(self, returned):
        super().__init__()
        self.returned = returned
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4),
                                      nn.ReLU())

    def forward(self, x):
        if x.shape[-1] % 2:
            x = nn.functional.pad(x, (0, 1))
        outs = []
        for layer in self.features:
            x = layer(x)
            outs.append(x)
        return outs[self.returned]


@pytest.mark.parametrize("tool", ["convert", "fold"])
def test_pairing_by_sequential_order_warns(tool):
    """Without an fx graph the tools pair modules by their order in nn.Sequential, which
    is wrong for a forward that reads inside one; they cannot see that, so they say what
    they assumed."""
    model = _InnerOutputs(returned=1 if tool == "convert" else 0).eval()
    randomize(model)
    with pytest.warns(UserWarning, match="compare the result's outputs"):
        getattr(batchnorm, tool)(model)


class _TrainingOnlyOutput(nn.Module):
    """In training the batch norm's output is returned too, before the activation (deep
    supervision): fusing the ReLU would change it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.training:
            return self.act(y), y
        return self.act(y)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_convert_fuses_only_what_holds_in_both_modes(mode, gen):
    """The fx graph depends on the training flags (``if self.training``): convert traces
    both modes, so a model converted in eval keeps its training-only output, and it puts
    every module's flag back as it was (mixed ones too)."""
    ref = _TrainingOnlyOutput().double().train(mode == "train")
    ref.conv.train(mode != "train")
    model = copy.deepcopy(ref)
    flags = [m.training for m in model.modules()]
    batchnorm.convert(model)
    assert model.bn.activation == "none" and isinstance(model.act, nn.ReLU)
    assert [m.training for m in model.modules()] == flags
    x = torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64)
    for training in (True, False):
        want, got = ref.train(training)(x), model.train(training)(x)
        torch.testing.assert_close(got, want)


def test_convert_keeps_parameter_objects_mode_and_dtype():
    model, x = make("mlp", torch.float64)
    model.eval()
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batchnorm.convert(model)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(m.weight.dtype == torch.float64 and not m.training for m in bns(model))
    model.train()
    model(x).sum().backward()
    before = model[1].weight.clone()
    opt.step()  # the optimizer built before convert still updates the layers
    assert not torch.equal(model[1].weight, before)


def test_convert_shared_activation_is_not_fused():
    relu = nn.ReLU()
    model = nn.Sequential(nn.BatchNorm1d(4), relu, nn.Linear(4, 4), nn.BatchNorm1d(4), relu)
    batchnorm.convert(model)
    assert model[0].activation == "none" and model[3].activation == "none"


def test_convert_leaves_a_gelu_of_an_unknown_approximation_unfused():
    """torch's GELU raises at its call for approximate='Tanh'; fused, it ran as the exact
    GELU (now refused), and convert would have raised for the whole model."""
    model = nn.Sequential(nn.BatchNorm1d(4), nn.GELU(approximate="Tanh"),
                          nn.BatchNorm1d(4), nn.GELU(approximate="tanh"))
    batchnorm.convert(model)
    assert model[0].activation == "none" and type(model[1]) is nn.GELU
    assert model[2].activation == "gelu_tanh"


def test_convert_without_fusion_and_root_bn():
    model, _ = make("mlp")
    batchnorm.convert(model, fuse_activations=False)
    assert not any(isinstance(m, FusedActivation) for m in model.modules())
    bn = nn.BatchNorm2d(3)
    assert isinstance(batchnorm.convert(bn), batchnorm.BatchNorm2d)


def test_convert_sync_batchnorm():
    sync = nn.SyncBatchNorm(4)
    model = batchnorm.convert(nn.Sequential(nn.Linear(3, 4), sync))
    assert isinstance(model[1], batchnorm.SyncBatchNorm)
    x = torch.randn(5, 3)
    assert_close(model(x), nn.Sequential(model[0], nn.BatchNorm1d(4))(x))
    back = batchnorm.revert(model)
    assert type(back[1]) is nn.SyncBatchNorm


def _fail_on_second_call(monkeypatch, owner, name):
    """Make ``owner.name`` raise on its second call: a layer deep in the model that cannot
    be converted, after one that could."""
    original = getattr(owner, name)
    calls = []

    def failing(m):
        calls.append(m)
        if len(calls) == 2:
            raise RuntimeError("cannot build this layer")
        return original(m)

    monkeypatch.setattr(owner, name, failing)


def _tree(model):
    """(name, module object, training flag) at every place, and every layer's state."""
    return ([(n, m, m.training) for n, m in model.named_modules(remove_duplicate=False)],
            {n: (getattr(m, "activation", None), getattr(m, "frozen", None))
             for n, m in model.named_modules()})


@pytest.mark.parametrize("how", ["convert", "freeze", "freeze_buffers"])
def test_convert_and_freeze_leave_the_model_unchanged_when_a_layer_fails(monkeypatch, how):
    # The package's ``convert`` is the function; the module is reached by its full name.
    convert_mod = importlib.import_module("batchnorm.tools.convert")
    model, _ = make("resnet")
    if how == "freeze_buffers":
        _fail_on_second_call(monkeypatch, _FrozenBatchNorm, "from_batchnorm")
    else:
        _fail_on_second_call(monkeypatch, convert_mod, "_to_ours")
    before = _tree(model)
    with pytest.raises(RuntimeError, match="cannot build"):
        if how == "convert":
            batchnorm.convert(model)
        else:
            batchnorm.freeze(model, buffers=how == "freeze_buffers")
    after = _tree(model)
    assert [(n, type(m)) for n, m, _ in after[0]] == [(n, type(m)) for n, m, _ in before[0]]
    assert all(a[1] is b[1] and a[2] == b[2] for a, b in zip(after[0], before[0]))
    assert after[1] == before[1]


class _MyBatchNorm(nn.BatchNorm2d):
    """A user's subclass of torch's batch norm: its forward may be its own."""


def _with_subclass():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1),
                          _MyBatchNorm(4))
    randomize(model)
    return model


@pytest.mark.parametrize("how", ["convert", "freeze", "freeze_buffers"])
def test_convert_and_freeze_leave_a_subclass_with_a_warning(how):
    model = _with_subclass()
    run = {"convert": batchnorm.convert, "freeze": batchnorm.freeze,
           "freeze_buffers": lambda m: batchnorm.freeze(m, buffers=True)}[how]
    with pytest.warns(UserWarning, match=r"'3' is a _MyBatchNorm.*subclass of torch's "
                                         r"BatchNorm2d.*left"):
        run(model)
    assert type(model[3]) is _MyBatchNorm
    assert not tools._common.is_torch_bn(model[1])  # the exact class is still converted


@FALLBACK_WARNS
@pytest.mark.parametrize("name", list(MODELS))
def test_revert_restores_structure_and_outputs(name):
    ref, x = make(name, torch.float64)
    model = batchnorm.revert(batchnorm.convert(copy.deepcopy(ref)))
    assert [type(m) for m in model.modules()] == [type(m) for m in ref.modules()]
    assert model.state_dict().keys() == ref.state_dict().keys()
    assert_same(outputs_and_grads(ref, x), outputs_and_grads(model, x))


def test_revert_layer_built_with_activation():
    model = nn.Sequential(nn.Linear(3, 4), batchnorm.BatchNorm1d(4, activation=nn.LeakyReLU(0.3)))
    x = torch.randn(6, 3)
    y = model(x)
    batchnorm.revert(model)
    assert type(model[1][0]) is nn.BatchNorm1d and model[1][1].negative_slope == 0.3
    assert_close(model(x), y)


class _ResidualBlock(nn.Module):
    def __init__(self, cls=batchnorm.BatchNorm2d):
        super().__init__()
        self.bn1, self.bn2 = cls(3, activation="relu"), cls(3)

    def forward(self, x):
        return self.bn2(self.bn1(x, residual=x))


@pytest.mark.parametrize("cls", [batchnorm.BatchNorm2d, batchnorm.SyncBatchNorm])
def test_revert_leaves_a_layer_called_with_a_residual_and_says_so(cls):
    """torch's layers take no residual: revert made the layer torch's and the model's
    next call raised TypeError, silently (its docstring said it could not)."""
    model, x = _ResidualBlock(cls), torch.randn(2, 3, 4, 4)
    model(x)
    assert model.bn1.called_with_residual and not model.bn2.called_with_residual
    with pytest.warns(UserWarning, match=r"revert: bn1 stays batchnorm's: called with a residual"):
        batchnorm.revert(model)
    assert type(model.bn1) is cls
    assert type(model.bn2) is {batchnorm.BatchNorm2d: nn.BatchNorm2d,
                               batchnorm.SyncBatchNorm: nn.SyncBatchNorm}[cls]
    assert model(x).shape == x.shape
    alone = model.bn1
    with pytest.warns(UserWarning, match="the model stays"):
        assert batchnorm.revert(alone) is alone


def test_the_residual_mark_survives_sync_conversion_and_not_a_failed_call():
    """convert_sync_batchnorm and revert_sync_batchnorm dropped the mark (revert then made
    the layer torch's, and the model's call failed); a call that raised set it."""
    model, x = _ResidualBlock(), torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="residual must have the input's shape"):
        model.bn2(x, torch.randn(2, 3))
    assert not model.bn2.called_with_residual
    model(x)
    sync = batchnorm.convert_sync_batchnorm(model)
    assert sync.bn1.called_with_residual and not sync.bn2.called_with_residual
    local = batchnorm.revert_sync_batchnorm(sync)
    assert local.bn1.called_with_residual
    with pytest.warns(UserWarning, match="bn1 stays"):
        batchnorm.revert(local)
    assert local(x).shape == x.shape


def test_revert_gives_restored_modules_the_mode_of_those_they_replace():
    model, _ = make("resnet")
    batchnorm.convert(model)
    model.eval()
    batchnorm.revert(model)
    assert isinstance(model[2], nn.ReLU)
    assert not any(m.training for m in model.modules())
    built = nn.Sequential(nn.Linear(3, 4), batchnorm.BatchNorm1d(4, activation="relu")).eval()
    batchnorm.revert(built)
    assert isinstance(built[1], nn.Sequential)
    assert not any(m.training for m in built.modules())


def test_convert_keeps_a_torch_layer_without_bias():
    """A torch layer built with ``bias=False`` becomes ours without bias: its checkpoint
    still loads strictly (convert gave it a fixed zero bias, a key torch's lacks), and
    revert gives torch's layer without bias back."""
    if not TORCH_HAS_BIAS_KWARG:
        pytest.skip("this torch's layers take no bias keyword (2.11's have none, 2.13's "
                    "have it)")
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, bias=False), nn.ReLU(),
                          nn.SyncBatchNorm(4, bias=False))
    state = copy.deepcopy(model.state_dict())
    batchnorm.convert(model)
    assert model[1].bias is None and model[3].bias is None
    assert model.state_dict().keys() == state.keys()
    model.load_state_dict(state)
    batchnorm.revert(model)
    assert type(model[1]) is nn.BatchNorm2d and model[1].bias is None
    model.load_state_dict(state)


class _KeepsBlockInEval(nn.Module):
    """A model whose train() keeps its first block in eval mode, as fine-tuning code does
    to keep a backbone's statistics fixed."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.head = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    def train(self, mode=True):
        super().train(mode)
        self.block.eval()
        return self

    def forward(self, x):
        return self.head(self.block(x))


def test_revert_finds_the_fused_batch_norm_by_identity():
    """revert puts a fused activation back after the batch norm convert took it from, by
    identity: a converted block reverted inside another model (where its batch norm has
    another name, and another layer has the first one's) or inside a wrapper."""
    block = batchnorm.convert(nn.Sequential(nn.BatchNorm2d(4), nn.SiLU()))
    outer = nn.Sequential(batchnorm.BatchNorm2d(4, activation="silu"), block).eval()
    randomize(outer)
    x = torch.randn(2, 4, 3, 3)
    y = outer(x)
    batchnorm.revert(outer)
    assert type(outer[0]) is nn.Sequential and type(outer[1][1]) is nn.SiLU
    assert_close(outer(x), y)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
    keys = backbone.state_dict().keys()
    batchnorm.convert(backbone)
    batchnorm.revert(nn.Sequential(backbone))
    assert type(backbone[1]) is nn.BatchNorm2d and type(backbone[2]) is nn.ReLU
    assert backbone.state_dict().keys() == keys
    batchnorm.convert(backbone)
    del backbone[2].__dict__["bn"]  # as pickled before it kept its batch norm: by name
    batchnorm.revert(backbone)
    assert type(backbone[1]) is nn.BatchNorm2d and type(backbone[2]) is nn.ReLU


def _plus_one(module, args, output):
    return output + 1


def _times_two_pre(module, args):
    return (args[0] * 2,)


def test_convert_and_revert_keep_hooks_and_fuse_no_hooked_module():
    """Hooks move with the layer convert replaces (their handles still remove them), and
    an activation with hooks, or after a batch norm with hooks, is not fused: its hooks
    would no longer run, or see the activation's output."""
    model = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4), nn.Tanh()).eval()
    randomize(model)
    model[1].register_forward_hook(_plus_one)
    pre = model[2].register_forward_pre_hook(_times_two_pre)
    x = torch.randn(2, 4, 3, 3)
    y = model(x)
    batchnorm.convert(model)
    assert type(model[1]) is nn.ReLU and type(model[3]) is nn.Tanh  # neither fused
    assert tools._common.is_our_bn(model[2])
    assert_close(model(x), y)
    batchnorm.revert(model)
    assert type(model[2]) is nn.BatchNorm2d
    assert_close(model(x), y)
    pre.remove()
    assert not model[2]._forward_pre_hooks


def test_convert_and_freeze_leave_a_parametrized_layer_with_a_warning():
    """A parametrization computes the layer's weight (its class is a subclass torch makes):
    ours would take the weight as it is now, so the layer stays, with a warning."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    nn.utils.parametrize.register_parametrization(model[1], "weight", _Absolute())
    for run in (batchnorm.convert, batchnorm.freeze):
        with pytest.warns(UserWarning, match=r"'1' is a BatchNorm2d whose weight a "
                                             r"parametrization computes"):
            run(model)
        assert nn.utils.parametrize.is_parametrized(model[1], "weight")


class _Absolute(nn.Module):
    def forward(self, w):
        return w.abs()


def test_convert_warns_about_a_torch_lazy_layer_without_input():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d())
    with pytest.warns(UserWarning, match=r"'1' is torch's LazyBatchNorm2d and has not seen "
                                         r"input yet"):
        batchnorm.convert(model)
    assert type(model[1]) is nn.LazyBatchNorm2d


def test_fused_activation_reads_the_originals_settings():
    """A forward may read its activation's settings; after convert the placeholder left in
    its place answers for the original (the batch norm applies that slope now)."""
    class ScalesBySlope(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.act = nn.BatchNorm2d(4), nn.LeakyReLU(0.2)

        def forward(self, x):
            return self.act(self.bn(x)) * self.act.negative_slope

    model = ScalesBySlope()
    x = torch.randn(2, 4, 3, 3)
    expected = model(x)
    batchnorm.convert(model)
    assert isinstance(model.act, FusedActivation)
    assert model.act.negative_slope == 0.2 and model.act.inplace is False
    assert_close(model(x), expected)
    assert not hasattr(model.act, "_private_of_the_original")
    with pytest.raises(AttributeError, match="FusedActivation.*no attribute 'slope'"):
        _ = model.act.slope


# ---------------------------------------------------------------------------------------
# fold


@FALLBACK_WARNS
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("ours", [False, True], ids=["torch", "ours"])
def test_fold_equals_eval_model(name, ours):
    model, x = make(name)
    if ours:
        batchnorm.convert(model)
    model.eval()
    before = copy.deepcopy(model.state_dict())
    folded, report = batchnorm.fold(model)
    assert not bns(folded)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    for k, v in model.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k])
    expected_folded = {"resnet": 6, "mlp": 2, "block3d": 2, "untraceable": 1}[name]
    assert len(report.folded) == expected_folded, str(report)
    assert report.method == ("sequential" if name == "untraceable" else "fx")
    if name == "untraceable":
        assert report.scale_shift == ["bn"]  # nothing before it: a per-channel scale-shift


@pytest.mark.parametrize("layer", [
    nn.Conv2d(6, 4, 3, groups=2), nn.ConvTranspose2d(6, 4, 3, groups=2, bias=False),
    nn.ConvTranspose1d(3, 6, 2, groups=3), nn.Linear(5, 4)], ids=str)
def test_fold_layer_kinds(layer):
    cout = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    bn_cls = {nn.Linear: nn.BatchNorm1d,
              nn.ConvTranspose1d: nn.BatchNorm1d}.get(type(layer), nn.BatchNorm2d)
    model = nn.Sequential(layer, bn_cls(cout)).eval()
    randomize(model)
    shape = {nn.Linear: (3, 5), nn.ConvTranspose1d: (2, 3, 7)}.get(type(layer), (2, 6, 7, 7))
    x = torch.randn(shape)
    folded, report = batchnorm.fold(model)
    assert report.folded == [("1", "0")]
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_fold_keeps_residual_and_activation():
    model = tools.small_resnet(channels=4, blocks=1).eval()
    randomize(model)
    x = torch.randn(2, 3, 6, 6)
    folded, report = batchnorm.fold(model)
    assert len(report.folded) == 3 and isinstance(folded[2].bn2, ChannelAffine)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_fold_refuses_training_mode():
    model, _ = make("resnet")
    with pytest.raises(RuntimeError, match="model.eval"):
        batchnorm.fold(model)
    model.eval()
    model[1].train()
    with pytest.raises(RuntimeError, match="'1' is in training mode"):
        batchnorm.fold(model)
    batchnorm.freeze(model)  # frozen: uses running statistics in train() too
    batchnorm.fold(model)


def test_fold_skips_layers_without_running_stats_and_handles_root():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, track_running_stats=False)).eval()
    _folded, report = batchnorm.fold(model)
    assert report.skipped[0][0] == "1" and not report.folded
    bn = batchnorm.BatchNorm2d(3, activation="relu").eval()
    randomize(nn.Sequential(bn))
    x = torch.randn(2, 3, 4, 4)
    affine, _ = batchnorm.fold(bn)
    assert isinstance(affine, ChannelAffine)
    torch.testing.assert_close(affine(x), bn(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("data,stats", [(torch.bfloat16, torch.float32),
                                         (torch.float32, torch.float64)], ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_fold_scale_shift_keeps_the_input_dtype(data, stats, residual, gen):
    """A batch norm left as a scale-and-shift returns the input's dtype, as the batch
    norm did (a float32 scale on bfloat16 data must not promote the output: the next
    layer, in bfloat16, would refuse it), with the same values."""
    bn = batchnorm.BatchNorm2d(4, activation="relu", dtype=stats)
    model = nn.Sequential(nn.Identity(), bn, nn.Conv2d(4, 4, 1).to(data)).eval()
    randomize(model)
    x = torch.randn(2, 4, 3, 3, generator=gen).to(data)
    r = torch.randn(2, 4, 3, 3, generator=gen).to(data) if residual else None
    folded, report = batchnorm.fold(model)
    assert report.scale_shift == ["1"]
    with torch.no_grad():
        got, want = folded[1](x, r), model[1](x, r)
        assert got.dtype == want.dtype == data
        tol = {"rtol": 1e-5, "atol": 1e-5} if data == torch.float32 else {}
        torch.testing.assert_close(got, want, **tol)
        torch.testing.assert_close(folded(x), model(x), **tol)


def _output_doubling_hook(module, args, output):
    return output * 2


def test_fold_leaves_a_batch_norm_with_hooks_alone(gen):
    """A batch norm with hooks is neither folded nor made a scale-and-shift: neither would
    run them. The report says so."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    randomize(model)
    model[1].register_forward_pre_hook(_times_two_pre)
    x = torch.randn(2, 3, 6, 6, generator=gen)
    folded, report = batchnorm.fold(model)
    assert report.skipped == [("1", "it has hooks, which a folded layer would not run")]
    assert not report.folded and type(folded[1]) is nn.BatchNorm2d
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    root, report = batchnorm.fold(model[1])
    assert type(root) is nn.BatchNorm2d and report.skipped[0][0] == ""


@pytest.mark.parametrize("hooked", ["spectral_norm", "forward_hook"])
def test_fold_leaves_layers_with_hooks_alone(hooked, gen):
    """A layer whose weight a hook recomputes (``nn.utils.spectral_norm``: the parameter
    is ``weight_orig``) or whose output a hook changes is not folded into: rewriting its
    weight would be undone or doubled. The batch norm becomes a scale-and-shift."""
    conv = nn.Conv2d(3, 4, 3)
    if hooked == "spectral_norm":
        conv = nn.utils.spectral_norm(conv)
    else:
        conv.register_forward_hook(_output_doubling_hook)
    model = nn.Sequential(conv, nn.BatchNorm2d(4)).eval()
    randomize(model)
    x = torch.randn(2, 3, 6, 6, generator=gen)
    folded, report = batchnorm.fold(model)
    assert report.folded == [] and report.scale_shift == ["1"]
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_fold_names_the_fix_when_the_model_cannot_be_copied():
    with pytest.warns(FutureWarning):  # the hook-based weight_norm is deprecated
        conv = nn.utils.weight_norm(nn.Conv2d(3, 4, 3))
    model = nn.Sequential(conv, nn.BatchNorm2d(4)).eval()
    with pytest.raises(RuntimeError, match="parametrizations.weight_norm"):
        batchnorm.fold(model)


class _OwnResidual(nn.Module):
    """The convolution's output is the batch norm's input *and* its residual: one user
    node, two uses."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = batchnorm.BatchNorm2d(3, activation="relu")

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y, residual=y)


def test_fold_counts_every_use_of_the_layer_output():
    model = _OwnResidual().eval()
    randomize(model)
    x = torch.randn(2, 3, 4, 4)
    folded, report = batchnorm.fold(model)
    assert report.folded == [] and report.scale_shift == ["bn"]
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_uses_counts_occurrences_not_user_nodes():
    graph = tools._common.trace(_OwnResidual())
    conv = next(n for n in graph.nodes if n.target == "conv")
    assert len(conv.users) == 1 and tools._common.uses(conv) == 2


class _TiedWeight(nn.Module):
    """forward reads the Linear's weight directly, besides calling the Linear."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.fc(x)) + torch.nn.functional.linear(x, self.fc.weight, self.fc.bias)


def test_fold_leaves_a_layer_whose_weight_is_read_elsewhere():
    model = _TiedWeight().eval()
    randomize(model)
    x = torch.randn(3, 4)
    folded, report = batchnorm.fold(model)
    assert report.folded == [] and report.scale_shift == ["bn"]
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


class _Branchy(nn.Module):
    """Wraps a model in control flow on a value, so that fold falls back to nn.Sequential."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(x if x.sum() > 0 else -x)


@pytest.mark.parametrize("traced", [True, False], ids=["fx", "sequential"])
@pytest.mark.parametrize("shared", ["weight", "bias"])
def test_fold_leaves_a_layer_whose_parameters_another_layer_shares(traced, shared):
    body = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4))
    setattr(body[2], shared, getattr(body[0], shared))
    model = (body if traced else _Branchy(body)).eval()
    randomize(model)
    x = torch.randn(3, 4)
    folded, report = batchnorm.fold(model)
    assert report.method == ("fx" if traced else "sequential")
    assert report.folded == [] and len(report.scale_shift) == 1
    fbody = folded if traced else folded.body
    assert getattr(fbody[0], shared) is getattr(fbody[2], shared)  # still one parameter
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bn_cls", [nn.BatchNorm1d, batchnorm.BatchNorm1d, nn.SyncBatchNorm,
                                    batchnorm.SyncBatchNorm])
def test_fold_linear_refuses_input_of_another_rank(bn_cls):
    # On (N, L, C) the batch norm normalizes dim 1 = L, which a fold into the Linear's C
    # outputs cannot express; with L == C nothing else would fail.
    model = nn.Sequential(nn.Linear(4, 4), bn_cls(4)).eval()
    randomize(model)
    folded, report = batchnorm.fold(model)
    assert report.folded == [("1", "0")]
    x = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
        model(torch.randn(2, 4, 4))  # the original takes it (normalizing L)
        with pytest.raises(ValueError, match=r"folded into the Linear.*\(N, C\).*3D"):
            folded(torch.randn(2, 4, 4))


_CONV_DIMS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3, nn.ConvTranspose1d: 1,
              nn.ConvTranspose2d: 2}


@pytest.mark.parametrize("conv_cls, bn_cls", [
    (nn.Conv1d, nn.BatchNorm1d), (nn.Conv1d, batchnorm.BatchNorm1d),
    (nn.Conv2d, nn.BatchNorm2d), (nn.Conv3d, batchnorm.BatchNorm3d),
    (nn.ConvTranspose1d, nn.BatchNorm1d), (nn.ConvTranspose2d, batchnorm.BatchNorm2d),
    (nn.Conv2d, nn.SyncBatchNorm), (nn.Conv1d, batchnorm.SyncBatchNorm)])
def test_fold_into_a_conv_refuses_unbatched_input(conv_cls, bn_cls):
    """A folded convolution takes unbatched (C, *spatial) input, and scales its C. The batch
    norm after it refused that input (BatchNorm2d/3d), or normalized dim 1, not C
    (BatchNorm1d on a Conv1d's (C, L), SyncBatchNorm on any): the ChannelAffine left in its
    place refuses it, rather than disagree with the original model."""
    d = _CONV_DIMS[conv_cls]
    model = nn.Sequential(conv_cls(3, 3, 1), bn_cls(3)).eval()
    randomize(model)
    folded, report = batchnorm.fold(model)
    assert report.folded == [("1", "0")]
    assert f"{d + 2}D input" in repr(folded[1])
    x, unbatched = torch.randn(2, 3, *[3] * d), torch.randn(3, *[3] * d)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
        try:
            original = model(unbatched)  # dim 1 normalized: not what the fold computes
        except ValueError:
            original = None  # refused
        if original is not None:
            assert not torch.allclose(original, folded[0](unbatched))
        with pytest.raises(ValueError, match=rf"ChannelAffine: .* took {d + 2}D input, got "
                                             rf"{d + 1}D input of shape"):
            folded(unbatched)


@pytest.mark.parametrize("bn_cls, good, bad", [
    (nn.BatchNorm2d, [4], [3, 5]), (batchnorm.BatchNorm1d, [2, 3], [1, 4]),
    (nn.BatchNorm3d, [5], [4]), (nn.SyncBatchNorm, [2, 3, 5], [1])])
def test_scale_shift_takes_the_ranks_its_batch_norm_took(bn_cls, good, bad):
    """A batch norm not folded (after a ReLU, or alone) becomes a scale-and-shift that takes
    the input ranks the batch norm took: on a (4, 4, 4) image the BatchNorm2d raised, and a
    scale-and-shift of dim 1 would silently scale H."""
    for model in (nn.Sequential(nn.ReLU(), bn_cls(4)).eval(), bn_cls(4).eval()):
        randomize(model)
        folded, report = batchnorm.fold(model)
        affine = folded[1] if isinstance(folded, nn.Sequential) else folded
        assert isinstance(affine, ChannelAffine) and report.scale_shift
        with torch.no_grad():
            for rank in good:
                x = torch.randn(*[4] * rank)
                torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
            for rank in bad:
                x = torch.randn(*[4] * rank)
                with pytest.raises(ValueError):
                    model(x)
                with pytest.raises(ValueError, match=rf"ChannelAffine: .*, got {rank}D input"):
                    folded(x)


class _ReadsRunningMean(nn.Module):
    def __init__(self, attribute):
        super().__init__()
        self.conv, self.bn, self.attribute = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), attribute

    def forward(self, x):
        return self.bn(self.conv(x)) - getattr(self.bn, self.attribute).view(1, -1, 1, 1)


@pytest.mark.parametrize("attribute", ["running_mean", "running_var", "weight", "bias"])
def test_fold_leaves_a_batch_norm_whose_tensors_a_forward_reads(attribute):
    """A forward that reads the batch norm's parameters or buffers itself needs the batch
    norm as it is: folded, it became a ChannelAffine without them (AttributeError)."""
    model = _ReadsRunningMean(attribute).eval()
    randomize(model)
    x = torch.randn(2, 3, 5, 5)
    folded, report = batchnorm.fold(model)
    assert not report.folded and not report.scale_shift
    assert report.skipped == [("bn", ("a forward reads its parameters or buffers itself "
                               "(self.bn.running_mean, say), which a folded layer no longer "
                               "has"))]
    assert type(folded.bn) is nn.BatchNorm2d
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_channel_affine_keeps_num_features():
    """A forward may check its input against ``self.bn.num_features``: the model below does
    not trace (the check reads a shape), so its batch norm becomes a scale-and-shift."""
    class Checks(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            if y.shape[1] != self.bn.num_features:
                raise ValueError("channels")
            return self.bn(y)

    model = Checks().eval()
    randomize(model)
    x = torch.randn(2, 3, 5, 5)
    folded, report = batchnorm.fold(model)
    assert report.method == "sequential" and report.scale_shift == ["bn"]
    assert isinstance(folded.bn, ChannelAffine) and folded.bn.num_features == 4
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    folded, _ = batchnorm.fold(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval())
    assert folded[1].num_features == 4  # folded into the conv: no scale to read it from


class _CachesOnSelf(nn.Module):
    """A forward with side effects on its module: a cached output and a call counter."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU()
        self.features, self.calls = None, 0

    def forward(self, x):
        self.calls += 1
        y = self.act(self.bn(self.conv(x)))
        self.features = y
        return y


@pytest.mark.parametrize("tool", ["convert", "fold"])
def test_tracing_leaves_what_a_forward_assigns_to_its_module(tool):
    """Tracing runs each forward on fx placeholders: a forward's ``self.features = y`` kept
    a Proxy (torch.save then failed: it cannot be pickled), and ``self.calls += 1`` counted
    the traces. The model (convert) and the copy fold returns keep their attributes."""
    model = _CachesOnSelf().eval()
    randomize(model)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        expected = model(x)
    cached = model.features
    if tool == "convert":
        result = batchnorm.convert(model)
        assert result is model
    else:
        result, report = batchnorm.fold(model)
        assert report.method == "fx" and report.folded
    assert result.calls == 1 and torch.equal(result.features, cached)
    assert model.calls == 1 and model.features is cached
    torch.save(result, io.BytesIO())
    with torch.no_grad():
        torch.testing.assert_close(result(x), expected, rtol=1e-5, atol=1e-5)


class _UpdatesBuffers(nn.Module):
    """A forward that moves buffers of its own: in place, and by assignment."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU()
        self.register_buffer("ema", torch.zeros(4))
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, x):
        y = self.act(self.bn(self.conv(x)))
        self.ema.mul_(0.9).add_(y.detach().mean((0, 2, 3)), alpha=0.1)
        self.steps += 1
        return y


@pytest.mark.parametrize("tool", ["convert", "fold"])
def test_tracing_moves_no_buffer(tool):
    """The traces ran a forward's in-place updates on the real buffers (convert moved the
    user's ema and counted 2 steps): buffers are placeholders in the trace now."""
    model = _UpdatesBuffers().eval()
    if tool == "convert":
        result = batchnorm.convert(model)
        assert isinstance(result.act, FusedActivation)
    else:
        result, report = batchnorm.fold(model)
        assert report.folded == [("bn", "conv")]
    for m in {id(model): model, id(result): result}.values():
        assert torch.equal(m.ema, torch.zeros(4)) and m.steps.item() == 0


def test_fold_warns_about_the_batch_norms_it_leaves_unseen():
    """A subclass of torch's batch norm (its forward may differ) is left as it is, as
    convert and freeze leave it, and said so: fold's report does not list it."""
    class MyBN(nn.BatchNorm2d):
        pass

    model = nn.Sequential(nn.Conv2d(3, 4, 1), MyBN(4)).eval()
    with pytest.warns(UserWarning, match=r"fold: '1' is a MyBN, a subclass of torch's "
                                         r"BatchNorm2d.*It is not folded and runs as it is"):
        folded, report = batchnorm.fold(model)
    assert type(folded[1]) is MyBN and not report.folded


# ---------------------------------------------------------------------------------------
# freeze


@pytest.mark.parametrize("name", ["resnet", "mlp", "block3d"])
def test_freeze_uses_and_keeps_running_stats_in_train(name):
    model, x = make(name, torch.float64)
    expected = outputs_and_grads(copy.deepcopy(model).eval(), x)
    batchnorm.freeze(model)
    model.train()
    stats = copy.deepcopy({k: v for k, v in model.state_dict().items()
                           if "running" in k or "num_batches" in k})
    assert_same(expected, outputs_and_grads(model, x))
    for k, v in stats.items():
        assert torch.equal(model.state_dict()[k], v), k
    batchnorm.unfreeze(model)
    y = model(x)
    assert not torch.allclose(y, expected[0])  # batch statistics again


def test_freeze_affine_and_unfreeze():
    model, _x = make("mlp")
    model[1].bias.requires_grad_(False)  # the user's own choice stays after unfreeze
    batchnorm.freeze(model, affine=True)
    assert all(not p.requires_grad for m in bns(model) for p in m.parameters())
    assert model[0].weight.requires_grad
    batchnorm.unfreeze(model)
    assert model[1].weight.requires_grad and not model[1].bias.requires_grad
    assert model[4].weight.requires_grad and model[4].bias.requires_grad
    assert not any(m.frozen for m in bns(model))


@pytest.mark.parametrize("second", [{"affine": True}, {}], ids=["affine", "plain"])
def test_freeze_twice_then_unfreeze_gives_back_requires_grad(second):
    model, _x = make("mlp")
    model[4].bias.requires_grad_(False)  # the user's, before any freeze: stays off
    batchnorm.freeze(model, affine=True)
    batchnorm.freeze(model, **second)
    batchnorm.unfreeze(model)
    assert model[1].weight.requires_grad and model[1].bias.requires_grad
    assert model[4].weight.requires_grad and not model[4].bias.requires_grad


def test_frozen_state_dict_round_trip_and_strict_loading_both_ways():
    model, _ = make("resnet")
    torch_sd = model.state_dict()
    batchnorm.freeze(model)
    sd = model.state_dict()
    assert sd.keys() == torch_sd.keys()  # the flag is metadata, not a key
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = batchnorm.convert(make("resnet")[0], fuse_activations=False)
    fresh.load_state_dict(torch.load(buf), strict=True)
    assert all(m.frozen for m in bns(fresh))
    resnet().load_state_dict(sd, strict=True)  # into torch's layers
    fresh.load_state_dict(torch_sd, strict=True)  # torch's into ours: frozen left as it was
    assert all(m.frozen for m in bns(fresh))
    batchnorm.unfreeze(model)
    fresh.load_state_dict(model.state_dict())  # an unfrozen state_dict freezes nothing...
    assert all(m.frozen for m in bns(fresh))  # ... and unfreezes nothing either
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    assert all(m.frozen for m in bns(fresh))


def test_frozen_state_dict_into_a_layer_without_running_statistics():
    src = batchnorm.BatchNorm2d(3)
    batchnorm.freeze(src)
    sd = src.state_dict()
    plain = batchnorm.BatchNorm2d(3, track_running_stats=False)
    result = plain.load_state_dict(sd, strict=False)  # as the stats' keys: unexpected
    assert sorted(result.unexpected_keys) == ["num_batches_tracked", "running_mean", "running_var"]
    assert not plain.frozen
    with pytest.raises(RuntimeError, match="Unexpected key"):  # strict: torch's error
        plain.load_state_dict(sd)
    assert not plain.frozen


def test_frozen_errors_and_repr():
    bn = batchnorm.BatchNorm2d(3, track_running_stats=False)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        bn.frozen = True
    with pytest.warns(UserWarning, match="no running statistics"):
        batchnorm.freeze(nn.Sequential(bn))
    bn = batchnorm.BatchNorm2d(3)
    bn.frozen = True
    assert "frozen=True" in repr(bn)


@pytest.mark.parametrize("cls,shape", [(batchnorm.FrozenBatchNorm1d, (4, 5)),
                                       (batchnorm.FrozenBatchNorm2d, (2, 5, 3, 3)),
                                       (batchnorm.FrozenBatchNorm3d, (2, 5, 2, 3, 3))])
def test_frozen_batchnorm_modules(cls, shape):
    torch_cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[len(shape) - 2 or 1]
    bn = torch_cls(5)
    randomize(nn.Sequential(bn))
    bn.eval()
    frozen = cls(5, activation="relu")
    frozen.load_state_dict(bn.state_dict(), strict=True)  # num_batches_tracked ignored
    assert not list(frozen.parameters())
    assert sorted(dict(frozen.named_buffers())) == ["bias", "running_mean", "running_var", "weight"]
    x = torch.randn(shape, requires_grad=True)
    frozen.train()
    y = frozen(x)
    assert_close(y, torch.relu(bn(x)))
    y.sum().backward()
    assert x.grad is not None
    with pytest.raises(ValueError, match="expected"):
        frozen(torch.randn(5))


@pytest.mark.parametrize("args,exc,match", [
    ((0,), ValueError, "num_features"), ((-2,), ValueError, "num_features"),
    ((2.5,), TypeError, "num_features"), ((3, -1.0), ValueError, "eps"),
    ((3, "a"), TypeError, "eps")])
def test_frozen_batch_norm_checks_its_arguments(args, exc, match):
    """As our BatchNorm2d: ValueError (a wrong value) or TypeError (a wrong type) at
    construction, not a failure at the first call."""
    with pytest.raises(exc, match=match):
        batchnorm.FrozenBatchNorm2d(*args)


TOOLS = ["convert", "revert", "fold", "freeze", "unfreeze", "recalibrate",
         "convert_sync_batchnorm", "revert_sync_batchnorm"]


def _call_tool(tool, model):
    call = getattr(batchnorm, tool)
    return call(model, [torch.randn(4, 3, 2, 2)]) if tool == "recalibrate" else call(model)


@pytest.mark.parametrize("tool", TOOLS)
def test_tools_say_when_they_are_given_no_module(tool):
    with pytest.raises(TypeError, match=rf"{tool}\(\) takes a torch.nn.Module.*got str"):
        _call_tool(tool, "model")


@pytest.mark.parametrize("tool", TOOLS)
def test_tools_refuse_a_torchscript_module(tool):
    """A scripted model's layers are compiled code: the tools returned it unchanged
    without a word (freeze left its statistics moving, fold reported nothing folded)."""
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)))
    state = {k: v.clone() for k, v in scripted.state_dict().items()}
    with pytest.raises(TypeError, match=rf"{tool}\(\) cannot change a TorchScript module.*"
                                        r"before torch.jit.script"):
        _call_tool(tool, scripted)
    for k, v in scripted.state_dict().items():
        assert torch.equal(v, state[k]), k


def _with_compiled_layer(kind: str) -> nn.Module:
    """A model whose submodule '1' is compiled code holding a layer ('1.1'): torch's batch
    norm scripted ("torch"), ours or our SyncBatchNorm traced ("ours", "sync"), or
    torch's InstanceNorm with running statistics scripted ("instance")."""
    layer = {"torch": lambda: nn.BatchNorm2d(3), "ours": lambda: batchnorm.BatchNorm2d(3),
             "sync": lambda: batchnorm.SyncBatchNorm(3).eval(),
             "instance": lambda: nn.InstanceNorm2d(3, track_running_stats=True)}[kind]()
    inner = nn.Sequential(nn.Conv2d(3, 3, 1), layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the tracer's warnings about our Python)
        compiled = (torch.jit.trace(inner, torch.randn(4, 3, 2, 2)) if kind in ("ours", "sync")
                    else torch.jit.script(inner))
    return nn.Sequential(nn.Conv2d(3, 3, 1), compiled, nn.BatchNorm2d(3))


# The compiled layers each tool would change: ours for revert and unfreeze, SyncBatchNorm
# for revert_sync_batchnorm, torch's for the others.
_COMPILED_KIND = {"revert": "ours", "unfreeze": "ours", "revert_sync_batchnorm": "sync"}


@pytest.mark.parametrize("tool", TOOLS)
def test_tools_warn_about_a_torchscript_submodule_holding_batch_norms(tool):
    """A scripted or traced submodule's layers are compiled code that the tools cannot
    change: they passed it over without a word (freeze left its statistics moving)."""
    model = _with_compiled_layer(_COMPILED_KIND.get(tool, "torch"))
    if tool == "fold":
        model.eval()
    with pytest.warns(UserWarning, match=rf"{tool}: '1' is a TorchScript module "
                                         rf".*holding batch norms \('1.1'\).*before "
                                         rf"torch.jit.script"):
        _call_tool(tool, model)


@pytest.mark.parametrize(("tool", "kind"), [(tool, "instance") for tool in TOOLS]
                         + [(tool, "torch") for tool in _COMPILED_KIND])
def test_tools_say_nothing_of_compiled_layers_they_would_not_change(tool, kind):
    """No tool changes an InstanceNorm (it has running statistics too), and revert,
    unfreeze and revert_sync_batchnorm none of torch's batch norms."""
    model = _with_compiled_layer(kind)
    if tool == "fold":
        model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _call_tool(tool, model)


def test_recalibrate_puts_back_a_torchscript_submodule_s_statistics():
    """recalibrate cannot recompute a compiled layer's statistics, and its train() let
    them move with each batch; they are put back, as an InstanceNorm's are."""
    model = _with_compiled_layer("torch")
    inner = dict(model.named_modules())["1.1"]
    before = [b.clone() for b in inner.buffers()]
    with pytest.warns(UserWarning, match="recalibrate: '1' is a TorchScript module"):
        seen = batchnorm.recalibrate(model, [torch.randn(4, 3, 2, 2)] * 2, progress=False)
    assert seen == {"2": 32}
    for b, saved in zip(inner.buffers(), before, strict=True):
        assert torch.equal(b, saved)
    assert model[2].num_batches_tracked == 2


class _Average(nn.Module):
    """A hand-written running average whose forward assigns new tensors to its buffers."""

    def __init__(self):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(3))
        self.register_buffer("running_var", torch.ones(3))

    def forward(self, x):
        if self.training:
            self.running_mean = 0.9 * self.running_mean + 0.1 * x.mean((0, 2, 3))
            self.running_var = 0.9 * self.running_var + 0.1 * x.var((0, 2, 3))
        return x


def test_recalibrate_puts_back_compiled_statistics_that_a_forward_replaced():
    """They were put back into the tensors saved, which the forward had replaced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch.jit.script is deprecated)
        average = torch.jit.script(_Average())
    model = nn.Sequential(nn.Conv2d(3, 3, 1), average, nn.BatchNorm2d(3))
    batchnorm.recalibrate(model, [torch.randn(4, 3, 2, 2) + 5] * 2, progress=False)
    assert torch.equal(average.running_mean, torch.zeros(3))
    assert torch.equal(average.running_var, torch.ones(3))


def test_freeze_into_buffers():
    model, x = make("resnet")
    model.eval()
    expected = model(x)
    batchnorm.freeze(model, buffers=True)
    assert all(isinstance(m, _FrozenBatchNorm) for m in bns(model))
    model.train()
    assert_close(model(x), expected)


def test_freeze_into_buffers_keeps_a_converted_sync_layers_rank():
    """A SyncBatchNorm made from a BatchNorm1d became FrozenBatchNorm2d, which refused the
    (N, C) input the model had run on; its rank is its origin's, as revert gives back."""
    model = batchnorm.convert_sync_batchnorm(nn.Sequential(nn.Linear(3, 4),
                                                           nn.BatchNorm1d(4))).eval()
    randomize(model)
    x = torch.randn(5, 3)
    expected = model(x)
    batchnorm.freeze(model, buffers=True)
    assert type(model[1]).__name__ == "FrozenBatchNorm1d"
    assert_close(model(x), expected)


@pytest.mark.parametrize("sync_cls", [nn.SyncBatchNorm, batchnorm.SyncBatchNorm])
def test_freeze_into_buffers_keeps_a_sync_layers_ranks(sync_cls):
    """A SyncBatchNorm built as one takes every rank of 2 or more; frozen into buffers it
    became a FrozenBatchNorm2d, which refused the 3D and 5D input it had run on."""
    model = nn.Sequential(sync_cls(4)).eval()
    randomize(model)
    inputs = [torch.randn(3, 4), torch.randn(3, 4, 5), torch.randn(2, 4, 3, 3),
              torch.randn(2, 4, 2, 3, 3)]
    expected = [model(x) for x in inputs]
    batchnorm.freeze(model, buffers=True)
    assert type(model[0]) is batchnorm.FrozenBatchNormNd
    model.train()
    for x, want in zip(inputs, expected):
        assert_close(model(x), want)
    with pytest.raises(ValueError, match=r"FrozenBatchNormNd expected at least 2D input"):
        model(torch.randn(4))
    folded, report = batchnorm.fold(model.eval())  # a scale-and-shift of any rank too
    assert report.scale_shift == ["0"]
    for x, want in zip(inputs, expected):
        assert_close(folded(x), want)


# ---------------------------------------------------------------------------------------
# recalibrate


def _population_stats(model, batches):
    """Oracle: every BN input of every batch (model in train mode), concatenated."""
    seen = {}
    probe = copy.deepcopy(model).train()

    def keep(name):
        def hook(module, args, kwargs):
            x = (args[0] if args else kwargs["input"]).detach()
            seen.setdefault(name, []).append(x.transpose(0, 1).reshape(x.shape[1], -1))
        return hook

    hooks = [m.register_forward_pre_hook(keep(n), with_kwargs=True)
             for n, m in probe.named_modules()
             if tools._common.is_any_bn(m) or isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for b in batches:
            probe(b[0])
    for h in hooks:
        h.remove()
    return {n: (torch.cat(v, 1).mean(1), torch.cat(v, 1).var(1), torch.cat(v, 1).shape[1])
            for n, v in seen.items()}


@pytest.mark.parametrize("name", ["resnet", "mlp", "block3d"])
@pytest.mark.parametrize("ours", [False, True], ids=["torch", "ours"])
def test_recalibrate_gives_population_statistics(name, ours):
    model, x = make(name, torch.float64)
    if ours:
        batchnorm.convert(model)
    model.eval()
    gen = torch.Generator().manual_seed(3)
    # Batches of different sizes, with a shift: an EMA would weight the last ones most.
    batches = [(torch.randn((n, *x.shape[1:]), generator=gen, dtype=torch.float64) + i, None)
               for i, n in enumerate([2, 5, 3, 4, 6])]
    expected = _population_stats(model, batches)
    seen = batchnorm.recalibrate(model, batches, progress=False)
    assert not model.training and all(not m.training for m in model.modules())
    for n, m in model.named_modules():
        if n in expected:
            torch.testing.assert_close(m.running_mean, expected[n][0], rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(m.running_var, expected[n][1], rtol=1e-10, atol=1e-10)
            assert seen[n] == expected[n][2]


def test_recalibrate_restores_modes_limits_batches_and_skips_frozen(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # the plain progress lines
    model, _x = make("mlp")
    model[2].eval()
    batchnorm.convert(model)
    assert not model[2].training  # FusedActivation keeps the replaced module's mode
    model.train()
    model[3].eval()  # a mixed state is restored exactly
    model[4].frozen = True
    before = model[4].running_mean.clone()
    calls = []

    def forward(m, batch):
        calls.append(batch.shape[0])
        return m(batch)

    batches = [torch.randn(4, 6) for _ in range(5)]
    seen = batchnorm.recalibrate(model, batches, num_batches=3, forward=forward)
    assert calls == [4, 4, 4] and list(seen) == ["1"] and seen["1"] == 12
    assert model.training and not model[3].training and model[4].training
    assert torch.equal(model[4].running_mean, before)
    err = capsys.readouterr().err
    assert "recalibrate: 3/3 batches" in err and "recalibrate: done, 3 batches" in err
    with pytest.raises(ValueError, match="no batches"):
        batchnorm.recalibrate(model, [], progress=False)


def _bn_state(model):
    """Every batch norm's running statistics, momentum and training flag, copied."""
    return {n: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(),
                m.momentum, m.training)
            for n, m in model.named_modules() if getattr(m, "running_mean", None) is not None}


def _assert_same_bn_state(model, before):
    after = _bn_state(model)
    assert after.keys() == before.keys()
    for n, (mean, var, tracked, momentum, training) in before.items():
        a_mean, a_var, a_tracked, a_momentum, a_training = after[n]
        assert torch.equal(a_mean, mean) and torch.equal(a_var, var), n
        assert torch.equal(a_tracked, tracked), n
        assert (a_momentum, a_training) == (momentum, training), n


@pytest.mark.parametrize("ours", [False, True], ids=["torch", "ours"])
@pytest.mark.parametrize("where", ["loader", "forward"])
def test_recalibrate_failure_leaves_statistics_as_they_were(ours, where):
    model, x = make("mlp")
    if ours:
        batchnorm.convert(model)
    model.eval()
    model[4].momentum = None
    before = _bn_state(model)

    def batches():
        yield x
        yield x + 1
        if where == "loader":
            raise OSError("disk")
        yield x[:, :2]  # the first Linear fails on it

    with pytest.raises(OSError if where == "loader" else RuntimeError):
        batchnorm.recalibrate(model, batches(), progress=False)
    _assert_same_bn_state(model, before)
    assert not model.training


class _KeywordInput(nn.Module):
    def __init__(self, bn):
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.bn = bn

    def forward(self, x):
        return self.bn(input=self.fc(x))


@pytest.mark.parametrize("bn", [nn.BatchNorm1d(4), batchnorm.BatchNorm1d(4)],
                         ids=["torch", "ours"])
def test_recalibrate_batch_norm_called_with_keyword_input(bn):
    model = _KeywordInput(bn)
    batches = [(torch.randn(5, 6, dtype=torch.float32), None) for _ in range(3)]
    expected = _population_stats(model, batches)
    seen = batchnorm.recalibrate(model, batches, progress=False)
    assert seen == {"bn": 15}
    torch.testing.assert_close(model.bn.running_mean, expected["bn"][0])
    torch.testing.assert_close(model.bn.running_var, expected["bn"][1])


def test_recalibrate_includes_subclasses_of_torch_batch_norm():
    model = _with_subclass().eval()
    batches = [(torch.randn(n, 3, 6, 6) + 1, None) for n in (3, 5)]
    expected = _population_stats(model, batches)
    seen = batchnorm.recalibrate(model, batches, progress=False)
    assert set(seen) == {"1", "3"} and not model[3].training
    torch.testing.assert_close(model[3].running_mean, expected["3"][0])
    torch.testing.assert_close(model[3].running_var, expected["3"][1])


def test_recalibrate_puts_back_the_statistics_of_other_norm_layers():
    """train() also moves an InstanceNorm's running statistics: recalibrate recomputes
    batch norms only, so it gives the others back what they had."""
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.InstanceNorm2d(3, track_running_stats=True),
                          batchnorm.BatchNorm2d(3)).eval()
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in model[1].state_dict().items()}
    seen = batchnorm.recalibrate(model, [torch.randn(4, 3, 5, 5) + 2], progress=False)
    assert set(seen) == {"2"}
    assert all(torch.equal(v, model[1].state_dict()[k]) for k, v in before.items())


def test_recalibrate_leaves_layers_that_train_keeps_in_eval(gen):
    """A batch norm that the model's train() keeps in eval mode normalizes with its
    running statistics during the passes: it keeps them (recomputing them would leave the
    layers after it calibrated on another input than the model's), and the layers after
    it get the statistics of what it outputs."""
    model = _KeepsBlockInEval()
    with torch.no_grad():
        model.block[1].running_mean.fill_(5.0)
        model.block[1].running_var.fill_(9.0)
    before = {k: v.clone() for k, v in model.block[1].state_dict().items()}
    batches = [torch.randn(16, 3, 4, 4, generator=gen) for _ in range(3)]
    seen = batchnorm.recalibrate(model, batches, progress=False)
    assert set(seen) == {"head.1"}
    assert all(torch.equal(v, before[k]) for k, v in model.block[1].state_dict().items())
    model.eval()
    with torch.no_grad():
        head_input = torch.cat([model.head[0](model.block(x)) for x in batches])
    assert_close(model.head[1].running_mean, head_input.mean((0, 2, 3)), torch.float32)
    assert model.training is False and not model.head[1].training
    everything_in_eval = _KeepsBlockInEval().eval()
    everything_in_eval.head = nn.Identity()
    with pytest.raises(ValueError, match="leaves every batch norm .* in eval mode"):
        batchnorm.recalibrate(everything_in_eval, batches, progress=False)
    assert not everything_in_eval.training


@pytest.mark.parametrize("lazy_cls", [nn.LazyBatchNorm2d, batchnorm.LazyBatchNorm2d])
@pytest.mark.parametrize("tool", ["recalibrate", "freeze", "freeze_affine", "freeze_buffers",
                                  "fold"])
def test_recalibrate_and_freeze_refuse_a_lazy_batch_norm_without_input(tool, lazy_cls):
    """A lazy layer that has not seen input has no statistics to recompute or freeze:
    recalibrate's training-mode forwards would make and move them with nothing to restore,
    freeze would pass torch's over or fail half-way on ours. Both say what to do, first."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), lazy_cls())
    types = [type(m) for m in model]
    state = {k: v.clone() for k, v in model[1].state_dict().items()}
    call = {"recalibrate": lambda: batchnorm.recalibrate(model, [torch.randn(4, 3, 2, 2)],
                                                         progress=False),
            "freeze": lambda: batchnorm.freeze(model),
            "freeze_affine": lambda: batchnorm.freeze(model, affine=True),
            "freeze_buffers": lambda: batchnorm.freeze(model, buffers=True),
            "fold": lambda: batchnorm.fold(model.eval())}[tool]
    with pytest.raises(ValueError, match="'2' is a lazy batch norm that has not seen input"):
        call()
    assert [type(m) for m in model] == types
    assert all(torch.equal(v, state[k]) for k, v in model[1].state_dict().items())
    assert model[1].weight.requires_grad and not getattr(model[1], "frozen", False)
    assert model[2].has_uninitialized_params()


def _recal_worker(rank, init_file, result_file):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        with backends.using("portable"):
            torch.manual_seed(0)
            model = mlp().double()
            gen = torch.Generator().manual_seed(10 + rank)
            batches = [torch.randn(3 + rank * 2, 6, generator=gen, dtype=torch.float64) + rank
                       for _ in range(2)]
            batchnorm.recalibrate(model, batches, progress=False)
            if rank == 0:
                torch.save(model.state_dict(), result_file)
    finally:
        dist.destroy_process_group()


def test_recalibrate_merges_across_processes(tmp_path):
    torch.multiprocessing.spawn(_recal_worker, args=(str(tmp_path / "init"), str(tmp_path / "sd")),
                                nprocs=2)
    torch.manual_seed(0)
    model = mlp().double()
    batches = []
    for rank in range(2):
        gen = torch.Generator().manual_seed(10 + rank)
        batches += [torch.randn(3 + rank * 2, 6, generator=gen, dtype=torch.float64) + rank
                    for _ in range(2)]
    # One process over both ranks' batches: the first layer sees exactly the same values
    # (deeper layers see per-rank batch normalization, so only the first is comparable).
    batchnorm.recalibrate(model, batches, progress=False)
    got = torch.load(tmp_path / "sd")
    torch.testing.assert_close(got["1.running_mean"], model[1].running_mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got["1.running_var"], model[1].running_var, rtol=1e-10, atol=1e-10)


def _recal_group_worker(rank, world, init_file, result_file):
    """Rank r's batch holds values near 10·(r + 1). Three ranks: a SyncBatchNorm over
    ranks {0, 1} and a BatchNorm1d (all ranks) on the same input. Two ranks: rank 1 has no
    batch at all, and a BatchNorm1d only."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        gen = torch.Generator().manual_seed(rank)
        x = torch.randn(6, 2, generator=gen, dtype=torch.float64) + 10 * (rank + 1)
        if world == 3:
            group = dist.new_group([0, 1])
            model = nn.ModuleDict({"sync": batchnorm.SyncBatchNorm(2, process_group=group),
                                   "local": batchnorm.BatchNorm1d(2)}).double()
            batches = [x]

            def forward(m, batch):
                return m["sync"](batch) + m["local"](batch)
        else:
            model = nn.ModuleDict({"local": batchnorm.BatchNorm1d(2)}).double()
            batches = [x] if rank == 0 else []

            def forward(m, batch):
                return m["local"](batch)
        batchnorm.recalibrate(model, batches, progress=False, forward=forward)
        torch.save(model.state_dict(), f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [3, 2], ids=["process-group", "a-rank-without-batches"])
def test_recalibrate_merges_over_each_layers_processes(tmp_path, world):
    """What a probe found: every layer was merged over all processes, a SyncBatchNorm's
    process_group aside (rank 2, outside {0, 1}, got all three ranks' statistics); a rank
    whose batches yielded nothing took part in the merge, wrote the merged statistics and
    then raised "no batches" while the other rank returned."""
    torch.multiprocessing.spawn(_recal_group_worker, args=(world, str(tmp_path / "init"),
                                                           str(tmp_path / "sd")), nprocs=world)
    data = [torch.randn(6, 2, generator=torch.Generator().manual_seed(r), dtype=torch.float64)
            + 10 * (r + 1) for r in range(world)]

    def stats(*ranks):
        x = torch.cat([data[r] for r in ranks if world == 3 or r == 0])
        return x.mean(0), x.var(0)  # the unbiased variance, as running_var stores
    for rank in range(world):
        got = torch.load(f"{tmp_path / 'sd'}.{rank}")
        expected = {"local": stats(*range(world))}
        if world == 3:
            expected["sync"] = stats(0, 1) if rank < 2 else stats(2)
        for name, (mean, var) in expected.items():
            torch.testing.assert_close(got[f"{name}.running_mean"], mean)
            torch.testing.assert_close(got[f"{name}.running_var"], var)


def _recal_uneven_worker(rank, counts, init_file, result_file):
    """A SyncBatchNorm model; rank r has counts[r] batches, batch i near 10·(i + 1)."""
    from datetime import timedelta

    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=2, timeout=timedelta(seconds=30))
    try:
        # the SyncBatchNorm synchronizes, though it has no statistics to recalibrate
        model = nn.Sequential(batchnorm.BatchNorm1d(2),
                              batchnorm.SyncBatchNorm(2, track_running_stats=False)).double()
        gen = torch.Generator().manual_seed(rank)
        batches = [torch.randn(3, 2, generator=gen, dtype=torch.float64) + 10 * (i + 1)
                   for i in range(counts[rank])]
        try:
            batchnorm.recalibrate(model, batches, progress=False)
            result = model.state_dict()
        except ValueError as e:
            result = str(e)
        torch.save(result, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("counts", [(2, 3), (0, 2), (3, 2)],
                         ids=["2-and-3", "none-and-2", "3-and-2"])
def test_recalibrate_runs_sync_layers_in_step(tmp_path, counts):
    """With SyncBatchNorm layers (each forward a collective), a process that ran out of
    batches waited in the merge while the other waited in a forward: both hung until the
    process group's timeout. Now each runs as many batches as the one with the fewest."""
    torch.multiprocessing.spawn(_recal_uneven_worker, args=(counts, str(tmp_path / "init"),
                                                            str(tmp_path / "sd")), nprocs=2)
    got = [torch.load(f"{tmp_path / 'sd'}.{rank}") for rank in range(2)]
    if min(counts) == 0:
        assert all("one had none" in g for g in got), got
        return
    data = []
    for rank in range(2):
        gen = torch.Generator().manual_seed(rank)
        data += [torch.randn(3, 2, generator=gen, dtype=torch.float64) + 10 * (i + 1)
                 for i in range(counts[rank])][:min(counts)]
    x = torch.cat(data)
    for g in got:
        torch.testing.assert_close(g["0.running_mean"], x.mean(0))
        torch.testing.assert_close(g["0.running_var"], x.var(0))


# ---------------------------------------------------------------------------------------
# Conventions


def _keras_weights(c, seed=0):
    rng = np.random.default_rng(seed)
    return {"bn/gamma:0": rng.uniform(0.5, 1.5, c).astype(np.float32),
            "bn/beta:0": rng.normal(size=c).astype(np.float32),
            "bn/moving_mean:0": rng.normal(size=c).astype(np.float32),
            "bn/moving_variance:0": rng.uniform(0.5, 2, c).astype(np.float32)}


def test_keras_conventions():
    w = _keras_weights(4)
    bn = tools.load_keras(batchnorm.BatchNorm2d(4), w).eval()
    assert bn.eps == 1e-3 and bn.momentum == 0.01  # as typed, not 1 - 0.99 in binary
    x = np.random.default_rng(1).normal(size=(2, 4, 3, 3)).astype(np.float32)
    # Keras inference, written out with its own names, channels moved to axis 1.
    c = (slice(None), None, None)
    expected = (w["bn/gamma:0"][c] * (x - w["bn/moving_mean:0"][c])
                / np.sqrt(w["bn/moving_variance:0"][c] + 1e-3) + w["bn/beta:0"][c])
    assert_close(bn(torch.from_numpy(x)), torch.from_numpy(expected))
    # count: the biased moving variance becomes torch's unbiased one, and back.
    bn2 = tools.load_keras(nn.BatchNorm2d(4), list(w.values()), count=10)
    assert_close(bn2.running_var, torch.from_numpy(w["bn/moving_variance:0"]) * 10 / 9)
    back, config = tools.to_keras(bn2, count=10)
    np.testing.assert_allclose(back["moving_variance"], w["bn/moving_variance:0"], rtol=1e-6)
    assert config == {"momentum": 0.99, "epsilon": 1e-3, "axis": 1, "center": True,
                      "scale": True}
    with pytest.raises(ValueError, match="no offset|has none"):
        tools.load_keras(batchnorm.BatchNorm2d(4, affine=False), w)


def test_flax_conventions_round_trip():
    rng = np.random.default_rng(2)
    variables = {"params": {"scale": rng.uniform(size=3), "bias": rng.normal(size=3)},
                 "batch_stats": {"mean": rng.normal(size=3), "var": rng.uniform(0.5, 2, 3)}}
    bn = tools.load_flax(batchnorm.BatchNorm1d(3, dtype=torch.float64), variables, momentum=0.9)
    assert bn.eps == 1e-5 and bn.momentum == 0.1
    out, config = tools.to_flax(bn)
    for group, values in variables.items():
        for k, v in values.items():
            np.testing.assert_array_equal(out[group][k], v)
    assert config["momentum"] == 0.9
    assert tools.load_flax(bn, out, momentum=config["momentum"]).momentum == 0.1


@pytest.mark.parametrize("extra, fragment", [
    ({"bn_2/gamma:0": np.ones(4, np.float32)}, "both 'gamma'"),
    ({"bn/renorm_mean:0": np.ones(4, np.float32)}, "not a weight"),
])
def test_keras_names_of_more_than_one_layer_are_refused(extra, fragment):
    # model.weights of a whole model: the names without their scopes collide, and the
    # last layer's values were loaded silently
    bn = batchnorm.BatchNorm2d(4)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(ValueError, match=fragment):
        tools.load_keras(bn, {**_keras_weights(4), **extra})
    assert all(torch.equal(v, before[k]) for k, v in bn.state_dict().items())


@pytest.mark.parametrize("kwargs, keras, flax", [
    ({"bias": False}, {"center": False, "scale": True}, {"use_bias": False, "use_scale": True}),
    ({"affine": False}, {"center": False, "scale": False},
     {"use_bias": False, "use_scale": False}),
])
def test_exported_configs_say_which_affine_parameters_there_are(kwargs, keras, flax):
    bn = batchnorm.BatchNorm2d(4, **kwargs)
    weights, config = tools.to_keras(bn)
    assert keras.items() <= config.items()
    assert ("gamma" in weights, "beta" in weights) == (keras["scale"], keras["center"])
    _, config = tools.to_flax(bn)
    assert flax.items() <= config.items()


@pytest.mark.parametrize("how", ["load_keras", "to_keras", "load_flax", "to_flax"])
def test_a_lazy_layer_without_input_is_refused_by_the_conventions(how):
    bn = batchnorm.LazyBatchNorm2d()
    args = {"load_keras": (_keras_weights(4),),
            "load_flax": ({"params": {}, "batch_stats": {"mean": np.zeros(4),
                                                          "var": np.ones(4)}},)}
    with pytest.raises(ValueError, match="has not seen input"):
        getattr(tools, how)(bn, *args.get(how, ()))


def test_flax_errors_use_flax_names():
    variables = {"params": {"scale": np.ones(3)},
                 "batch_stats": {"mean": np.zeros(3), "var": np.ones(3)}}
    with pytest.raises(ValueError, match=r"offset \('bias'\)"):
        tools.load_flax(batchnorm.BatchNorm1d(3), variables)


def _layer_state(bn):
    return ([t.clone() for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)],
            bn.momentum, bn.eps)


@pytest.mark.parametrize("load", ["keras", "flax"])
@pytest.mark.parametrize("problem,kwargs,exc,match", [
    ("variance shape", {}, ValueError, r"variance (\('var'\) )?has shape \(4,\)"),
    ("count", {"count": 1}, ValueError, "count must be an integer >= 2"),
    ("count type", {"count": 2.5}, TypeError, "count must be an integer >= 2"),
    ("count bool", {"count": True}, TypeError, "count must be an integer >= 2"),
    ("missing mean", {}, ValueError, "lacks 'mean'|lacks 'moving_mean'"),
    ("momentum", {"momentum": 1.5}, ValueError, r"momentum must be .*\[0, 1\]"),
    ("momentum type", {"momentum": "0.99"}, TypeError, "momentum must be"),
    ("momentum bool", {"momentum": True}, TypeError, "momentum must be"),
    ("eps", {"epsilon": -1.0}, ValueError, "epsilon must be"),
    ("eps type", {"epsilon": "1e-3"}, TypeError, "epsilon must be"),
    ("meta", {}, ValueError, "meta device.*to_empty"),
])
def test_load_validates_everything_before_writing(load, problem, kwargs, exc, match):
    w = _keras_weights(3, seed=4)
    if problem == "variance shape":
        w["bn/moving_variance:0"] = np.ones(4, np.float32)
    bn = batchnorm.BatchNorm2d(3, device="meta" if problem == "meta" else None)
    mean = None if problem == "missing mean" else w["bn/moving_mean:0"]
    if mean is None:
        del w["bn/moving_mean:0"]
    before = _layer_state(bn)
    with pytest.raises(exc, match=match):
        if load == "keras":
            tools.load_keras(bn, w, **kwargs)
        else:
            variables = {"params": {"scale": w["bn/gamma:0"], "bias": w["bn/beta:0"]},
                         "batch_stats": {"var": w["bn/moving_variance:0"]}}
            if mean is not None:
                variables["batch_stats"]["mean"] = mean
            tools.load_flax(bn, variables, **kwargs)
    after = _layer_state(bn)
    if problem != "meta":  # (meta tensors hold no values to compare)
        assert all(torch.equal(a, b) for a, b in zip(after[0], before[0]))
    assert after[1:] == before[1:]


@pytest.mark.parametrize("how", ["to_keras", "to_flax", "load_keras", "load_flax"])
@pytest.mark.parametrize("given", ["conv", "model", "str"])
def test_conventions_take_one_batch_norm_layer(how, given):
    """A Conv2d said it had track_running_stats=False, a model gave an AttributeError:
    one TypeError that names what to pass, before anything is read or written."""
    bn = batchnorm.BatchNorm2d(3)
    layer = {"conv": nn.Conv2d(3, 3, 1), "model": nn.Sequential(bn), "str": "bn"}[given]
    args = {"load_keras": (_keras_weights(3, seed=1),),
            "load_flax": ({"params": {}, "batch_stats": {"mean": np.zeros(3),
                                                         "var": np.ones(3)}},)}
    with pytest.raises(TypeError, match=rf"{how}\(\) takes one batch-norm layer.*got "
                                        rf"{type(layer).__name__}"):
        getattr(tools, how)(layer, *args.get(how, ()))


def test_conventions_take_numbers_of_any_kind_and_refuse_wrong_containers():
    """A one-value tensor is a number (np.float32 was, tensor(0.99) was refused as out of
    [0, 1]); an eps stored as a tensor exports as a float; weights that are no dict or
    list, and Flax variables that are no mapping, raise TypeError."""
    bn = batchnorm.BatchNorm2d(3)
    tools.load_keras(bn, _keras_weights(3, seed=2), momentum=torch.tensor(0.99),
                     epsilon=np.float32(1e-3))
    assert bn.momentum == pytest.approx(0.01) and type(bn.eps) is float
    bn.eps = torch.tensor(1e-3)
    assert type(tools.to_keras(bn)[1]["epsilon"]) is float
    assert type(tools.to_flax(bn)[1]["epsilon"]) is float
    with pytest.raises(TypeError, match="weights must be a dict"):
        tools.load_keras(bn, None)
    with pytest.raises(TypeError, match="variables must be a mapping"):
        tools.load_flax(bn, [np.ones(3)] * 4)
    # what get_weights() gives, stacked: any sized container of the four
    stacked = np.stack([np.full(3, 2.0), np.zeros(3), np.zeros(3), np.full(3, 4.0)])
    for weights in (stacked, torch.from_numpy(stacked)):
        tools.load_keras(bn, weights)
        assert bn.weight.tolist() == [2.0] * 3 and bn.running_var.tolist() == [4.0] * 3


class _TorchvisionFrozenBatchNorm2d(nn.Module):
    """torchvision.ops.FrozenBatchNorm2d as published: four buffers and eps, no
    num_features (torchvision is not installed here)."""

    def __init__(self, n, eps=1e-5):
        super().__init__()
        self.eps = eps
        for name, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0),
                           ("running_var", 1.0)):
            self.register_buffer(name, torch.full((n,), fill))


def test_conventions_take_torchvisions_frozen_batch_norm():
    layer = _TorchvisionFrozenBatchNorm2d(3)
    tools.load_keras(layer, [np.full(3, 2.0), np.zeros(3), np.zeros(3), np.full(3, 3.0)])
    assert layer.weight.tolist() == [2.0] * 3 and layer.running_var.tolist() == [3.0] * 3
    weights, config = tools.to_keras(layer)
    assert config["momentum"] == 1.0 and weights["gamma"].tolist() == [2.0] * 3


def test_conventions_with_a_frozen_layer_and_one_without_statistics():
    """A FrozenBatchNorm has no momentum: it exports Keras's decay 1 (its statistics never
    move) and loads without gaining one. A layer without running statistics has nothing
    for Keras's or Flax's moving statistics: ValueError, not arrays missing."""
    frozen = batchnorm.FrozenBatchNorm2d(3)
    weights, config = tools.to_keras(frozen)
    assert config["momentum"] == 1.0 and set(weights) == {"gamma", "beta", "moving_mean",
                                                          "moving_variance"}
    tools.load_keras(frozen, weights)
    assert "momentum" not in vars(frozen)
    for export in (tools.to_keras, tools.to_flax):
        with pytest.raises(ValueError, match="track_running_stats=False has no running"):
            export(batchnorm.BatchNorm2d(3, track_running_stats=False))


@pytest.mark.parametrize("bn_cls", [batchnorm.BatchNorm2d, nn.BatchNorm2d])
def test_cumulative_average_layer_round_trips(bn_cls):
    # momentum=None (a cumulative average) exports as momentum None, and loads back as one.
    source = bn_cls(3, momentum=None)
    randomize(nn.Sequential(source))
    weights, config = tools.to_keras(source)
    assert config["momentum"] is None
    target = tools.load_keras(bn_cls(3), weights, momentum=config["momentum"],
                              epsilon=config["epsilon"])
    assert target.momentum is None and target.eps == source.eps
    assert torch.equal(target.running_var, source.running_var)
    variables, config = tools.to_flax(source)
    target = tools.load_flax(bn_cls(3), variables, momentum=config["momentum"])
    assert target.momentum is None and torch.equal(target.weight, source.weight)


def test_benchmark_fold_hook():
    result = tools.benchmark_fold(repeats=2, batch=2, size=8, channels=4, blocks=1)
    assert result["folded"] == 3 and result["ratio"] > 0 and result["max_rel_diff"] < 1e-5


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "gelu", "tanh"])
def test_folded_model_gradients(activation):
    # The folded layers run their residual and activation in place on the conv's output;
    # gradients through the folded model still equal those of the eval model.
    model = tools.small_resnet(channels=4, blocks=1).double().eval()
    for m in model.modules():
        if isinstance(m, batchnorm.BatchNorm2d):
            m.activation, m.activation_slope = activation, 0.1
    randomize(model)
    _assert_fold_keeps_outputs_and_grads(model, torch.randn(2, 3, 6, 6, dtype=torch.float64))


def _assert_fold_keeps_outputs_and_grads(model, x):
    folded, _ = batchnorm.fold(model)
    y_ref, dx_ref, _ = outputs_and_grads(model, x)
    y, dx, _ = outputs_and_grads(folded, x)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(dx, dx_ref)


@pytest.mark.parametrize("before", ["conv", "nothing"], ids=["folded", "scale_shift"])
def test_folded_model_gradients_with_negative_leaky_slope(before):
    # In-place leaky_relu has no backward for a negative slope: the out-of-place op runs.
    first = nn.Conv2d(3, 3, 1) if before == "conv" else nn.Identity()
    model = nn.Sequential(first, batchnorm.BatchNorm2d(3, activation=nn.LeakyReLU(-0.1)))
    model = model.double().eval()
    randomize(model)
    _assert_fold_keeps_outputs_and_grads(model, torch.randn(2, 3, 4, 4, dtype=torch.float64))


def test_frozen_sync_batchnorm_uses_running_stats_in_train(monkeypatch):
    # A frozen SyncBatchNorm must neither synchronize nor compute batch statistics. The
    # world is made to look like 2 ranks, so taking the synchronized path would fail.
    import batchnorm.distributed as dist_mod
    from batchnorm import SyncBatchNorm
    monkeypatch.setattr(dist_mod, "world_size", lambda group=None: 2)
    layer = SyncBatchNorm(3)
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
    layer.frozen = True
    layer.train()
    x = torch.randn(4, 3, 5, 5)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    y = layer(x)
    expected = (x - layer.running_mean.view(1, -1, 1, 1)) / torch.sqrt(
        layer.running_var.view(1, -1, 1, 1) + layer.eps)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------------------------------
# Found by a probe of the tools on real architectures (2026-12-05)


def _stats_kept_flag_off():
    """A torch BatchNorm2d whose track_running_stats was turned off after it trained: it
    keeps its buffers, normalizes with them in eval and leaves them alone in training."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 5, 5) * 3 + 2)
    model[1].track_running_stats = False
    return model


@pytest.mark.parametrize("tool", ["convert", "revert", "freeze"])
def test_tools_keep_running_buffers_of_a_layer_whose_flag_was_turned_off(tool):
    torch_model = _stats_kept_flag_off()
    model = batchnorm.convert(copy.deepcopy(torch_model))
    if tool == "revert":
        model = batchnorm.revert(model)
        assert type(model[1]) is nn.BatchNorm2d
    elif tool == "freeze":
        model = batchnorm.freeze(model)
        assert model[1].frozen
    assert torch.equal(model[1].running_var, torch_model[1].running_var)
    assert list(model.state_dict()) == list(torch_model.state_dict())
    x = torch.randn(4, 3, 5, 5)
    with torch.no_grad():
        torch_model.eval(), model.eval()
        assert_close(model(x), torch_model(x))
        if tool == "freeze":  # frozen: the running statistics in train() too
            model.train()
            assert_close(model(x), torch_model(x))
        else:
            torch_model.train(), model.train()
            before = model[1].running_mean.clone()
            assert_close(model(x), torch_model(x))
            assert torch.equal(model[1].running_mean, before)


def test_convert_keeps_num_batches_tracked_alone():
    # TENT's setup: no running statistics, num_batches_tracked kept.
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    model[1].track_running_stats = False
    model[1].running_mean = model[1].running_var = None
    keys = list(model.state_dict())
    assert list(batchnorm.convert(model).state_dict()) == keys


class _KeepsFeatures(nn.Module):
    """A forward that stores a value on the module (a feature tap)."""

    def __init__(self, tap):
        super().__init__()
        self.tap = tap
        self.conv, self.bn, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()

    def forward(self, x):
        y = self.conv(x)
        if self.tap == "conv":
            self.features = y
        y = self.bn(y)
        if self.tap == "bn":
            self.features = [y]
        return self.act(y)


@pytest.mark.parametrize("tap", ["conv", "bn"])
@pytest.mark.parametrize("tool", ["convert", "fold"])
def test_a_value_stored_on_a_module_is_not_rewritten(tool, tap):
    model = _KeepsFeatures(tap).eval()
    randomize(model)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        model(x)
        expected = model.features
        new = (batchnorm.convert(copy.deepcopy(model)) if tool == "convert"
               else batchnorm.fold(model)[0])
        y = new(x)
        assert_close(y, model(x))
        features = new.features
    if tap == "bn":
        expected, features = expected[0], features[0]
    assert_close(features, expected)


@pytest.mark.parametrize("steps", ["revert", "revert_sync, revert"])
def test_revert_undoes_a_fusion_after_the_sync_conversions(steps):
    original = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
    keys = list(original.state_dict())
    model = batchnorm.convert_sync_batchnorm(batchnorm.convert(original))
    if steps != "revert":
        model = batchnorm.revert_sync_batchnorm(model)
    model = batchnorm.revert(model)
    assert [type(m) for m in model] == [nn.Conv2d, nn.SyncBatchNorm if steps == "revert"
                                        else nn.BatchNorm2d, nn.ReLU]
    assert list(model.state_dict()) == keys


def test_revert_keeps_to_the_layer_in_the_model_when_a_copy_was_synced_elsewhere():
    """A layer converted to sync for another model (or alone) stays in this one: revert
    followed the replaced layer's record out of the model and left the fusion."""
    model = batchnorm.convert(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU()))
    assert batchnorm.convert_sync_batchnorm(model[1]) is not model[1]
    model = batchnorm.revert(model)
    assert [type(m) for m in model] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]


def test_channel_affine_refuses_another_channel_count():
    folded, _ = batchnorm.fold(nn.Sequential(nn.MaxPool2d(1), nn.BatchNorm2d(4)).eval())
    assert isinstance(folded[1], ChannelAffine)
    with pytest.raises(ValueError, match="4 channels"):
        folded(torch.randn(2, 1, 3, 3))


class _MyBN(batchnorm.BatchNorm2d):
    pass


@pytest.mark.parametrize("kind", ["nd", "subclass", "parametrized", "lazy"])
def test_revert_says_which_layers_of_ours_it_leaves(kind):
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    if kind == "nd":
        model = batchnorm.revert_sync_batchnorm(nn.Sequential(nn.SyncBatchNorm(4)))
    elif kind == "subclass":
        model = nn.Sequential(_MyBN(4))
    elif kind == "lazy":
        model = nn.Sequential(batchnorm.LazyBatchNorm2d())
    else:
        model = nn.Sequential(batchnorm.BatchNorm2d(4))
        parametrize.register_parametrization(model[0], "weight", Double())
    before = type(model[0])
    reason = "not seen input" if kind == "lazy" else ""
    with pytest.warns(UserWarning, match=f"revert: '0' stays batchnorm's: .*{reason}"):
        batchnorm.revert(model)
    assert type(model[0]) is before


def test_fold_names_a_stored_tensor_it_cannot_copy():
    model = _KeepsFeatures("conv").eval()
    model(torch.randn(2, 3, 6, 6))  # gradients on: features is a tensor autograd computed
    with pytest.raises(RuntimeError, match="'features' is a tensor that autograd computed"):
        batchnorm.fold(model)


class _Aliased(nn.Module):
    """One batch norm at two places: an alias of the same parent, and a second parent."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.again = self.bn
        self.sub = nn.Sequential(self.bn)


def test_the_sync_conversions_keep_a_shared_layer_one_layer():
    # named_children() skipped the alias (left torch's, normalizing per rank), and two
    # parents got two SyncBatchNorms sharing tensors but not frozen, hooks or mode
    model = batchnorm.convert_sync_batchnorm(_Aliased())
    assert isinstance(model.bn, batchnorm.SyncBatchNorm)
    assert model.again is model.bn and model.sub[0] is model.bn
    model = batchnorm.revert_sync_batchnorm(model)
    assert not isinstance(model.bn, batchnorm.SyncBatchNorm)
    assert model.again is model.bn and model.sub[0] is model.bn
    twice = batchnorm.revert_sync_batchnorm(nn.Sequential(*[batchnorm.SyncBatchNorm(3)] * 2))
    assert twice[0] is twice[1] and not isinstance(twice[0], batchnorm.SyncBatchNorm)


def test_recalibrate_evaluates_a_layer_whose_flag_was_turned_off_with_its_statistics():
    """Such a layer keeps its running statistics and evaluates with them: the layer after
    it is recalibrated on what it gets in eval (it got the batch-statistics output)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3), batchnorm.BatchNorm2d(3))
    with torch.no_grad():
        model[0].running_mean.fill_(1.0)
        model[0].running_var.fill_(4.0)
    model[0].track_running_stats = False
    batches = [torch.randn(8, 3, 4, 4) * 3 + 2 for _ in range(4)]
    before = model[0].running_mean.clone()
    batchnorm.recalibrate(model, batches, progress=False)
    assert torch.equal(model[0].running_mean, before) and model[0].training
    with torch.no_grad():
        inputs = torch.cat([model[0].eval()(b) for b in batches])
    assert_close(model[1].running_mean, inputs.mean((0, 2, 3)))
    with pytest.raises(ValueError, match="track_running_stats"):
        batchnorm.recalibrate(model[:1], batches, progress=False)


@pytest.mark.parametrize("steps", ["revert", "revert_sync, revert"])
def test_revert_undoes_a_fusion_after_a_submodule_alone_was_synced(steps):
    """The ReLU's marker sits outside the block converted to sync: it kept pointing at the
    replaced layer, so revert left the fusion (keys block.1.0.weight)."""
    original = nn.Sequential()
    original.block = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    original.act = nn.ReLU()
    keys = list(original.state_dict())
    model = batchnorm.convert(original)
    assert isinstance(model.act, FusedActivation)
    model.block = batchnorm.convert_sync_batchnorm(model.block)
    if steps != "revert":
        model.block = batchnorm.revert_sync_batchnorm(model.block)
    model = batchnorm.revert(model)
    assert isinstance(model.act, nn.ReLU)
    assert type(model.block[1]) is (nn.SyncBatchNorm if steps == "revert" else nn.BatchNorm2d)
    assert list(model.state_dict()) == keys


def _hook_computed(kind):
    from torch.nn.utils import prune
    return {"prune": lambda m: prune.l1_unstructured(m, "weight", amount=1),
            "spectral_norm": lambda m: nn.utils.spectral_norm(m, "weight"),
            "weight_norm": lambda m: nn.utils.weight_norm(m, "weight", dim=0)}[kind]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # the hook-based weight_norm
@pytest.mark.parametrize("tool", ["convert", "revert", "freeze", "freeze_buffers"])
@pytest.mark.parametrize("ours", [False, True], ids=["torch", "ours"])
@pytest.mark.parametrize("kind", ["prune", "spectral_norm", "weight_norm"])
def test_the_tools_leave_a_layer_whose_weight_a_hook_computes(kind, ours, tool):
    """convert and revert raised a TypeError (revert half done), and freeze(buffers=True)
    moved the hook to a copy without the parameters it computes from (an AttributeError
    at the next call)."""
    cls = batchnorm.BatchNorm2d if ours else nn.BatchNorm2d
    model = nn.Sequential(nn.Conv2d(3, 3, 1), cls(3), cls(3))
    _hook_computed(kind)(model[2])
    x = torch.randn(4, 3, 5, 5)
    model(x)
    model.eval()
    expected = model(x)
    run = {"convert": batchnorm.convert, "revert": batchnorm.revert,
           "freeze": batchnorm.freeze,
           "freeze_buffers": lambda m: batchnorm.freeze(m, buffers=True)}[tool]
    # what the tool would replace: torch's layers (convert, freeze), ours (revert), both
    left = {"convert": not ours, "revert": ours, "freeze": not ours,
            "freeze_buffers": True}[tool]
    with (pytest.warns(UserWarning, match="'2' is left as it is: a forward pre-hook "
                       "computes its weight") if tool != "revert" else
          pytest.warns(UserWarning, match="'2' stays batchnorm's: a forward pre-hook")) \
            if left else contextlib.nullcontext():
        model = run(model)
    if left:  # the layer without the hook was replaced
        assert type(model[2]) is cls and type(model[1]) is not cls
    if tool == "freeze" and ours:  # frozen in place, both
        assert model[1].frozen and model[2].frozen
    assert_close(model(x), expected)


@pytest.mark.parametrize("kind", ["parametrize", "prune"])
def test_freeze_affine_leaves_a_computed_weight_trainable_and_changes_nothing_else(kind):
    """requires_grad_(False) on the computed weight raised, after earlier layers and this
    one had been frozen."""
    from torch.nn.utils import parametrize

    class Softplus(nn.Module):
        def forward(self, w):
            return nn.functional.softplus(w)

    model = nn.Sequential(batchnorm.BatchNorm2d(3), batchnorm.BatchNorm2d(3))
    if kind == "parametrize":
        parametrize.register_parametrization(model[1], "weight", Softplus())
    else:
        _hook_computed(kind)(model[1])
    model(torch.randn(4, 3, 2, 2))
    with pytest.warns(UserWarning, match="'1' has its statistics frozen, not its weight"):
        batchnorm.freeze(model, affine=True)
    assert model[0].frozen and model[1].frozen
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "1.parametrizations.weight.original" if kind == "parametrize" else "1.weight_orig"]
    batchnorm.unfreeze(model)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.filterwarnings("ignore::FutureWarning")  # the hook-based weight_norm
@pytest.mark.parametrize("kind", ["prune", "spectral_norm", "weight_norm", "parametrize"])
def test_the_sync_conversions_leave_a_layer_whose_weight_is_computed(kind):
    """They raised a TypeError (cannot assign a tensor as parameter 'weight') after the
    layers before it had been replaced; the warning points at the caller's line."""
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    model = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3), nn.BatchNorm2d(3))
    if kind == "parametrize":
        parametrize.register_parametrization(model[1], "weight", Double())
    else:
        _hook_computed(kind)(model[1])
    before = type(model[1])
    model(torch.randn(4, 3, 2, 2))
    reason = "a parametrization computes" if kind == "parametrize" else "a forward pre-hook"
    with pytest.warns(UserWarning, match=f"convert_sync_batchnorm: '1' is left as it is: "
                      f"{reason}") as record:
        batchnorm.convert_sync_batchnorm(model)
    assert {w.filename for w in record} == {__file__}
    assert [type(m) for m in model] == [batchnorm.SyncBatchNorm, before,
                                        batchnorm.SyncBatchNorm]
    assert batchnorm.revert_sync_batchnorm(model) is model
    assert type(model[0]) is batchnorm.BatchNorm2d and type(model[1]) is before


def test_a_sync_conversion_that_fails_leaves_the_model_as_it_was():
    model = nn.Sequential(nn.BatchNorm2d(3), batchnorm.LazyBatchNorm2d())
    with pytest.raises(ValueError, match="uninitialized LazyBatchNorm2d"):
        batchnorm.convert_sync_batchnorm(model)
    assert type(model[0]) is nn.BatchNorm2d


class _WithResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = batchnorm.BatchNorm2d(4, activation="relu")

    def forward(self, x, r):
        return self.bn(self.conv(x), r)


def test_a_folded_layer_checks_its_residual_as_the_batch_norm_did():
    """ChannelAffine broadcast a (1, C, 1, 1) residual and took a float, where the batch
    norm it replaces raised."""
    model = _WithResidual().eval()
    folded, _ = batchnorm.fold(model)
    assert isinstance(folded.bn, ChannelAffine)
    x = torch.randn(2, 3, 4, 4)
    r = torch.randn(2, 4, 4, 4)
    assert_close(folded(x, r), model(x, r))
    for bad, error in ((torch.randn(1, 4, 1, 1), ValueError), (1.0, TypeError)):
        for m in (model, folded):
            with pytest.raises(error, match="residual must"):
                m(x, bad)


def test_unfreeze_gives_back_what_freeze_froze_after_a_revert():
    """revert dropped freeze(affine=True)'s record: weight and bias stayed
    requires_grad=False for good (after convert + unfreeze too), silently."""
    for convert_again in (False, True):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        batchnorm.freeze(model, affine=True)
        with pytest.warns(UserWarning, match="weight and bias that freeze.affine=True. froze"):
            batchnorm.revert(model)
        assert not model[1].weight.requires_grad
        if convert_again:
            batchnorm.convert(model)
        batchnorm.unfreeze(model)
        assert model[1].weight.requires_grad and model[1].bias.requires_grad


def test_a_model_frozen_into_buffers_traces_with_fx():
    """FrozenBatchNorm2d checked the rank of fx's Proxy: a TypeError."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
    model(torch.randn(2, 3, 4, 4))
    batchnorm.freeze(model, buffers=True)
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 4, 4)
    assert_close(traced(x), model(x))


def test_a_folded_model_traces_with_fx_and_quantizes():
    """ChannelAffine's checks branched on fx's Proxy (a TraceError), so prepare_fx failed
    on a folded model. It traces into its ops: after a batch norm folded into a
    convolution, prepare_fx fuses the convolution with the activation left behind."""
    model = batchnorm.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    model(torch.randn(4, 3, 6, 6))
    folded, report = batchnorm.fold(model.eval())
    assert report.folded
    traced = torch.fx.symbolic_trace(folded)
    x = torch.randn(2, 3, 6, 6)
    assert_close(traced(x), folded(x))
    quantize_fx = pytest.importorskip("torch.ao.quantization.quantize_fx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation, observers'
        prepared = quantize_fx.prepare_fx(
            folded, torch.ao.quantization.get_default_qconfig_mapping(), (x,))
    assert type(prepared.get_submodule("0")).__name__ == "ConvReLU2d"


@pytest.mark.parametrize("shape", [(3, 4), (3, 4, 5)])
def test_a_scale_shift_left_by_fold_traces_with_fx(shape):
    """A batch norm fold could not put into a layer (after a ReLU): its scale and shift
    broadcast along dim 1 of the traced input, whatever its rank."""
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm1d(4))
    model(torch.randn(6, 4, 5))
    folded, report = batchnorm.fold(model.eval())
    assert report.scale_shift
    x = torch.randn(shape)
    assert_close(torch.fx.symbolic_trace(folded)(x), folded(x))


def test_a_traced_channel_affine_rounds_to_the_input_dtype():
    """float32 scale and shift, a residual and a leaky ReLU on float16 input: the traced
    graph computes as the module does (in float32, rounded once to float16)."""
    affine = ChannelAffine(torch.rand(4) + 0.5, torch.randn(4), "leaky_relu", 0.1)

    class WithResidual(nn.Module):
        def __init__(self):
            super().__init__()
            self.affine = affine

        def forward(self, x, residual):
            return self.affine(x, residual)

    model = WithResidual()
    x = torch.randn(2, 4, 3, dtype=torch.float16)
    residual = torch.randn(2, 4, 3, dtype=torch.float16)
    out = torch.fx.symbolic_trace(model)(x, residual)
    assert out.dtype == torch.float16
    assert torch.equal(out, model(x, residual))


def test_quantization_aware_training_of_a_converted_model_ends_in_eval():
    """prepare_qat_fx traced our layers with the mode of the trace: after training,
    ``eval()`` and convert_fx, the quantized model went on normalizing with each batch's
    statistics (a sample's output depended on the batch it came in) and moving them."""
    quantize_fx = pytest.importorskip("torch.ao.quantization.quantize_fx")
    torch.manual_seed(0)
    model = batchnorm.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    x = torch.randn(8, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation, observers'
        prepared = quantize_fx.prepare_qat_fx(
            model.train(), torch.ao.quantization.get_default_qat_qconfig_mapping(), (x,))
        prepared(x)
        quantized = quantize_fx.convert_fx(prepared.eval())
    running_mean = quantized.get_submodule("1").running_mean.clone()
    assert torch.equal(quantized(x)[:2], quantized(x[:2]))
    assert torch.equal(quantized.get_submodule("1").running_mean, running_mean)


_KEEPING_TOOLS = {
    "convert": batchnorm.convert,
    "fold": lambda model: batchnorm.fold(model.eval())[0],
    "convert_sync_batchnorm": batchnorm.convert_sync_batchnorm,
    "revert": lambda model: batchnorm.revert(batchnorm.convert(model)),
    "freeze(buffers=True)": lambda model: batchnorm.freeze(model, buffers=True),
}


@pytest.mark.parametrize("tool", _KEEPING_TOOLS)
def test_a_tools_output_is_freed_without_the_cycle_collector(tool):
    """convert and fold left the model in the reference cycles of the fx tracer they
    traced it with, convert_sync_batchnorm in one of its recursive walk: a deleted model
    (a GPU's memory) lived on until gc ran."""
    gc.collect()
    gc.disable()
    try:
        model = _KEEPING_TOOLS[tool](nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
                                                   nn.ReLU()))
        weight = weakref.ref(model[0].weight)
        del model
        assert weight() is None
    finally:
        gc.enable()


def test_freeze_into_buffers_drops_the_layers_it_replaced():
    """After convert, the marker left in a fused ReLU's place kept the batch norm that
    freeze(buffers=True) replaced (its parameters, their gradients) for the model's life."""
    model = batchnorm.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    replaced = weakref.ref(model[1])
    batchnorm.freeze(model, buffers=True)
    gc.collect()
    assert replaced() is None
    batchnorm.revert(model)  # (the frozen layer stays, and the ReLU fused into it)
    x = torch.randn(2, 3, 5, 5)
    assert (model(x) >= 0).all()


def test_a_folded_layer_refuses_a_quantized_input_by_name():
    """Eager-mode quantization hands the layers after a QuantStub quint8 tensors: the
    batch norm it replaced said so, ChannelAffine raised torch's internal promoteTypes
    error."""
    affine = ChannelAffine(torch.rand(3) + 0.5, torch.randn(3))
    x = torch.quantize_per_tensor(torch.randn(2, 3, 4, 4), 0.1, 0, torch.quint8)
    with pytest.raises(TypeError, match="floating-point input, got torch.quint8.*DeQuantStub"):
        affine(x)


def test_a_channel_affine_traced_as_the_root_takes_its_residual_or_none():
    """Traced as the root, its optional residual is a placeholder: the graph added it
    unconditionally, and a call without one raised a TypeError (tensor + None). A nested
    input is refused by name, as by the batch norm it replaced."""
    affine = ChannelAffine(torch.rand(3) + 0.5, torch.randn(3), "relu")
    traced = torch.fx.symbolic_trace(affine)
    x, residual = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    assert torch.equal(traced(x), affine(x))
    assert torch.equal(traced(x, residual), affine(x, residual))
    nested = torch.nested.nested_tensor([torch.randn(3, 4)] * 2, layout=torch.jagged)
    with pytest.raises(NotImplementedError, match="nested tensor"):
        affine(nested)
