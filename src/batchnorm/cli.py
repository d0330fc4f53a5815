"""The ``batchnorm`` command (also ``python -m batchnorm``).

    batchnorm demo     the seed article's worked example, step by step
    batchnorm bench    our modules against torch on this machine (see ``bench.py``)
    batchnorm compile  the CPU kernels into numba's cache, on every core
"""

from __future__ import annotations

import argparse
import sys
from contextlib import suppress


def _rule(title: str) -> str:
    return f"\n── {title} " + "─" * max(0, 72 - len(title))


def demo(out=None) -> int:
    """The seed's example: BatchNorm2d(num_features=2, eps=0, momentum=0) on a 2x2x3x4
    tensor of ones with 25 at [0, 0, 0, 0], computed, then explained by hand. ``out``:
    where to print (sys.stdout at the time of the call)."""
    import torch

    out = out or sys.stdout
    # its tensors printed with 4 decimals, the process's print options left as they were
    with torch._tensor_str.printoptions(precision=4, sci_mode=False):
        return _demo(out)


def _demo(out) -> int:
    import torch

    from . import BatchNorm2d

    def say(*lines):
        for line in lines:
            print(line, file=out)

    data = torch.ones(2, 2, 3, 4)
    data[0][0][0][0] = 25

    say("batchnorm demo: the worked example of 'A brief analysis of PyTorch's nn.BatchNorm2d()'",
        _rule("the input"),
        "data = torch.ones(2, 2, 3, 4); data[0][0][0][0] = 25     # (N, C, H, W)",
        str(data))

    bn = BatchNorm2d(num_features=2, eps=0, momentum=0)
    with torch.no_grad():
        out_ = bn(data)
    say(_rule("our layer"),
        "BN = batchnorm.BatchNorm2d(num_features=2, eps=0, momentum=0)",
        "BN_data = BN(data)", str(out_))

    # By hand, the way the article does it, in float64.
    ch0 = data[:, 0].reshape(-1).double()
    mean = ch0.mean().item()
    var = ch0.var(unbiased=False).item()
    first = (25 - mean) / var ** 0.5
    gamma, beta = bn.weight[0].item(), bn.bias[0].item()
    say(_rule("by hand, channel 0"),
        f"gather channel 0 of both batch items: {ch0.numel()} values "
        f"(one 25 and {ch0.numel() - 1} ones)",
        f"mean                     = (25 + {ch0.numel() - 1}·1) / {ch0.numel()} = {mean:g}",
        f"biased variance          = Σ(x − {mean:g})² / {ch0.numel()} = {var:g}   "
        f"(divide by the count, not count − 1)",
        f"x̂ of the first element   = (25 − {mean:g}) / √{var:g} = {first:.4f}",
        f"y = γ₀·x̂ + β₀            = {gamma:g}·{first:.4f} + {beta:g} = {gamma * first + beta:.4f}",
        f"our layer gave           = {out_[0, 0, 0, 0].item():.4f}",
        f"every other element      = (1 − {mean:g}) / √{var:g} = {(1 - mean) / var ** 0.5:.4f}")
    say(_rule("by hand, channel 1"),
        "every value is 1: mean 1, variance 0, and with eps = 0 the formula reads 0/0.",
        "A zero-variance channel normalizes to x̂ = 0, so y = β₁ = "
        f"{bn.bias[1].item():g}: our layer gave max |y| = {out_[:, 1].abs().max().item():g}.")
    say(_rule("running statistics after the step"),
        "running = (1 − momentum)·running + momentum·batch, with the unbiased batch variance",
        f"momentum = 0, so they do not move: running_mean = {bn.running_mean.tolist()}, "
        f"running_var = {bn.running_var.tolist()}",
        f"num_batches_tracked = {bn.num_batches_tracked.item()}",
        f"(with momentum 0.1 they would be mean {0.1 * mean:.4f}, var "
        f"{0.9 + 0.1 * var * 24 / 23:.4f} for channel 0: the unbiased variance is 23·24/23 = 24)")

    ref = torch.nn.BatchNorm2d(num_features=2, eps=0, momentum=0)
    say(_rule(f"torch.nn.BatchNorm2d, same call (torch {torch.__version__})"))
    try:
        with torch.no_grad():
            theirs = ref(data)
    except Exception as e:  # torch >= 2.x refuses eps=0 in training
        say(f"torch refuses it: {type(e).__name__}: {e}",
            f"and it has already counted the batch: num_batches_tracked = "
            f"{ref.num_batches_tracked.item()}",
            "batchnorm runs it as the article wrote it, and leaves its state untouched when "
            "a call fails.")
    else:
        say(str(theirs), f"max |ours − torch| = {(theirs - out_).abs().max().item():g}")
    return 0


def compile_kernels(jobs: int | None, out=None) -> int:
    """``batchnorm compile``: numba's cache filled before the first use (see
    ``backends/cpu_compile.py``), with a line per group as it finishes."""
    out = out or sys.stdout
    try:
        from .backends import cpu_compile
    except ImportError as e:  # numba missing: there are no CPU kernels to compile
        print(f"batchnorm compile: the CPU backend is not available ({e})", file=sys.stderr)
        return 2
    from .backends import cpu_kernels
    if cpu_kernels._CACHE_ERROR is not None:  # (the import warned too)
        print(f"batchnorm compile: numba has no cache directory it can write "
              f"({cpu_kernels._CACHE_ERROR}), so there is nothing to fill: set "
              f"NUMBA_CACHE_DIR to a directory this user can write", file=sys.stderr)
        return 2

    def report(group, seconds):
        view, build, dtype = group
        print(f"  {view:3s} {('parallel', 'serial')[build]:8s} {str(dtype)[6:]:7s} "
              f"{seconds:6.1f} s", file=out, flush=True)

    print(f"batchnorm compile: {len(cpu_compile.GROUPS)} groups of CPU kernels",
          file=out, flush=True)
    seconds = cpu_compile.precompile(jobs, report)
    print(f"done in {seconds:.1f} s", file=out)
    return 0


def _positive_int(text: str) -> int:
    value = int(text)  # a ValueError here: argparse says "invalid int value" (the name below)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: at least 1")
    return value


_positive_int.__name__ = "int"  # what argparse names in its message


def main(argv: list[str] | None = None) -> int:
    # the demo prints x̂ and box-drawing lines: where stdout cannot encode them (an ASCII
    # locale's PYTHONIOENCODING), a replacement character rather than a traceback
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        with suppress(ValueError, OSError):
            reconfigure(errors="replace")
    try:
        return _main(argv)
    except BrokenPipeError:
        # the reader went away (`batchnorm demo | head -1`): quietly, as a Unix tool,
        # and without a second error when Python flushes stdout at exit
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _main(argv: list[str] | None) -> int:
    # the docstring's first line, without its reST markup (argparse prints it as is)
    parser = argparse.ArgumentParser(prog="batchnorm",
                                     description=__doc__.split("\n\n")[0].replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="the seed article's worked example, step by step")
    compile_parser = sub.add_parser(
        "compile", help="compile the CPU kernels into numba's cache, on every core")
    compile_parser.add_argument("--jobs", type=_positive_int, default=None,
                                help="processes at once (default: the number of cores)")
    bench_parser = sub.add_parser("bench", help="benchmark our modules against torch")
    try:
        from . import bench
    except ImportError:
        bench = None
    else:
        bench.add_arguments(bench_parser)
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo()
    if args.command == "compile":
        return compile_kernels(args.jobs)
    if bench is None:
        print("batchnorm bench is not available in this build", file=sys.stderr)
        return 2
    return bench.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
