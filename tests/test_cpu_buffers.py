"""The CPU backend's reusable output buffers: reuse only what no tensor refers to."""

import subprocess
import sys
import threading

import pytest
import torch

pytest.importorskip("numba")

import batchnorm  # noqa: E402
from batchnorm import backends  # noqa: E402
from batchnorm.backends import cpu_buffers as buffers  # noqa: E402


@pytest.fixture
def pool(monkeypatch):
    """Pool every size, start empty, and leave nothing behind."""
    monkeypatch.setattr(buffers, "MIN_BYTES", 0)
    monkeypatch.setattr(buffers, "cache_limit", 1 << 30)
    buffers.release()
    yield buffers
    buffers.release()


SHAPE = (8, 16, 32)


def test_a_freed_output_is_reused(pool):
    a = pool.empty(SHAPE, torch.float32)
    ptr = a.data_ptr()
    del a
    b = pool.empty(SHAPE, torch.float32)
    assert b.data_ptr() == ptr
    assert b.shape == SHAPE and b.dtype == torch.float32 and b.is_contiguous()


@pytest.mark.parametrize("hold", ["tensor", "view", "numpy", "grad_of_leaf"])
def test_a_referenced_output_is_never_reused(pool, hold):
    a = pool.empty(SHAPE, torch.float32)
    ptr = a.data_ptr()
    if hold == "grad_of_leaf":
        keep = torch.zeros(SHAPE, requires_grad=True)
        keep.grad = a
    else:
        keep = {"tensor": lambda: a, "view": lambda: a[1:3].transpose(0, 2), "numpy": lambda: a.numpy()}[hold]()
    del a
    b = pool.empty(SHAPE, torch.float32)
    assert b.data_ptr() != ptr
    del keep


def test_release_frees_only_free_blocks(pool):
    start = pool.info()["blocks"]  # blocks other tests' tensors may still hold
    used = pool.empty(SHAPE, torch.float32)
    free = pool.empty(SHAPE, torch.float32)
    del free
    before = pool.info()
    assert before["blocks"] == start + 2 and before["bytes_free"] > 0
    pool.release()
    after = pool.info()
    assert after["blocks"] == start + 1 and after["bytes_free"] == 0
    used.fill_(3.0)
    assert used.sum().item() == 3.0 * used.numel()


def test_free_blocks_above_the_limit_are_evicted_on_a_miss(pool, monkeypatch):
    held = [pool.empty((1024 * (i + 1),), torch.float32) for i in range(6)]  # one step
    del held
    assert pool.info()["bytes_free"] >= 4 * 1024 * 21
    monkeypatch.setattr(pool, "cache_limit", 8192)
    big = pool.empty((50_000,), torch.float32)  # a miss: evicts down to the limit first
    assert pool.info()["bytes_free"] <= 8192
    del big


def test_changing_sizes_keep_memory_near_one_steps_need(pool):
    """Shapes that change from call to call (sequences of varying length): free blocks
    beyond what the outputs in use needed at once are released on a miss, so memory held
    stays near the largest output, not the sum of every size seen (the limit)."""
    start = pool.info()["bytes_held"]  # blocks other tests' tensors may still hold
    largest = total = 0
    for n in range(4096, 40960, 1024):
        y = pool.empty((n,), torch.float32)  # freed once the next one is made
        largest = max(largest, 4 * n)
        total += 4 * n
    del y
    # two outputs in use at once (the last and the next), as many bytes free at most
    held = pool.info()["bytes_held"] - start
    assert held <= 4 * largest + 4 * 4096 < total / 4


