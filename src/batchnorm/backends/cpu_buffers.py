"""Reusable output buffers for the CPU backend: large outputs without fresh page faults.

Why: a tensor of 100 MB allocated by torch on the CPU comes from ``mmap`` (glibc serves
every allocation above 32 MB that way) and is returned to the kernel when freed, so each
training step writes its outputs (``y`` in forward, ``dx`` in backward) into pages the
kernel must fault in and zero again: measured on the 2-core machine, ~33 ms per 100 MB
against ~2 ms to write memory already mapped (torch 2.13), two to three times
the kernels' own time. This module keeps those buffers and hands them out again once
nothing refers to them, as the CUDA caching allocator does on GPUs.

How a buffer is known to be free: each block is a NumPy array over memory allocated by
torch (so torch's profiler and memory accounting see it when it is created); an output
tensor is ``torch.from_numpy`` of a slice of that array, and its storage holds the slice
until the storage dies, views and ``.numpy()`` views of the output included. The pool
keeps a weak reference to the slice it handed out last: a block whose slice is dead is
free. (It counted the block's references before 2026-12-05, against a count measured at
import; a profiling hook that read the import's frames made that count one too high, and
blocks in use were handed out again.)

An output is a tensor of its own over the block's storage, not a view of it, as torch's
outputs are (autograd treats views apart: an in-place op with a tensor that requires grad
on an output made under ``no_grad``, or ``detach_()``, raised on views). Unlike torch's,
its storage cannot be resized (``resize_``, ``out=`` that grows it); copy it first.

Bounds: only outputs of at least :data:`MIN_BYTES` are pooled (smaller ones glibc serves
from its heap without faults), at most :data:`MAX_PER_SIZE` blocks of one size. A free
block up to twice the size asked for serves too (a smaller batch, a shorter sequence).
On an allocation that still misses, free blocks are released, largest sizes first, until
they hold at most what the outputs in use held at once at any earlier miss (the most one
step has needed) and at most :data:`cache_limit` bytes (on a hit too, where the blocks
held exceed that limit): so with shapes that change from
step to step (a last smaller batch, sequences of varying length) memory held stays within
about twice what one step needs, where keeping every size grew to the limit (measured by
a probe: 1.4 GB held against torch's 0.4 GB over batch sizes 4-59 of six BatchNorm2d(32)
layers). ``BATCHNORM_CPU_BUFFER_CACHE_MB`` sets that limit (0 turns the pool off);
:func:`release` frees every free block now, like ``torch.cuda.empty_cache``.
"""

from __future__ import annotations

import math
import os
import threading
import weakref

import torch
from torch import Tensor

_CPU = torch.device("cpu")  # not the default device (see backends/cpu.py)
MIN_BYTES = 1 << 20
# Blocks kept per size. A deep network holds a few dozen outputs of one size at once (its
# y's until backward, then the dx's); beyond this many in use (outputs a caller keeps, say
# every batch's predictions) allocations are plain torch ones, so that a search for a
# free block never scans an ever longer list.
MAX_PER_SIZE = 256
_PAGE = 4096


def _limit_from_environment() -> int:
    """``BATCHNORM_CPU_BUFFER_CACHE_MB`` in bytes: 2048 MiB when unset or empty."""
    text = os.environ.get("BATCHNORM_CPU_BUFFER_CACHE_MB", "").strip()
    if not text:
        return 2048 * 2**20
    try:
        mib = float(text)
    except ValueError:
        mib = math.nan
    if not 0 <= mib < math.inf:
        raise ValueError(f"BATCHNORM_CPU_BUFFER_CACHE_MB={text!r}: give the cache's size "
                         "in MiB, a number >= 0 (0 turns the cache off)")
    return int(mib * 2**20)


cache_limit = _limit_from_environment()

_lock = threading.Lock()


def _new_lock_in_child() -> None:
    # a fork child of a process whose other thread held the lock would wait on it forever
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_in_child)

# nbytes (page-rounded) -> blocks of that size, least recently handed out first
_blocks: dict[int, list] = {}
_stats = {"hits": 0, "misses": 0}
# The most bytes in use (one step's outputs at once) seen at a miss: free blocks beyond
# that are not kept (see the module docstring)
_peak = 0


class _Block:
    """A reusable buffer: ``array`` (its memory) and a weak reference to the slice of it
    the last output took, which that output's storage keeps alive."""

    __slots__ = ("array", "handed")

    def __init__(self, nbytes: int) -> None:
        self.array = torch.empty(nbytes, dtype=torch.uint8, device=_CPU).numpy()
        self.handed = None

    def is_free(self) -> bool:
        return self.handed is None or self.handed() is None

    def hand_out(self, nbytes: int):
        """The first ``nbytes`` of the block, for one output; the block is in use until
        that slice dies."""
        part = self.array[:nbytes]
        self.handed = weakref.ref(part)
        return part


