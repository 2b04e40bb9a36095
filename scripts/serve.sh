#!/usr/bin/env bash
# Builds and runs the Apex server in release mode on the embedded local model, fetching the
# model into the data folder first when it is missing. Extra arguments go to `apex serve`.
#
# Usage: scripts/serve.sh [apex serve options...]   (data folder: $APEX_DATA_DIR, else ./data)
set -euo pipefail
cd "$(dirname "$0")/.."

DATA_DIR="${APEX_DATA_DIR:-./data}"
for ((i = 1; i <= $#; i++)); do
    if [[ "${!i}" == "--data-dir" ]]; then
        next=$((i + 1))
        DATA_DIR="${!next}"
    elif [[ "${!i}" == --data-dir=* ]]; then
        DATA_DIR="${!i#--data-dir=}"
    fi
done

scripts/fetch-model.sh "$DATA_DIR"
export APEX_DATA_DIR="$DATA_DIR"
# The local model's matrix code runs about twice as fast when the whole binary may use
# AVX2 and FMA (x86-64-v3: Intel since 2013, AMD Zen): about 100 against 46-49 generated tokens
# per second on this project's machine (docs/benchmarks.md). Use it when this CPU has them,
# unless RUSTFLAGS is already set.
if [[ -z "${RUSTFLAGS+x}" && "$(uname -m)" == "x86_64" ]] \
    && grep -qw avx2 /proc/cpuinfo 2>/dev/null && grep -qw fma /proc/cpuinfo 2>/dev/null \
    && grep -qw bmi2 /proc/cpuinfo 2>/dev/null; then
    export RUSTFLAGS="-C target-cpu=x86-64-v3"
fi
exec cargo run --release -p apex -- serve "$@"
