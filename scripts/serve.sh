#!/usr/bin/env bash
# Builds and runs the Apex server in release mode on the embedded local model, fetching the
# model once per machine into its cache first when it is missing (see scripts/fetch-model.sh;
# every data folder uses it). Extra arguments go to `apex serve`.
#
# Usage: scripts/serve.sh [apex serve options...]   (data folder: $APEX_DATA_DIR, else ./data)
set -euo pipefail
cd "$(dirname "$0")/.."

# A model path given as a flag is the server's business (it names the file it wants).
has_model_flag=false
for argument in "$@"; do
    [[ "$argument" == --model-path* ]] && has_model_flag=true
done
if ! $has_model_flag; then
    scripts/fetch-model.sh
fi
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
