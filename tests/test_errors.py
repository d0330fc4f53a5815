"""Every error case: a clear message that names the fix, and nothing mutated.

torch increments ``num_batches_tracked`` before some of its checks fail; we validate
everything first, so a failed call leaves every parameter and buffer as it was.
"""

import functools
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from tolerances import assert_close
from torch import nn

import batchnorm
from batchnorm import functional as F


def _randomized(bn, gen):
    """Parameters and buffers away from their defaults, so a reset would show."""
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            if t is not None:
                t.copy_(torch.randn(t.shape, generator=gen))
        if bn.running_var is not None:
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen) + 0.5)
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.fill_(7)
    return bn


def _snapshot(bn):
    return {k: v.clone() for k, v in bn.state_dict().items()}


def _assert_untouched(bn, before):
    after = bn.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed by a failed call"
    for p in bn.parameters():
        assert p.grad is None


CASES = {
    # id: (module factory, input factory(gen), residual factory or None, exception, fragments)
    "2d-got-3d": (lambda: batchnorm.BatchNorm2d(3), lambda g: torch.randn(4, 3, 5, generator=g),
                  None, ValueError, ["BatchNorm2d", "expected 4D input", "got 3D input",
                                     "use BatchNorm1d for 3D input"]),
    "1d-got-4d": (lambda: batchnorm.BatchNorm1d(3),
                  lambda g: torch.randn(2, 3, 2, 2, generator=g), None, ValueError,
                  ["expected 2D or 3D input", "got 4D input", "use BatchNorm2d for 4D input"]),
    "3d-got-4d": (lambda: batchnorm.BatchNorm3d(3),
                  lambda g: torch.randn(2, 3, 2, 2, generator=g), None, ValueError,
                  ["expected 5D input"]),
    "channels": (lambda: batchnorm.BatchNorm2d(3, momentum=None),
                 lambda g: torch.randn(2, 4, 3, 3, generator=g), None, ValueError,
                 ["4 channels", "num_features=4"]),
    "channels-noaffine": (lambda: batchnorm.BatchNorm1d(3, affine=False),
                          lambda g: torch.randn(5, 2, generator=g), None, ValueError,
                          ["running_mean", "2 channels", "num_features=2"]),
    "one-value-1d": (lambda: batchnorm.BatchNorm1d(3), lambda g: torch.randn(1, 3, generator=g),
                     None, ValueError, ["Expected more than 1 value per channel when training",
                                        "drop_last=True", "eval"]),
    "one-value-1d-ncl": (lambda: batchnorm.BatchNorm1d(3, momentum=None),
                         lambda g: torch.randn(1, 3, 1, generator=g), None, ValueError,
                         ["Expected more than 1 value per channel when training", "batch"]),
    "one-value-2d": (lambda: batchnorm.BatchNorm2d(2, activation="relu"),
                     lambda g: torch.randn(1, 2, 1, 1, generator=g), None, ValueError,
                     ["Expected more than 1 value per channel when training",
                      "drop_last=True", "model.eval()"]),
    "integer": (lambda: batchnorm.BatchNorm2d(3), lambda g: torch.randint(0, 9, (2, 3, 2, 2)),
                None, TypeError, ["floating", "torch.int64", "input.float()"]),
    "bool": (lambda: batchnorm.BatchNorm1d(3), lambda g: torch.ones(4, 3, dtype=torch.bool),
             None, TypeError, ["floating", "input.float()"]),
    "device": (lambda: batchnorm.BatchNorm2d(3),
               lambda g: torch.empty(2, 3, 4, 4, device="meta"), None, RuntimeError,
               ["is on cpu", "input is on meta", ".to("]),
    "sparse": (lambda: batchnorm.BatchNorm1d(3), lambda g: torch.randn(4, 3, generator=g
                                                                        ).to_sparse(),
               None, NotImplementedError, ["dense (strided)", "input.to_dense()"]),
    # (the hint was input.to_dense(), which a jagged tensor refuses; a strided nested
    # tensor raised torch's internal error at its shape)
    "nested-jagged": (lambda: batchnorm.BatchNorm2d(3), lambda g: _nested(g, torch.jagged),
                      None, NotImplementedError, ["nested tensor", "torch.stack(t.unbind())"]),
    "nested-strided": (lambda: batchnorm.BatchNorm2d(3), lambda g: _nested(g, torch.strided),
                       None, NotImplementedError, ["nested tensor", "dense (strided)"]),
    "residual-nested": (lambda: batchnorm.BatchNorm2d(3),
                        lambda g: torch.randn(2, 3, 5, 5, generator=g),
                        lambda g: _nested(g, torch.strided), NotImplementedError,
                        ["residual is a nested tensor"]),
    "residual-shape": (lambda: batchnorm.BatchNorm2d(3, activation="relu"),
                       lambda g: torch.randn(2, 3, 4, 4, generator=g),
                       lambda g: torch.randn(2, 3, 4, 5, generator=g), ValueError,
                       ["residual must have the input's shape", "(2, 3, 4, 4)", "(2, 3, 4, 5)"]),
    # (it was a ValueError, against the README's rule: TypeError for a wrong type)
    "residual-not-a-tensor": (lambda: batchnorm.BatchNorm2d(3),
                              lambda g: torch.randn(2, 3, 2, 2, generator=g),
                              lambda g: [1.0, 2.0], TypeError,
                              ["residual must be None or a tensor", "got list"]),
    "residual-dtype": (lambda: batchnorm.BatchNorm2d(3),
                       lambda g: torch.randn(2, 3, 2, 2, generator=g),
                       lambda g: torch.randint(0, 3, (2, 3, 2, 2)), TypeError,
                       ["residual must be floating point"]),
    "residual-device": (lambda: batchnorm.BatchNorm2d(3),
                        lambda g: torch.randn(2, 3, 2, 2, generator=g),
                        lambda g: torch.empty(2, 3, 2, 2, device="meta"), RuntimeError,
                        ["residual is on meta", ".to("]),
    # torch raises this from save_for_backward, after its running update
    "inference-input": (lambda: batchnorm.BatchNorm2d(3),
                        lambda g: _inference(torch.randn(2, 3, 2, 2, generator=g)), None,
                        RuntimeError, ["Inference tensors cannot be saved for backward",
                                       ".clone()"]),
}


