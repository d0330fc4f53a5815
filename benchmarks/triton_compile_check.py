"""Compile the triton backend's kernels for a GPU, without a GPU, and show what they became.

    PYTHONPATH=src python benchmarks/triton_compile_check.py [--arch 90] [--rows all|NAME...]
        [--candidates] [--dump-ptx DIR]

For each row of issue 4 (and a few extra kernel views) it runs the real launchers on
unallocated CPU tensors with the launch intercepted, rebuilds each launch's specialization
the way Triton's JIT would on a GPU (pointer dtypes, 16-divisible integers, constexprs),
compiles it ahead of time for ``sm_<arch>`` with the ptxas bundled in the triton wheel, and
prints per kernel: global load/store widths from the PTX (``v4.b32`` = 16 bytes), registers
and spills from the cubin. Catches GPU-only compile errors the interpreter cannot, and
shows whether the 16-byte vector accesses the design counts on were emitted.
``--candidates``: every plan the autotuner may time for each pass, not only the defaults
(identical compilations are shown once); kernels with a stack frame or local memory
(register spills) are counted, failures fail the run.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import batchnorm.backends.triton as tb  # noqa: E402

ROWS = {  # name: (shape, dtype, channels_last)
    "64x112x112-bf16-CL": ((256, 64, 112, 112), torch.bfloat16, True),
    "256x56x56-bf16-CL": ((256, 256, 56, 56), torch.bfloat16, True),
    "256x56x56-bf16-NCHW": ((256, 256, 56, 56), torch.bfloat16, False),
    "256x56x56-fp32-NCHW": ((256, 256, 56, 56), torch.float32, False),
    "2048x7x7-bf16-CL": ((256, 2048, 7, 7), torch.bfloat16, True),
    "32x512x512-fp32-NCHW": ((8, 32, 512, 512), torch.float32, False),
    "8192x4096-bf16": ((8192, 4096), torch.bfloat16, False),
    "2048x7x7-fp32-NCHW": ((256, 2048, 7, 7), torch.float32, False),
    "fp64-NCL": ((16, 32, 1000), torch.float64, False),
    # channel counts no multiple of 16, several partials per channel
    "24x56x56-bf16-CL": ((64, 24, 56, 56), torch.bfloat16, True),
    "4000x100-fp32": ((4000, 100), torch.float32, False),
}

_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
          torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32"}


def _kernel_view(shape, dtype, cl):
    x = torch.empty(shape, dtype=dtype)  # never written: costs no memory
    if len(shape) == 2:
        return x
    if cl:
        return x.movedim(1, -1).contiguous().view(-1, shape[1])
    return x.view(shape[0], shape[1], -1)


def _record_launches(fn):
    """Run fn() with every JIT launch recorded instead of executed."""
    launches = []
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs, grid))

    JITFunction.run = run
    try:
        fn()
    finally:
        JITFunction.run = original
    return launches


def _source(kernel, args, kwargs):
    names = kernel.arg_names
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values = dict(zip(names, args))
    values.update(kwargs)
    sig, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        v = values[name]
        param = kernel.params[i]
        if param.is_constexpr:
            sig[name] = "constexpr"
            constexprs[(i,)] = v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _TYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            if v == 1:
                sig[name] = "constexpr"
                constexprs[(i,)] = 1
            else:
                sig[name] = "i64" if abs(v) >= 2 ** 31 else "i32"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{name}: {type(v)}")
    spec = ",".join(f"{n}={values[n]}" for i, n in enumerate(names) if kernel.params[i].is_constexpr)
    return ASTSource(kernel, sig, constexprs, attrs), options, spec


def _resources(cubin: bytes) -> str:
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name],
                                 capture_output=True, text=True, timeout=60).stdout
        except Exception as e:  # noqa: BLE001
            return f"(cuobjdump: {e})"
    m = re.search(r"REG:(\d+).*?STACK:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", out)
    return f"regs {m[1]} stack {m[2]} smem {m[3]} local {m[4]}" if m else "(no usage)"


def _phases(x, act="relu", residual=False):
    c = x.shape[1]
    mean = torch.empty(c, dtype=tb.acc_dtype(x.dtype))
    w = torch.empty(c)
    r = torch.empty_like(x) if residual else None
    count = x.numel() // c
    update = (w.clone(), w.clone(), torch.zeros((), dtype=torch.int64), 0.1)
    saved = torch.empty((4, c), dtype=mean.dtype).unbind(0)
    return [
        ("batch_norm_forward", lambda: tb.batch_norm_forward(x, w, w, r, None, None, 1e-5, act,
                                                             0.0, update)),
        ("forward (eval)", lambda: tb.batch_norm_forward(x, w, w, r, w, w, 1e-5, act, 0.0)),
        ("forward (eval, y alone)", lambda: tb.batch_norm_forward(
            x, w, w, r, w, w, 1e-5, act, 0.0, need_stats=False)),
        ("forward (eval, float64 mean)", lambda: tb.batch_norm_forward(
            x, w, w, r, w.double(), w, 1e-5, act, 0.0, need_stats=False)),
        ("batch_norm_backward", lambda: tb.batch_norm_backward(
            x, x, w, w, r, mean.double(), mean, 1e-5, True, act, 0.0, True, True, residual)),
        ("backward (saved)", lambda: tb.batch_norm_backward(
            x, x, w, w, r, mean.double(), mean, 1e-5, True, act, 0.0, True, True, residual,
            saved=saved)),
        ("update_running_stats", lambda: tb.update_running_stats(
            w, w.clone(), torch.zeros((), dtype=torch.int64), mean.double(), mean, count, None)),
        ("stats", lambda: tb.stats(x)),
        ("normalize", lambda: tb.normalize(x, mean, mean, w, w, r, act, 0.0)),
        ("backward_reduce", lambda: tb.backward_reduce(x, x, mean, mean, w, w, r, act, 0.0)),
        ("backward_elementwise", lambda: tb.backward_elementwise(
            x, x, mean, mean, w, w, r, mean, mean, count, act, 0.0, residual)),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--rows", nargs="*", default=["all"])
    ap.add_argument("--act", default="relu")
    ap.add_argument("--dump-ptx", metavar="DIR", help="write each kernel's PTX there")
    ap.add_argument("--candidates", action="store_true",
                    help="every autotuner candidate plan, not only the defaults")
    args = ap.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    tb._plans.sm_count.cache_clear()
    tb._plans.sm_count = lambda device: 132  # an H100 SXM
    tb.supports = lambda x: True  # CPU stand-ins for CUDA tensors
    tb._launch.DIRECT = False  # every launch through JITFunction.run, intercepted here
    if args.candidates:
        # the autotuner on CPU tensors, its timer a no-op: each candidate's warm-up launch
        # is what gets recorded
        tb.CONFIG["autotune"] = 1
        tb.CONFIG["autotune_min_numel"] = 0
        tb._plans.TUNE_ON_CPU = True
        tb._plans.ROUNDS = 0
    seen = set()
    spills = 0
    rows = ROWS if args.rows == ["all"] else {k: ROWS[k] for k in args.rows}
    failures = 0
    print(f"triton {triton.__version__}, target sm_{args.arch}, CONFIG {tb.CONFIG}")
    for name, (shape, dtype, cl) in rows.items():
        x = _kernel_view(shape, dtype, cl)
        print(f"\n{name}  kernel view {tuple(x.shape)} {dtype}")
        for phase, call in _phases(x, args.act, residual=False):
            for kernel, kargs, kwargs, grid in _record_launches(call):
                try:
                    src, options, spec = _source(kernel, list(kargs), dict(kwargs))
                    identity = (kernel.fn.__name__, spec, str(options), str(src.signature))
                    if args.candidates and identity in seen:
                        continue
                    seen.add(identity)
                    k = triton.compile(src, target=target, options=options)
                    resources = _resources(k.asm['cubin'])
                    spills += not re.search(r"stack 0 .*local 0", resources)
                    ptx = k.asm["ptx"]
                    if args.dump_ptx:
                        os.makedirs(args.dump_ptx, exist_ok=True)
                        with open(os.path.join(args.dump_ptx, f"{name}-{phase}-"
                                  f"{kernel.fn.__name__}.ptx".replace(" ", "_")), "w") as f:
                            f.write(ptx)
                    mem = collections.Counter(re.findall(r"(?:ld|st)\.global[\.\w]*", ptx))
                    mem = " ".join(f"{op.replace('.global', '')}x{n}" for op, n in sorted(mem.items()))
                    print(f"  {phase:21s} {kernel.fn.__name__:20s} grid {grid[0]:>7} "
                          f"warps {options.get('num_warps', 4)} {resources}\n"
                          f"      {spec}\n      {mem}")
                except Exception as e:  # noqa: BLE001
                    failures += 1
                    print(f"  {phase:21s} {kernel.fn.__name__}: COMPILE FAILED: "
                          f"{type(e).__name__}: {str(e)[:2000]}")
    print(f"\n{failures} compile failures, {spills} kernels with a stack frame or local "
          f"memory (spills)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
