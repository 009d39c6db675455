#!/usr/bin/env bash
# Run a benchmark with its dependencies: a release build of Basalt and a virtualenv with psycopg.
#   bench/run.sh foundation [--docs N] [--out results.json]
#   bench/run.sh recovery [--docs N] [--out results.json]
#   bench/run.sh fresh_reads [--out results.json]
#   bench/run.sh kafka_latency [--rates 1000,5000] [--seconds 20] [--backlog 200000] [--tansu-storage sqlite|memory] [--out results.json]
#   bench/run.sh parquet_load [--rows 500000] [--out results.json]   (moto_server and DuckDB, from the venv)
#   bench/run.sh analytics [--sf 1] [--runs 3] [--suites tpch,ssb] [--leaves 0|2] [--load s3|http] [--out results.json]
#   bench/run.sh fragments [--sf 1] [--runs 3] [--leaves 2] [--shards 4] [--out results.json]
#   bench/run.sh access_paths [--docs 1000000] [--runs 5] [--out results.json]
#     (TPC-H and SSB vs DuckDB, chDB and DataFusion-python; tpchgen-cli from ~/.cache/basalt/tools)
#     (needs the tansu broker that scripts/test.sh installs into ~/.cache/basalt/tools)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/basalt/target}"
VENV="${BASALT_VENV:-$HOME/.cache/basalt/venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check -r tests/python/requirements.txt -r bench/requirements.txt
cargo build --release -p basalt
which="$1"; shift
exec "$VENV/bin/python" "bench/$which.py" --basalt-bin "$CARGO_TARGET_DIR/release/basalt" "$@"
