#!/usr/bin/env bash
# GPU check: parity tests and a reduced benchmark run on a machine with an NVIDIA GPU.
#
# Installs nothing: run it where torch (CUDA build), cupy, pytest and the
# bench extra (matplotlib, mambapy, transformers) are already installed, from
# any folder:
#
#     OUT=/path/to/results bash benchmarks/gpu_check.sh
#
# Everything goes into ${OUT:-gpu_results} (relative paths: from the repository
# root): nvidia-smi.txt, parity.txt, benchmarks.log, the benchmark tables and
# plots (step.md, scan.md, step.png, scan.png, machine.md) and status.txt with
# each step's exit status. Exits non-zero if any step failed.
#
# Environment: PYTHON (default python), BENCH_FLAGS (default --quick: a few
# minutes; e.g. "--quick --torch-compile" to add torch.compile).
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_results}"
PYTHON="${PYTHON:-python}"
BENCH_FLAGS="${BENCH_FLAGS:---quick}"
mkdir -p "$OUT"
STATUS="$OUT/status.txt"
: > "$STATUS"
worst=0

started=$SECONDS
record() {  # record NAME EXIT_STATUS: one line in status.txt, with the step's duration
    echo "$1: exit $2 ($((SECONDS - started)) s)" | tee -a "$STATUS"
    if [ "$2" -ne 0 ]; then worst=1; fi
    started=$SECONDS
}

rc=0
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || rc=$?
record "nvidia-smi" "$rc"

rc=0
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' \
    > "$OUT/torch-cuda.txt" 2>&1 || rc=$?
record "torch CUDA probe" "$rc"

rc=0
"$PYTHON" -m pytest tests/parity -q -rs 2>&1 | tee "$OUT/parity.txt" || rc=$?
record "pytest tests/parity" "$rc"

rc=0
# shellcheck disable=SC2086  # BENCH_FLAGS is a list of flags
"$PYTHON" -m benchmarks --only step,scan --out "$OUT" $BENCH_FLAGS 2>&1 | tee "$OUT/benchmarks.log" || rc=$?
record "python -m benchmarks --only step,scan $BENCH_FLAGS" "$rc"

echo "results in $OUT"
exit "$worst"
