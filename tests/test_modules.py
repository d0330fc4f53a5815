"""Module surface: lazy modules, repr, resets, the activation argument's forms, dtype and
device moves, and the constructor's torch-compatible signature."""

import copy
import inspect
import pickle
import subprocess
import sys

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import backends
from batchnorm import functional as F
from conftest import TORCH_HAS_BIAS_KWARG, make_input

PAIRS = [(batchnorm.BatchNorm1d, nn.BatchNorm1d, (5, 4, 3)),
         (batchnorm.BatchNorm2d, nn.BatchNorm2d, (3, 4, 3, 2)),
         (batchnorm.BatchNorm3d, nn.BatchNorm3d, (2, 4, 2, 2, 3))]
LAZY = [(batchnorm.LazyBatchNorm1d, nn.LazyBatchNorm1d, (5, 4, 3)),
        (batchnorm.LazyBatchNorm2d, nn.LazyBatchNorm2d, (3, 4, 3, 2)),
        (batchnorm.LazyBatchNorm3d, nn.LazyBatchNorm3d, (2, 4, 2, 2, 3))]


@pytest.mark.parametrize("ours_cls,torch_cls", [p[:2] for p in PAIRS + LAZY],
                         ids=lambda c: getattr(c, "__module__", "")[:5] + c.__name__)
def test_constructor_signature_is_torchs_plus_activation(ours_cls, torch_cls):
    ours = inspect.signature(ours_cls.__init__).parameters
    theirs = inspect.signature(torch_cls.__init__).parameters
    for name, p in theirs.items():
        assert name in ours, name
        assert ours[name].default == p.default and ours[name].kind == p.kind, name
    # (torch 2.11 has no bias keyword, 2.13 has; ours has it whatever the torch)
    assert set(ours) - set(theirs) == {"activation"} | ({"bias"} - set(theirs))
    assert ours["activation"].kind == inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("lazy_cls,torch_lazy,shape", LAZY, ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("kwargs", [{}, dict(affine=False), dict(bias=False),
                                    dict(track_running_stats=False), dict(momentum=None)],
                         ids=["default", "noaffine", "nobias", "notrack", "cumulative"])
def test_lazy_module_becomes_the_eager_one(lazy_cls, torch_lazy, shape, kwargs, gen):
    if "bias" in kwargs and not TORCH_HAS_BIAS_KWARG:
        pytest.skip("this torch's lazy layers take no bias keyword (2.11's have none, "
                    "2.13's have it)")
    ours, theirs = lazy_cls(**kwargs), torch_lazy(**kwargs)
    assert ours.has_uninitialized_params() == theirs.has_uninitialized_params()
    x = torch.randn(shape, generator=gen) * 3 + 1
    y, yt = ours(x), theirs(x)
    assert type(ours) is lazy_cls.cls_to_become
    assert ours.num_features == theirs.num_features == 4
    assert not any(isinstance(t, nn.parameter.UninitializedTensorMixin)
                   for t in list(ours.parameters()) + list(ours.buffers()))
    torch.testing.assert_close(y, yt)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, msg=k)


def test_lazy_module_with_activation_and_dtype(gen):
    lazy = batchnorm.LazyBatchNorm2d(activation=nn.LeakyReLU(0.3), dtype=torch.float64)
    x = torch.randn(3, 5, 2, 2, generator=gen, dtype=torch.float64)
    y = lazy(x)
    ref = nn.functional.leaky_relu(nn.functional.batch_norm(x, None, None, training=True), 0.3)
    torch.testing.assert_close(y, ref)
    assert lazy.weight.dtype == torch.float64 and lazy.weight.shape == (5,)
    assert lazy.activation == "leaky_relu" and lazy.activation_slope == 0.3


@pytest.mark.parametrize("how", ["keyword", "positional"])
def test_lazy_module_takes_a_residual_on_its_first_call(how, gen):
    """The first call builds the layer from the input alone (LazyModuleMixin hands
    initialize_parameters every argument of the call: a residual raised TypeError)."""
    x, r = (torch.randn(3, 5, 2, 2, generator=gen) for _ in range(2))
    lazy = batchnorm.LazyBatchNorm2d(activation="relu")
    y = lazy(x, residual=r) if how == "keyword" else lazy(x, r)
    assert type(lazy) is batchnorm.BatchNorm2d and lazy.num_features == 5
    ref = torch.relu(nn.functional.batch_norm(x, None, None, training=True) + r)
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("shape,exc,fragment", [((4, 0, 2, 2), ValueError, "no channels"),
                                                 ((4,), ValueError, "expected")])
