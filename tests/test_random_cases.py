"""Random combinations of what the parity suite varies one at a time.

Each case draws a shape (2-D to 5-D, up to 33 channels), a dtype, a layout (contiguous,
channels-last, a strided slice, channels innermost through a transpose), weights (none,
float32, the input's dtype, strided), a residual (in the input's dtype or float32, in
another layout), running statistics (none, float32, float64), momentum (0, 1, None: the
cumulative average), eps (0 included), an activation, training or evaluation, and which
inputs want a gradient. Every backend must give what the portable backend (plain torch
ops, itself checked against torch and the float64 reference by the parity suite) gives:
the output and its layout, the running statistics, num_batches_tracked and the gradients.
The seed decides all of a case's data: a failing case reruns alone by its test id
(``...[cpu-cpu-seed7]``).
"""

import math
import random

import pytest
import torch
from tolerances import TOLERANCES

from batchnorm import backends
from batchnorm import functional as F
from batchnorm.backends.portable import acc_dtype as portable_acc_dtype

ACTIVATIONS = (None, "relu", "leaky_relu", "silu", "gelu", "gelu_tanh", "sigmoid", "tanh")
SEEDS = range(60)


def _random_case(seed: int) -> dict:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    dims = rng.choice([2, 3, 4, 5])
    c = rng.choice([1, 2, 3, 5, 8, 16, 17, 33])
    spatial = [rng.choice([1, 2, 3, 5, 7]) for _ in range(dims - 2)]
    training = rng.random() < 0.7
    n = rng.choice([1, 2, 3, 4])
    if training and n * math.prod(spatial) < 2:
        n = 2  # batch statistics need two values a channel
    shape = (n, c, *spatial)
    dtype = rng.choice([torch.float32, torch.float64, torch.bfloat16, torch.float16])
    x = (torch.randn(shape, generator=gen) * rng.choice([1.0, 3.0])
         + rng.choice([0.0, 5.0, -100.0])).to(dtype)
    layout = rng.choice(["contiguous", "channels_last", "strided", "transposed"])
    if layout == "channels_last" and dims in (4, 5):
        x = x.contiguous(memory_format=torch.channels_last if dims == 4
                         else torch.channels_last_3d)
    elif layout == "strided":
        x = torch.stack([x, torch.zeros_like(x)], dim=1)[:, 0]  # every other block
    elif layout == "transposed" and dims >= 3:
        x = x.transpose(1, -1).contiguous().transpose(1, -1)
    weight_dtype = rng.choice([None, torch.float32, dtype])
    weight = bias = None
    if weight_dtype is not None:
        weight = (torch.rand(c, generator=gen) + 0.5).to(weight_dtype)
        if rng.random() < 0.2:
            weight = torch.stack([weight, weight], dim=1)[:, 0]  # strided
        if rng.random() < 0.8:
            bias = torch.randn(c, generator=gen).to(weight_dtype)
    residual = None
    if rng.random() < 0.35:
        residual = torch.randn(shape, generator=gen).to(rng.choice([dtype, torch.float32]))
        if dims == 4 and rng.random() < 0.3:
            residual = residual.contiguous(memory_format=torch.channels_last)
    track = not training or rng.random() < 0.8
    running_mean = running_var = num_batches_tracked = None
    if track:
        stats_dtype = torch.float64 if rng.random() < 0.1 else torch.float32
        running_mean = (torch.randn(c, generator=gen) * 0.1).to(stats_dtype)
        running_var = (torch.rand(c, generator=gen) + 0.5).to(stats_dtype)
        num_batches_tracked = torch.tensor(rng.choice([0, 3]))
    momentum = rng.choice([0.1, None, 0.0, 1.0, 0.3]) if training else 0.1
    if momentum is None and num_batches_tracked is None:
        momentum = 0.1
    return {
        "x": x, "weight": weight, "bias": bias, "residual": residual,
        "running_mean": running_mean, "running_var": running_var,
        "num_batches_tracked": num_batches_tracked, "momentum": momentum,
        "eps": rng.choice([1e-5, 0.0, 0.1]), "activation": rng.choice(ACTIVATIONS),
        "training": training, "wants_grad": [rng.random() < p for p in (0.8, 0.7, 0.7, 0.6)],
        "dy_seed": seed + 1}


