"""Run the triton backend's launches against a stand-in CUDA driver, without a GPU.

    python tests/fake_cuda_launches.py OUT.json

Run by ``test_triton_launch.py`` in a process of its own (``TRITON_INTERPRET`` must be
unset before triton is imported). The stand-in driver (``fake_cuda_driver.py``) compiles
the kernels for sm_90 with the ptxas of the triton wheel, as a GPU machine would, and
its launcher records what it is handed instead of launching.

Every call below runs three times: with the direct launches of ``_launch.py`` (a first
time, which compiles and goes through ``kernel[grid]``; a second, which must not), then
with every launch through ``kernel[grid]``. OUT.json gets the records of the second and
third runs, which must be equal: the direct path hands the launcher what Triton's own
``JITFunction.run`` does. Pointer arguments are recorded as the address the launcher reads
(its alignment, and the order of its first use in the launch: the direct path hands over
addresses, kernel[grid] tensors), the compiled kernel by its name and the identity of its
function handle. Exit code 3: no stand-in for this Triton.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    import fake_cuda_driver
except ImportError as e:
    print(f"no stand-in driver for this triton: {e}")
    sys.exit(3)

import torch  # noqa: E402

RECORD: list = []


def _record(v):
    if isinstance(v, list):  # ["address", int]: a pointer argument (fake_cuda_driver)
        return v
    if isinstance(v, torch.Tensor):
        return ["tensor", str(v.dtype), list(v.shape), list(v.stride()), v.data_ptr()]
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return repr(type(v))


def _by_first_use(records: list) -> list:
    """Addresses as the order of their first use in each launch (and their alignment):
    new allocations differ from call to call, which tensor is passed where (a dummy
    pointer, an alias) does not."""
    for record in records:
        seen: dict = {}
        for arg in record[-1]:
            if isinstance(arg, list):
                arg[-1] = [seen.setdefault(arg[-1], len(seen)), arg[-1] % 16]
    return records


def _on_launch(grid, stream, function, packed_metadata, launch_metadata, enter_hook,
               exit_hook, args):
    # no hook runs: None, or an empty chain (launch_metadata is only for hooks)
    inert = all(h is None or getattr(h, "calls", None) == [] for h in (enter_hook, exit_hook))
    RECORD.append([function, list(grid), stream, id(packed_metadata), inert,
                   [_record(a) for a in args]])


def calls(tb):
    """Every launch site of the backend, on CPU tensors standing in for CUDA ones."""
    gen = torch.Generator().manual_seed(0)
    out = []
    # (65536, 24): merges of 512 partials of a channel count that is no multiple of 16, in
    # [512, 4] tiles: at 4 warps (16 values a thread) they crash Triton 3.9's compiler for
    # sm_90 (a segmentation fault; Triton 3.6 compiles them), at 8 they compile
    for shape, channels_last in (((4, 8, 5, 6), False), ((4, 8, 5, 6), True), ((32, 16), False),
                                 ((65536, 24), False)):
        x = torch.randn(shape, generator=gen)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        c = shape[1]
        w, b = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
        r, dy = torch.randn_like(x), torch.randn_like(x)
        state = (torch.zeros(c), torch.ones(c), torch.zeros((), dtype=torch.int64))

        def train(x=x, w=w, b=b, r=r, dy=dy, state=state, cl=channels_last):
            y, mean, var, _, saved = tb.batch_norm_forward(
                x, w, b, r, None, None, 1e-5, "relu", 0.0, (*state, 0.1), cl)
            tb.batch_norm_backward(dy, x, w, b, r, mean, var, 1e-5, True, "relu", 0.0, True,
                                   True, True, cl, saved=saved)
            tb.batch_norm_backward(dy, x, w, b, None, mean, var, 1e-5, True, "none", 0.0,
                                   True, True, False, cl)
            tb.update_running_stats(*state, mean, var, x.numel() // x.shape[1], None)

        def evaluate(x=x, w=w, b=b, r=r, state=state, cl=channels_last):
            tb.batch_norm_forward(x, w, b, None, state[0], state[1], 1e-5, "silu", 0.0,
                                  None, cl)
            tb.batch_norm_forward(x, w, b, r, state[0], state[1], 1e-5, "relu", 0.0, None,
                                  cl, need_stats=False)  # y alone: one launch

        out += [train, evaluate]
    v = torch.randn(6, 8, 7, generator=gen)  # the primitives, on an (N, C, L) kernel view
    mean, m2 = torch.zeros(8), torch.ones(8)
    out.append(lambda: tb.stats(v))
    out.append(lambda: tb.normalize(v, mean, m2, None, None, v, "leaky_relu", 0.01))
    out.append(lambda: tb.backward_reduce(v, v, mean, m2, None, None, None, "gelu", 0.0))
    out.append(lambda: tb.backward_elementwise(v, v, mean, m2, None, None, v, mean, m2, 42,
                                               "tanh", 0.0, True))
    return out


def main(path: str) -> int:
    try:
        fake_cuda_driver.install(_on_launch)
        import batchnorm.backends.triton as tb
        from batchnorm.backends.triton import _launch, _plans
        # Plans for the stand-in's SM count, not the interpreter's 2 (CPU tensors stand in
        # for CUDA ones here): the grids and merge tiles a GPU gets are what compiles.
        _plans.sm_count = lambda device: fake_cuda_driver.MULTIPROCESSORS
    except Exception as e:  # noqa: BLE001
        print(f"no stand-in driver for this triton: {type(e).__name__}: {e}")
        return 3
    if not _launch.DIRECT:
        print("direct launches are off")
        return 3
    from triton.runtime.jit import JITFunction

    def refuse(*args, **kwargs):
        raise AssertionError("a second launch went through JITFunction.run")

    through_jit = JITFunction.run
    records = {}
    for i, call in enumerate(calls(tb)):
        call()  # compiles, through kernel[grid]
        RECORD.clear()
        JITFunction.run = refuse
        try:
            call()
        finally:
            JITFunction.run = through_jit
        direct = list(RECORD)
        _launch.DIRECT = False
        RECORD.clear()
        call()
        _launch.DIRECT = True
        records[i] = [_by_first_use(direct), _by_first_use(list(RECORD))]
    with open(path, "w") as f:
        json.dump(records, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