def _nested(gen, layout):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch.strided nested tensors are a prototype)
        return torch.nested.nested_tensor([torch.randn(3, 5, 5, generator=gen)] * 2,
                                          layout=layout)


def test_a_lazy_layer_refuses_a_nested_first_input_and_stays_lazy(gen):
    """It read the nested tensor's shape first: torch's internal errors."""
    bn = batchnorm.LazyBatchNorm2d()
    for layout in (torch.jagged, torch.strided):
        with pytest.raises(NotImplementedError, match="nested tensor"):
            bn(_nested(gen, layout))
    assert bn.has_uninitialized_params()


def test_a_call_that_fails_in_a_fake_tensor_mode_changes_no_state(gen):
    """The running update ran before the normalization on the torch-ops path (dispatch
    modes, tensor subclasses), and num_batches_tracked moved first: a real layer given a
    fake input moved it, then raised."""
    fake_tensor = pytest.importorskip("torch._subclasses.fake_tensor")
    bn = _randomized(batchnorm.BatchNorm2d(3), gen)
    before = _snapshot(bn)
    with fake_tensor.FakeTensorMode(), pytest.raises(Exception):  # noqa: B017 (torch's)
        bn(torch.randn(2, 3, 4, 4))
    _assert_untouched(bn, before)


def _inference(t):
    with torch.inference_mode():
        return t.clone()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", list(CASES))