def _run(case: dict, backend: str, device: str) -> dict:
    """One forward (and backward, where some input wants a gradient) on copies of the
    case's tensors; what it gave and what it left in the running buffers."""
    def copy(t):
        return None if t is None else t.detach().clone().to(device)
    x, weight, bias, residual = (copy(case[k]) for k in ("x", "weight", "bias", "residual"))
    state = [copy(case[k]) for k in ("running_mean", "running_var", "num_batches_tracked")]
    leaves, names = [], []
    for name, t, wants in zip(("x", "weight", "bias", "residual"), (x, weight, bias, residual),
                              case["wants_grad"]):
        if t is not None and wants:
            leaves.append(t.requires_grad_())
            names.append(name)
    with backends.using(backend):
        y = F.batch_norm(x, state[0], state[1], weight, bias, case["training"],
                         case["momentum"], case["eps"], activation=case["activation"],
                         residual=residual, num_batches_tracked=state[2])
        grads = ()
        if leaves:
            dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(case["dy_seed"]))
            grads = torch.autograd.grad(y, leaves, dy.to(y.dtype).to(device))
    # the layout: strides of the dimensions longer than 1 (the others' do not matter)
    layout = [s for s, n in zip(y.stride(), y.shape) if n > 1]
    return {"y": y.detach(), "layout": layout, "state": state,
            "grads": dict(zip(names, grads))}


def _magnitude(t: torch.Tensor) -> float:
    """max(1, the largest finite |value|): what the absolute tolerances scale with."""
    finite = t[torch.isfinite(t)]
    return max(1.0, finite.abs().max().item()) if finite.numel() else 1.0


def _assert_close(got, want, rtol_dtypes, atol, what):
    """rtol: the table's coarsest among ``rtol_dtypes`` and want's dtype (the roundings the
    value went through); atol: ``atol`` times want's magnitude."""
    rtol = max(TOLERANCES[d][0] for d in (*rtol_dtypes, want.dtype))
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol * _magnitude(want),
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("seed", SEEDS, ids=lambda s: f"seed{s}")
def test_random_case_gives_what_the_portable_backend_gives(backend, seed):
    if backend.name == "portable":
        pytest.skip("the portable backend is the oracle here")
    case = _random_case(seed)
    want = _run(case, "portable", backend.device)
    got = _run(case, backend.name, backend.device)
    # Every backend computes in the acc dtype (float32 for float16/bfloat16, see
    # portable.acc_dtype) from the same inputs and rounds once to the output's dtype. So:
    # - rtol: the table's for x's dtype (or the output's where coarser: a float32 dweight
    #   or dresidual of float64 data). The final rounding moves a value by at most one ulp
    #   of itself (relative 2**-8 in bfloat16, 2**-11 in float16); the table allows ~4 of
    #   them, and for float32/float64 covers the arithmetic's reordering many times over.
    # - atol: the table's for the acc dtype, not x's (1e-5 for halves, where the half row
    #   would allow 0.03 on values of size 1: a bug's size), times the compared tensor's
    #   magnitude max(1, max|want|). Absolute differences come from acc arithmetic on terms
    #   as large as the largest value (dx = w·invstd·(dz − Σdz/n − x̂·Σdz·x̂/n) cancels to
    #   near 0; evaluation's y is ~100 when x is), not from the final rounding (relative).
    #   Factor 4 for y, dx and dresidual (elementwise: a few roundings each); 4·√count for
    #   the weight and bias gradients, sums over count values, whose rounding error grows
    #   as √count.
    # Measured on the 60 seeds (cpu, triton interpreted): the largest difference is 0.26 of
    # what this allows for halves (one ulp of the output), under 0.01 for float32/float64.
    x = case["x"]
    acc = portable_acc_dtype(x.dtype)
    atol = TOLERANCES[acc][1]
    count = x.numel() // x.shape[1]
    _assert_close(got["y"], want["y"], (x.dtype,), 4 * atol, "y")
    assert got["layout"] == want["layout"]
    for g, w in zip(got["state"], want["state"]):
        if w is None:
            assert g is None
        elif not w.is_floating_point():
            assert torch.equal(g, w)  # num_batches_tracked
        else:
            # the running statistics are never rounded to x's dtype: acc arithmetic stored
            # in the buffer's dtype (the coarser of the two rows)
            _assert_close(g, w, (acc,), 4 * max(atol, TOLERANCES[w.dtype][1]),
                          "running statistics")
    assert got["grads"].keys() == want["grads"].keys()
    for name, w in want["grads"].items():
        factor = 4 * math.sqrt(count) if name in ("weight", "bias") else 4
        _assert_close(got["grads"][name], w, (x.dtype,), factor * atol, f"d{name}")
