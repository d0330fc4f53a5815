#!/usr/bin/env bash
# The GPU check of the triton backend, in one call of about 8 minutes:
#   bash benchmarks/gpu_check.sh            (from the repository root; installs nothing)
#
# 1. the card and the versions, and a preflight of the direct launches (off for the rest
#    of the check if a directly launched step differs from or fails where kernel[grid]
#    does not);
# 2. the table first, what issue 4 is measured by: `batchnorm bench --device cuda --csv`,
#    its 10 rows x 4 ops (forward; forward+backward; BN+ReLU and BN+add+ReLU
#    forward+backward), ours against torch eager, and torch.compile on the BN+ReLU op (the
#    one whose target names it; compiling every op does not fit), then
#    benchmarks/issue4_verdict.py, row by row against the issue's targets on this card,
#    and where the host time of an eager step goes (benchmarks/gpu_host_profile.py --parts);
# 3. the GPU tests: tests/test_backend_triton.py, then the triton cases of the shared
#    parity suite (tests/test_parity.py -k triton) if it exists;
# 4. benchmarks/triton_dev.py with what is left: section B (BN+ReLU: ours with the default
#    plans, ours and torch eager captured in CUDA graphs, the host's time a step), T (what
#    the autotuner chose), then C (per primitive, device time), E (variants), D;
# 5. a short summary last.
# Every stage has its own time limit and runs whatever the previous ones did; logs and CSVs
# go to benchmarks/results/ (logs in logs/) and, when set (the device machine sets it), to $OUT.
# GPU_CHECK_SECONDS (default 480) is the whole script's budget.

set -u
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION=1   # Triton >= 3.9 warns when unset; 1 is every version's default
unset TRITON_INTERPRET              # on the GPU the kernels must compile, not be interpreted
PY=${PYTHON:-python3}
RESULTS=benchmarks/results
mkdir -p "$RESULTS/logs"
LOGS=("$RESULTS/logs")
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" && LOGS+=("$OUT"); fi
START=$SECONDS
STARTED=$(mktemp)  # its time: files newer than it are this run's
BUDGET=${GPU_CHECK_SECONDS:-480}
STATUS=()

left() { echo $(( BUDGET - (SECONDS - START) )); }
limit() {  # limit WANTED: WANTED seconds, or what is left of the budget if less
    local want=$1 l
    l=$(left)
    (( l < want )) && want=$l
    (( want < 10 )) && want=10
    echo "$want"
}
stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log, record the exit code
    local name=$1 secs=$2 rc
    shift 2
    echo
    echo "================ $name (limit ${secs} s, $(( SECONDS - START )) s elapsed) ================"
    timeout -k 10 "$secs" "$@" 2>&1 | tee "${LOGS[0]}/gpu_check-$name.log"
    rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && echo "!! $name: timed out after ${secs} s"
    for d in "${LOGS[@]:1}"; do cp "${LOGS[0]}/gpu_check-$name.log" "$d/" 2>/dev/null; done
    STATUS+=("$name: exit $rc")
    echo "================ $name: exit $rc ================"
}

echo "================ machine ================"
date -u
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | head -5
git log --oneline -1 2>/dev/null
$PY - <<'EOF' 2>&1
import platform, importlib
print("python", platform.python_version())
for m in ("torch", "triton", "numpy", "numba", "hypothesis", "pytest"):
    try:
        print(f"{m:10s}", importlib.import_module(m).__version__)
    except Exception as e:
        print(f"{m:10s} missing ({type(e).__name__})")
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
from batchnorm import backends
print("batchnorm backends available:", backends.available(), dict(backends._load_errors))
EOF

# Direct launches (backends/triton/_launch.py) were written against Triton 3.9's launcher
# and checked through a stand-in driver only: if a step launched directly differs from (or
# fails where) kernel[grid] does not, everything after runs with them off, and says so.
stage preflight "$(limit 90)" env BATCHNORM_TRITON_CONFIG=autotune=0 $PY - <<'EOF'
import sys, torch, batchnorm
from batchnorm.backends.triton import _launch
m = batchnorm.BatchNorm2d(32, activation="relu").cuda()
x = torch.randn(8, 32, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last)
x.requires_grad_()
def step():
    x.grad = None
    y = m(x)
    y.backward(torch.ones_like(y))
    torch.cuda.synchronize()
    return y.detach().clone(), x.grad.clone()
direct = _launch.DIRECT
_launch.DIRECT = False
want = step()
if not direct:
    print("direct launches are off here (interpreter, ROCm, or a Triton without them)")
    sys.exit(0)
