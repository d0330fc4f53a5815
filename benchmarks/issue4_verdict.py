"""Issue 4's targets, row by row, from a CSV of ``batchnorm bench --device cuda --csv``.

    python benchmarks/issue4_verdict.py [benchmarks/results/cuda-<date>.csv]

(default: the newest ``cuda-*.csv`` there). The targets, on the card of the run:

* BN+ReLU forward+backward at most the target, 85% of the 8-pass floor at the copy
  bandwidth measured in the same run (``floor / 0.85``; the issue's column gives an
  H100's, 3.0 TB/s: a faster card's floor is lower), and at least 1.2x faster than the
  better of torch eager and torch.compile;
* plain BN forward+backward at least 1.2x faster than torch eager.

The bench's ``frac_copy`` of a row is its bytes over its time against the copy bandwidth,
so a BN+ReLU row meets the first target where ``frac_copy >= 0.85``. A row whose
torch.compile was not timed is judged ``yes?`` where the rest holds.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BN_RELU, PLAIN = "bn+relu fwd+bwd", "fwd+bwd"
EFFICIENCY, SPEEDUP = 0.85, 1.2


def judge(ours: float, floor: float, eager: float, compile: float | None) -> str:
    """A BN+ReLU row against both targets: ``"yes"``, ``"yes?"`` (met, but torch.compile
    was not timed) or ``"no"``."""
    best = min(t for t in (eager, compile) if t is not None)
    if ours <= floor / EFFICIENCY and best / ours >= SPEEDUP:
        return "yes" if compile is not None else "yes?"
    return "no"


def verdicts(rows: list[dict]) -> list[dict]:
    """One dict per case of the table: the BN+ReLU and plain forward+backward times and
    whether each meets its target (``"yes"``, ``"yes?"`` or ``"no"``; None where the
    table has no such row)."""
    by: dict = {}
    for r in rows:
        if r.get("case") != "first call":
            by.setdefault(r["case"], {}).setdefault(r["op"], {})[r["impl"]] = r
    out = []
    for case, ops in by.items():
        v = {"case": case, "bn_relu": None, "plain": None}
        relu = ops.get(BN_RELU, {})
        if "ours" in relu and "torch" in relu:
            ours = float(relu["ours"]["ms"])
            floor = ours * float(relu["ours"]["frac_copy"])
            eager = float(relu["torch"]["ms"])
            comp = float(relu["torch.compile"]["ms"]) if "torch.compile" in relu else None
            best = min(t for t in (eager, comp) if t is not None)
            v.update(ours=ours, eager=eager, compile=comp, floor=floor,
                     target=floor / EFFICIENCY, vs_best=best / ours,
                     bn_relu=judge(ours, floor, eager, comp))
        plain = ops.get(PLAIN, {})
        if "ours" in plain and "torch" in plain:
            ratio = float(plain["torch"]["ms"]) / float(plain["ours"]["ms"])
            v.update(plain_ratio=ratio, plain="yes" if ratio >= SPEEDUP else "no")
        out.append(v)
    return out


def _ms(v: dict, key: str) -> str:
    return f"{v[key]:7.3f}" if v.get(key) is not None else "      -"


def report(rows: list[dict]) -> str:
    lines = [(f"{'case':32s} {'ours':>7s} {'eager':>7s} {'compile':>7s} {'floor':>7s} "
              f"{'target':>7s} {'vs best':>7s} {'met?':>5s}   {'plain x eager':>13s} "
              f"{'met?':>5s}")]
    for v in verdicts(rows):
        relu = (" ".join(_ms(v, k) for k in ("ours", "eager", "compile", "floor", "target"))
                + f" {v['vs_best']:6.2f}x {v['bn_relu']:>5s}" if v["bn_relu"] else
                " ".join(["      -"] * 6) + "     -")
        plain = (f"{v['plain_ratio']:12.2f}x {v['plain']:>5s}" if v["plain"] else
                 f"{'-':>13s} {'-':>5s}")
        lines.append(f"{v['case']:32s} {relu}   {plain}")
    vs = verdicts(rows)
    relu = [v["bn_relu"] for v in vs if v["bn_relu"]]
    plain = [v["plain"] for v in vs if v["plain"]]
    lines.append(f"BN+ReLU rows meeting both targets: {relu.count('yes')} of {len(relu)}"
                 + (f" ({relu.count('yes?')} more without a torch.compile time)"
                    if "yes?" in relu else "")
                 + f"; plain BN fwd+bwd >= {SPEEDUP}x eager: {plain.count('yes')} of "
                 f"{len(plain)}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv:
        path = Path(argv[0])
    else:
        found = sorted(RESULTS.glob("cuda-*.csv"), key=lambda p: p.stat().st_mtime)
        if not found:
            print(f"no cuda-*.csv in {RESULTS}: run `batchnorm bench --device cuda --csv`",
                  file=sys.stderr)
            return 2
        path = found[-1]
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    print(f"issue 4's targets on {rows[0].get('device_name', '?')} ({path.name}):")
    print(report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
