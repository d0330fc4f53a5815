"""``batchnorm compile``: the groups compile what the modules run, in worker processes."""

import pytest
import torch

pytest.importorskip("numba")

from batchnorm import cli
from batchnorm.backends import cpu, cpu_compile
from batchnorm.backends import cpu_kernels as K


def test_groups_cover_every_view_build_and_dtype():
    assert set(cpu_compile.GROUPS) == {(v, b, d) for v in ("ncl", "mc") for b in (0, 1)
                                       for d in (torch.float32, torch.float64,
                                                 torch.float16, torch.bfloat16)}
    for view, build, _ in cpu_compile.GROUPS:
        x = torch.empty(cpu_compile._shape(view, build))
        assert cpu._kernel_plan(x, False)[:2] == (view, build)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_group_compiles_the_kernels_a_module_runs(dtype):
    """After the (serial, NCL) group of a dtype, a module's training and evaluation steps
    and the primitives on such a tensor find every kernel they call compiled for their
    argument types; and each kernel has one variant for the dtype, though the mean comes
    in float64 in training and in the data's dtype in evaluation."""
    cpu_compile.compile_group("ncl", 1, dtype)
    wrappers = [K.FORWARD_TRAIN["ncl"][1], K.FORWARD_EVAL["ncl"][1], K.BACKWARD["ncl"][1]]
    kernels = [K.NORMALIZE["ncl"][1], K.REDUCE["ncl"][1], K.ELEMENTWISE["ncl"][1]]
    name = str(dtype).removeprefix("torch.")

    def variants():
        return [len(k.signatures) for k in wrappers] + [
            sum(str(s[0].dtype) == name for s in k.signatures) for k in kernels]

    before = variants()
    assert all(before) and before[len(wrappers):] == [1] * len(kernels)
    import batchnorm
    bn = batchnorm.BatchNorm1d(3, activation="relu").to(dtype)
    x = torch.randn(4, 3, 5, dtype=dtype, requires_grad=True)
    bn(x).sum().backward()
    bn.eval()(x).sum().backward()
    mean, invstd = torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype)
    y = cpu.normalize(x.detach(), mean, invstd, None, None, None, "relu", 0.0)
    sums = cpu.backward_reduce(y, x.detach(), mean, invstd, None, None, None, "relu", 0.0)
    cpu.backward_elementwise(y, x.detach(), mean, invstd, None, None, None, *sums, 20,
                             "relu", 0.0, False)
    assert variants() == before


def test_precompile_in_two_processes_reports_each_group(capsys):
    groups = [("ncl", 1, torch.float64), ("mc", 1, torch.float64)]
    done = []
    seconds = cpu_compile.precompile(2, lambda g, s: done.append(g), groups=groups)
    assert sorted(done, key=str) == sorted(groups, key=str) and seconds > 0


def test_cli_compile(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cpu_compile, "precompile",
                        lambda jobs, report: calls.append(jobs) or report(
                            ("ncl", 1, torch.float32), 1.5) or 2.0)
    assert cli.main(["compile", "--jobs", "3"]) == 0
    out = capsys.readouterr().out
    assert calls == [3] and "ncl serial   float32" in out and "done in 2.0 s" in out
    for bad in ("0", "-3"):  # -3 ran one process, 0 all cores, silently
        with pytest.raises(SystemExit) as info:
            cli.main(["compile", "--jobs", bad])
        assert info.value.code == 2 and f"'{bad}': at least 1" in capsys.readouterr().err
    assert calls == [3]


def test_cache_saves_run_under_the_lock(monkeypatch):
    """What precompile's workers (and the suite's xdist workers) install: each save of a
    numba cache entry holds the shared lock, so no two rewrite one index at once."""
    from numba.core import caching
    events = []

    class Lock:
        def __enter__(self):
            events.append("lock")

        def __exit__(self, *exc):
            events.append("unlock")

    monkeypatch.setattr(cpu_compile, "_lock", None)
    monkeypatch.setattr(caching.IndexDataCacheFile, "save",
                        lambda self, key, data: events.append(("save", key, data)))
    cpu_compile.lock_cache_saves(Lock())
    caching.IndexDataCacheFile.save(None, "key", "data")
    assert events == ["lock", ("save", "key", "data"), "unlock"]


