"""A/B on a GPU: the training step with each reduction's merge in its stage-1 launch
(CONFIG's fused_merge_max) against the merges launched apart (fused_merge_max 0).

    PYTHONPATH=src python3 benchmarks/fused_merge_ab.py [--values 0,16384,65536]
        [--budget 120] [--repeats 9]

For each of issue 4's rows (the small ones first), BN+ReLU forward+backward of our
module, timed as ``batchnorm bench`` times it (samples of back-to-back calls from a
synchronized start, the variants in turn, medians), CONFIG's fused_merge_max set before
each call. Two launches a step fewer is host time; the last program's merge is device
time at the end of stage 1, longer the more partial values a channel block holds (the
last column: P times the block's channels, for the statistics' plan; a variant whose
limit is below it launches the merges apart). Every variant runs with the plans the
default tuned (the tuner times stage 1 with its merge apart, so its choice does not
depend on the limit; left to itself each variant would tune its own, and timing noise
would pick different tiles). Starts no row after ``--budget`` seconds.
``--device cpu``: a dry run of the script under TRITON_INTERPRET=1 (tiny cases patched in).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from batchnorm import backends, bench
from batchnorm.backends.triton import CONFIG, _plans


def _share_plans(values: list[int]) -> None:
    """The plans tuned under the default CONFIG, for the other fused_merge_max values too
    (each its own ``merge_p``)."""
    default = dict(_plans.CONFIG)
    for key, plan in list(_plans.CHOSEN.items()):
        if key[-1] != tuple(default.values()):
            continue
        for value in values:
            cfg = {**default, "fused_merge_max": value}
            shared = plan
            if "merge_p" in plan:
                shared = {**plan, "merge_p": _plans.fused_merge_p(
                    key[1].cl, plan["P"], plan.get("BLOCK_C", 1), plan["warps"], cfg)}
            _plans.CHOSEN[(*key[:-1], tuple(cfg.values()))] = shared


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--values", default=f"0,{CONFIG['fused_merge_max']}",
                    help="fused_merge_max values to compare, the first the reference")
    ap.add_argument("--budget", type=float, default=120.0)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--target-ms", type=float, default=20.0)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    values = [int(v) for v in args.values.split(",")]
    device = torch.device(args.device)
    timer = bench._Timer(device)
    default = CONFIG["fused_merge_max"]
    start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}: BN+ReLU fwd+bwd ms (medians of {args.repeats}) by fused_merge_max; "
          f"x: ratio to {values[0]}")
    print(f"{'case':34s} " + " ".join(f"{v:>16d}" for v in values) + "  values a block")
    for case in reversed(bench.cuda_cases()):
        if time.perf_counter() - start > args.budget:
            print("(budget spent)")
            break
        step = bench._functions(case, "bn+relu fwd+bwd", device, False)["ours"]

        def variant(step, value):
            def run():
                CONFIG["fused_merge_max"] = value
                step()
            return run
        try:
            with backends.using("triton"):
                step()  # the default CONFIG tunes the plans, which every variant then uses
                _share_plans(values)
                samples = bench.interleaved(timer, {v: variant(step, v) for v in values},
                                            args.repeats, args.target_ms)
        finally:
            CONFIG["fused_merge_max"] = default
        x = bench._input(case, device, torch.Generator(device=device).manual_seed(0))
        g = _plans.geometry(x.shape, x.dim() == 2 or case.channels_last)
        plan = _plans.chosen("stats", g, x) or _plans.reduce_plan(g, x.device)
        block = plan["P"] * (plan["BLOCK_C"] if g.cl else 1)
        ms = [statistics.median(samples[v]) for v in values]
        print(f"{case.label:34s} " + " ".join(f"{m:8.3f} {ms[0] / m:6.2f}x" for m in ms)
              + f"  {block}", flush=True)
        del step, x
        torch.cuda.empty_cache() if device.type == "cuda" else None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