def test_a_larger_free_block_serves_a_smaller_request(pool):
    a = pool.empty((10_000,), torch.float32)
    ptr = a.data_ptr()
    del a
    b = pool.empty((6_000,), torch.float32)  # within twice the size: reused
    assert b.data_ptr() == ptr and b.shape == (6_000,)
    c = pool.empty((2_000,), torch.float32)  # less than half: a block of its own
    assert c.data_ptr() != ptr


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "CL"])
def test_outputs_are_not_views(pool, gen, channels_last):
    """A pooled output is a tensor of its own, as torch's are: made under no_grad, it
    takes an in-place op with a tensor that requires grad, and detach_()."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(4, 8, 6, 6, generator=gen).to(memory_format=fmt)
    w = torch.ones(8, 1, 1, requires_grad=True)
    with backends.using("cpu"):
        bn = batchnorm.BatchNorm2d(8).eval()
        with torch.no_grad():
            y = bn(x)
    assert not y._is_view() and y.is_contiguous(memory_format=fmt)
    y.mul_(w)  # raised "A view was created in no_grad mode ..." on a view
    assert y.grad_fn is not None
    z = pool.empty((3, 4, 5), torch.float32)
    assert not z._is_view()
    z.detach_()
    strided = pool.empty((2, 3, 4, 5), torch.float32, (60, 1, 15, 3))
    assert strided.stride() == (60, 1, 15, 3) and not strided._is_view()


def test_a_fork_child_allocates_while_a_parent_thread_held_the_lock(pool):
    """The pool's lock is new in a fork child: one a parent thread held at the fork would
    never be released there."""
    import multiprocessing as mp
    import os

    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    ctx = mp.get_context("fork")
    parent_end, child_end = ctx.Pipe()
    with pool._lock:  # as another thread allocating at the moment of the fork
        proc = ctx.Process(target=_allocate_and_report, args=(child_end,))
        proc.start()
    proc.join(30)
    alive = proc.is_alive()
    if alive:
        proc.kill()
    assert not alive and parent_end.recv() == (3, 4, 5)


def _allocate_and_report(conn):
    conn.send(tuple(buffers.empty((3, 4, 5), torch.float32).shape))


def test_outputs_kept_beyond_the_per_size_cap_are_plain_allocations(pool, monkeypatch):
    monkeypatch.setattr(pool, "MAX_PER_SIZE", 3)
    start = pool.info()["blocks"]
    kept = [pool.empty(SHAPE, torch.float32) for _ in range(6)]  # a caller keeping outputs
    assert pool.info()["blocks"] == start + 3
    assert len({t.data_ptr() for t in kept}) == 6
    freed = kept.pop(0).data_ptr()
    again = pool.empty(SHAPE, torch.float32)  # the freed block is found again
    assert again.data_ptr() == freed and pool.info()["blocks"] == start + 3


def test_limit_zero_turns_the_pool_off(pool, monkeypatch):
    monkeypatch.setattr(pool, "cache_limit", 0)
    before = pool.info()
    t = pool.empty(SHAPE, torch.float64)
    assert t.shape == SHAPE and t.dtype == torch.float64
    after = pool.info()
    assert (after["hits"], after["misses"], after["blocks"]) == (
        before["hits"], before["misses"], before["blocks"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_dtypes_and_odd_sizes(pool, dtype):
    t = pool.empty((3, 5, 7), dtype)
    t.copy_(torch.arange(105, dtype=torch.float32).view(3, 5, 7).to(dtype))
    assert t.dtype == dtype and t.shape == (3, 5, 7)
    assert torch.equal(t.flatten()[:5].float(), torch.arange(5, dtype=torch.float32))


def test_threads_never_share_a_block(pool):
    held = []
    lock = threading.Lock()

    def work():
        mine = [pool.empty(SHAPE, torch.float32) for _ in range(50)]
        with lock:
            held.extend(mine)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({t.data_ptr() for t in held}) == len(held)


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "CL"])
def test_training_steps_keep_earlier_outputs_and_gradients_intact(pool, gen, channels_last):
    """End to end on the module: what step 1 returned is untouched by step 2, and equals
    torch's; channels_last outputs are pooled (N, H, W, C) blocks seen through a permute."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with backends.using("cpu"):
        bn = batchnorm.BatchNorm2d(4, activation="relu")
        ref = torch.nn.BatchNorm2d(4)
        x1 = torch.randn(3, 4, 5, 6, generator=gen).to(memory_format=fmt).requires_grad_()
        x1_ref = x1.detach().clone().requires_grad_()
        y1 = bn(x1)
        assert y1.is_contiguous(memory_format=fmt)
        dy = torch.randn(y1.shape, generator=gen)
        torch.testing.assert_close(y1, torch.relu(ref(x1_ref)))
        y1.backward(dy)
        torch.relu(ref(x1_ref)).backward(dy)
        torch.testing.assert_close(x1.grad, x1_ref.grad)
        y1_copy, g1_copy = y1.detach().clone(), x1.grad.clone()
        for _ in range(3):
            x2 = torch.randn(3, 4, 5, 6, generator=gen).to(memory_format=fmt).requires_grad_()
            bn(x2).backward(torch.randn(3, 4, 5, 6, generator=gen))
        assert torch.equal(y1, y1_copy)
        assert torch.equal(x1.grad, g1_copy)
        # and the steps above did reuse memory: blocks were handed out again
        assert pool.info()["hits"] > 0


