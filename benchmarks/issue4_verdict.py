"""Issue 4's targets, row by row, from a CSV of ``batchnorm bench --device cuda --csv``.

    python benchmarks/issue4_verdict.py [benchmarks/results/cuda-<date>.csv]

(default: the newest run's table there, by the date in its name: ``cuda-<card>-<date>[b].csv``,
not a ``--shape`` run's). The targets, on the card of the run:

* BN+ReLU forward+backward at most the target, 85% of the 8-pass floor at the copy
  bandwidth measured in the same run (``floor / 0.85``; the issue's column gives an
  H100's, 3.0 TB/s: a faster card's floor is lower), and at least 1.2x faster than the
  better of torch eager and torch.compile;
* plain BN forward+backward at least 1.2x faster than torch eager.

The bench's ``frac_copy`` of a row is its bytes over its time against the copy bandwidth,
so a BN+ReLU row meets the first target where ``frac_copy >= 0.85`` (compared as such:
``ms <= floor / 0.85`` with the floor rebuilt from them is false for ~5% of times exactly at
it). A row whose torch.compile was not timed is judged ``yes?`` where the rest holds. A
table without all of the issue's rows (a bench cut short by ``--budget``) says which are
missing: the issue is judged on every row.
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BN_RELU, PLAIN = "bn+relu fwd+bwd", "fwd+bwd"
EFFICIENCY, SPEEDUP = 0.85, 1.2


def judge(ours: float, frac_copy: float, eager: float, compile: float | None) -> str:
    """A BN+ReLU row against both targets: ``"yes"``, ``"yes?"`` (met, but torch.compile
    was not timed) or ``"no"``."""
    best = min(t for t in (eager, compile) if t is not None)
    if frac_copy >= EFFICIENCY and best / ours >= SPEEDUP:
        return "yes" if compile is not None else "yes?"
    return "no"


def issue_cases() -> list[str] | None:
    """The labels of the issue's rows, as the bench names them (None where the package
    cannot be imported: run with ``PYTHONPATH=src``)."""
    try:
        from batchnorm.bench import cuda_cases
    except ImportError:
        return None
    return [c.label for c in cuda_cases()]


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
            ours, frac_copy = float(relu["ours"]["ms"]), float(relu["ours"]["frac_copy"])
            floor = ours * frac_copy
            eager = float(relu["torch"]["ms"])
            comp = float(relu["torch.compile"]["ms"]) if "torch.compile" in relu else None
            best = min(t for t in (eager, comp) if t is not None)
            v.update(ours=ours, eager=eager, compile=comp, floor=floor,
                     target=floor / EFFICIENCY, vs_best=best / ours,
                     bn_relu=judge(ours, frac_copy, eager, comp))
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
    expected = issue_cases()
    if expected is not None:
        missing = [c for c in expected if c not in {v["case"] for v in vs}]
        if missing:
            lines.append(f"NOT the whole table: {len(missing)} of the issue's {len(expected)} "
                         f"rows missing ({'; '.join(missing)})")
    return "\n".join(lines)


def newest_table(results: Path = RESULTS) -> Path | None:
    """The newest run's table by the date (and letter) in its name: a file's mtime is its
    checkout's in a clone, and ``-shapes`` CSVs are no table."""
    found = []
    for p in results.glob("cuda-*.csv"):
        m = re.fullmatch(r"cuda-(?:.+-)?(\d{4}-\d{2}-\d{2})([a-z]?)\.csv", p.name)
        if m and "-shapes" not in p.name:
            found.append((m.group(1), m.group(2), p.name, p))
    return max(found)[-1] if found else None


def main(argv: list[str]) -> int:
    if argv:
        path = Path(argv[0])
    else:
        path = newest_table()
        if path is None:
            print(f"no cuda-*.csv in {RESULTS}: run `batchnorm bench --device cuda --csv`",
                  file=sys.stderr)
            return 2
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    print(f"issue 4's targets on {rows[0].get('device_name', '?')} ({path.name}):")
    print(report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