def test_lazy_module_refuses_a_first_input_it_cannot_take_and_stays_lazy(shape, exc, fragment):
    """A first input of 0 channels made a BatchNorm2d(0), which the constructor refuses
    (torch's lazy layer: IndexError); a 1-D one gave an IndexError from input.shape[1]."""
    lazy = batchnorm.LazyBatchNorm2d()
    with pytest.raises(exc, match=fragment):
        lazy(torch.randn(shape))
    assert type(lazy) is batchnorm.LazyBatchNorm2d and lazy.has_uninitialized_params()
    assert lazy(torch.randn(2, 3, 2, 2)).shape == (2, 3, 2, 2)


def test_lazy_module_loads_a_state_dict(gen):
    source = batchnorm.BatchNorm2d(6)
    with torch.no_grad():
        source.running_mean.copy_(torch.randn(6, generator=gen))
        source.weight.copy_(torch.randn(6, generator=gen))
    lazy = batchnorm.LazyBatchNorm2d()
    lazy.load_state_dict(source.state_dict())
    x = torch.randn(2, 6, 3, 3, generator=gen)
    torch.testing.assert_close(lazy.eval()(x), source.eval()(x))
    assert lazy.weight.shape == lazy.running_var.shape == (6,)


@pytest.mark.parametrize("ours_cls,torch_cls,shape", PAIRS, ids=["1d", "2d", "3d"])
def test_repr_is_torchs_plus_the_activation(ours_cls, torch_cls, shape):
    if not TORCH_HAS_BIAS_KWARG:
        pytest.skip("this torch predates BatchNorm's bias keyword and its 'bias=' in repr")
    for kwargs in ({}, dict(eps=0.0, momentum=None), dict(affine=False, bias=False),
                   dict(track_running_stats=False)):
        assert repr(ours_cls(4, **kwargs)) == repr(torch_cls(4, **kwargs))
    assert repr(ours_cls(4, activation="silu")).endswith(
        "track_running_stats=True, activation='silu')")
    assert repr(ours_cls(4, activation=nn.LeakyReLU(0.2))).endswith(
        "activation='leaky_relu', negative_slope=0.2)")


def test_reset_parameters_and_running_stats(gen):
    bn = batchnorm.BatchNorm2d(3)
    for _ in range(2):
        bn(torch.randn(4, 3, 2, 2, generator=gen) + 5)
    with torch.no_grad():
        bn.weight.mul_(3)
        bn.bias.add_(2)
    bn.reset_running_stats()
    assert bn.running_mean.eq(0).all() and bn.running_var.eq(1).all()
    assert bn.num_batches_tracked.item() == 0
    assert bn.weight.eq(3).all()  # parameters stay
    bn(torch.randn(4, 3, 2, 2, generator=gen) + 5)
    bn.reset_parameters()
    assert bn.weight.eq(1).all() and bn.bias.eq(0).all()
    assert bn.running_mean.eq(0).all() and bn.num_batches_tracked.item() == 0
    # Neither fails without the state they would reset.
    batchnorm.BatchNorm2d(3, affine=False, track_running_stats=False).reset_parameters()


@pytest.mark.parametrize("activation,name,slope", [
    (None, "none", None),
    ("relu", "relu", None),
    (nn.ReLU(), "relu", None),
    (nn.ReLU(inplace=True), "relu", None),
    ("leaky_relu", "leaky_relu", 0.01),
    (nn.LeakyReLU(), "leaky_relu", 0.01),
    (nn.LeakyReLU(0.2), "leaky_relu", 0.2),
    (nn.LeakyReLU(negative_slope=1.5), "leaky_relu", 1.5),
    ("silu", "silu", None), (nn.SiLU(), "silu", None),
    ("gelu", "gelu", None), (nn.GELU(), "gelu", None),
    ("gelu_tanh", "gelu_tanh", None), (nn.GELU(approximate="tanh"), "gelu_tanh", None),
    ("sigmoid", "sigmoid", None), (nn.Sigmoid(), "sigmoid", None),
    ("tanh", "tanh", None), (nn.Tanh(), "tanh", None),
])
def test_activation_forms(activation, name, slope, gen):
    bn = batchnorm.BatchNorm1d(3, activation=activation, dtype=torch.float64)
    assert bn.activation == name
    if slope is not None:
        assert bn.activation_slope == slope
    x = torch.randn(6, 3, generator=gen, dtype=torch.float64) * 2
    plain = nn.functional.batch_norm(x, None, None, training=True, eps=bn.eps)
    torch_act = {"none": lambda t: t, "relu": torch.relu,
                 "leaky_relu": lambda t: nn.functional.leaky_relu(t, slope or 0.01),
                 "silu": nn.functional.silu, "gelu": nn.functional.gelu,
                 "gelu_tanh": lambda t: nn.functional.gelu(t, approximate="tanh"),
                 "sigmoid": torch.sigmoid, "tanh": torch.tanh}[name]
    torch.testing.assert_close(bn(x), torch_act(plain))


