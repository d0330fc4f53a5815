#!/usr/bin/env bash
# Why issue 4's table is what it is: a second GPU call after benchmarks/gpu_check.sh, of
# about 4 minutes:
#   bash benchmarks/gpu_dev.sh              (from the repository root; installs nothing)
#
# 1. the card, the versions and the preflight, as gpu_check.sh;
# 2. where the host time of an eager step goes (benchmarks/gpu_host_profile.py --parts:
#    our forward with and without autograd, the backward alone, one launch, a bare
#    autograd.Function step on CUDA tensors, torch's step), a few seconds, with the
#    reductions' merges in stage 1 and apart; then benchmarks/fused_merge_ab.py (the
#    table's BN+ReLU rows with the merges apart, and in stage 1 up to two limits);
# 3. benchmarks/triton_dev.py with the rest: section B (BN+ReLU: ours with the default
#    plans, ours and torch eager captured in CUDA graphs, the host's time a step) with T
#    (what the autotuner chose), then C (per primitive, device time), E (variants), D.
# GPU_CHECK_SECONDS (default 240) is the whole script's budget.

cd "$(dirname "$0")/.." || exit 1
DEFAULT_BUDGET=240
PREFIX=gpu_dev
# shellcheck source=benchmarks/gpu_common.sh
source benchmarks/gpu_common.sh

# Where an eager step's host time goes (the 2026-11-27 steps were host-bound on every row:
# 1.3-1.7 ms of host time a step); then the same with the reductions' merges launched
# apart (6 launches a step instead of 4), and the table's BN+ReLU rows both ways.
stage host_parts "$(limit 60)" $PY benchmarks/gpu_host_profile.py --parts --steps 300
BATCHNORM_TRITON_CONFIG="fused_merge_max=0" stage host_parts_apart "$(limit 40)" \
    $PY benchmarks/gpu_host_profile.py --parts --steps 300
stage fused_merge_ab "$(limit 150)" $PY benchmarks/fused_merge_ab.py --budget 100 \
    --values "0,16384,65536"

# triton_dev.py gets what is left: B (and T) first, then C, E, D; it stops starting work
# when its budget is spent, the stage limit adds a margin for the last step.
DEV_BUDGET=$(( $(left) - 25 ))
(( DEV_BUDGET < 30 )) && DEV_BUDGET=30
stage triton_dev "$(( DEV_BUDGET + 20 ))" $PY benchmarks/triton_dev.py --budget "$DEV_BUDGET" \
    --sections BCED

echo
echo "================ gpu_dev summary ($(( SECONDS - START )) s) ================"
printf '%s\n' "${STATUS[@]}"
cat "${LOGS[0]}/gpu_dev-host_parts.log" "${LOGS[0]}/gpu_dev-host_parts_apart.log" \
    "${LOGS[0]}/gpu_dev-fused_merge_ab.log" 2>/dev/null
if [ -f "${LOGS[0]}/gpu_dev-triton_dev.log" ]; then
    echo "-- triton_dev (its last summary) --"
    tac "${LOGS[0]}/gpu_dev-triton_dev.log" 2>/dev/null | sed '/^== summary/q' | tac
fi