def test_error_message_and_state_untouched(case, training, gen):
    make_module, make_input, make_residual, exc, fragments = CASES[case]
    if not training and case.startswith("one-value"):
        pytest.skip("not an error in eval: see test_one_value_per_channel_is_fine_in_eval")
    bn = _randomized(make_module(), gen).train(training)
    before = _snapshot(bn)
    residual = make_residual(gen) if make_residual else None
    with pytest.raises(exc) as info:
        bn(make_input(gen), residual)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in: {info.value}"
    _assert_untouched(bn, before)


def test_torch_counts_the_failed_batch_we_do_not(gen):
    """The difference documented in the README: torch's num_batches_tracked moves on a
    batch of one; ours does not."""
    x = torch.randn(1, 3, generator=gen)
    theirs, ours = nn.BatchNorm1d(3), batchnorm.BatchNorm1d(3)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        theirs(x)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        ours(x)
    assert ours.num_batches_tracked.item() == 0
    if theirs.num_batches_tracked.item() == 0:
        pytest.skip("this torch no longer counts the failed batch; the README's note is stale")


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("one-value")])
def test_one_value_per_channel_is_fine_in_eval(case, gen):
    """Evaluation uses the running statistics, which a batch of one does not need."""
    make_module, make_input = CASES[case][:2]
    bn = _randomized(make_module(), gen).eval()
    before = _snapshot(bn)
    y = bn(make_input(gen))
    assert torch.isfinite(y).all()
    _assert_untouched(bn, before)


# ---------------------------------------------------------------------------------------
# Activation and constructor arguments


@pytest.mark.parametrize("activation,exc,fragment", [
    ("relu6", ValueError, "unknown activation 'relu6'"),
    ("ReLU", ValueError, "'leaky_relu'"),
    (nn.ReLU6(), TypeError, "cannot be fused"),
    (nn.Softplus(), TypeError, "ReLU"),
    (3, TypeError, "cannot be fused"),
    (nn.GELU(approximate="Tanh"), ValueError, "approximate must be 'none' or 'tanh'"),
    # a class, a function, a partial: each says what to pass instead
    (nn.ReLU, TypeError, "the class nn.ReLU: pass an instance, nn.ReLU(), or a name"),
    (torch.relu, TypeError, "is a function, which cannot be fused: pass a name ('relu'"),
    (functools.partial(torch.nn.functional.leaky_relu, negative_slope=0.2), TypeError,
     "is a function"),
])
def test_unknown_activation(activation, exc, fragment):
    with pytest.raises(exc) as info:
        batchnorm.BatchNorm2d(3, activation=activation)
    assert fragment in str(info.value)
    with pytest.raises(exc):
        F.batch_norm(torch.randn(4, 3), None, None, training=True, activation=activation)


def test_the_resolved_forms_check_the_activation_and_its_slope(backend):
    """batch_norm_resolved, sync_batch_norm and ChannelAffine take a resolved name: an
    unknown one raised KeyError on the kernels' backends and ValueError on the portable
    one; a string activation_slope was taken at assignment (read by float() on cpu, a
    TypeError on portable at the next forward)."""
    x = torch.randn(4, 3, 2, 2, device=backend.device)
    for activation in ("RELU", nn.ReLU()):
        with pytest.raises(ValueError, match="activation must be a resolved name"):
            F.batch_norm_resolved(x, None, None, None, None, True, 0.1, 1e-5, activation,
                                  0.0)
        with pytest.raises(ValueError, match="activation must be a resolved name"):
            batchnorm.tools.ChannelAffine(torch.ones(3), torch.zeros(3), activation=activation)
    bn = batchnorm.BatchNorm2d(3, activation="leaky_relu")
    for slope in ("0.2", True, None):
        with pytest.raises(TypeError, match="activation_slope must be a number"):
            bn.activation_slope = slope
    assert bn.activation_slope == 0.01
    bn.activation_slope = np.float32(0.25)
    assert type(bn.activation_slope) is float and "negative_slope=0.25" in repr(bn)
    frozen = batchnorm.FrozenBatchNorm2d(3, activation=nn.LeakyReLU(0.3))
    assert "negative_slope=0.3" in repr(frozen)


