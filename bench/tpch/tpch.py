"""TPC-H on Basalt: data from tpchgen-cli, loaded through Basalt's HTTP write API, the 22 queries
(bench/tpch/queries) run over pgwire, results compared with DuckDB's on the same files.

    python bench/tpch/tpch.py expected --sf 0.01 --out tests/tpch/expected-sf0.01.json
        generates the data and writes DuckDB's answers (checked in; tests/python/test_tpch.py
        compares Basalt's answers with them)

The module is also imported by the test and the benchmark for `generate`, `load_basalt`,
`normalize` and `same`.
"""

import argparse
import csv
import datetime
import decimal
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import time
import urllib.request

HERE = pathlib.Path(__file__).resolve().parent
QUERIES = HERE / "queries"
TABLES = ["nation", "region", "part", "supplier", "partsupp", "customer", "orders", "lineitem"]

# Column types (everything else is text; dates stay ISO text, which Basalt compares with DATE
# literals after coercion).
INTEGER = {
    "n_nationkey", "n_regionkey", "r_regionkey", "p_partkey", "p_size", "s_suppkey", "s_nationkey",
    "ps_partkey", "ps_suppkey", "ps_availqty", "c_custkey", "c_nationkey", "o_orderkey", "o_custkey",
    "o_shippriority", "l_orderkey", "l_partkey", "l_suppkey", "l_linenumber",
}
DECIMAL = {
    "p_retailprice", "s_acctbal", "ps_supplycost", "c_acctbal", "o_totalprice", "l_quantity",
    "l_extendedprice", "l_discount", "l_tax",
}
KEYS = {
    "nation": ["n_nationkey"], "region": ["r_regionkey"], "part": ["p_partkey"], "supplier": ["s_suppkey"],
    "partsupp": ["ps_partkey", "ps_suppkey"], "customer": ["c_custkey"], "orders": ["o_orderkey"],
    "lineitem": ["l_orderkey", "l_linenumber"],
}


def tpchgen_bin() -> str:
    explicit = os.environ.get("BASALT_TPCHGEN")
    if explicit:
        return explicit
    tools = pathlib.Path(os.environ.get("BASALT_TOOLS", pathlib.Path.home() / ".cache/basalt/tools"))
    found = tools / "bin" / "tpchgen-cli"
    if found.exists():
        return str(found)
    on_path = shutil.which("tpchgen-cli")
    if on_path:
        return on_path
    raise RuntimeError("tpchgen-cli not found: scripts/test.sh installs it into ~/.cache/basalt/tools")


def generate(sf: float, out: pathlib.Path, fmt: str = "csv") -> pathlib.Path:
    """The eight tables at scale factor `sf` as `<table>.csv` (with header) or `.parquet`."""
    out.mkdir(parents=True, exist_ok=True)
    if all((out / f"{t}.{fmt}").exists() for t in TABLES):
        return out
    subprocess.run([tpchgen_bin(), fmt, "--scale-factor", str(sf), "--output-dir", str(out)],
                   check=True, capture_output=True)
    missing = [t for t in TABLES if not (out / f"{t}.{fmt}").exists()]
    if missing:
        raise RuntimeError(f"tpchgen-cli did not write {missing} into {out}: {sorted(os.listdir(out))}")
    return out


def documents(table: str, path: pathlib.Path):
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            doc = {}
            for k, v in row.items():
                if k in INTEGER:
                    doc[k] = int(v)
                elif k in DECIMAL:
                    doc[k] = float(v)
                else:
                    doc[k] = v
            doc["_id"] = "-".join(str(doc[k]) for k in KEYS[table])
            yield doc


def http(port: int, method: str, path: str, body: bytes):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read() or b"null")


def sql(port: int, text: str):
    return http(port, "POST", "/v1/query", json.dumps({"sql": text}).encode())


def write_documents(port: int, collection: str, docs, batch: int = 5000) -> int:
    """POST documents to /v1/collections/<collection>/docs in batches; any refused document
    fails the load. Returns how many were written."""
    n, chunk = 0, []

    def flush():
        result = http(port, "POST", f"/v1/collections/{collection}/docs", json.dumps({"data": chunk}).encode())
        errors = [r for r in result.get("data", []) if r.get("error")]
        if errors:
            raise RuntimeError(f"{collection}: {len(errors)} documents refused, first: {errors[0]}")

    for doc in docs:
        chunk.append(doc)
        n += 1
        if len(chunk) == batch:
            flush()
            chunk = []
    if chunk:
        flush()
    return n


def load_basalt(http_port: int, data: pathlib.Path, shards: int = 2, progress=print) -> dict:
    """Create the eight collections and write every row through the HTTP write API."""
    counts = {}
    for table in TABLES:
        started = time.time()
        sql(http_port, f"CREATE COLLECTION IF NOT EXISTS {table} WITH (shards = {shards})")
        counts[table] = write_documents(http_port, table, documents(table, data / f"{table}.csv"))
        progress(f"loaded {table}: {counts[table]} rows in {time.time() - started:.1f}s")
    return counts


def query_text(n: int) -> str:
    return (QUERIES / f"q{n}.sql").read_text()


def normalize(value):
    """A result value in the form both engines' answers are compared in."""
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float, decimal.Decimal)):
        return float(value)
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()[:10]
    return str(value)


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)
    return a == b


def compare(got: list, want: list) -> str | None:
    """None when the rows agree (in order), else what differs."""
    if len(got) != len(want):
        return f"{len(got)} rows, want {len(want)}; first got {got[:3]}, want {want[:3]}"
    for i, (g, w) in enumerate(zip(got, want)):
        if len(g) != len(w) or not all(same(x, y) for x, y in zip(g, w)):
            return f"row {i}: got {g}, want {w}"
    return None


def duckdb_answers(data: pathlib.Path) -> dict:
    import duckdb

    con = duckdb.connect()
    for t in TABLES:
        con.execute(f"CREATE TABLE {t} AS SELECT * FROM read_csv('{data / (t + '.csv')}', header = true)")
    answers = {}
    for n in range(1, 23):
        rows = con.execute(query_text(n)).fetchall()
        answers[f"q{n}"] = [[normalize(v) for v in row] for row in rows]
    return answers


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("expected", help="write DuckDB's answers for the test")
    e.add_argument("--sf", type=float, default=0.01)
    e.add_argument("--data", default=None, help="data directory (default: a cache directory)")
    e.add_argument("--out", required=True)
    args = ap.parse_args()
    data = pathlib.Path(args.data or pathlib.Path.home() / f".cache/basalt/bench/tpch-sf{args.sf}")
    generate(args.sf, data)
    answers = duckdb_answers(data)
    pathlib.Path(args.out).write_text(json.dumps({"sf": args.sf, "answers": answers}, indent=1) + "\n")
    print(f"wrote {args.out}: " + ", ".join(f"{q} {len(r)} rows" for q, r in answers.items()), file=sys.stderr)


if __name__ == "__main__":
    main()
