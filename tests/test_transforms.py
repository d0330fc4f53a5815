"""torch.func transforms, forward-mode AD, torch.jit.trace and dispatch modes (make_fx,
FakeTensorMode), against torch's layers.

Under these our kernels cannot run (a transform's tensors have no storage to hand them;
a trace or a dispatch mode sees torch ops only), so ``ops.batch_norm`` computes in torch
ops alone (``ops._composed``); these tests check that path gives what torch's batch norm
gives, where torch's supports the transform.
"""

import pytest
import torch
from tolerances import assert_close
from torch import nn
from torch.autograd import forward_ad
from torch.func import functional_call, grad, jacrev, jvp, vmap

import batchnorm
from batchnorm import ops

F64 = torch.float64


def _pair(activation=None, **kwargs):
    """Our BatchNorm2d(3) and torch's (followed by the activation), equal random state."""
    gen = torch.Generator().manual_seed(0)
    ours = batchnorm.BatchNorm2d(3, activation=activation, dtype=F64, **kwargs)
    theirs = nn.BatchNorm2d(3, dtype=F64, **kwargs)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean"):
            if getattr(theirs, name) is not None:
                value = torch.randn(3, generator=gen, dtype=F64)
                getattr(ours, name).copy_(value)
                getattr(theirs, name).copy_(value)
        if theirs.running_var is not None:
            value = torch.rand(3, generator=gen, dtype=F64) + 0.5
            ours.running_var.copy_(value)
            theirs.running_var.copy_(value)
    if activation is not None:
        theirs = nn.Sequential(theirs, batchnorm.functional.activation_module(
            *batchnorm.functional.resolve_activation(activation)))
    return ours, theirs


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("mode", ["eval", "batch_stats"])
def test_vmap_over_a_batch_of_batches(mode):
    """vmap in eval, and in training without running statistics (what torch supports)."""
    kwargs = {} if mode == "eval" else {"track_running_stats": False}
    ours, theirs = _pair("relu", **kwargs)
    if mode == "eval":
        ours.eval(), theirs.eval()
    x = _x(4, 5, 3, 2, 2)
    assert_close(vmap(ours)(x), vmap(theirs)(x))
    ours.requires_grad_(False), theirs.requires_grad_(False)  # the no-grad branch too
    assert_close(vmap(ours)(x), vmap(theirs)(x))


@pytest.mark.parametrize("mode", ["eval", "batch_stats"])
@pytest.mark.parametrize("view", ["in_dims=1", "transposed", "channels_last"])
def test_vmap_over_samples_of_any_layout(view, mode):
    """Under vmap a sample's memory format cannot be asked (torch raises NYI for any
    format but the contiguous one): samples that are not contiguous (vmap over dim 1, a
    transpose inside, channels_last samples) compute as torch's layers do."""
    kwargs = {} if mode == "eval" else {"track_running_stats": False}
    ours, theirs = _pair("relu", **kwargs)
    if mode == "eval":
        ours.eval(), theirs.eval()
    if view == "in_dims=1":
        x, run = _x(5, 4, 3, 2, 2), lambda m: vmap(m, in_dims=1)
    elif view == "transposed":
        x, run = _x(4, 5, 3, 2, 3), lambda m: vmap(lambda xi: m(xi.transpose(2, 3)))
    else:
        x, run = _x(4, 5, 2, 3, 3).permute(0, 1, 4, 2, 3), vmap
    assert_close(run(ours)(x), run(theirs)(x))


@pytest.mark.parametrize("nested", [False, True], ids=["vmap", "vmap_of_grad"])
def test_vmap_of_a_step_that_updates_running_stats_fails_like_torch(nested):
    """torch refuses it; ours too, naming the ways out, and before anything changes
    (num_batches_tracked included)."""
    ours, theirs = _pair()
    x = _x(4, 5, 3, 2, 2)
    run = (lambda m: vmap(grad(lambda xi: m(xi).sum()))) if nested else vmap
    with pytest.raises(RuntimeError):
        run(theirs)(x)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(RuntimeError, match="running statistics.*not batched.*eval mode"):
        run(ours)(x)
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())
    # the way out the message names for our layers (torch.func's replace_all_batch_norm_
    # modules_, which it named before, changes torch's layers only)
    ours.track_running_stats = theirs.track_running_stats = False
    theirs.running_mean = theirs.running_var = None
    assert_close(run(ours)(x), run(theirs)(x))
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())