@pytest.mark.parametrize("num_batches,exc", [(-1, ValueError), (0, ValueError),
                                             (2.5, TypeError), ("2", TypeError),
                                             (True, TypeError)])
def test_recalibrate_checks_num_batches(num_batches, exc):
    model = nn.Sequential(batchnorm.BatchNorm2d(3))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc, match="num_batches must be None .* or an integer >= 1"):
        batchnorm.recalibrate(model, [torch.randn(4, 3, 2, 2)], num_batches=num_batches)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_recalibrate_takes_num_batches_of_any_integer_kind():
    batches = [torch.randn(4, 3, 2, 2) for _ in range(3)]
    for num_batches, used in ((np.int64(2), 2), (np.array(2), 2), (torch.tensor(2), 2),
                              (10**20, 3)):
        model = nn.Sequential(batchnorm.BatchNorm2d(3))
        seen = batchnorm.recalibrate(model, iter(batches), num_batches=num_batches)
        assert seen == {"0": 16 * used}


def test_sync_batch_norm_checks_its_process_group():
    """A process group of the wrong kind was taken, and the first synchronized call
    failed deep inside torch.distributed ('str' object has no attribute 'size')."""
    with pytest.raises(TypeError, match="process_group must be None .* or a "
                                        "torch.distributed ProcessGroup"):
        batchnorm.SyncBatchNorm(3, process_group="world")


def test_a_backend_named_wrongly_says_where_the_name_came_from():
    """BATCHNORM_BACKEND=CPU made the import fail with an error that did not name the
    variable; a backend named by a number raised ValueError."""
    env = {**os.environ, "BATCHNORM_BACKEND": "CPU"}
    run = subprocess.run([sys.executable, "-c", "import batchnorm"], env=env,
                         capture_output=True, text=True, check=False)
    assert run.returncode != 0
    assert "ValueError: BATCHNORM_BACKEND='CPU': unknown batchnorm backend" in run.stderr
    before = batchnorm.backends.forced()
    with pytest.raises(TypeError, match="named by a string"):
        batchnorm.backends.force(1)
    assert batchnorm.backends.forced() == before


@pytest.mark.parametrize("kwargs,exc,fragment", [
    (dict(num_features=0), ValueError, "num_features must be a positive int"),
    (dict(num_features=-2), ValueError, "num_features must be a positive int"),
    (dict(num_features=2.5), TypeError, "num_features must be a positive int"),
    ({"num_features": "4"}, TypeError, "num_features must be a positive int"),
    (dict(num_features=None), TypeError, "got NoneType None"),
    (dict(num_features=True), TypeError, "got bool True"),
    (dict(num_features=3, eps=-1e-5), ValueError, "eps must be >= 0"),
    (dict(num_features=3, eps=float("nan")), ValueError, "eps must be >= 0"),
    (dict(num_features=3, eps=None), TypeError, "eps must be a number >= 0, got NoneType"),
    ({"num_features": 3, "eps": "a"}, TypeError, "eps must be a number >= 0, got str"),
    (dict(num_features=3, momentum=-0.1), ValueError, "momentum must be a number in [0, 1]"),
    (dict(num_features=3, momentum=1.5), ValueError, "momentum must be a number in [0, 1]"),
    ({"num_features": 3, "momentum": "0.1"}, TypeError, "momentum must be a number in [0, 1]"),
    ({"num_features": 3, "momentum": True}, TypeError, "momentum must be a number in [0, 1]"),
])
@pytest.mark.parametrize("cls", [batchnorm.BatchNorm1d, batchnorm.BatchNorm2d,
                                 batchnorm.BatchNorm3d])