def _free_in(bucket):
    """A free block of ``bucket``, moved to its end (most recently handed out last, so
    that eviction takes the oldest), or None."""
    for i in range(len(bucket)):
        block = bucket[i]
        if block.is_free():
            bucket.append(bucket.pop(i))
            return block
    return None


def _take(rounded: int, nbytes: int):
    """A slice of ``nbytes`` of a free block of ``rounded`` bytes (or up to twice that),
    or of a new one; None where this size has ``MAX_PER_SIZE`` blocks in use."""
    global _peak
    bucket = _blocks.get(rounded)
    block = _free_in(bucket) if bucket else None
    if block is None:
        for size in sorted(s for s in _blocks if rounded < s <= 2 * rounded):
            block = _free_in(_blocks[size])
            if block is not None:
                break
    if block is not None:
        _stats["hits"] += 1
        part = block.hand_out(nbytes)
        if _held() > cache_limit:  # (a loop of fixed shapes never misses)
            _evict(cache_limit)
        return part
    _stats["misses"] += 1
    if bucket is not None and len(bucket) >= MAX_PER_SIZE:
        return None
    free = _free_bytes()
    _peak = max(_peak, _held() - free + rounded)
    _evict(min(cache_limit, _peak), free)
    block = _Block(rounded)
    _blocks.setdefault(rounded, []).append(block)
    return block.hand_out(nbytes)


def _held() -> int:
    return sum(size * len(bucket) for size, bucket in _blocks.items())


def _free_bytes() -> int:
    free = 0
    for size, bucket in _blocks.items():
        for block in bucket:
            if block.is_free():
                free += size
    return free


def _evict(limit: int, free: int | None = None) -> None:
    """Drop free blocks, oldest first within the largest sizes, until at most ``limit``
    bytes of free blocks remain (``free``: the free bytes now, if known)."""
    if free is None:
        free = _free_bytes()
    if free <= limit:
        return
    for size in sorted(_blocks, reverse=True):
        keep = []
        for block in _blocks[size]:
            if free > limit and block.is_free():
                free -= size
            else:
                keep.append(block)
        _blocks[size] = keep
    for size in [s for s, b in _blocks.items() if not b]:
        del _blocks[size]


def empty(shape: torch.Size | tuple[int, ...], dtype: torch.dtype, strides=None) -> Tensor:
    """A CPU tensor, contiguous or with the dense ``strides`` given (channels-last), from a
    reused block when it is large enough to matter."""
    numel = 1
    for s in shape:
        numel *= s
    return _empty(shape, dtype, numel * _ITEMSIZE[dtype], strides)


def empty_like(x: Tensor) -> Tensor:
    """:func:`empty` with x's shape and dtype (x contiguous, as kernel views are)."""
    nbytes = x.numel() * x.element_size()
    if nbytes < MIN_BYTES:  # the common small case first: no more work than torch's
        return torch.empty_like(x)
    return _empty(x.shape, x.dtype, nbytes)


_ITEMSIZE = {dt: torch.empty((), dtype=dt).element_size()
             for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def _plain(shape, dtype: torch.dtype, strides) -> Tensor:
    """The tensor torch would allocate: for small sizes, the pool off or full."""
    if strides is None:
        return torch.empty(shape, dtype=dtype, device=_CPU)
    return torch.empty_strided(shape, strides, dtype=dtype, device=_CPU)


def _empty(shape, dtype: torch.dtype, nbytes: int, strides=None) -> Tensor:
    if nbytes < MIN_BYTES or cache_limit <= 0:
        return _plain(shape, dtype, strides)
    rounded = -(-nbytes // _PAGE) * _PAGE
    with _lock:
        part = _take(rounded, nbytes)
        if part is None:
            return _plain(shape, dtype, strides)
        # from_numpy's storage keeps the slice (and so the block in use) as long as it lives
        storage = torch.from_numpy(part).untyped_storage()
    return torch.empty(0, dtype=dtype, device=_CPU).set_(storage, 0, shape, strides)


def release() -> None:
    """Free every cached block that no tensor uses (blocks in use stay until they are free)."""
    global _peak
    with _lock:
        _evict(0)
        _peak = 0


def info() -> dict:
    """Blocks and bytes held, in use and free, and the hit/miss counts since import."""
    with _lock:
        held = _held()
        free = _free_bytes()
        return {"blocks": sum(len(b) for b in _blocks.values()), "bytes_held": held,
                "bytes_free": free, **_stats}
