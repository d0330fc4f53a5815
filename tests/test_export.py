"""Export: in eval, models of our layers export (torch.export, ONNX) as standard batch-norm
and activation ops, and the exported programs give the model's outputs."""

import io

import pytest
import torch
from test_tools import make, randomize
from torch import nn

import batchnorm
from batchnorm import backends, tools


@pytest.fixture(autouse=True)
def portable_backend():
    with backends.using("portable"):
        yield


def _models():
    residual = tools.small_resnet(channels=4, blocks=1)
    frozen = nn.Sequential(nn.Conv2d(3, 4, 3), batchnorm.FrozenBatchNorm2d(4, activation="silu"))
    return {"resnet": make("resnet"), "mlp": make("mlp"), "block3d": make("block3d"),
            "residual": (residual, torch.randn(2, 3, 6, 6)),
            "frozen": (frozen, torch.randn(2, 3, 6, 6))}


def _ours(name):
    model, x = _models()[name]
    batchnorm.convert(model)
    randomize(model)
    return model.eval(), x


@pytest.mark.parametrize("name", ["resnet", "mlp", "block3d", "residual", "frozen"])
def test_torch_export_has_standard_ops_and_same_outputs(name):
    model, x = _ours(name)
    ep = torch.export.export(model, (x,))
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("batchnorm::" in op or op.startswith("batchnorm.") for op in ops), ops
    assert any("batch_norm" in op for op in ops), ops
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_export_in_training_keeps_our_op():
    model, x = _ours("mlp")
    model.train()
    ep = torch.export.export(model, (x,))
    assert any("batchnorm" in str(n.target) for n in ep.graph.nodes if n.op == "call_function")


def test_a_training_export_saves_and_loads():
    """The running update ran under torch.no_grad(), a wrapper node without outputs in
    the exported graph, which torch.export.load refused (SpecViolationError)."""
    model = batchnorm.BatchNorm2d(3, momentum=None).train()
    theirs = nn.BatchNorm2d(3, momentum=None).train()
    x = torch.randn(4, 3, 5, 5)
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(model, (x,)), buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer).module()
    for step in range(2):
        torch.testing.assert_close(loaded(x + step), theirs(x + step))
    for name, value in theirs.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value)


def test_onnx_export_batch_normalization_nodes():
    onnx = pytest.importorskip("onnx")
    model, x = _ours("residual")
    model[0] = nn.Identity()  # the stem BN then follows nothing: ONNX cannot fold it away
    x = torch.randn(2, 4, 6, 6)
    # optimize=False: onnxscript's optimizer would fold BatchNormalization into Conv.
    program = torch.onnx.export(model, (x,), dynamo=True, optimize=False, verbose=False)
    proto = program.model_proto
    onnx.checker.check_model(proto)
    kinds = [node.op_type for node in proto.graph.node]
    assert kinds.count("BatchNormalization") == 3 and "Relu" in kinds, kinds
    assert not any(node.domain.startswith("batchnorm") for node in proto.graph.node)
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=1e-5, atol=1e-5)


def test_export_without_running_stats_uses_standard_ops():
    model = nn.Sequential(nn.Conv2d(3, 4, 3),
                          batchnorm.BatchNorm2d(4, track_running_stats=False, activation="relu"))
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    ep = torch.export.export(model, (x,))
    assert not any("batchnorm" in str(n.target) for n in ep.graph.nodes if n.op == "call_function")
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["residual", "mlp"])
def test_folded_model_exports(name):
    # mlp: the ChannelAffine left by a Linear -> BatchNorm1d fold checks its input's rank.
    model, x = _ours(name)
    folded, _ = batchnorm.fold(model)
    ep = torch.export.export(folded, (x,))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_folded_mlp_exports_to_onnx():
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model, x = _ours("mlp")
    folded, _ = batchnorm.fold(model)
    program = torch.onnx.export(folded, (x,), dynamo=True, verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=1e-5, atol=1e-5)


class _WithResidual(nn.Module):
    def __init__(self, bn):
        super().__init__()
        self.bn = bn

    def forward(self, x, r):
        return self.bn(x, residual=r)


def _export_case(case):
    """(model, inputs) that eager runs and torch's batch norm would refuse as written:
    eps = 0 with batch statistics, layer and input dtypes mixed, a residual of another
    dtype."""
    x = torch.randn(2, 3, 4, 4)
    if case == "eps0_batch_stats":
        x[:, 1] = 7.0  # a constant channel: x̂ = 0, the output is the bias
        bn = batchnorm.BatchNorm2d(3, eps=0.0, track_running_stats=False, activation="relu")
        randomize(nn.Sequential(bn))
        return bn, (x,)
    if case == "residual_float32_on_bfloat16":
        bn = batchnorm.BatchNorm2d(3, activation="relu")
        randomize(nn.Sequential(bn))
        return _WithResidual(bn), (x.bfloat16(), torch.randn(2, 3, 4, 4))
    layer_dtype, input_dtype = {"float64_layer": (torch.float64, torch.float32),
                                "bfloat16_layer": (torch.bfloat16, torch.float32),
                                "float64_input": (torch.float32, torch.float64)}[case]
    bn = batchnorm.BatchNorm2d(3, dtype=layer_dtype)
    randomize(nn.Sequential(bn))
    return bn, (x.to(input_dtype),)


@pytest.mark.parametrize("case", ["eps0_batch_stats", "float64_layer", "bfloat16_layer",
                                  "float64_input", "residual_float32_on_bfloat16"])
def test_exported_program_runs_what_eager_runs(case):
    """The exported graph is torch's batch norm, which refuses some of what our layers
    take (see README, "Where we differ"): the program runs anyway, with eager's dtype
    and values."""
    model, inputs = _export_case(case)
    model.eval()
    ep = torch.export.export(model, inputs)
    assert not any("batchnorm" in str(n.target) for n in ep.graph.nodes
                   if n.op == "call_function")
    with torch.no_grad():
        want, got = model(*inputs), ep.module()(*inputs)
    assert got.dtype == want.dtype
    # (bfloat16: rounded once, as eager; rounding twice moved 17 of 96 values a step)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if case == "eps0_batch_stats":
        torch.testing.assert_close(got[:, 1], model.bias[1].relu().expand_as(got[:, 1]))