def test_constructor_rejects(cls, kwargs, exc, fragment):
    """ValueError for a value that cannot work (torch accepts it and fails later, or never),
    TypeError for an argument of a wrong type, as torch's constructor or forward raises."""
    with pytest.raises(exc) as info:
        cls(**kwargs)
    assert type(info.value) is exc and fragment in str(info.value)
    if exc is TypeError and "num_features" in fragment:
        with pytest.raises(TypeError):
            getattr(nn, cls.__name__)(**kwargs)


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(eps=-1.0), "eps must be >= 0"),
    (dict(momentum=1.5), "momentum must be a number in [0, 1]"),
])
def test_lazy_constructor_rejects(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        batchnorm.LazyBatchNorm2d(**kwargs)


def test_constructor_accepts_the_edges():
    for kwargs in (dict(eps=0.0), dict(momentum=0.0), dict(momentum=1.0), dict(momentum=None)):
        bn = batchnorm.BatchNorm1d(2, **kwargs)
        assert bn(torch.randn(5, 2)).shape == (5, 2)


def test_constructor_takes_integer_types_as_torch_does():
    np = pytest.importorskip("numpy")
    bn = batchnorm.BatchNorm2d(np.int64(3))
    assert bn.num_features == 3 and type(bn.num_features) is int
    assert nn.BatchNorm2d(np.int64(3)).num_features == 3
    with pytest.raises(TypeError, match="num_features must be a positive int"):
        batchnorm.BatchNorm2d(3.0)


def test_running_buffers_made_under_inference_mode_are_not_updated_outside_it(gen):
    """torch refuses the in-place update; our CPU kernels write by address, past torch's
    check, so ours checks first."""
    x = torch.randn(4, 3, 2, 2, generator=gen)
    for cls in (nn.BatchNorm2d, batchnorm.BatchNorm2d):
        with torch.inference_mode():
            bn = cls(3).requires_grad_(False)
        before = _snapshot(bn)
        with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside "
                                               "InferenceMode is not allowed"):
            bn(x)
        if cls is batchnorm.BatchNorm2d:  # torch's has counted the failed batch
            _assert_untouched(bn, before)
            with torch.inference_mode():  # where the update is allowed
                bn(x)
            assert bn.num_batches_tracked.item() == 1


@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_a_residual_made_under_inference_mode_works_as_in_torch(activation, gen):
    """Torch's BN, add, then activation never saves the residual, so one made under
    inference_mode works there. Ours keeps it to recompute the activation's input in
    backward, and refused it (the error save_for_backward raises): it keeps a normal copy
    of it now, only of such a residual."""
    x = torch.randn(4, 3, 2, 2, generator=gen)
    with torch.inference_mode():
        r = torch.randn(4, 3, 2, 2, generator=gen)
    dy = torch.randn(4, 3, 2, 2, generator=gen)
    theirs = _randomized(nn.BatchNorm2d(3), gen)
    ours = batchnorm.BatchNorm2d(3, activation=activation)
    ours.load_state_dict(theirs.state_dict())
    act = nn.ReLU() if activation == "relu" else nn.SiLU()
    outs = []
    for m in (ours, theirs):
        x_ = x.clone().requires_grad_()
        y = m(x_, r) if m is ours else act(m(x_) + r)
        y.backward(dy)
        outs.append((y, x_.grad, m.weight.grad, m.bias.grad, m.running_mean))
    for a, b in zip(*outs):
        assert_close(a.detach(), b.detach(), torch.float32)


def test_momentum_none_without_num_batches_tracked_is_torchs_factor_zero(gen):
    x = torch.randn(4, 3, 2, 2, generator=gen)
    theirs = _randomized(nn.BatchNorm2d(3, momentum=None), gen)
    ours = batchnorm.BatchNorm2d(3, momentum=None)
    ours.load_state_dict(theirs.state_dict())
    before = _snapshot(ours)
    for bn in (theirs, ours):
        bn.num_batches_tracked = None
        bn(x)
    assert torch.equal(ours.running_mean, before["running_mean"])
    assert torch.equal(ours.running_mean, theirs.running_mean)
    assert torch.equal(ours.running_var, theirs.running_var)