def test_residual_keyword_and_positional(gen):
    bn = batchnorm.BatchNorm2d(2, activation="relu")
    x, r = torch.randn(3, 2, 2, 2, generator=gen), torch.randn(3, 2, 2, 2, generator=gen)
    a = copy.deepcopy(bn)(x, r)
    b = copy.deepcopy(bn)(x, residual=r)
    assert torch.equal(a, b)
    plain = batchnorm.BatchNorm2d(2)
    plain.load_state_dict(bn.state_dict())
    torch.testing.assert_close(a, torch.relu(plain(x) + r))


@pytest.mark.parametrize("counter_dtype", [torch.long, torch.float32], ids=["int64", "float32"])
def test_a_counter_of_another_one_value_shape_counts_as_torchs(backend, gen, counter_dtype):
    """torch's layer reads num_batches_tracked as a number (momentum=None divides by it),
    so a (1, 1) counter works there; ours broadcast the cumulative factor to the counter's
    shape and failed to write a [1, C] mean into [C], after the count had moved."""
    x = torch.randn(4, 3, 2, 2, generator=gen).to(backend.device)
    layers = []
    for cls in (batchnorm.BatchNorm2d, torch.nn.BatchNorm2d):
        bn = cls(3, momentum=None, device=backend.device)
        bn.num_batches_tracked = torch.zeros(1, 1, dtype=counter_dtype, device=backend.device)
        bn(x), bn(x * 2 + 1)
        layers.append(bn)
    ours, theirs = layers
    assert ours.num_batches_tracked.tolist() == [[2]]
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


def test_dtype_and_device_moves(gen):
    bn = batchnorm.BatchNorm2d(3, activation="tanh").double()
    assert bn.weight.dtype == bn.running_mean.dtype == torch.float64
    assert bn.num_batches_tracked.dtype == torch.long
    x = torch.randn(2, 3, 2, 2, generator=gen, dtype=torch.float64)
    assert bn(x).dtype == torch.float64
    bn = bn.to("cpu", torch.float32)
    assert bn(x.float()).dtype == torch.float32
    meta = batchnorm.BatchNorm2d(3, device="meta")
    assert meta.weight.is_meta and meta.num_batches_tracked.is_meta


def test_deepcopy_and_pickle_keep_the_activation(gen):
    bn = batchnorm.BatchNorm1d(3, momentum=None, activation=nn.LeakyReLU(0.25))
    x = torch.randn(5, 3, generator=gen)
    for clone in (copy.deepcopy(bn), pickle.loads(pickle.dumps(bn))):
        assert clone.activation == "leaky_relu" and clone.activation_slope == 0.25
        assert clone.momentum is None
        torch.testing.assert_close(clone(x), copy.deepcopy(bn)(x))


def test_a_layer_pickled_whole_before_the_activation_moved_loads(gen):
    """The activation is kept under ``_activation`` now (torch 2.11's dynamo recursed on
    the old key, the property's own name): a layer pickled with the old key (torch.save
    of a whole model) loads with its activation, not silently without; and a pickle made
    now still holds that key, which the earlier code reads."""
    bn = batchnorm.BatchNorm2d(3, activation="silu")
    state = bn.__getstate__()
    assert state["activation"] == "silu"
    del state["_activation"]  # as a pickle of the earlier code
    old = batchnorm.BatchNorm2d.__new__(batchnorm.BatchNorm2d)
    old.__setstate__(state)
    assert old.activation == "silu" and "activation" not in old.__dict__
    x = torch.randn(2, 3, 2, 2, generator=gen)
    torch.testing.assert_close(old(x), bn(x))


