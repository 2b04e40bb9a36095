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
exec cargo run --release -p apex -- serve "$@"