# A forward run by the kernels, and its backward under a transform: the backward's
# cotangent comes batched (no storage: the kernels read addresses) or dual (the kernels
# would drop its tangent). Both crashed or lost the tangent (found by a probe).


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batched_cotangents_of_a_kernel_forward(backend, activation, mode):
    """autograd.grad(..., is_grads_batched=True), which jacobian(vectorize=True) and
    gradcheck(check_batched_grad=True) use, against a loop over the cotangents."""
    ours = batchnorm.BatchNorm1d(3, activation=activation, dtype=F64, device=backend.device)
    ours.train(mode == "train")
    x = _x(5, 3, 4).to(backend.device).requires_grad_()
    r = _x(5, 3, 4, seed=2).to(backend.device).requires_grad_()
    y = ours(x, r)
    v = _x(6, 5, 3, 4, seed=3).to(backend.device)
    batched = torch.autograd.grad(y, (x, r, ours.weight), v, is_grads_batched=True,
                                  retain_graph=True)
    for i in range(v.shape[0]):
        one = torch.autograd.grad(y, (x, r, ours.weight), v[i], retain_graph=True)
        for a, b in zip(batched, one):
            torch.testing.assert_close(a[i], b, rtol=1e-10, atol=1e-12)
    jacobian = torch.autograd.functional.jacobian(lambda t: ours(t, r), x, vectorize=True)
    assert jacobian.shape == (5, 3, 4, 5, 3, 4)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradcheck_with_batched_grads_of_a_kernel_forward(backend, mode):
    """The README says gradcheck holds; its check_batched_grad option crashed."""
    ours = batchnorm.BatchNorm1d(2, activation="silu", dtype=F64, device=backend.device)
    ours.train(mode == "train")
    x = _x(4, 2, 3).to(backend.device).requires_grad_()
    assert torch.autograd.gradcheck(ours, (x,), check_batched_grad=True)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_dual_cotangent_keeps_its_tangent(mode):
    """Forward over reverse (a Hessian-vector product): the gradient of a forward run
    outside the dual level, with a dual cotangent, has the tangent the cotangent's tangent
    gives, as torch's layer has; ours came back without one."""
    ours, theirs = _pair("relu")
    for m in (ours, theirs):
        m.train(mode == "train")
    got = []
    for m in (ours, theirs):
        x = _x(4, 3, 2, 2).requires_grad_()
        y = m(x)
        u, tu = _x(4, 3, 2, 2, seed=5), _x(4, 3, 2, 2, seed=6)
        with forward_ad.dual_level():
            g, = torch.autograd.grad(y, x, forward_ad.make_dual(u, tu), retain_graph=True)
            primal, tangent = forward_ad.unpack_dual(g)
        assert tangent is not None
        plain, = torch.autograd.grad(y, x, tu)
        torch.testing.assert_close(tangent, plain, rtol=1e-12, atol=1e-12)
        got.append((primal, tangent))
    for a, b in zip(*got):
        assert_close(a, b)


def test_grad_and_per_sample_gradients_with_functional_call():
    ours, theirs = _pair("silu")
    ours.eval(), theirs.eval()
    x, target = _x(6, 3, 2, 2), _x(6, 3, 2, 2, seed=2)

    def loss(model, params, xb, tb):
        return (functional_call(model, params, (xb,)) - tb).pow(2).sum()

    def per_sample(model):
        params = {k: v.detach() for k, v in model.named_parameters()}
        params = {k.removeprefix("0."): v for k, v in params.items()}
        if isinstance(model, nn.Sequential):
            params = {f"0.{k}": v for k, v in params.items()}
        fn = grad(lambda p, xb, tb: loss(model, p, xb[None], tb[None]))
        return vmap(fn, in_dims=(None, 0, 0))(params, x, target)

    got, expected = per_sample(ours), per_sample(theirs)
    for name in ("weight", "bias"):
        assert_close(got[name], expected[f"0.{name}"])