def test_docstrings_are_shared_and_filled():
    for cls in (batchnorm.BatchNorm1d, batchnorm.BatchNorm2d, batchnorm.BatchNorm3d):
        doc = cls.__doc__
        assert cls.__name__ in doc and "Default: 0.1" in doc and "eps=0" in doc
        assert "{name}" not in doc and "{shape}" not in doc
    assert "BatchNorm2d" in batchnorm.LazyBatchNorm2d.__doc__
    for cls in (batchnorm.BatchNorm2d, batchnorm.LazyBatchNorm1d, batchnorm.SyncBatchNorm):
        assert "residual" in cls.forward.__doc__  # help() shows it, not nn.Module's


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_eager_graph_is_one_node_per_layer(layout, gen):
    """The kernel views are made where autograd does not record them: the output's
    grad_fn is our Function and its inputs lead straight to x's and the parameters'
    accumulators (no view nodes, each of which costs more than a small batch norm)."""
    x = torch.randn(2, 3, 4, 5, generator=gen)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    y = batchnorm.BatchNorm2d(3, activation="relu")(x)
    assert y.is_contiguous(memory_format=torch.channels_last if layout == "channels_last"
                           else torch.contiguous_format)
    nexts = [f for f, _ in y.grad_fn.next_functions if f is not None]
    assert nexts and all(type(f).__name__ == "AccumulateGrad" for f in nexts)
    assert {id(f.variable) for f in nexts} >= {id(x)}


def test_an_inplace_change_of_the_saved_input_is_detected(gen):
    """The backend reads x by its address in backward; autograd's version check of the
    saved tensors still guards it."""
    leaf = torch.randn(4, 3, 5, generator=gen, requires_grad=True)
    x = leaf * 1.0
    y = batchnorm.BatchNorm1d(3, activation="relu")(x)
    x.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


_LAYER_BY_RANK = {2: batchnorm.BatchNorm1d, 3: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d,
                  5: batchnorm.BatchNorm3d}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,layout", [
    ((4, 3, 5, 6), "contiguous"), ((4, 3, 5, 6), "channels_last"), ((0, 3, 5, 6), "contiguous"),
    ((6, 3), "contiguous"), ((4, 3, 7), "contiguous"), ((2, 3, 2, 3, 4), "contiguous")])
def test_the_output_takes_an_inplace_op(backend, shape, layout, dtype, training, gen):
    """``nn.ReLU(inplace=True)`` right after the layer (torchvision's blocks, and what
    ``convert`` leaves unfused when the ReLU is shared) works as after torch's: the output
    is no view made inside our autograd Function, which autograd would refuse to change
    in place. Same values and gradients as the out-of-place ReLU."""
    x = make_input(shape, layout, dtype, backend.device, gen)[1].detach()
    bn = _LAYER_BY_RANK[len(shape)](3).to(backend.device).train(training)
    results = []
    for relu in (torch.relu, torch.relu_):
        leaf = x.clone(memory_format=torch.preserve_format).requires_grad_()
        y = relu(bn(leaf))
        y.float().square().sum().backward()
        results.append((y.detach(), leaf.grad, bn.weight.grad.clone(), bn.bias.grad.clone()))
        bn.weight.grad = bn.bias.grad = None
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_pooled_output_takes_an_inplace_op(gen):
    """The CPU backend's outputs of 1 MiB or more come from its pool of reused buffers:
    those, too, take ``relu_`` (torchvision's ``out += identity`` and in-place ReLU)."""
    if "cpu" not in backends.available():
        pytest.skip("the numba CPU backend is not available")
    x = torch.randn(16, 64, 16, 16, generator=gen)  # 1 MiB of float32
    bn = batchnorm.BatchNorm2d(64)
    results = []
    with backends.using("cpu"):
        for relu in (torch.relu, torch.relu_):
            leaf = x.clone().requires_grad_()
            y = relu(bn(leaf))
            y.square().sum().backward()
            results.append((y.detach(), leaf.grad, bn.weight.grad.clone()))
            bn.weight.grad = bn.bias.grad = None
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


class _Doubled(nn.Module):
    def forward(self, w):
        return 2 * w


