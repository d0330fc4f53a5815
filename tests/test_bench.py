"""A one-case smoke run of ``batchnorm bench``: it measures, it never asserts a time."""

import pytest
import torch

from batchnorm import bench


def test_run_table_smoke(tmp_path):
    rows = bench.run_table("cpu", repeats=2, compile=False, cases=[bench.Case((2, 2, 3, 4))],
                           ops=("fwd", "bn+add+relu fwd+bwd"), progress=False, target_ms=1.0)
    first, *timed = rows
    assert first["case"] == "first call" and first["ms"] > 0
    assert {(r["op"], r["impl"]) for r in timed} == {
        (op, impl) for op in ("fwd", "bn+add+relu fwd+bwd") for impl in ("torch", "ours")}
    for r in timed:
        assert r["ms"] > 0 and r["gbps"] > 0 and r["copy_gbps"] > 0
        assert r["device"] == "cpu" and r["torch_version"] == torch.__version__
        assert "THP_MEM_ALLOC_ENABLE" in r
    bwd = [r for r in timed if r["op"] != "fwd"]
    assert all(r["peak_bytes"] > 0 for r in bwd)
    assert "ratio" in bench.format_table(rows)
    path = bench.write_csv(rows, "cpu", tmp_path)
    assert path.read_text().count("\n") == len(rows) + 1


def test_named_csv_never_overwrites_and_the_table_does(tmp_path, monkeypatch):
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    rows = [{"case": "a", "ms": 1.0}]
    shapes = [bench.write_csv(rows, "cpu", tmp_path, name="shapes") for _ in range(3)]
    assert len(set(shapes)) == 3
    assert shapes[0].name.endswith("-shapes.csv") and shapes[1].name.endswith("-shapes-2.csv")
    assert bench.write_csv(rows, "cpu", tmp_path) == bench.write_csv(rows, "cpu", tmp_path)


def test_cli_parses():
    import argparse
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--device", "cpu", "--quick", "--csv", "--plot", "--repeats", "3"])
    assert args.quick and args.csv and args.plot and args.repeats == 3


@pytest.mark.parametrize("bad", [["--device", "tpu"], ["--device", "foo:0"],
                                 ["--repeats", "0"], ["--repeats", "-3"], ["--budget", "-1"],
                                 ["--budget", "nan"]],
                         ids=" ".join)
def test_cli_refuses_bad_values_before_running(bad, capsys):
    """A device torch cannot parse or we cannot run on, no repeats, a negative budget:
    argparse's one-line error and exit status 2, not a traceback after the run."""
    import argparse
    p = argparse.ArgumentParser(prog="batchnorm bench")
    bench.add_arguments(p)
    with pytest.raises(SystemExit) as exit_info:
        p.parse_args(bad)
    assert exit_info.value.code == 2
    assert f"argument {bad[0]}: '{bad[1]}'" in capsys.readouterr().err
    assert p.parse_args(["--device", "cuda:1", "--budget", "0"]).device == "cuda:1"


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_tables_are_defined(device):
    cases = bench.cpu_cases() if device == "cpu" else bench.cuda_cases()
    assert len(cases) >= 10
    assert all(c.module_name.startswith("BatchNorm") for c in cases)


def test_extra_rows_fold():
    # The inference row (eval model vs folded) in the table's long format; the sync row
    # spawns 2 ranks on a 16x256x56x56 input and is left to `batchnorm bench` itself.
    rows = bench.extra_rows(torch.device("cpu"), quick=True, info=bench.machine(
        torch.device("cpu")), sync=False)
    assert [r["impl"] for r in rows] == ["eval model", "folded"]
    assert all(r["ms"] > 0 and r["op"] == "inference" for r in rows)
    assert rows[0]["ratio"] == 1.0 and rows[1]["ratio"] > 0
    assert "folded" in bench.format_extra(rows)