_launch.DIRECT = True
step()  # each key's first launch goes through kernel[grid]
got = step()
same = all(torch.equal(a, b) for a, b in zip(got, want))
print("direct launches:", "same results as kernel[grid]" if same else "DIFFERENT results")
sys.exit(0 if same else 3)
EOF
if [ "${STATUS[-1]}" != "preflight: exit 0" ]; then
    export BATCHNORM_TRITON_DIRECT_LAUNCH=0
    echo "!! direct launches off for the rest of this check (BATCHNORM_TRITON_DIRECT_LAUNCH=0)"
fi

# The table: 10 rows x 4 ops; on each row's first call the autotuner compiles and times
# its candidates (~40 compilations at ~0.2 s), torch.compile takes ~5 s a row (H200 host,
# 2026-11-27). The bench starts no row after --budget seconds, so a slow run still leaves
# a table (and its CSV).
table() {
    stage "$1" "$(limit 250)" $PY -m batchnorm bench --device cuda --csv --no-extras \
        --repeats 9 --compile-ops "bn+relu fwd+bwd" --budget 200
}
table table
rc=${STATUS[-1]##*exit }
if (( rc > 128 && rc != 137 )); then
    # killed by a signal (a compiler crash on one of the autotuner's candidates would be a
    # SIGSEGV): the table again with the default plans only, and the rest of the check too
    export BATCHNORM_TRITON_CONFIG="autotune=0"
    echo "!! the table died by signal $(( rc - 128 )); again without autotuning"
    table table_defaults
fi
# the CSV this run wrote (a committed one of an earlier run may share the folder)
CSV=$(find "$RESULTS" -maxdepth 1 -name 'cuda-*.csv' -newer "$STARTED" 2>/dev/null | head -1)
for d in "${LOGS[@]:1}"; do [ -n "$CSV" ] && cp "$CSV" "$d/"; done
if [ -n "$CSV" ]; then
    $PY benchmarks/issue4_verdict.py "$CSV" 2>&1 | tee "${LOGS[0]}/gpu_check-verdict.log"
    for d in "${LOGS[@]:1}"; do cp "${LOGS[0]}/gpu_check-verdict.log" "$d/"; done
fi

# Where an eager step's host time goes (the 2026-11-27 steps were host-bound on every row:
# 1.3-1.7 ms of host time a step): a few seconds.
stage host_parts "$(limit 40)" $PY benchmarks/gpu_host_profile.py --parts --steps 300

# 97.6 s for 134 tests on the H200 (2026-11-27); 2026-11-28 added ~40, 2026-12-02 ~8 (the
# autotuner's: ~60 compilations), mostly compiles
stage tests_triton "$(limit 180)" $PY -m pytest -q --maxfail=5 -p no:cacheprovider \
    tests/test_backend_triton.py --durations=5

if [ -f tests/test_parity.py ]; then
    stage tests_parity "$(limit 30)" $PY -m pytest -q --maxfail=5 -p no:cacheprovider \
        tests/test_parity.py -k triton
else
    echo "(tests/test_parity.py not present: skipped)"
fi

# triton_dev.py gets what is left: B (and T) first, then C, E, D; it stops starting work
# when its budget is spent, the stage limit adds a margin for the last step.
DEV_BUDGET=$(( $(left) - 25 ))
(( DEV_BUDGET > 200 )) && DEV_BUDGET=200
(( DEV_BUDGET < 30 )) && DEV_BUDGET=30
stage triton_dev "$(( DEV_BUDGET + 20 ))" $PY benchmarks/triton_dev.py --budget "$DEV_BUDGET" \
    --sections BCED

echo
echo "================ gpu_check summary ($(( SECONDS - START )) s) ================"
printf '%s\n' "${STATUS[@]}"
# this run's logs only (logs of earlier runs kept in the same folder carry a card and date)
grep -h -E "passed|failed|error" "${LOGS[0]}"/gpu_check-tests_{triton,parity}.log 2>/dev/null |
    tail -4
for name in table table_defaults; do
    [ -f "${LOGS[0]}/gpu_check-$name.log" ] || continue
    echo "-- $name (the bench's table) --"
    sed -n '/^case /,$p' "${LOGS[0]}/gpu_check-$name.log"
done
[ -f "${LOGS[0]}/gpu_check-verdict.log" ] && cat "${LOGS[0]}/gpu_check-verdict.log"
[ -f "${LOGS[0]}/gpu_check-host_parts.log" ] && cat "${LOGS[0]}/gpu_check-host_parts.log"
if [ -f "${LOGS[0]}/gpu_check-triton_dev.log" ]; then
    echo "-- triton_dev (its last summary) --"
    tac "${LOGS[0]}/gpu_check-triton_dev.log" 2>/dev/null | sed '/^== summary/q' | tac
fi
