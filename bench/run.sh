#!/usr/bin/env bash
# Run a benchmark with its dependencies: a release build of Basalt and a virtualenv with psycopg.
#   bench/run.sh foundation [--docs N] [--out results.json]
#   bench/run.sh recovery [--docs N] [--out results.json]
#   bench/run.sh fresh_reads [--out results.json]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/basalt/target}"
VENV="${BASALT_VENV:-$HOME/.cache/basalt/venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check -r tests/python/requirements.txt
cargo build --release -p basalt
which="$1"; shift
exec "$VENV/bin/python" "bench/$which.py" --basalt-bin "$CARGO_TARGET_DIR/release/basalt" "$@"