def test_shape_cases_parse():
    assert bench.parse_case("64,64,4,4") == bench.Case((64, 64, 4, 4))
    case = bench.parse_case("8,16,4,4,4:cl", torch.float64)
    assert case.shape == (8, 16, 4, 4, 4) and case.channels_last
    assert case.dtype == torch.float64 and case.label == "3d (8, 16, 4, 4, 4) f64 CL"
    for bad in ("64", "64,x", "1,2,3,4,5,6", "0,4", "64,64:cl", "64,64,4,4:nhwc",
                "1,3", "1,3,1", "1,3,1,1:cl",  # these three: one value per channel
                "2,2,3,4:",  # a colon and no layout
                "2147483648,2147483648", "99999999999999999999,2"):  # (tracebacks from torch)
        with pytest.raises(ValueError, match="--shape"):
            bench.parse_case(bad)
    # torch's CPU layer refuses float64 input with float32 parameters (the bench crashed)
    assert case.param_dtype == torch.float64
    assert bench.parse_case("4,3", torch.bfloat16).param_dtype == torch.float32


def _parser():
    import argparse
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    return p


def test_cli_times_given_shapes(capsys):
    p = _parser()
    args = p.parse_args(["--device", "cpu", "--shape", "2,2,3,4", "--shape", "4,3,2,2:cl",
                         "--repeats", "2", "--no-memory", "--no-compile"])
    assert bench.run(args) == 0
    out = capsys.readouterr().out
    assert "2d (2, 2, 3, 4) f32 " in out and "2d (4, 3, 2, 2) f32 CL" in out
    assert "(32, 256, 56, 56)" not in out and "folded" not in out
    assert bench.run(p.parse_args(["--device", "cpu", "--shape", "4,3,2,2", "--dtype",
                                   "float64", "--repeats", "1", "--no-memory",
                                   "--no-compile"])) == 0
    assert "2d (4, 3, 2, 2) f64" in capsys.readouterr().out
    assert bench.run(p.parse_args(["--device", "cpu", "--shape", "2,2:cl"])) == 2
    assert "--shape '2,2:cl'" in capsys.readouterr().err


def test_a_shape_too_large_for_memory_ends_with_one_line(monkeypatch, capsys):
    """A --shape this machine cannot hold ended in the allocator's traceback (exit 1): one
    line and exit 2, as for every other bad --shape. (The allocation fails at once; a
    stand-in for run_table keeps the test from depending on this machine's memory.)"""
    def run_table(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 400000000000 bytes.")
    monkeypatch.setattr(bench, "run_table", run_table)
    p = _parser()
    assert bench.run(p.parse_args(["--device", "cpu", "--shape", "100000,100000,10"])) == 2
    err = capsys.readouterr().err
    assert err.startswith("batchnorm bench: not enough memory on cpu") and len(
        err.strip().splitlines()) == 1

    def broken(*args, **kwargs):
        raise RuntimeError("a defect, not memory")
    monkeypatch.setattr(bench, "run_table", broken)
    with pytest.raises(RuntimeError, match="a defect"):
        bench.run(p.parse_args(["--device", "cpu", "--shape", "2,2,3,4"]))


def test_dtype_without_shape_says_it_is_not_used(monkeypatch, capsys):
    """--dtype applies to --shape cases; the standard table ran in its own dtypes, silently."""
    monkeypatch.setattr(bench, "run_table", lambda *a, **k: (_ for _ in ()).throw(
        KeyboardInterrupt))  # stop once the arguments are read
    p = _parser()
    with pytest.raises(KeyboardInterrupt):
        bench.run(p.parse_args(["--device", "cpu", "--quick", "--dtype", "float16"]))
    assert "--dtype float16 applies to --shape cases" in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):
        bench.run(p.parse_args(["--device", "cpu", "--quick"]))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("load,warned", [(5.0, True), (0.5, False)])