def test_parameters_reached_other_ways_are_read(gen):
    """forward reads the parameters and buffers from the module's dicts (cheaper than
    ``nn.Module.__getattr__``); where they live elsewhere they are read as attributes:
    a parametrization, a parameter replaced by a plain tensor (as ``weight_norm`` does),
    ``torch.func.functional_call``. Each gives what torch's module gives."""
    from torch.nn.utils import parametrize
    x = torch.randn(4, 3, 5, generator=gen)
    ours, theirs = batchnorm.BatchNorm1d(3), nn.BatchNorm1d(3)
    for bn in (ours, theirs):
        parametrize.register_parametrization(bn, "weight", _Doubled())
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)

    ours, theirs = batchnorm.BatchNorm1d(3), nn.BatchNorm1d(3)
    for bn in (ours, theirs):
        del bn.bias
        bn.bias = torch.full((3,), 0.5)
    torch.testing.assert_close(ours(x), theirs(x))

    ours, theirs = batchnorm.BatchNorm1d(3), nn.BatchNorm1d(3)
    state = {"weight": torch.full((3,), 3.0), "running_mean": torch.ones(3)}
    got = torch.func.functional_call(ours.eval(), state, (x,))
    want = torch.func.functional_call(theirs.eval(), state, (x,))
    torch.testing.assert_close(got, want)
    assert torch.equal(ours.weight, torch.ones(3))  # the module's own are untouched


def _bytes_kept_for_backward(module, x) -> int:
    """Bytes of the storages a training forward keeps for backward: what autograd's saved
    tensors hold (seen by a pack hook) and what a backend keeps on the side (our
    Function's ``backend_saved``), each storage once."""
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        y = module(x)
    if isinstance(module, batchnorm.BatchNorm2d):
        kept += y.grad_fn.backend_saved or ()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept}
    return sum(storages.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bn_relu_keeps_about_half_of_what_torch_keeps(backend, layout, dtype, gen):
    """BN+ReLU keeps x alone of the input's size for backward (the ReLU's mask is
    recomputed from x and the statistics); torch's BatchNorm then ReLU keeps x and the
    ReLU's output. Issue 4 asks for at most 0.55x; a [C]-sized remainder rides on top."""
    x = torch.randn(4, 8, 16, 16, generator=gen).to(backend.device, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    ours = batchnorm.BatchNorm2d(8, activation="relu").to(backend.device)
    theirs = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU()).to(backend.device)
    kept, torchs = _bytes_kept_for_backward(ours, x), _bytes_kept_for_backward(theirs, x)
    input_bytes = x.numel() * x.element_size()
    assert torchs >= 2 * input_bytes
    assert kept <= 0.55 * torchs, (kept, torchs)


class _TracedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = batchnorm.BatchNorm2d(4, activation="relu")
        self.skip = batchnorm.BatchNorm2d(4, momentum=None)
        self.head = batchnorm.BatchNorm1d(4, affine=False)

    def forward(self, x):
        h = self.conv(x)
        return self.head(self.bn(h, residual=self.skip(h)).mean((2, 3)))


@pytest.mark.parametrize("kind", ["BatchNorm2d", "FrozenBatchNorm2d", "ChannelAffine"])
def test_torch_jit_script_says_what_to_use_instead(kind):
    """It failed deep inside our Python ("Don't support conversion in JoinedStr"); on a
    folded model, at ChannelAffine's annotations (a ValueError), or naming the copy of
    the converted BatchNorm2d that a ReLU's marker kept."""
    import warnings
    model = nn.Sequential(nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4), nn.ReLU())
    if kind == "FrozenBatchNorm2d":
        batchnorm.freeze(model, buffers=True)
    elif kind == "ChannelAffine":
        model, _ = batchnorm.fold(batchnorm.convert(model).eval())
        assert model[2].bn is model[1]  # the marker points at what the model has
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit's own
        with pytest.raises(TypeError, match=f"torch.jit.script cannot compile batchnorm's "
                           f"{kind}.*torch.jit.trace, torch.export or "
                           "torch.compile") as info:
            torch.jit.script(model)
    assert ("batchnorm.revert" in str(info.value)) is (kind == "BatchNorm2d")


