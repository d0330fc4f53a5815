"""torch.compile(fullgraph=True) of a small CNN built from our modules matches eager.

fullgraph=True turns any graph break into an error, so this also checks that the custom
ops' fake implementations, the running-statistics update and ``momentum=None``'s
1/num_batches_tracked trace without leaving the graph. Compilation is slow on a small
CPU machine: one model, two training steps and an evaluation.
"""

import copy
import shutil

import pytest
import torch
from torch import nn

import batchnorm


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = batchnorm.BatchNorm2d(4, activation="relu")
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        # momentum=None: the cumulative average, a tensor computation in the graph.
        self.bn2 = batchnorm.BatchNorm2d(4, momentum=None, activation=nn.LeakyReLU(0.2))
        self.bn3 = batchnorm.BatchNorm1d(4, activation="silu")

    def forward(self, x):
        h = self.bn1(self.conv1(x))
        h = self.bn2(self.conv2(h), residual=h)
        return self.bn3(h.mean((2, 3)))


def _state(model):
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return grads, buffers


def test_compiled_cnn_matches_eager(gen):
    # Inductor needs a C compiler on the CPU; aot_eager traces the same graph without one.
    has_cc = shutil.which("cc") is not None or shutil.which("gcc") is not None
    compiler = "inductor" if has_cc else "aot_eager"
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = SmallNet()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=compiler)
    for step in range(2):
        x = torch.randn(4, 3, 5, 5, generator=gen) * 2 + step
        v = torch.randn(4, 4, generator=gen)
        outs = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            out = model(x)
            (out * v).sum().backward()
            outs.append(out.detach())
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
        (g_e, b_e), (g_c, b_c) = _state(eager), _state(compiled_model)
        for name in g_e:
            torch.testing.assert_close(g_c[name], g_e[name], rtol=1e-4, atol=1e-5, msg=name)
        for name in b_e:
            torch.testing.assert_close(b_c[name], b_e[name], rtol=1e-5, atol=1e-6, msg=name)
        assert compiled_model.bn2.num_batches_tracked.item() == step + 1
    eager.eval()
    compiled.eval()
    x = torch.randn(4, 3, 5, 5, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", [batchnorm.BatchNorm2d, batchnorm.SyncBatchNorm])
def test_a_residual_call_compiles_once(cls, gen):
    """The layer marks itself when called with a residual (batchnorm.revert leaves such
    layers); written while dynamo traced, the mark became a guard that the first call
    broke: every model passing a residual compiled twice. Not marked under compile."""
    torch._dynamo.reset()
    bn = cls(3, activation="relu")
    f = torch.compile(lambda x: bn(x, x), backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 4, 4, generator=gen)
    f(x)
    with torch._dynamo.config.patch(error_on_recompile=True):
        f(x)
    assert not bn.called_with_residual
    bn(x, x)
    assert bn.called_with_residual


def _functorch_calls(bn, x, t):
    from torch.func import grad, jvp, vmap
    return {
        "jvp": lambda a: jvp(bn, (a,), (t,))[1],
        "grad": lambda a: grad(lambda b: bn(b).square().sum())(a),
        # per-group gradients: two groups of three samples
        "vmap_grad": lambda a: vmap(grad(lambda b: bn(b).square().sum()))(a.view(2, 3, 3)),
    }


@pytest.mark.parametrize("call", ["jvp", "grad", "vmap_grad"])
@pytest.mark.parametrize("mode", ["eval", "batch_stats"])
def test_torch_func_inside_a_compiled_function(mode, call, gen):
    """Dynamo traces into torch.func transforms; our custom op has no rules for them (a
    compiled jvp gave a zero tangent, a compiled grad failed), so they take the composed
    path as in eager, and give eager's values. (backend='eager': dynamo alone, where the
    zero tangent showed too; the other backends compile the same graph further.)"""
    torch._dynamo.reset()
    if mode == "eval":
        bn = batchnorm.BatchNorm1d(3, activation="relu").eval()
        with torch.no_grad():
            bn.running_mean.copy_(torch.randn(3, generator=gen) * 0.1)
            bn.running_var.copy_(torch.rand(3, generator=gen) + 0.5)
    else:
        bn = batchnorm.BatchNorm1d(3, activation="relu", track_running_stats=False)
    x, t = torch.randn(6, 3, generator=gen), torch.randn(6, 3, generator=gen)
    fn = _functorch_calls(bn, x, t)[call]
    want = fn(x)
    got = torch.compile(fn, fullgraph=True, backend="eager")(x)
    assert want.abs().sum() > 0
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("case", ["train", "eval", "eval-float64-buffers"])
def test_custom_op_passes_opcheck(backend, case, gen):
    """``batchnorm::batch_norm`` on every backend: its fake implementation gives what the
    op returns (the evaluation's mean keeps a float64 running mean's dtype: rounded to
    float32 it moved outputs by up to 0.03/std at a mean of 1e6), and no output aliases
    an input or another output."""
    from batchnorm import ops

    x = torch.randn(4, 3, 5, generator=gen).to(backend.device).requires_grad_()
    w, b = (torch.randn(3, generator=gen).to(backend.device).requires_grad_() for _ in "wb")
    buffers = torch.float64 if case == "eval-float64-buffers" else torch.float32
    rm, rv = (None, None) if case == "train" else (
        torch.randn(3, dtype=buffers, device=backend.device),
        torch.rand(3, dtype=buffers, device=backend.device) + 0.5)
    torch.library.opcheck(ops.batch_norm_op, (x, w, b, None, rm, rv, 1e-5, "relu", 0.0))


class _Tagged(torch.Tensor):
    pass


class _CountCalls(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def test_a_subclass_input_and_a_mode_compile_in_one_graph(gen):
    """Our __torch_function__ handler raised inside dynamo for a subclass input under
    fullgraph ("no implementation found ... on types that implement __torch_function__"):
    torch.compile handles subclasses and modes itself, as for torch's batch_norm."""
    torch._dynamo.reset()
    layer = batchnorm.BatchNorm2d(3, activation="relu")
    x = torch.randn(4, 3, 5, 5, generator=gen)
    eager = copy.deepcopy(layer)
    y = torch.compile(layer, backend="eager", fullgraph=True)(x.as_subclass(_Tagged))
    assert type(y) is _Tagged
    torch.testing.assert_close(y.as_subclass(torch.Tensor), eager(x))
    if torch.__version__ < "2.13":
        pytest.skip("torch 2.11's dynamo fails a counting mode's guard on the frame that made "
                    "it ('Guard failed on the same frame it was created'), for torch's own "
                    "layer too; 2.13 compiles it")
    with _CountCalls() as mode:
        y = torch.compile(layer, backend="eager")(x)
    assert mode.calls > 0
    torch.testing.assert_close(y, eager(x))


class _Halved(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs or {})
        return out * 0.5 if func is batchnorm.functional.batch_norm_resolved else out


def test_a_subclass_override_takes_the_call_under_compile_too(gen):
    """While compiling, the handler was skipped: the override never saw our call, and
    the compiled output was twice the eager one. It runs outside the graph now."""
    torch._dynamo.reset()
    layer = batchnorm.BatchNorm2d(3).eval()
    x = torch.randn(2, 3, 4, 4, generator=gen).as_subclass(_Halved)
    torch.testing.assert_close(torch.compile(layer, backend="eager")(x), layer(x))


def test_a_subclass_calling_us_from_its_own_override_compiles(gen):
    """Under DisableTorchFunctionSubclass (a subclass's own call, as Tensor's
    __torch_function__ makes it), dynamo still saw a subclass, and the handler outside
    the graph found none to dispatch to: a TypeError."""
    torch._dynamo.reset()

    def call(x):
        with torch._C.DisableTorchFunctionSubclass():
            return batchnorm.functional.batch_norm(x, None, None, training=True)

    x = torch.randn(4, 3, 5, generator=gen).as_subclass(_Halved)
    torch.testing.assert_close(torch.compile(call, backend="eager")(x), call(x))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_negative_views_compiled_are_read_at_their_values(backend, gen, training):
    """Compiled, negative views (``z.conj().imag``) reach the custom op as values
    (AOTAutograd resolves them; eager mode resolves them in ops, where dynamo cannot ask
    ``is_neg``), as the README says. (aot_eager: inductor gets such inputs wrong for
    torch's own batch norm too, see README.)"""
    x = torch.randn(4, 3, 5, 2, generator=gen).to(backend.device).requires_grad_()
    w = torch.randn(3, generator=gen).to(backend.device).requires_grad_()
    dy = torch.randn(4, 3, 5, 2, generator=gen).to(backend.device)
    rm, rv = torch.randn(3, generator=gen), torch.rand(3, generator=gen) + 0.5

    def forward(x, w, rm, rv):
        return batchnorm.functional.batch_norm(x, rm, rv, w, None, training,
                                               activation="relu")

    def step(forward, x, w, dy, rm, rv):
        y = forward(x, w, rm, rv)
        y.backward(dy)
        return y.detach()

    torch._dynamo.reset()
    compiled = torch.compile(forward, backend="aot_eager", fullgraph=True)
    neg = torch._neg_view
    got = [step(compiled, neg(-x), neg(-w), neg(-dy), rm.clone().to(backend.device),
                rv.clone().to(backend.device)), x.grad.clone(), w.grad.clone()]
    x.grad = w.grad = None
    want = [step(forward, x, w, dy, rm.clone().to(backend.device),
                 rv.clone().to(backend.device)), x.grad, w.grad]
    for name, g, e in zip(("y", "dx", "dweight"), got, want):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4, msg=name)
