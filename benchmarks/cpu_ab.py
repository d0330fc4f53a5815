"""The CPU backend's fused passes in two source trees, timed in alternating processes.

For a change to the kernels that should not (or should) change their speed: this
machine's steal time moves a single run by tens of percent, so one process per tree and
case is started in turn, several rounds (the order flips each round), and each process
reports the minimum and median of its calls. The table gives, per case and pass, the
minimum over the processes of each tree and their ratio, then every process's minimum.

    git worktree add /tmp/base <rev>
    NUMBA_CACHE_DIR=/tmp/nb_base PYTHONPATH=/tmp/base/src .venv/bin/batchnorm compile
    .venv/bin/python benchmarks/cpu_ab.py --base /tmp/base/src --base-cache /tmp/nb_base \\
        32,64,56,56@bfloat16 32,64,56,56:cl@float32 64,256,4,4@bfloat16@relu@split

A case is ``shape[:cl]@dtype[@activation[@split]]``: ``:cl`` for channels-last; with
``split`` the passes are the reduction alone (``red``), the elementwise backward alone
(``elem``) and the evaluation forward (``evalfwd``), else the training forward (``fwd``,
statistics and normalize) and the whole backward (``bwd``). The new tree is this
checkout's ``src`` (``--new`` to change it), with numba's default cache. Give the base
tree a cache of its own: both trees' kernels have the same names.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

CALLS = 100


def _child(case: str) -> None:
    """Time the passes of one case in this process; print ``name min median`` triples."""
    import torch

    from batchnorm.backends import cpu

    spec, dtype, *rest = case.split("@")
    act = rest[0] if rest else "relu"
    split = len(rest) > 1 and rest[1] == "split"
    cl = spec.endswith(":cl")
    shape = tuple(int(v) for v in spec.removesuffix(":cl").split(","))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(getattr(torch, dtype))
    dy = torch.randn(shape, generator=gen).to(x.dtype)
    if cl:
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    c = shape[1]
    w, b = torch.ones(c), torch.zeros(c)
    _, mean, var, *_ = cpu.batch_norm_forward(x, w, b, None, None, None, 1e-5, act, 0.0,
                                              None, cl)
    eval_mean = mean.to(var.dtype)

    def backward(training, need_sums, need_dx, m):
        return cpu.batch_norm_backward(dy, x, w, b, None, m, var, 1e-5, training, act, 0.0,
                                       need_sums, need_dx, False, cl)

    if split:
        passes = {"red": lambda: backward(True, True, False, mean),
                  "elem": lambda: backward(False, False, True, eval_mean),
                  "evalfwd": lambda: cpu.batch_norm_forward(x, w, b, None, eval_mean, var,
                                                            1e-5, act, 0.0, None, cl)}
    else:
        passes = {"fwd": lambda: cpu.batch_norm_forward(x, w, b, None, None, None, 1e-5, act,
                                                        0.0, None, cl),
                  "bwd": lambda: backward(True, True, True, mean)}
    out = []
    for name, f in passes.items():
        f()
        times = []
        for _ in range(CALLS):
            t0 = time.perf_counter()
            result = f()
            times.append(time.perf_counter() - t0)
            del result  # (the output buffers go back to the pool, as in a training step)
        out += [name, f"{min(times) * 1e3:.4f}", f"{statistics.median(times) * 1e3:.4f}"]
    print(" ".join(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cases", nargs="+", metavar="SHAPE[:cl]@DTYPE[@ACT[@split]]")
    p.add_argument("--base", required=True, help="the base tree's src folder")
    p.add_argument("--base-cache", help="NUMBA_CACHE_DIR for the base tree")
    p.add_argument("--new", default=str(Path(__file__).resolve().parents[1] / "src"),
                   help="the new tree's src folder (default: this checkout's)")
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args()
    env = {"base": {"PYTHONPATH": args.base}, "new": {"PYTHONPATH": args.new}}
    if args.base_cache:
        env["base"]["NUMBA_CACHE_DIR"] = args.base_cache
    got = defaultdict(list)
    for r in range(args.rounds):
        for case in args.cases:
            for tree in ("base", "new") if r % 2 == 0 else ("new", "base"):
                run = subprocess.run([sys.executable, __file__, "--child", case], check=False,
                                     env=dict(os.environ, **env[tree]), capture_output=True,
                                     text=True)
                words = run.stdout.split()
                if run.returncode or not words or len(words) % 3:
                    sys.exit(f"{tree} {case}: {run.stderr[-2000:]}")
                for i in range(0, len(words), 3):
                    got[case, words[i], tree].append(float(words[i + 1]))
    print(f"{'case':40} {'pass':8} {'base ms':>9} {'new ms':>9} {'new/base':>8}"
          f"   (minimum of {args.rounds} processes' minimums; then each process's)")
    for case in args.cases:
        for name in ("fwd", "bwd", "red", "elem", "evalfwd"):
            if (case, name, "base") not in got:
                continue
            old, new = got[case, name, "base"], got[case, name, "new"]
            print(f"{case:40} {name:8} {min(old):9.3f} {min(new):9.3f} "
                  f"{min(new) / min(old):8.2f}   base {sorted(old)} new {sorted(new)}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child(sys.argv[2])
    else:
        main()