@pytest.mark.parametrize("training", [True, False])
def test_torch_fx_symbolic_trace(training, gen):
    """torch.fx traces a model through our layers (only torch.nn's own modules are its
    leaves): each becomes one call_module node, as torch's layers do, and the
    GraphModule computes what the model does, running updates included. Our layers raised
    "expects a torch.Tensor, got Proxy"."""
    model = _TracedBlock().train(training)
    with torch.no_grad():
        for bn in (model.bn, model.skip):
            bn.running_mean.uniform_(-1, 1, generator=gen)
            bn.weight.uniform_(0.5, 2, generator=gen)
    eager = copy.deepcopy(model)
    traced = torch.fx.symbolic_trace(model)
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"] == [
        "conv", "skip", "bn", "head"]
    for _ in range(2):
        x = torch.randn(5, 3, 6, 6, generator=gen)
        assert torch.equal(traced(x), eager(x))
    state, eager_state = traced.state_dict(), eager.state_dict()
    assert state.keys() == eager_state.keys()
    for name, got in state.items():
        assert torch.equal(got, eager_state[name]), name
    again = pickle.loads(pickle.dumps(traced))
    x = torch.randn(5, 3, 6, 6, generator=gen)
    assert torch.equal(again(x), copy.deepcopy(traced)(x))


@pytest.mark.parametrize("traced_in", ["train", "eval"])
def test_a_traced_model_follows_its_train_and_eval_mode(traced_in, gen):
    """The graph held the mode of the trace: a model traced in training went on updating
    its statistics after ``eval()`` (and quantization-aware training's ``convert_fx``
    gave a model that normalized with each batch's statistics)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), batchnorm.BatchNorm2d(4, activation="relu"),
                          batchnorm.FrozenBatchNorm2d(4))
    model.train(traced_in == "train")
    eager = copy.deepcopy(model)
    traced = torch.fx.symbolic_trace(model)
    for mode in ("train", "eval", "train"):
        eager.train(mode == "train"), traced.train(mode == "train")
        x = torch.randn(6, 3, 5, 5, generator=gen)
        assert torch.equal(traced(x), eager(x))
        assert torch.equal(traced.get_submodule("1").running_mean, eager[1].running_mean)
    assert eager[1].num_batches_tracked == 2


def test_a_traced_layer_with_forward_hooks_runs_them_once(gen):
    """fx runs a layer's forward hooks around the traced forward, on Proxies: a layer
    with hooks is its computation in the graph (the mode of the trace), not a node that
    would run them a second time; so is the traced root."""
    model = nn.Sequential(batchnorm.BatchNorm2d(4), batchnorm.BatchNorm2d(4)).eval()
    model[1].register_forward_hook(lambda module, args, out: out * 2)
    traced = torch.fx.symbolic_trace(model)
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"] == ["0"]
    x = torch.randn(2, 4, 3, 3, generator=gen)
    assert torch.equal(traced(x), model(x))
    root = batchnorm.BatchNorm2d(4).eval()
    assert torch.equal(torch.fx.symbolic_trace(root)(x), root(x))


class _DoublesItsInput(batchnorm.BatchNorm2d):
    def forward(self, input, residual=None):
        return super().forward(input * 2, residual)


def test_a_traced_subclass_with_its_own_forward_runs_it_once(gen):
    """fx traces a subclass's own forward (what it does before calling ours is in the
    graph): as a call_module node the layer ran it a second time (bn(4x) for bn(2x))."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), _DoublesItsInput(4)).eval()
    with torch.no_grad():
        model[1].running_var.fill_(2.0)
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 3, 3, generator=gen)
    assert torch.equal(traced(x), model(x))


