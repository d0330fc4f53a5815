# Sourced by gpu_check.sh and gpu_dev.sh (from the repository root, with DEFAULT_BUDGET and
# PREFIX set): the environment, the stage helpers, the card and versions, and the preflight
# of the direct launches. Logs go to benchmarks/results/logs/$PREFIX-<stage>.log and, when
# set (the device machine sets it), to $OUT.

set -u
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
BUDGET=${GPU_CHECK_SECONDS:-$DEFAULT_BUDGET}
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
    timeout -k 10 "$secs" "$@" 2>&1 | tee "${LOGS[0]}/$PREFIX-$name.log"
    rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && echo "!! $name: timed out after ${secs} s"
    for d in "${LOGS[@]:1}"; do cp "${LOGS[0]}/$PREFIX-$name.log" "$d/" 2>/dev/null; done
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

