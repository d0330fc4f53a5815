"""Issue 4's targets, row by row, from a CSV of ``batchnorm bench --device cuda --csv``.

    python benchmarks/issue4_verdict.py [benchmarks/results/cuda-<date>.csv]

(default: the newest run's table there, by the time written in it, not a ``--shape`` run's).
The targets, on the card of the run:

* BN+ReLU forward+backward at most the target, 85% of the 8-pass floor at the copy
  bandwidth measured in the same run (``floor / 0.85``; the issue's column gives an
  H100's, 3.0 TB/s: a faster card's floor is lower), and at least 1.2x faster than the
  better of torch eager and torch.compile;
* plain BN forward+backward at least 1.2x faster than torch eager.

The bench's ``frac_copy`` of a row is its bytes over its time against the copy bandwidth,
so a BN+ReLU row meets the first target where ``frac_copy >= 0.85`` (compared as such:
``ms <= floor / 0.85`` with the floor rebuilt from them is false for ~5% of times exactly at
it; the bench writes it to 6 significant digits). A row whose torch.compile was not timed
is judged ``yes?`` where the rest holds. A table without all of the issue's rows (a bench
cut short by ``--budget``), or a row without its BN+ReLU or plain times, says which: the
issue is judged on every row; cases outside the issue's table are judged, not counted. A
table with a row twice, or a time that is no number, is refused (exit 2).
"""

from __future__ import annotations

import csv
import math
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BN_RELU, PLAIN = "bn+relu fwd+bwd", "fwd+bwd"
COLUMNS = ("case", "op", "impl", "ms", "frac_copy")  # what the verdict reads of a row
EFFICIENCY, SPEEDUP = 0.85, 1.2


def _timed(ms: float | None) -> bool:
    return ms is not None and not math.isnan(ms)


def _at_least(ratio_of: float, over: float, rule: float) -> bool:
    """``ratio_of / over >= rule``, where a ratio exactly at the rule in decimal (the
    bench writes times with 4 decimals: 0.1644 / 0.137) counts: the division lands just
    under 1.2 for ~2% of such pairs."""
    return ratio_of >= rule * over * (1 - 1e-9)


def _better_torch(eager: float, compile: float | None) -> float:
    """The better of torch eager and a timed torch.compile (eager, NaN or not, alone
    where torch.compile has no time)."""
    return min(t for t in (eager, compile) if _timed(t)) if _timed(eager) else eager


def judge(ours: float, frac_copy: float, eager: float, compile: float | None) -> str:
    """A BN+ReLU row against both targets: ``"yes"``, ``"yes?"`` (met, but torch.compile
    was not timed: no time, or NaN) or ``"no"``."""
    best = _better_torch(eager, compile)
    if frac_copy >= EFFICIENCY * (1 - 1e-9) and _at_least(best, ours, SPEEDUP):
        return "yes" if _timed(compile) else "yes?"
    return "no"


def issue_cases() -> list[str] | None:
    """The labels of the issue's rows, as the bench names them (None where the package
    cannot be imported: run with ``PYTHONPATH=src``)."""
    try:
        from batchnorm.bench import cuda_cases
    except ImportError:
        return None
    return [c.label for c in cuda_cases()]


def _number(row: dict, key: str, where: int) -> float:
    try:
        return float(row[key])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"row {where}: {key} {row.get(key)!r} is not a number") from None


def verdicts(rows: list[dict]) -> list[dict]:
    """One dict per case of the table: the BN+ReLU and plain forward+backward times and
    whether each meets its target (``"yes"``, ``"yes?"`` or ``"no"``; None where the
    table has no such row). ``ValueError`` for a row that is there twice (which one
    would count?) or whose times are no numbers."""
    by: dict = {}
    for where, r in enumerate(rows, start=2):  # (the CSV's line: the header is line 1)
        if r.get("case") == "first call":
            continue
        key = (r.get("case"), r.get("op"), r.get("impl"))
        impls = by.setdefault(key[0], {}).setdefault(key[1], {})
        if key[2] in impls:
            raise ValueError(f"row {where}: {key} is in the table twice")
        impls[key[2]] = (r, where)
    out = []
    for case, ops in by.items():
        v = {"case": case, "bn_relu": None, "plain": None}
        relu = ops.get(BN_RELU, {})
        if "ours" in relu and "torch" in relu:
            ours = _number(relu["ours"][0], "ms", relu["ours"][1])
            frac_copy = _number(relu["ours"][0], "frac_copy", relu["ours"][1])
            eager = _number(relu["torch"][0], "ms", relu["torch"][1])
            comp = (_number(relu["torch.compile"][0], "ms", relu["torch.compile"][1])
                    if "torch.compile" in relu else None)
            floor = ours * frac_copy
            best = _better_torch(eager, comp)
            v.update(ours=ours, eager=eager, compile=comp if _timed(comp) else None,
                     floor=floor, target=floor / EFFICIENCY, vs_best=best / ours,
                     bn_relu=judge(ours, frac_copy, eager, comp))
        plain = ops.get(PLAIN, {})
        if "ours" in plain and "torch" in plain:
            ours = _number(plain["ours"][0], "ms", plain["ours"][1])
            eager = _number(plain["torch"][0], "ms", plain["torch"][1])
            v.update(plain_ratio=eager / ours,
                     plain="yes" if _at_least(eager, ours, SPEEDUP) else "no")
        out.append(v)
    return out