def test_global_forward_hooks_run_once_in_a_traced_model(gen):
    """register_module_forward_hook's hooks run around every forward, traced ones too:
    the call_module node ran them again (an output doubled twice)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), batchnorm.BatchNorm2d(4)).eval()

    def double_ours(module, args, out):
        return out * 2 if isinstance(module, batchnorm.BatchNorm2d) else out

    handle = torch.nn.modules.module.register_module_forward_hook(double_ours)
    try:
        traced = torch.fx.symbolic_trace(model)
        x = torch.randn(2, 3, 3, 3, generator=gen)
        assert torch.equal(traced(x), model(x))
    finally:
        handle.remove()


@pytest.mark.parametrize("value, expected", [
    (None, ("none", 0.0)), (nn.ReLU(), ("relu", 0.0)), ("leaky_relu", ("leaky_relu", 0.01)),
    (nn.LeakyReLU(0.2), ("leaky_relu", 0.2)), (nn.GELU(approximate="tanh"), ("gelu_tanh", 0.0))])
@pytest.mark.parametrize("make", [lambda: batchnorm.BatchNorm2d(3, activation="relu"),
                                  lambda: batchnorm.FrozenBatchNorm2d(3, activation="relu")],
                         ids=["BatchNorm2d", "FrozenBatchNorm2d"])
def test_activation_takes_what_the_constructor_takes_also_later(backend, make, value,
                                                                  expected):
    """``activation = None`` or a module raised a KeyError at the next call (cpu), or a
    ValueError after the running statistics had moved (portable); the name 'leaky_relu'
    kept a ReLU layer's slope 0, silently a ReLU; a module became a submodule."""
    bn = make().to(backend.device)
    bn.activation = value
    assert (bn.activation, bn.activation_slope) == expected
    assert not list(bn.children())
    torch.manual_seed(0)
    x = torch.randn(4, 3, 2, 2, device=backend.device)
    frozen = isinstance(bn, batchnorm.FrozenBatchNorm2d)  # the running statistics
    theirs = nn.BatchNorm2d(3).to(backend.device).train(not frozen)
    act = F.activation_module(*expected)
    want = theirs(x) if act is None else act(theirs(x))
    torch.testing.assert_close(bn(x), want)


def test_a_bad_activation_fails_at_the_assignment_and_changes_nothing():
    bn = batchnorm.BatchNorm2d(3, activation=nn.LeakyReLU(0.2))
    for bad, error in (("elu", ValueError), (nn.ELU(), TypeError), (3, TypeError)):
        with pytest.raises(error):
            bn.activation = bad
        assert (bn.activation, bn.activation_slope) == ("leaky_relu", 0.2)


def test_activation_can_be_assigned_in_a_compiled_function():
    """fullgraph=True: dynamo did not trace the property's fset called by name."""
    torch._dynamo.reset()

    def swap_and_run(m, x):
        m.activation = "silu"
        return m(x)

    bn = batchnorm.BatchNorm2d(3).eval()
    x = torch.randn(4, 3, 5, 5)
    y = torch.compile(swap_and_run, fullgraph=True, backend="eager")(bn, x)
    torch.testing.assert_close(y, nn.functional.silu(nn.BatchNorm2d(3).eval()(x)))
    assert bn.activation == "silu"


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5, 5)])
@pytest.mark.parametrize("training", [True, False])
def test_a_default_device_leaves_the_computation_on_the_inputs(backend, shape, training, gen):
    """Under ``with torch.device("meta")`` (or ``torch.set_default_device``) a layer on a
    CPU input computes on the CPU, as torch's: the CPU kernels' statistics were allocated
    on the default device, and the kernels wrote to its address 0 (a segfault)."""
    if backend.device != "cpu":
        pytest.skip("a default device other than the CPU input's: this machine's case")
    x = torch.randn(shape, generator=gen)
    ours_cls, torch_cls = {2: (batchnorm.BatchNorm1d, nn.BatchNorm1d),
                           4: (batchnorm.BatchNorm2d, nn.BatchNorm2d)}[len(shape)]
    ours, theirs = ours_cls(3, activation="relu"), torch_cls(3)
    ours.train(training), theirs.train(training)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    with torch.device("meta"):
        y, expected = ours(xs[0]), torch.relu(theirs(xs[1]))
        y.sum().backward(), expected.sum().backward()
    assert y.device == xs[0].grad.device == torch.device("cpu")
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(xs[0].grad, xs[1].grad)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