MODES = {"eval": {}, "batch_stats": {"track_running_stats": False}}


@pytest.mark.parametrize("mode", list(MODES))
def test_grad_and_jacrev(mode):
    ours, theirs = _pair("tanh", **MODES[mode])
    if mode == "eval":
        ours.eval(), theirs.eval()
    x = _x(4, 3, 2, 2)
    assert_close(grad(lambda t: ours(t).pow(3).sum())(x),
                 grad(lambda t: theirs(t).pow(3).sum())(x))
    assert_close(jacrev(ours)(x), jacrev(theirs)(x))


def test_grad_transform_of_a_running_update_fails_like_torch():
    """torch.func refuses the in-place update of a captured buffer (torch's layer counts
    num_batches_tracked in place): ours refuses it the same way and changes nothing."""
    ours, theirs = _pair()
    x = _x(4, 3, 2, 2)
    with pytest.raises(RuntimeError, match="in-place operation"):
        grad(lambda t: theirs(t).sum())(x)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(RuntimeError, match="in-place operation"):
        grad(lambda t: ours(t).sum())(x)
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("mode", list(MODES))
def test_jvp(mode):
    ours, theirs = _pair("gelu", **MODES[mode])
    if mode == "eval":
        ours.eval(), theirs.eval()
    x, tangent = _x(4, 3, 2, 2), _x(4, 3, 2, 2, seed=3)
    y, dy = jvp(ours, (x,), (tangent,))
    y_t, dy_t = jvp(theirs, (x,), (tangent,))
    assert_close(y, y_t)
    assert_close(dy, dy_t)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_mode_ad_with_dual_tensors(training):
    """torch.autograd.forward_ad (not a torch.func transform): a training step updates
    the running statistics, as torch's does."""
    ours, theirs = _pair("gelu")
    ours.train(training), theirs.train(training)
    x, tangent = _x(4, 3, 2, 2), _x(4, 3, 2, 2, seed=3)
    with forward_ad.dual_level():
        out = forward_ad.unpack_dual(ours(forward_ad.make_dual(x, tangent)))
        out_t = forward_ad.unpack_dual(theirs(forward_ad.make_dual(x, tangent)))
    assert_close(out.primal, out_t.primal)
    assert_close(out.tangent, out_t.tangent)
    assert_close(ours.running_var, theirs[0].running_var)
    assert torch.equal(ours.num_batches_tracked, theirs[0].num_batches_tracked)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_jit_trace_records_the_computation(layout):
    ours, theirs = _pair("relu")
    ours.eval(), theirs.eval()
    x = _x(2, 3, 4, 4)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    traced = torch.jit.trace(ours, (x,), check_trace=False)
    other = _x(5, 3, 4, 4, seed=4)  # the trace replays torch ops, not a kernel's
    assert_close(traced(other), theirs(other))


def test_composed_path_is_not_taken_without_a_transform(monkeypatch):
    """The kernels, not the composed torch ops, serve plain eager calls."""
    def fail(*args):
        raise AssertionError("composed path taken")

    monkeypatch.setattr(ops, "_composed", fail)
    ours, _ = _pair()
    x = _x(4, 3, 2, 2).requires_grad_()
    ours(x).sum().backward()
    with torch.no_grad():
        ours.eval()(x)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_composed_path_keeps_the_numerics_of_the_kernels(layout):
    """The composed path is the kernels' arithmetic in torch ops: float32 data with mean
    1e6 and a constant channel with eps = 0 give what the kernels give (the constant
    channel exactly 0), in the input's layout, with the same running statistics."""
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(5)) + 1e6
    x[:, 1] = x[0, 1, 0, 0]
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    kernels, composed = (batchnorm.BatchNorm2d(3, eps=0.0, activation="relu") for _ in "ab")
    y = kernels(x)
    with forward_ad.dual_level():  # a plain tensor, but the composed path all the same
        y_composed = composed(x)
    assert_close(y_composed, y)
    assert torch.equal(y_composed[:, 1], torch.zeros_like(y[:, 1]))
    assert y_composed.stride() == y.stride()
    assert_close(composed.running_mean, kernels.running_mean)
    assert_close(composed.running_var, kernels.running_var)