def _ms(v: dict, key: str) -> str:
    return f"{v[key]:7.3f}" if v.get(key) is not None else "      -"


def report(rows: list[dict], expected: list[str] | None = None) -> str:
    """The table of verdicts and the counts over the issue's rows (``expected``, default
    :func:`issue_cases`; every case where that is None): a row of the issue that is
    missing, or lacks its BN+ReLU or plain forward+backward times, is named, and a case
    outside the issue's table is judged but not counted."""
    vs = verdicts(rows)
    lines = [(f"{'case':32s} {'ours':>7s} {'eager':>7s} {'compile':>7s} {'floor':>7s} "
              f"{'target':>7s} {'vs best':>7s} {'met?':>5s}   {'plain x eager':>13s} "
              f"{'met?':>5s}")]
    for v in vs:
        relu = (" ".join(_ms(v, k) for k in ("ours", "eager", "compile", "floor", "target"))
                + f" {v['vs_best']:6.2f}x {v['bn_relu']:>5s}" if v["bn_relu"] else
                " ".join(["      -"] * 6) + "     -")
        plain = (f"{v['plain_ratio']:12.2f}x {v['plain']:>5s}" if v["plain"] else
                 f"{'-':>13s} {'-':>5s}")
        lines.append(f"{v['case']:32s} {relu}   {plain}")
    expected = issue_cases() if expected is None else expected
    counted = vs if expected is None else [v for v in vs if v["case"] in expected]
    relu = [v["bn_relu"] for v in counted if v["bn_relu"]]
    plain = [v["plain"] for v in counted if v["plain"]]
    lines.append(f"BN+ReLU rows meeting both targets: {relu.count('yes')} of {len(relu)}"
                 + (f" ({relu.count('yes?')} more without a torch.compile time)"
                    if "yes?" in relu else "")
                 + f"; plain BN fwd+bwd >= {SPEEDUP}x eager: {plain.count('yes')} of "
                 f"{len(plain)}")
    if expected is not None:
        outside = [v["case"] for v in vs if v["case"] not in expected]
        if outside:
            lines.append(f"not in the issue's table, not counted: {'; '.join(outside)}")
        found = {v["case"]: v for v in vs}
        missing = [c for c in expected if c not in found]
        partial = [c for c in expected if c in found
                   and not (found[c]["bn_relu"] and found[c]["plain"])]
        if missing:
            lines.append(f"NOT the whole table: {len(missing)} of the issue's {len(expected)} "
                         f"rows missing ({'; '.join(missing)})")
        if partial:
            lines.append(f"NOT the whole table: {len(partial)} of the issue's rows lack their "
                         f"BN+ReLU or plain fwd+bwd times ({'; '.join(partial)})")
    return "\n".join(lines)


def newest_table(results: Path = RESULTS) -> Path | None:
    """The newest run's table: by the time the bench wrote in its first row (``date``),
    else by the date (and letter) in its name (a file's mtime is its checkout's in a
    clone; the bench names a table ``cuda-<date>[-thp<N>].csv``, and the tables kept here
    were renamed ``cuda-<card>-<date>[b].csv``); ``-shapes`` CSVs are no table."""
    found = []
    for p in results.glob("cuda-*.csv"):
        m = re.search(r"(\d{4}-\d{2}-\d{2})([a-z]?)(?:-thp\d+)?\.csv$", p.name)
        if not m or "-shapes" in p.name:
            continue
        try:
            with p.open(newline="") as f:
                written = next(csv.DictReader(f), {}).get("date") or ""
        except (OSError, UnicodeDecodeError, csv.Error):
            written = ""
        found.append((written or m.group(1), m.group(2), p.name, p))
    return max(found)[-1] if found else None


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print("usage: issue4_verdict.py [CSV]  (one table)", file=sys.stderr)
        return 2
    if argv:
        path = Path(argv[0])
    else:
        path = newest_table()
        if path is None:
            print(f"no cuda-*.csv in {RESULTS}: run `batchnorm bench --device cuda --csv`",
                  file=sys.stderr)
            return 2
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
        lacking = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
        if lacking:
            raise ValueError(f"not a table of `batchnorm bench --csv`: no {', '.join(lacking)} "
                             f"column")
        if not rows:
            raise ValueError("no rows")
        text = report(rows)
    except (OSError, ValueError, csv.Error) as e:
        print(f"issue4_verdict.py: {path}: {e}", file=sys.stderr)
        return 2
    print(f"issue 4's targets on {rows[0].get('device_name', '?')} ({path.name}):")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