def test_a_first_call_under_a_default_device_imports_the_backend():
    """The CPU backend, imported at the first call, made a tensor at import: on the meta
    device, whose data numpy cannot take (a TypeError)."""
    code = ("import torch, batchnorm\n"
            "x = torch.randn(4, 3, 2, 2)\n"
            "with torch.device('meta'):\n"
            "    y = batchnorm.BatchNorm2d(3, device='cpu')(x)\n"
            "assert y.device.type == 'cpu', y.device\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]


class _CallNames(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


class _Tagged(torch.Tensor):
    pass


class _OverridesBatchNorm(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is F.batch_norm:
            return "overridden"
        return super().__torch_function__(func, types, args, kwargs or {})


def test_the_functional_form_and_the_layers_take_part_in_torch_function(backend, gen):
    """As torch.nn.functional.batch_norm: a subclass's override is called, a
    TorchFunctionMode sees one call (it saw each of the ~57 torch ops inside), and a
    subclass without an override gets its type back (the cpu backend gave a plain Tensor
    for a subclass weight)."""
    x = torch.randn(4, 3, 5, 5, generator=gen).to(backend.device)
    rm, rv = torch.zeros(3, device=backend.device), torch.ones(3, device=backend.device)
    assert F.batch_norm(x.as_subclass(_OverridesBatchNorm), rm, rv) == "overridden"
    with _CallNames() as mode:
        F.batch_norm(x, rm, rv, training=True, activation="relu")
    assert mode.names == ["batch_norm"]
    layer = batchnorm.BatchNorm2d(3, activation="relu").to(backend.device)
    with _CallNames() as mode:
        layer(x)
    assert mode.names.count("batch_norm_resolved") == 1 and len(mode.names) <= 2, mode.names
    for training in (True, False):
        weight = torch.rand(3, generator=gen).to(backend.device).as_subclass(_Tagged)
        assert type(F.batch_norm(x, rm, rv, weight, training=training)) is _Tagged
        assert type(layer.train(training)(x.as_subclass(_Tagged))) is _Tagged


def test_a_traced_layer_with_a_forward_of_its_own_instance_runs_it_once(gen):
    """A forward set on the instance (accelerate's hooks wrap it so) runs on fx's Proxies:
    as a call_module node the layer ran it again."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), batchnorm.BatchNorm2d(4)).eval()
    layer_forward = model[1].forward
    model[1].forward = lambda x, residual=None: layer_forward(x * 2, residual)
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 3, 3, generator=gen)
    assert torch.equal(traced(x), model(x))


def test_a_class_forward_bound_back_on_the_instance_stays_a_node(gen):
    """``bn.forward = bn.forward`` (what accelerate's remove_hook_from_module leaves) runs
    nothing on fx's Proxies: the layer stays a call_module node that follows eval()."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), batchnorm.BatchNorm2d(4))
    model[1].forward = model[1].forward
    traced = torch.fx.symbolic_trace(model)
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"] == ["0", "1"]


@pytest.mark.parametrize("make", [
    lambda: batchnorm.BatchNorm2d(3, activation="relu"),
    lambda: batchnorm.BatchNorm2d(3).eval(),
    lambda: batchnorm.SyncBatchNorm(3),
    lambda: batchnorm.FrozenBatchNorm2d(3),
    lambda: batchnorm.tools.ChannelAffine(torch.rand(3) + 0.5, torch.randn(3), "relu"),
], ids=["train", "eval", "sync", "frozen", "channel_affine"])
def test_a_layer_traced_as_the_root_pickles(make, gen):
    """fx copied the forward's annotations, strings under `from __future__ import
    annotations`, into the graph's code: pickle and torch.save raised AttributeError."""
    layer = make()
    traced = torch.fx.symbolic_trace(layer)
    again = pickle.loads(pickle.dumps(traced))
    x = torch.randn(2, 3, 4, 4, generator=gen)
    assert torch.equal(again(x), copy.deepcopy(traced)(x))


def test_a_layer_traced_as_its_computation_keeps_all_its_buffers(gen):
    """Traced in eval with a hook, the node read no num_batches_tracked, so the
    GraphModule lacked it and the model's state_dict did not load into it strictly."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), batchnorm.BatchNorm2d(4)).eval()
    model[1].register_forward_hook(lambda module, args, out: out)
    traced = torch.fx.symbolic_trace(model)
    assert traced.state_dict().keys() == model.state_dict().keys()
    traced.load_state_dict(model.state_dict())


def test_a_traced_layers_non_persistent_buffer_stays_out_of_the_state_dict(gen):
    """The node that keeps a layer's buffers in the GraphModule took a non-persistent
    one too, which fx registered as persistent: the GraphModule's state_dict had a key
    the model's lacks."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), batchnorm.BatchNorm2d(4)).eval()
    model[1].register_buffer("extra", torch.ones(4), persistent=False)
    model[1].register_forward_hook(lambda module, args, out: out)
    traced = torch.fx.symbolic_trace(model)
    assert traced.state_dict().keys() == model.state_dict().keys()
