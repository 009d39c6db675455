"""Plan fragments: how much data moves from the leaves to the aggregator, and what it costs, with
fragments on (per-shard work runs on the leaves) and off (leaves only scan), on TPC-H lineitem in
a deployment of leaf processes, a tailer and an aggregator. DuckDB answers the same queries on
the same rows (tpchgen-cli's Parquet, loaded into a table) in the same run.

    bench/run.sh fragments [--sf 1] [--runs 3] [--leaves 2] [--shards 4] [--out results.json]

Rows and bytes moved come from EXPLAIN ANALYZE (`rows_from_leaves`, `bytes_from_leaves`: the
Arrow data of every batch that reached the aggregator).
"""

import argparse
import json
import os
import pathlib
import platform
import re
import shutil
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "tpch"))
import analytics  # noqa: E402
import tpch  # noqa: E402

QUERIES = {
    "tpch-q1 (4 groups)": tpch.query_text(1),
    "tpch-q6 (one sum)": tpch.query_text(6),
    "count distinct per flag": "SELECT l_returnflag, count(DISTINCT l_suppkey) AS suppliers FROM lineitem "
                               "GROUP BY l_returnflag ORDER BY l_returnflag",
    "top-10 by price": "SELECT l_orderkey, l_linenumber, l_extendedprice FROM lineitem "
                       "ORDER BY l_extendedprice DESC, l_orderkey, l_linenumber LIMIT 10",
}

SCALE = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}


def metric(plan: str, name: str) -> float:
    """Sum a counter over an EXPLAIN ANALYZE plan (DataFusion prints `123`, `12.34 K`, `1.2 M`)."""
    total = 0.0
    for number, unit in re.findall(rf"{name}=([0-9.]+)(?: ([KMBT]))?", plan):
        total += float(number) * SCALE.get(unit, 1.0)
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--basalt-bin", required=True)
    ap.add_argument("--sf", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--leaves", type=int, default=2)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cache = pathlib.Path.home() / f".cache/basalt/bench/tpch-sf{args.sf}"
    csv_dir = tpch.generate(args.sf, cache)
    parquet_dir = tpch.generate(args.sf, cache / "parquet", fmt="parquet")
    workdir = tempfile.mkdtemp(prefix="basalt-fragments-")
    report = {"sf": args.sf, "runs": args.runs, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "basalt": f"{args.leaves} leaves, 1 tailer, 1 aggregator" if args.leaves else "dev",
              "shards": args.shards, "queries": {}}
    try:
        import duckdb

        basalt = analytics.Basalt(args.basalt_bin, workdir, args.leaves)
        started = time.time()
        tpch.sql(basalt.http, f"CREATE COLLECTION lineitem WITH (shards = {args.shards})")
        rows = tpch.write_documents(basalt.http, "lineitem", tpch.documents("lineitem", csv_dir / "lineitem.csv"))
        report["lineitem_rows"] = rows
        report["load_s"] = round(time.time() - started, 1)
        print(f"loaded {rows} lineitem rows in {report['load_s']} s", file=sys.stderr)
        duck = duckdb.connect()
        duck.execute(f"CREATE TABLE lineitem AS SELECT * FROM read_parquet('{parquet_dir / 'lineitem.parquet'}')")
        for case, sql in QUERIES.items():
            row = {}
            want = [[tpch.normalize(v) for v in r] for r in duck.execute(sql).fetchall()]
            row["duckdb_s"] = round(analytics.timed(lambda: duck.execute(sql).fetchall(), args.runs)[0], 4)
            for mode in ("on", "off"):
                basalt.conn.execute(f"SET basalt.fragments = {mode}")
                seconds, answer = analytics.timed(lambda: basalt.query(sql), args.runs)
                got = [[tpch.normalize(v) for v in r] for r in answer]
                plan = "\n".join(r[1] for r in basalt.query(f"EXPLAIN ANALYZE {sql}"))
                row[f"fragments_{mode}"] = {
                    "seconds": round(seconds, 4),
                    "rows_from_leaves": int(metric(plan, "rows_from_leaves")),
                    "bytes_from_leaves": int(metric(plan, "bytes_from_leaves")),
                    "same_answer_as_duckdb": tpch.compare(got, want) is None,
                }
            on, off = row["fragments_on"], row["fragments_off"]
            row["bytes_off_over_on"] = round(off["bytes_from_leaves"] / max(on["bytes_from_leaves"], 1), 1)
            row["time_on_over_off"] = round(on["seconds"] / off["seconds"], 2)
            row["ratio_vs_duckdb"] = round(on["seconds"] / row["duckdb_s"], 2)
            report["queries"][case] = row
            print(case, json.dumps(row), file=sys.stderr)
        basalt.close()
        duck.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    analytics.write_report(report, args.out)


if __name__ == "__main__":
    main()