@pytest.mark.parametrize("text, mib", [(None, 2048), ("", 2048), (" 64 ", 64), ("0", 0),
                                       ("0.5", 0.5)])
def test_cache_limit_from_the_environment(monkeypatch, text, mib):
    if text is None:
        monkeypatch.delenv("BATCHNORM_CPU_BUFFER_CACHE_MB", raising=False)
    else:
        monkeypatch.setenv("BATCHNORM_CPU_BUFFER_CACHE_MB", text)
    assert buffers._limit_from_environment() == int(mib * 2**20)


@pytest.mark.parametrize("text", ["lots", "-1", "nan", "inf"])
def test_a_bad_cache_limit_names_the_variable(monkeypatch, text):
    """It was a bare "could not convert string to float" from deep inside an import."""
    monkeypatch.setenv("BATCHNORM_CPU_BUFFER_CACHE_MB", text)
    with pytest.raises(ValueError, match="BATCHNORM_CPU_BUFFER_CACHE_MB=.*MiB"):
        buffers._limit_from_environment()


def test_a_profiling_hook_at_import_does_not_make_a_used_buffer_free(tmp_path):
    """A profile hook that reads f_locals while the pool is first imported (an argument
    logger) made its calibrated reference count one too high: a buffer an output still
    used read as free, and the next output overwrote it. Run in a fresh process, where
    the import is the first."""
    script = tmp_path / "hook.py"
    script.write_text(
        "import sys, torch\n"
        "def profile(frame, event, arg):\n"
        "    frame.f_locals\n"
        "sys.setprofile(profile)\n"
        "from batchnorm.backends import cpu_buffers as pool\n"
        "sys.setprofile(None)\n"
        "pool.MIN_BYTES = 0\n"
        "a = pool.empty((1024,), torch.float32)\n"
        "b = pool.empty((1024,), torch.float32)\n"
        "assert a.data_ptr() != b.data_ptr()\n"
        "del b\n"
        "c = pool.empty((1024,), torch.float32)\n"
        "assert c.data_ptr() != a.data_ptr()\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_a_profiling_hook_does_not_keep_free_buffers_from_reuse(pool):
    def profile(frame, event, arg):
        _ = frame.f_locals

    a = pool.empty(SHAPE, torch.float32)
    ptr = a.data_ptr()
    del a
    sys.setprofile(profile)
    try:
        b = pool.empty(SHAPE, torch.float32)
    finally:
        sys.setprofile(None)
    assert b.data_ptr() == ptr


def test_the_limit_holds_on_hits_too(pool, monkeypatch):
    """A loop of fixed shapes misses once: the limit on free memory is checked each time
    a buffer is handed out, not only on a miss."""
    nbytes = 4 * 1024
    steps = [[pool.empty((1024,), torch.float32) for _ in range(6)] for _ in range(2)]
    del steps
    assert pool.info()["bytes_free"] >= 6 * nbytes
    monkeypatch.setattr(pool, "cache_limit", 2 * nbytes)
    kept = pool.empty((1024,), torch.float32)  # a hit
    assert pool.info()["bytes_free"] <= 2 * nbytes
    assert pool.info()["misses"] >= 1 and kept.numel() == 1024