def test_a_loaded_machine_is_said_to_make_the_times_unreliable(monkeypatch, capsys, load,
                                                               warned):
    """The bench records the load average; on a loaded machine (a probe saw torch's small
    layer take 22 ms a call at load 3 on 2 cores) its ratios mean little: it says so."""
    info = dict(bench.machine(torch.device("cpu")), load_avg_1m=load, cpu_count=2)
    monkeypatch.setattr(bench, "run_table", lambda *a, **k: [info])
    monkeypatch.setattr(bench, "format_table", lambda rows: "")
    p = _parser()
    assert bench.run(p.parse_args(["--device", "cpu", "--shape", "2,2,3,4"])) == 0
    err = capsys.readouterr().err
    assert ("load average was 5.0 at the start, for 2 CPUs" in err) == warned


def test_every_case_gets_a_compiled_torch_compile(monkeypatch):
    """Dynamo caches compiled_body by its code object, the same for every case: the 9th
    graph met the recompile limit (8) and the rest of the table timed eager torch under
    the torch.compile label. Each case now compiles its own (a counting backend stands
    in for inductor), and a limit met raises where torch has that setting."""
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn: real(fn, backend=counting))
    cases = [bench.Case((2, c, 3, 4), compile=True) for c in range(2, 12)]
    rows = bench.run_table("cpu", repeats=1, cases=cases, ops=("fwd",), progress=False,
                           target_ms=0.05, memory=False)
    assert len(graphs) >= len(cases)
    assert sum(r["impl"] == "torch.compile" for r in rows) == len(cases)


def test_a_row_whose_torch_compile_fails_goes_on_without_it(monkeypatch, capsys):
    def broken(fn):
        def call(*a):
            raise RuntimeError("inductor: no C compiler\nmore lines")
        return call
    monkeypatch.setattr(torch, "compile", broken)
    rows = bench.run_table("cpu", repeats=1, cases=[bench.Case((2, 2, 3, 4), compile=True)],
                           ops=("fwd",), progress=False, target_ms=0.05, memory=False)
    assert {r["impl"] for r in rows[1:]} == {"torch", "ours"}
    assert ("torch.compile failed on 2d (2, 2, 3, 4) f32 fwd (RuntimeError: inductor: no C "
            "compiler); that row has no torch.compile time") in capsys.readouterr().err


def test_compile_ops_choose_what_torch_compile_is_timed_for(monkeypatch, capsys):
    monkeypatch.setattr(torch, "compile", lambda fn: fn)  # the plumbing, not a compile
    rows = bench.run_table("cpu", repeats=1, cases=[bench.Case((2, 2, 3, 4), compile=True)],
                           ops=("fwd", "fwd+bwd"), progress=False, target_ms=0.5,
                           memory=False, compile_ops=("fwd+bwd",))
    assert {(r["op"], r["impl"]) for r in rows[1:]} == {
        ("fwd", "torch"), ("fwd", "ours"), ("fwd+bwd", "torch"), ("fwd+bwd", "ours"),
        ("fwd+bwd", "torch.compile")}
    import argparse
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    assert bench.run(p.parse_args(["--device", "cpu", "--compile-ops", "fwd,relu"])) == 2
    assert "--compile-ops 'fwd,relu': ops are fwd, fwd+bwd" in capsys.readouterr().err


