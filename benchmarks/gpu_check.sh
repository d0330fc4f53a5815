#!/usr/bin/env bash
# The GPU check of the triton backend: the GPU tests and issue 4's table, in one call of
# about 6-9 minutes:
#   bash benchmarks/gpu_check.sh            (from the repository root; installs nothing)
#
# 1. the card and the versions, and a preflight of the direct launches (off for the rest
#    of the check if a directly launched step differs from or fails where kernel[grid]
#    does not);
# 2. the table first, what issue 4 is measured by: `batchnorm bench --device cuda --csv`,
#    its 10 rows x 4 ops (forward; forward+backward; BN+ReLU and BN+add+ReLU
#    forward+backward), ours against torch eager, and torch.compile on the BN+ReLU op (the
#    one whose target names it; compiling every op does not fit), then
#    benchmarks/issue4_verdict.py, row by row against the issue's targets on this card;
# 3. the GPU tests in one pytest run, spread over processes: tests/test_backend_triton.py
#    and the triton cases of the shared suite (parity, properties, gradcheck, modules; the
#    bytes BN+ReLU keeps for backward);
# 4. where an eager step's host time goes (gpu_host_profile.py --parts), if a minute is left;
# 5. a short summary last; the exit status is non-zero where a stage failed or timed out.
# Every stage has its own time limit and runs whatever the previous ones did; logs and the
# CSV go to benchmarks/results/ (logs in logs/) and, when set, to $OUT. GPU_CHECK_SECONDS
# (default 560) is the whole script's budget; GPU_CHECK_TABLE=0 leaves the table out (a
# second call after a fix, the tests again). benchmarks/gpu_dev.sh, a second call, says
# why the table is what it is (CUDA graphs, per-primitive device times, the tuner's choices,
# where the host time goes).

cd "$(dirname "$0")/.." || exit 1
DEFAULT_BUDGET=560
PREFIX=gpu_check
# shellcheck source=benchmarks/gpu_common.sh
source benchmarks/gpu_common.sh

# The table: 10 rows x 4 ops; on each row's first call the autotuner compiles and times
# its candidates (~40 compilations at ~0.2 s), torch.compile takes ~5 s a row (H200 host,
# 2026-11-27). The bench starts no case (a row's 4 ops) after --budget seconds, so a slow
# run still leaves a table (and its CSV).
table() {
    stage "$1" "$(limit 210)" $PY -m batchnorm bench --device cuda --csv --no-extras \
        --repeats 9 --compile-ops "bn+relu fwd+bwd" --budget 170
}
if [ "${GPU_CHECK_TABLE:-1}" = 0 ]; then
    echo "(GPU_CHECK_TABLE=0: no table; the tests only)"
    STATUS+=("table: skipped")
else
    table table
fi
rc=${STATUS[-1]##*exit }
[ "$rc" = "table: skipped" ] && rc=0
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
    STATUS+=("verdict: exit ${PIPESTATUS[0]}")
    for d in "${LOGS[@]:1}"; do cp "${LOGS[0]}/gpu_check-verdict.log" "$d/"; done
elif [ "${GPU_CHECK_TABLE:-1}" != 0 ]; then
    STATUS+=("verdict: no CSV from this run's table")
fi

# The GPU tests in one pytest run: tests/test_backend_triton.py and the shared suite's
# triton cases (parity, properties, gradcheck, modules; -k triton keeps the first file
# whole, its name matches). Serially they did not fit: 2026-12-04, 212 and 248 cases ran
# into limits of 200 s and 150 s, mostly Triton compiling each kernel variant on one core
# (97.6 s for 134 cases on 2026-11-27). The card's host has 16 cores: pytest-xdist (in
# the image) deals the cases to GPU_TEST_WORKERS processes (default 8), which compile in
# parallel and share Triton's on-disk cache; without xdist, one process. -v: a stage cut
# by its time limit still names the cases it ran.
XDIST=()
if $PY -c "import xdist" 2>/dev/null && [ "${GPU_TEST_WORKERS:-8}" != 0 ]; then
    XDIST=(-n "${GPU_TEST_WORKERS:-8}")
fi
stage tests "$(limit 330)" $PY -m pytest -v --maxfail=5 -p no:cacheprovider "${XDIST[@]}" \
    tests/test_backend_triton.py tests/test_parity.py tests/test_properties.py \
    tests/test_gradcheck.py tests/test_modules.py -k triton --durations=10

# What is left of the budget, if a minute: where an eager step's host time goes
# (gpu_dev.sh's first stage: the autograd engine's threads, the launcher's pointer
# arguments), so that one call answers it where the card is lent for one.
if (( $(left) >= 75 )); then
    stage host_parts "$(limit 60)" $PY benchmarks/gpu_host_profile.py --parts --steps 300
fi

echo
echo "================ gpu_check summary ($(( SECONDS - START )) s) ================"
printf '%s\n' "${STATUS[@]}"
# this run's logs only (logs of earlier runs kept in the same folder carry a card and date)
grep -h -E "[0-9]+ (passed|failed)|[0-9]+ errors?\b" "${LOGS[0]}/gpu_check-tests.log" 2>/dev/null |
    tail -2
for name in table table_defaults; do
    [ -f "${LOGS[0]}/gpu_check-$name.log" ] || continue
    echo "-- $name (the bench's table) --"
    sed -n '/^case /,$p' "${LOGS[0]}/gpu_check-$name.log"
done
[ -f "${LOGS[0]}/gpu_check-verdict.log" ] && cat "${LOGS[0]}/gpu_check-verdict.log"
if [ -f "${LOGS[0]}/gpu_check-host_parts.log" ]; then
    echo "-- host parts (its last rows) --"
    grep -E "^(threads|torch step|ours|bare node|triton:|torch:)" \
        "${LOGS[0]}/gpu_check-host_parts.log" | tail -24
fi
# Non-zero when a stage failed, timed out or left no CSV (the summary above says which).
for s in "${STATUS[@]}"; do
    case "$s" in *": exit 0" | *": skipped") ;; *) exit 1 ;; esac
done
exit 0