def test_the_suites_xdist_workers_save_under_a_file_lock():
    import os
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        pytest.skip("not an xdist worker (make test runs the suite in them)")
    assert type(cpu_compile._lock).__name__ == "_FileLock"


def _dispatchers(value):
    """The numba dispatchers in a module attribute (nested in dicts and tuples)."""
    from numba.core.registry import CPUDispatcher
    if isinstance(value, CPUDispatcher):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _dispatchers(v)
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _dispatchers(v)


def test_no_parallel_kernel_is_cached_on_its_own():
    """The rule of ``cpu_kernels._builds``: a parallel build loaded from numba's cache and
    linked into a newly compiled caller leaves that caller's cache entry without the
    parallel loops (a later process crashes), so no parallel build is cached by itself."""
    from numba.core.caching import NullCache
    parallel = [d for name in dir(K) for d in _dispatchers(getattr(K, name))
                if d.targetoptions.get("parallel")]
    assert len(parallel) >= 8  # four kernels, two views
    assert all(isinstance(d._cache, NullCache) for d in parallel)


_CACHE_ORDER_STEP = """
import sys, torch
from batchnorm.backends import cpu, cpu_compile
x = torch.randn(cpu_compile._shape("ncl", 0), generator=torch.Generator().manual_seed(0))
c = x.shape[1]
mean, var = torch.zeros(c), torch.ones(c)
if sys.argv[1] == "primitive":
    y = cpu.normalize(x, mean, torch.rsqrt(var + 1e-5), None, None, None, "relu", 0.0)
else:
    y = cpu.batch_norm_forward(x, None, None, None, mean, var, 1e-5, "relu", 0.0, None)[0]
print(float(y.double().sum()))
"""


def test_kernels_cached_in_any_order_load_in_a_later_process(tmp_path):
    """A parallel kernel cached by a direct call (SyncBatchNorm, a float64 running mean in
    evaluation), then the evaluation entry point compiled against it: the third process,
    loading that entry point from the cache, died with a segmentation fault."""
    import os
    import subprocess
    import sys
    if torch.get_num_threads() < 2:
        pytest.skip("one torch thread: the parallel build never runs here")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    script = tmp_path / "step.py"
    script.write_text(_CACHE_ORDER_STEP)
    outputs = []
    for step in ("primitive", "eval", "eval"):
        done = subprocess.run([sys.executable, str(script), step], env=env,
                              capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, (step, done.returncode, done.stderr[-2000:])
        outputs.append(float(done.stdout))
    assert outputs[1] == outputs[2] and abs(outputs[0] - outputs[1]) < 1e-3 * abs(outputs[1])


def test_without_a_cache_directory_the_kernels_compile_in_the_process(tmp_path):
    """Where numba has no cache directory it can write (a container's user without a
    home, a read-only package), every kernel's decoration raised: each call
    of the CPU backend failed with "cannot cache function". The kernels now compile
    uncached, with a warning that says what to set, and `batchnorm compile` says there
    is nothing to fill. (No locator at all stands for such a user: as root every
    directory is writable.)"""
    import subprocess
    import sys

    script = tmp_path / "no_cache.py"
    script.write_text(
        "import warnings\n"
        "import numba.core.caching\n"
        "numba.core.caching.CacheImpl._locator_classes = []\n"
        "import torch\n"
        "import batchnorm\n"
        "from batchnorm import backends, cli\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    assert 'cpu' in backends.available()\n"
        "assert any('Set NUMBA_CACHE_DIR' in str(w.message) for w in caught), caught\n"
        "x = torch.randn(4, 3, 5, 5)\n"
        "m = batchnorm.BatchNorm2d(3).eval()\n"
        "with backends.using('cpu'), torch.no_grad():\n"
        "    torch.testing.assert_close(m(x), torch.nn.BatchNorm2d(3).eval()(x))\n"
        "assert cli.main(['compile']) == 2\n"
        "print('ok')\n")
    import os
    env = {k: v for k, v in os.environ.items() if k != "BATCHNORM_BACKEND"}  # (it would
    # load the kernels at the import, before the warnings are caught)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=300, env=env, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
    assert "nothing to fill" in done.stderr