def test_issue4_verdict():
    """benchmarks/issue4_verdict.py judges the bench's CUDA rows by the issue's rules: 85%
    of the floor measured in the run (frac_copy) and 1.2x the better torch, per card."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "issue4_verdict.py"
    spec = importlib.util.spec_from_file_location("issue4_verdict", path)
    verdict = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(verdict)

    def row(case, op, impl, ms, frac=""):
        return {"case": case, "op": op, "impl": impl, "ms": str(ms), "frac_copy": str(frac)}
    relu, plain = "bn+relu fwd+bwd", "fwd+bwd"
    rows = [row("first call", "first", "ours", 3000.0),
            # meets both: 0.9 of the copy rate, 1.25x torch.compile
            row("a", relu, "torch", 2.0), row("a", relu, "ours", 1.0, 0.9),
            row("a", relu, "torch.compile", 1.25), row("a", plain, "torch", 1.3),
            row("a", plain, "ours", 1.0, 0.9),
            # fast enough against eager, 1.15x torch.compile only; plain 1.1x
            row("b", relu, "torch", 2.0), row("b", relu, "ours", 1.0, 0.9),
            row("b", relu, "torch.compile", 1.15), row("b", plain, "torch", 1.1),
            row("b", plain, "ours", 1.0, 0.9),
            # 80% of the copy rate; c2 meets both without a torch.compile time
            row("c", relu, "torch", 2.0), row("c", relu, "ours", 1.0, 0.8),
            row("c2", relu, "torch", 2.0), row("c2", relu, "ours", 1.0, 0.86)]
    got = {v["case"]: (v["bn_relu"], v["plain"]) for v in verdict.verdicts(rows)}
    assert got == {"a": ("yes", "yes"), "b": ("no", "no"), "c": ("no", None),
                   "c2": ("yes?", None)}
    text = verdict.report(rows, expected=["a", "b", "c", "c2", "d"])
    assert "BN+ReLU rows meeting both targets: 1 of 4 (1 more without a torch.compile time)" \
        in text and "plain BN fwd+bwd >= 1.2x eager: 1 of 2" in text
    # a table cut short says so (it read "k of k"), naming the rows it lacks, and the rows
    # without both times (it read "9 of 9" where a case lacked its BN+ReLU row)
    assert "NOT the whole table: 1 of the issue's 5 rows missing (d)" in text
    assert "NOT the whole table: 2 of the issue's rows lack their BN+ReLU or plain " \
           "fwd+bwd times (c; c2)" in text
    # the issue's own rows: these cases are none of them, so they are judged, not counted
    text = verdict.report(rows)
    assert "NOT the whole table: 10 of the issue's 10 rows missing (2d (256, 64, 112, 112)" \
        in text and "meeting both targets: 0 of 0" in text
    assert "not in the issue's table, not counted: a; b; c; c2" in text
    # exactly at 85% of the copy rate: ms <= ms * frac / 0.85 failed on ~5% of such times
    assert all(verdict.judge(ms, 0.85, 2 * ms, None) == "yes?"
               for ms in (0.1 * k + 0.001 * k * k for k in range(1, 200)))
    # exactly 1.2x in the CSV's decimals (0.1644 / 0.137 lands just under 1.2)
    assert verdict.judge(0.137, 0.9, 0.1644, 0.1644) == "yes"
    plain_at = [row("e", plain, "torch", 0.1644), row("e", plain, "ours", 0.137, 0.9)]
    assert verdict.verdicts(plain_at)[0]["plain"] == "yes"
    # a torch.compile time of NaN is no time: "yes?", as for a row without one
    assert verdict.judge(1.0, 0.9, 2.0, float("nan")) == "yes?"
    # a row twice (the last one won), or a time that is no number, is refused
    with pytest.raises(ValueError, match="twice"):
        verdict.verdicts(rows + [row("a", relu, "ours", 9.0, 0.1)])
    with pytest.raises(ValueError, match="ms '' is not a number"):
        verdict.verdicts([row("f", plain, "torch", ""), row("f", plain, "ours", 1.0)])


def test_issue4_verdict_command_line(tmp_path, capsys):
    """A table it cannot judge says why in a line, exit 2 (tracebacks, or a second path
    ignored without a word)."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "issue4_verdict.py"
    spec = importlib.util.spec_from_file_location("issue4_verdict", path)
    verdict = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(verdict)
    header = tmp_path / "header.csv"
    header.write_text("case,op,impl,ms,frac_copy\n")
    other = tmp_path / "other.csv"  # (triton_dev.py's tables: it said "... is there twice")
    other.write_text("shape,ms\n(1, 2),0.5\n")
    for argv in ([str(header)], [str(tmp_path / "none.csv")], [str(header), str(header)],
                 [str(other)]):
        assert verdict.main(argv) == 2
    err = capsys.readouterr().err
    assert "no rows" in err and "No such file" in err and "usage:" in err
    assert "not a table of `batchnorm bench --csv`: no case, op, impl, frac_copy column" in err