@pytest.mark.parametrize("training", [True, False])
def test_make_fx_records_the_computation(training):
    """make_fx (a Python dispatch mode) records the torch ops it sees: the kernels' work
    was missing from its graph (which returned uninitialized memory), so the composed
    path runs there. The graph replays the step on new data, running update included,
    as the graph of torch's layer does."""
    from torch.fx.experimental.proxy_tensor import make_fx

    ours, theirs = _pair()
    ours.train(training), theirs.train(training)

    def trace(module):
        state = {k: v.clone() for k, v in module.state_dict().items()}
        graph = make_fx(lambda s, x: functional_call(module, s, (x,)))(state, _x(4, 3, 5, 5))
        return graph, {k: v.clone() for k, v in module.state_dict().items()}

    (graph, state), (reference, reference_state) = trace(ours), trace(theirs)
    x = _x(4, 3, 5, 5, seed=7)  # (make_fx's real mode bakes in the shapes)
    assert_close(graph(state, x), reference(reference_state, x))
    for name, value in reference_state.items():
        if value.is_floating_point():
            assert_close(state[name], value)
        else:
            assert torch.equal(state[name], value)


@pytest.mark.parametrize("training", [True, False])
def test_fake_tensors_and_symbolic_tracing(training):
    """FakeTensorMode (shape propagation, memory estimators) and make_fx's fake and
    symbolic modes: the kernels got tensors with no storage and failed."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    ours, theirs = _pair("silu")
    ours.train(training), theirs.train(training)
    x = _x(4, 3, 5, 5).to(memory_format=torch.channels_last)
    with FakeTensorMode() as mode:
        fake = batchnorm.BatchNorm2d(3, activation="silu", dtype=F64).train(training)
        y = fake(mode.from_tensor(x))
    assert (y.shape, y.dtype, y.stride()) == (x.shape, x.dtype, x.stride())
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    for tracing_mode in ("fake", "symbolic"):
        graph = make_fx(lambda s, x: functional_call(ours, s, (x,)),
                        tracing_mode=tracing_mode)(state, x)
        shape = (4, 3, 5, 5) if tracing_mode == "fake" else (5, 3, 4, 4)  # fake: baked in
        other = _x(*shape, seed=3).to(memory_format=torch.channels_last)
        assert_close(graph({k: v.clone() for k, v in state.items()}, other),
                     theirs(other))


def test_make_fx_of_a_gradient():
    """The input gradient of an evaluation step, traced, replays torch's."""
    from torch.fx.experimental.proxy_tensor import make_fx

    ours, theirs = _pair("gelu")
    ours.eval(), theirs.eval()

    def input_grad(module):
        return lambda x: torch.autograd.grad(module(x).square().sum(), x)[0]

    graph = make_fx(input_grad(ours))(_x(4, 3, 5, 5).requires_grad_())
    other = _x(4, 3, 5, 5, seed=9).requires_grad_()
    assert_close(graph(other), input_grad(theirs)(other))


def test_functionalize_a_training_step():
    """With the running statistics passed in (functional_call) the step runs as torch's;
    with the module's own buffers torch's op has a rule of its own, and ours, which met
    an internal assert after num_batches_tracked had moved, refuses before anything
    changes."""
    from torch.func import functionalize

    ours, theirs = _pair("relu")
    x = _x(4, 3, 5, 5)
    states = [{k: v.clone() for k, v in m.state_dict().items()} for m in (ours, theirs)]
    outs = [functionalize(lambda s, x, m=m: functional_call(m, s, (x,)))(s, x)
            for m, s in zip((ours, theirs), states)]
    assert_close(outs[0], outs[1])
    for name, value in states[0].items():
        other = states[1][name if name in states[1] else "0." + name]
        if value.is_floating_point():
            assert_close(value, other)
        else:
            assert torch.equal(value, other)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(RuntimeError, match="functionalize got running statistics from outside"):
        functionalize(ours)(x)
    for name, value in ours.state_dict().items():
        assert torch.equal(value, before[name])