# ---------------------------------------------------------------------------------------
# The functional form validates before it mutates too


@pytest.mark.parametrize("bad,exc,fragment", [
    (dict(momentum=2.0), ValueError, "momentum must be a number in [0, 1]"),
    (dict(eps=-1.0), ValueError, "eps must be >= 0"),
    ({"eps": float("nan")}, ValueError, "eps must be >= 0, got nan"),
    (dict(weight=torch.ones(4)), ValueError, "weight has shape (4,)"),
    (dict(weight=torch.ones(1, 3)), ValueError, "pass weight.reshape(-1)"),
    (dict(bias=torch.ones(3, dtype=torch.long)), TypeError, "bias must be floating point"),
    ({"weight": torch.ones(3, dtype=torch.complex64)}, TypeError,
     "convert it, e.g. with .float()"),
    ({"momentum": "0.1"}, TypeError, "momentum must be a number in [0, 1], or None"),
    (dict(momentum=None), TypeError, "num_batches_tracked"),
    ({"eps": "a"}, TypeError, "eps must be a number >= 0, got str"),
    ({"training": None}, TypeError, "training must be True or False, got None"),
    ({"training": 1}, TypeError, "training must be True or False, got 1"),
])
def test_functional_validates_first(bad, exc, fragment, gen):
    rm, rv = torch.randn(3, generator=gen), torch.rand(3, generator=gen) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    kwargs = dict(weight=torch.randn(3, generator=gen), bias=torch.randn(3, generator=gen),
                  training=True, momentum=0.1, eps=1e-5)
    kwargs.update(bad)
    with pytest.raises(exc) as info:
        F.batch_norm(torch.randn(4, 3, generator=gen), rm, rv, **kwargs)
    assert fragment in str(info.value)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


def _inference_copy(t):
    with torch.inference_mode():
        return t.clone()


@pytest.mark.parametrize("case,exc,fragment", [
    ("sparse running_var", NotImplementedError, "pass running_var.to_dense()"),
    ("sparse weight", NotImplementedError, "pass weight.to_dense()"),
    ("sparse residual", NotImplementedError, "pass residual.to_dense()"),
    ("int num_batches_tracked", TypeError, "must be a tensor"),
    ("two num_batches_tracked", TypeError, "must be one number"),
    ("bool num_batches_tracked", TypeError, "must be one number"),
    ("meta num_batches_tracked", RuntimeError, "num_batches_tracked is on meta"),
    ("inference running_var", RuntimeError, "Inplace update to inference tensor"),
    ("inference num_batches_tracked", RuntimeError, "Inplace update to inference tensor"),
])
def test_functional_checks_every_argument_before_it_mutates(case, exc, fragment, gen):
    """What a probe found passing the checks and failing (or not) halfway through the
    running update: a sparse per-channel tensor (the update's copy failed after
    running_mean had moved), a num_batches_tracked that is no one-integer tensor (an int
    gave AttributeError, two values took the first; a float count, which torch's modules
    take, is taken), an inference-mode running_var or
    num_batches_tracked alone (written past torch's check: only running_mean was asked)."""
    x = torch.randn(4, 3, generator=gen)
    rm, rv, nbt = torch.randn(3, generator=gen), torch.rand(3, generator=gen) + 0.5, \
        torch.tensor(2)
    kwargs = dict(weight=None, residual=None, num_batches_tracked=nbt)
    what, name = case.split(" ")
    if what == "sparse":
        value = {"running_var": rv, "weight": torch.ones(3), "residual": x}[name].to_sparse()
        rv = value if name == "running_var" else rv
        kwargs.update({} if name == "running_var" else {name: value})
    elif name == "num_batches_tracked":
        kwargs[name] = {"int": 5, "two": torch.tensor([2, 7]), "bool": torch.tensor(True),
                        "meta": torch.tensor(2, device="meta"),
                        "inference": _inference_copy(nbt)}[what]
    else:
        rv = _inference_copy(rv)
    state = [t for t in (rm, rv, kwargs["num_batches_tracked"])
             if isinstance(t, torch.Tensor) and t.device.type == "cpu"]
    before = [t.to_dense().clone() for t in state]
    with pytest.raises(exc) as info:
        F.batch_norm(x, rm, rv, training=True, momentum=None, **kwargs)
    assert fragment in str(info.value), str(info.value)
    assert all(torch.equal(t.to_dense(), b) for t, b in zip(state, before))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_running_stats_that_require_grad_are_refused_as_torch_refuses_them(which, training,
                                                                            gen):
    """torch: "not differentiable with respect to argument 'running_mean'". Ours took
    them, and in eval the output depended on them with no gradient to show for it. Under
    no_grad both run (and a training step updates them)."""
    x = torch.randn(4, 3, generator=gen)
    stats = {"running_mean": torch.randn(3, generator=gen),
             "running_var": torch.rand(3, generator=gen) + 0.5}
    stats[which].requires_grad_()
    before = {k: v.detach().clone() for k, v in stats.items()}
    for batch_norm in (torch.nn.functional.batch_norm, F.batch_norm):
        with pytest.raises(RuntimeError, match=f"differentiable with respect to.*{which}"):
            batch_norm(x, stats["running_mean"], stats["running_var"], training=training)
    for name, value in stats.items():
        assert torch.equal(value.detach(), before[name])
    with torch.no_grad():
        expected = torch.nn.functional.batch_norm(
            x, *(v.detach().clone() for v in stats.values()), training=training)
        assert_close(F.batch_norm(x, stats["running_mean"], stats["running_var"],
                                  training=training), expected)


