#!/usr/bin/env bash
# The whole test suite, on a fresh machine or a warm one: installs what the tests need (a Python
# virtualenv with psycopg, pytest, SQLAlchemy, pandas and moto_server, the S3 API server; the
# Kafka-protocol broker tansu and the TPC-H generator tpchgen-cli, built once into
# ~/.cache/basalt/tools; psql if missing), builds Basalt, runs the Python tests (clients, tools,
# TPC-H against DuckDB's answers), then every Rust test (unit, sqllogictest against dev and a three-process
# deployment, crash, HTTP, S3 and Kafka tests) with cargo nextest (cargo test if nextest is
# missing). Test servers run on loopback ports and stop with their tests.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/basalt/target}"
VENV="${BASALT_VENV:-$HOME/.cache/basalt/venv}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

step() { printf '\n== %s\n' "$*"; }

step "test dependencies"
if ! command -v psql >/dev/null 2>&1; then
  apt-get install -y -q postgresql-client >/dev/null
fi
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --disable-pip-version-check -r tests/python/requirements.txt
TOOLS="${BASALT_TOOLS:-$HOME/.cache/basalt/tools}"
if [ ! -x "$TOOLS/bin/tansu" ]; then
  # About 15 minutes on two cores, once per machine; its build directory is removed afterwards.
  echo "building the tansu Kafka broker (once)"
  CARGO_TARGET_DIR="$HOME/.cache/basalt/tansu-target" \
    cargo install -q tansu --version 0.6.0 --features dynostore,libsql --locked --root "$TOOLS"
  rm -rf "$HOME/.cache/basalt/tansu-target"
fi
export BASALT_TANSU="$TOOLS/bin/tansu"
if [ ! -x "$TOOLS/bin/tpchgen-cli" ]; then
  # The TPC-H data generator for the TPC-H tests (a few minutes, once per machine).
  echo "building tpchgen-cli (once)"
  CARGO_TARGET_DIR="$HOME/.cache/basalt/tpchgen-target" \
    cargo install -q tpchgen-cli --version 4.0.0 --locked --root "$TOOLS"
  rm -rf "$HOME/.cache/basalt/tpchgen-target"
fi
export BASALT_TPCHGEN="$TOOLS/bin/tpchgen-cli"

step "build"
cargo build -p basalt
export BASALT_BIN="$CARGO_TARGET_DIR/debug/basalt"
# The S3 API server for the segment-store tests (installed into the virtualenv above).
export BASALT_MOTO_SERVER="$VENV/bin/moto_server"

step "python client tests (psycopg, psql)"
"$VENV/bin/pytest" -q tests/python

step "rust tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