@pytest.mark.parametrize("transform", ["grad", "jvp", "jacrev"])
@pytest.mark.parametrize("how", ["functional", "layer without num_batches_tracked"])
def test_a_training_step_updates_running_statistics_captured_by_a_transform(transform, how):
    """Running statistics captured from outside the transformed function move once, as
    torch's F.batch_norm moves them (an in-place op on a captured tensor raised "mutate a
    captured Tensor"); the transform's result is torch's."""
    x = _x(4, 3, 5)

    def run(fn):
        if transform == "grad":
            return grad(lambda t: fn(t).pow(3).sum())(x)
        if transform == "jvp":
            return jvp(fn, (x,), (torch.ones_like(x),))[1]
        return jacrev(fn)(x)

    results = {}
    for who in ("torch", "ours"):
        if how == "functional":
            rm, rv = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
            f = torch.nn.functional.batch_norm if who == "torch" else batchnorm.batch_norm
            out = run(lambda t, f=f, rm=rm, rv=rv: f(t, rm, rv, None, None, True, 0.1, 1e-5))
        else:
            layer = (nn.BatchNorm1d if who == "torch" else batchnorm.BatchNorm1d)(3, dtype=F64)
            layer.num_batches_tracked = None
            out = run(layer)
            rm, rv = layer.running_mean, layer.running_var
        results[who] = out, rm, rv
    for got, want in zip(results["ours"], results["torch"]):
        assert_close(got, want)
    assert not torch.equal(results["ours"][1], torch.zeros(3, dtype=F64))


@pytest.mark.parametrize("residual", [False, True])
def test_eval_of_inference_tensors_outside_inference_mode(backend, residual):
    """A layer and input made under torch.inference_mode(), evaluated outside it: torch
    records no graph for tensors autograd never sees and returns a normal tensor that
    requires no grad; ours raised "cannot be saved for backward". In training both
    raise."""
    with torch.inference_mode():
        ours, theirs = _pair("relu")
        ours, theirs = ours.to(backend.device).eval(), theirs.to(backend.device).eval()
        x, r = _x(4, 3, 2, 2).to(backend.device), _x(4, 3, 2, 2, seed=2).to(backend.device)
    y = ours(x, r) if residual else ours(x)
    want = torch.relu(theirs[0](x) + r) if residual else theirs(x)
    assert not y.requires_grad and not y.is_inference()
    assert_close(y, want)
    ours.train(), theirs.train()
    with pytest.raises(RuntimeError, match="(?i)inference"):
        theirs(x)
    with pytest.raises(RuntimeError, match="(?i)inference"):
        ours(x)


def test_per_sample_running_statistics_under_vmap_of_grad():
    """vmap over samples of a grad whose training step updates per-sample running
    statistics captured by the grad: each row moves by its own batch, as torch's does."""
    xs = _x(2, 4, 3, 5)
    results = []
    for f in (torch.nn.functional.batch_norm, batchnorm.batch_norm):
        rm, rv = torch.zeros(2, 3, dtype=F64), torch.ones(2, 3, dtype=F64)

        def per_sample(x, rm, rv, f=f):
            return grad(lambda t: f(t, rm, rv, None, None, True, 0.1, 1e-5).pow(3).sum())(x)

        results.append((vmap(per_sample)(xs, rm, rv), rm, rv))
    for got, want in zip(*reversed(results)):
        assert_close(got, want)
    rm, rv = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)  # one for every sample
    with pytest.raises(RuntimeError):
        vmap(lambda x: grad(lambda t: batchnorm.batch_norm(
            t, rm, rv, None, None, True, 0.1, 1e-5).sum())(x))(xs)
    assert torch.equal(rm, torch.zeros(3, dtype=F64))


def test_inference_tensors_with_normal_running_statistics_still_raise():
    """An eval whose input, weight and bias were made under inference_mode but whose
    running statistics are normal tensors needs autograd: torch raises, and so do we."""
    with torch.inference_mode():
        ours, theirs = _pair()
        x = _x(4, 3, 2, 2)
    for layer in (ours, theirs):
        layer.eval()
        for name in ("running_mean", "running_var"):
            setattr(layer, name, getattr(layer, name).clone())  # normal tensors
        with pytest.raises(RuntimeError, match="Inference tensors cannot be saved"):
            layer(x)