def test_functional_eval_needs_running_stats(gen):
    """RuntimeError in evaluation with either running statistic missing, as torch's; in
    training both must be given or neither (ValueError, as torch's)."""
    x = torch.randn(4, 3, generator=gen)
    for rm, rv, missing in ((None, None, "running_mean"), (torch.zeros(3), None, "running_var"),
                            (None, torch.ones(3), "running_mean")):
        with pytest.raises(RuntimeError, match=f"needs running_mean and running_var; "
                                               f"{missing} is None"):
            F.batch_norm(x, rm, rv, training=False)
        with pytest.raises(RuntimeError):
            torch.nn.functional.batch_norm(x, rm, rv, training=False)
    with pytest.raises(ValueError, match="given together"):
        F.batch_norm(x, torch.zeros(3), None, training=True)
    m = batchnorm.BatchNorm2d(3).eval()
    m.running_var = None
    with pytest.raises(RuntimeError, match="running_var is None"):
        m(torch.randn(4, 3, 2, 2, generator=gen))


def test_a_forced_backend_refuses_tensors_of_another_device():
    """BATCHNORM_BACKEND=cpu on tensors elsewhere would hand a kernel another device's
    addresses: a clear error instead (meta tensors stand in for CUDA here)."""
    from batchnorm import backends
    bn = batchnorm.BatchNorm2d(3, device="meta")
    x = torch.empty(2, 3, 2, 2, device="meta")
    with backends.using("cpu"), pytest.raises(RuntimeError,
                                              match="forced batchnorm backend 'cpu'.*not meta"):
        bn(x)
    with backends.using("portable"):
        assert bn(x).device.type == "meta"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_a_module_on_the_meta_device_names_to_empty(training, gen):
    """.to('cpu') cannot copy out of meta tensors: the message names what can."""
    bn = batchnorm.BatchNorm2d(3, device="meta").train(training)
    with pytest.raises(RuntimeError, match=r"meta device.*to_empty\(device='cpu'\)"):
        bn(torch.randn(2, 3, 2, 2, generator=gen))
    bn.to_empty(device="cpu").reset_parameters()
    assert bn(torch.randn(2, 3, 2, 2, generator=gen)).shape == (2, 3, 2, 2)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_functional_with_no_channels_is_empty_like_torch(training):
    x = torch.randn(4, 0, 5, requires_grad=True)
    for fn in (F.batch_norm, nn.functional.batch_norm):
        y = fn(x, torch.zeros(0), torch.ones(0), training=training)
        assert y.shape == x.shape
        y.sum().backward()
    assert F.batch_norm(x, None, None, training=True).shape == x.shape