def test_issue4_verdict_takes_the_newest_table_by_its_name(tmp_path):
    """The default CSV was the newest by mtime: in a clone that is the checkout's order,
    and a --shape run's CSV counted as a table."""
    import importlib.util
    import os
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "issue4_verdict.py"
    spec = importlib.util.spec_from_file_location("issue4_verdict", path)
    verdict = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(verdict)
    names = ["cuda-NVIDIA-H200-2026-12-04b.csv", "cuda-NVIDIA-H200-2026-12-04.csv",
             "cuda-NVIDIA-H200-2026-11-27.csv", "cuda-2026-12-05-shapes.csv"]
    for k, name in enumerate(names):  # the table wanted has the oldest mtime
        (tmp_path / name).write_text("")
        os.utime(tmp_path / name, (1e9 + k * 1e6, 1e9 + k * 1e6))
    assert verdict.newest_table(tmp_path).name == "cuda-NVIDIA-H200-2026-12-04b.csv"
    assert verdict.newest_table(tmp_path / "nothing") is None
    # the time the bench wrote in the table comes first: a table of that day as the bench
    # names it, written after the renamed ones, or with THP_MEM_ALLOC_ENABLE set (it was
    # passed over for the older ones)
    for name, written in (("cuda-NVIDIA-H200-2026-12-04b.csv", "2026-12-04T18:36:46Z"),
                          ("cuda-2026-12-04.csv", "2026-12-04T19:00:00Z")):
        (tmp_path / name).write_text(f"date,case\n{written},first call\n")
    assert verdict.newest_table(tmp_path).name == "cuda-2026-12-04.csv"
    (tmp_path / "cuda-2026-12-04-thp1.csv").write_text("date,case\n2026-12-04T20:00:00Z,x\n")
    assert verdict.newest_table(tmp_path).name == "cuda-2026-12-04-thp1.csv"


def test_budget_stops_starting_cases(capsys):
    cases = [bench.Case((2, 2, 3, 4)), bench.Case((4, 3, 2, 2))]
    rows = bench.run_table("cpu", repeats=1, compile=False, cases=cases, ops=("fwd",),
                           progress=False, target_ms=0.5, memory=False, budget_s=0)
    assert [r["case"] for r in rows] == ["first call"]
    assert "0 s spent; 2 of 2 cases left out" in capsys.readouterr().err


def test_quick_tables_leave_torch_compile_out_unless_asked():
    # --help: "--quick ... no torch.compile unless --compile-ops asks for it", on both devices
    for table in (bench.cpu_cases, bench.cuda_cases):
        full = [c for c in table() if c.compile]
        assert full and not any(c.compile for c in table(quick=True))
        asked = [c for c in table(quick=True, compile=True) if c.compile]
        assert asked and set(asked) <= set(full)
        assert not any(c.compile for c in table(compile=False))
        assert not any(c.compile for c in table(quick=True, compile=False))


def _run_args(monkeypatch, argv):
    """What ``bench.run`` hands run_table for these arguments (nothing is timed)."""
    import argparse
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    seen = {}

    def fake_run_table(device, **kwargs):
        seen.update(kwargs)
        return [dict(bench.machine(torch.device("cpu")), case="first call", ms=1.0,
                     numba_cache_hits=0, numba_cache_misses=0)]
    monkeypatch.setattr(bench, "run_table", fake_run_table)
    monkeypatch.setattr(bench, "extra_rows", lambda *a, **k: [])
    rc = bench.run(p.parse_args(["--device", "cpu", *argv]))
    return rc, seen


