"""Star Schema Benchmark on Basalt: SSB tables derived from tpchgen-cli's TPC-H data by SQL
(bench/ssb/derive.sql, run in DuckDB), loaded into Basalt's `ssb` workspace through the HTTP
write API, and the 13 queries in both forms (bench/ssb/queries/star: joins over the star;
bench/ssb/queries/flat: the denormalized `lineorder_flat`) compared with DuckDB's answers.

    python bench/ssb/ssb.py expected --sf 0.01 --out tests/tpch/ssb-expected-sf0.01.json
"""

import argparse
import json
import os
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tpch"))
import tpch  # noqa: E402

TABLES = ["dwdate", "customer", "supplier", "part", "lineorder", "lineorder_flat"]
KEYS = {
    "dwdate": ["d_datekey"], "customer": ["c_custkey"], "supplier": ["s_suppkey"], "part": ["p_partkey"],
    "lineorder": ["lo_orderkey", "lo_linenumber"], "lineorder_flat": ["lo_orderkey", "lo_linenumber"],
}
QUERIES = [f"q{g}.{i}" for g, n in ((1, 3), (2, 3), (3, 4), (4, 3)) for i in range(1, n + 1)]


def derive(tpch_data: pathlib.Path, out: pathlib.Path, source: str = "csv", write: str = "jsonl"):
    """Derive the SSB tables from TPC-H's and write each into `out` as JSON lines
    (`write="jsonl"`) or Parquet (`write="parquet"`). `source` says whether the TPC-H tables
    in `tpch_data` are tpchgen-cli's CSV or Parquet files (Parquet keeps its DECIMAL and DATE
    types, so prices in the derived tables are decimals; from CSV they are doubles).

    JSON lines (test scale): returns the in-memory DuckDB connection holding the tables.
    Parquet (benchmark scale, where the tables would not fit in memory): works in a DuckDB file
    in `out` over views of the Parquet files, removes it afterwards and returns None."""
    import duckdb

    out.mkdir(parents=True, exist_ok=True)
    if write == "parquet" and all((out / f"{t}.parquet").exists() for t in TABLES):
        return None
    scratch = out / "derive.duckdb"
    scratch_files = [scratch, pathlib.Path(f"{scratch}.wal")]
    for f in scratch_files:  # left by an interrupted run
        f.unlink(missing_ok=True)
    con = duckdb.connect(str(scratch) if write == "parquet" else ":memory:")
    read = {"csv": "read_csv('{}', header = true)", "parquet": "read_parquet('{}')"}[source]
    kind = "VIEW" if write == "parquet" else "TABLE"
    for t in tpch.TABLES:
        con.execute(f"CREATE {kind} {t} AS SELECT * FROM " + read.format(tpch_data / f"{t}.{source}"))
    con.execute((HERE / "derive.sql").read_text())
    fmt = {"jsonl": "FORMAT json", "parquet": "FORMAT parquet, COMPRESSION zstd"}[write]
    for t in TABLES:
        path = out / f"{t}.{write}"
        if not path.exists():
            con.execute(f"COPY ssb.{t} TO '{path}.tmp' ({fmt})")
            os.replace(f"{path}.tmp", path)
    if write == "parquet":
        con.close()
        for f in scratch_files:
            f.unlink(missing_ok=True)
        return None
    return con


def documents(table: str, path: pathlib.Path):
    with open(path) as f:
        for line in f:
            doc = json.loads(line)
            doc["_id"] = "-".join(str(doc[k]) for k in KEYS[table])
            yield doc


def load_basalt(http_port: int, data: pathlib.Path, shards: int = 2, progress=print) -> dict:
    tpch.sql(http_port, "CREATE WORKSPACE IF NOT EXISTS ssb")
    counts = {}
    for t in TABLES:
        started = time.time()
        tpch.sql(http_port, f"CREATE COLLECTION IF NOT EXISTS ssb.{t} WITH (shards = {shards})")
        counts[t] = tpch.write_documents(http_port, f"ssb.{t}", documents(t, data / f"{t}.jsonl"))
        progress(f"loaded ssb.{t}: {counts[t]} rows in {time.time() - started:.1f}s")
    return counts


def query_text(form: str, name: str) -> str:
    return (HERE / "queries" / form / f"{name}.sql").read_text()


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("expected", help="write DuckDB's answers for the test")
    e.add_argument("--sf", type=float, default=0.01)
    e.add_argument("--out", required=True)
    args = ap.parse_args()
    base = pathlib.Path.home() / f".cache/basalt/bench/tpch-sf{args.sf}"
    tpch.generate(args.sf, base)
    con = derive(base, base / "ssb")
    answers = {}
    for form in ("star", "flat"):
        for q in QUERIES:
            rows = con.execute(query_text(form, q)).fetchall()
            answers[f"{form}/{q}"] = [[tpch.normalize(v) for v in row] for row in rows]
    pathlib.Path(args.out).write_text(json.dumps({"sf": args.sf, "answers": answers}, indent=1) + "\n")
    print(f"wrote {args.out}: " + ", ".join(f"{q} {len(r)}" for q, r in answers.items()), file=sys.stderr)


if __name__ == "__main__":
    main()