def test_a_fork_child_is_not_stuck_with_another_threads_lock_or_block():
    """A fork while another thread sits inside using() (its lock taken at the fork, or its
    block open): the child neither waits forever on the lock nor stays forced to that
    thread's backend."""
    import os
    import threading

    from batchnorm import backends
    if not hasattr(os, "fork"):
        pytest.skip("no os.fork on this platform")
    inside, leave = threading.Event(), threading.Event()

    def hold():
        with backends.using("portable"):
            inside.set()
            leave.wait(30)

    thread = threading.Thread(target=hold)
    before = backends.forced()
    thread.start()
    inside.wait(30)
    backends._lock.acquire()  # as if the other thread held it at the fork
    try:
        pid = os.fork()
        if pid == 0:  # the child: exit code 0 when both hold, within an alarm
            import signal
            signal.alarm(20)
            ok = backends.forced() == before
            with backends.using("portable"):
                ok = ok and backends.forced() == "portable"
            os._exit(0 if ok and backends.forced() == before else 1)
    finally:
        backends._lock.release()
        leave.set()
        thread.join(30)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


def test_overlapping_using_blocks_in_two_threads_restore_the_choice():
    """Each block restored the choice it found on entry: A enters (None → portable), B
    enters (portable → portable), A leaves (→ None), B leaves (→ portable), and the whole
    process stayed on the portable backend."""
    import threading

    from batchnorm import backends
    entered, leave_a, left_a = threading.Barrier(2), threading.Event(), threading.Event()
    seen = {}

    def a():
        with backends.using("portable"):
            entered.wait()
            leave_a.wait()
        left_a.set()

    def b():
        entered.wait()
        with backends.using(None):
            seen["b"] = backends.forced()
            leave_a.set()
            left_a.wait()
            seen["after a"] = backends.forced()
        seen["after b"] = backends.forced()

    before = backends.forced()
    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert seen == {"b": None, "after a": None, "after b": before}
    assert backends.forced() == before


@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
@pytest.mark.parametrize("value", [np.ones(3), [1.0, 1.0, 1.0], 1.0, True],
                         ids=["numpy", "list", "float", "bool"])
def test_a_per_channel_argument_that_is_no_tensor_is_a_type_error(name, value):
    # as torch's TypeError (it raised AttributeError: 'list' object has no attribute ...)
    args = {"running_mean": torch.zeros(3), "running_var": torch.ones(3), "weight": None,
            "bias": None, name: value}
    with pytest.raises(TypeError, match=f"{name} must be a Tensor"):
        F.batch_norm(torch.randn(4, 3), args["running_mean"], args["running_var"],
                     args["weight"], args["bias"], training=False)


def test_a_fork_child_leaves_a_block_another_thread_entered():
    """A using() block entered on one thread (an ExitStack handed over) and left, after a
    fork, by the forking thread in the child: the child dropped the block at the fork,
    and leaving it raised ValueError from list.remove."""
    import contextlib
    import os
    import threading

    from batchnorm import backends
    if not hasattr(os, "fork"):
        pytest.skip("no os.fork on this platform")
    stack = contextlib.ExitStack()
    thread = threading.Thread(target=lambda: stack.enter_context(backends.using("portable")))
    thread.start()
    thread.join(30)
    try:
        pid = os.fork()
        if pid == 0:
            try:
                stack.close()
                code = 0
            except BaseException:  # noqa: BLE001 (anything is a failure here)
                code = 1
            os._exit(code)
    finally:
        stack.close()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