def test_shape_cases_honour_compile_ops_and_no_compile(monkeypatch, capsys):
    rc, seen = _run_args(monkeypatch, ["--shape", "2,2,3,4", "--shape", "4,3,2,2:cl"])
    assert rc == 0 and seen["compile"] is None
    assert [c.compile for c in seen["cases"]] == [False, False]  # not asked for
    rc, seen = _run_args(monkeypatch, ["--shape", "2,2,3,4", "--shape", "4,3,2,2:cl",
                                       "--compile-ops", "bn+relu fwd+bwd"])
    assert rc == 0 and [c.compile for c in seen["cases"]] == [True, True]
    assert seen["compile_ops"] == ("bn+relu fwd+bwd",)
    rc, seen = _run_args(monkeypatch, ["--shape", "2,2,3,4", "--no-compile"])
    assert rc == 0 and seen["compile"] is False and not seen["cases"][0].compile
    # the table: --quick alone leaves it to the table (none), --compile-ops asks for it
    rc, seen = _run_args(monkeypatch, ["--quick"])
    assert rc == 0 and seen["compile"] is None and seen["cases"] is None
    rc, seen = _run_args(monkeypatch, ["--quick", "--compile-ops", "fwd"])
    assert rc == 0 and seen["compile"] is True
    capsys.readouterr()
    rc, seen = _run_args(monkeypatch, ["--no-compile", "--compile-ops", "fwd"])
    assert rc == 2 and not seen
    assert "--no-compile and --compile-ops" in capsys.readouterr().err


def test_extra_rows_legend_names_only_the_rows_present():
    info = {"case": "x", "shape": "(1,)", "ms": 1.0, "ratio": 1.0}
    fold = [dict(info, impl="eval model"), dict(info, impl="folded")]
    sync = [dict(info, impl="local BatchNorm"), dict(info, impl="SyncBatchNorm")]
    text = bench.format_extra(fold)
    assert text.splitlines()[0] == "ratio = eval ms / folded ms"
    assert "SyncBatchNorm" not in text
    assert "local ms / SyncBatchNorm ms" in bench.format_extra(fold + sync).splitlines()[0]


def test_results_dir_is_the_checkouts_or_the_current_directorys(tmp_path, monkeypatch):
    from pathlib import Path
    repo = Path(bench.__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file():  # the tests run from a checkout
        assert bench.results_dir() == repo / "benchmarks" / "results"
    # an installed wheel: the module lies in site-packages; never write beside it
    site = tmp_path / "lib" / "python3" / "site-packages" / "batchnorm"
    site.mkdir(parents=True)
    monkeypatch.setattr(bench, "__file__", str(site / "bench.py"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert bench.results_dir() == work / "benchmarks" / "results"
    path = bench.write_csv([{"case": "a", "ms": 1.0}], "cpu")
    assert path.parent == work / "benchmarks" / "results" and path.is_file()


def test_plot_without_matplotlib_stops_before_running(monkeypatch, capsys, tmp_path):
    """--plot wrote the CSV, then died with a traceback on the chart's import."""
    import argparse
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    monkeypatch.setattr(bench, "run_table", lambda *a, **k: pytest.fail("ran the table"))
    monkeypatch.chdir(tmp_path)
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    assert bench.run(p.parse_args(["--device", "cpu", "--plot", "--shape", "2,2"])) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.csv"))


def test_csv_into_a_directory_it_cannot_write_is_refused_before_the_run(tmp_path,
                                                                         monkeypatch, capsys):
    """The whole table ran, then writing the CSV raised PermissionError (a user in a
    directory it cannot write, an installed wheel's bench writing under the cwd)."""
    import argparse
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setattr(bench, "results_dir", lambda: blocker / "benchmarks" / "results")
    monkeypatch.setattr(bench, "run_table", lambda *a, **k: pytest.fail("the table ran"))
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    assert bench.run(p.parse_args(["--device", "cpu", "--csv", "--shape", "2,2,3,4"])) == 2
    assert "cannot write" in capsys.readouterr().err
