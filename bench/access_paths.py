"""Access paths on the same queries: the search index, the column store and the row store, each
forced with `SET basalt.access_path`, next to the planner's own choice (`auto`), on one
collection of generated documents; DuckDB answers the same queries on the same rows in the same
run.

    bench/run.sh access_paths [--docs 1000000] [--runs 5] [--out results.json]

Fields: `rare` has 2,000 values (one document in 2,000 per value: a selective filter), `common`
two (half the documents: a broad one), `n` the document number, `note` ~80 bytes of text.
"""

import argparse
import json
import os
import pathlib
import platform
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
    "selective (0.05%)": ("SELECT count(*), sum(n) FROM ap.docs WHERE rare = 'r17'", ["search_index", "column_scan"]),
    "broad (50%)": ("SELECT count(*), sum(n) FROM ap.docs WHERE common = 'c1'", ["search_index", "column_scan"]),
    "by _id": ("SELECT n, rare FROM ap.docs WHERE _id = 'd123457' AND n >= 0",
               ["row_lookup", "search_index", "column_scan"]),
}


def documents(n: int):
    for i in range(n):
        yield {"_id": f"d{i}", "rare": f"r{i % 2000}", "common": f"c{i % 2}", "n": i,
               "note": f"document {i} of the access path benchmark, with a little text to carry along"}


def chosen_path(basalt, sql: str) -> str:
    plan = "\n".join(r[1] for r in basalt.query(f"EXPLAIN {sql}"))
    for path in ("row_lookup", "search_index", "column_scan"):
        if f"access_path={path}" in plan:
            return path
    return "?"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--basalt-bin", required=True)
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="basalt-access-")
    report = {"docs": args.docs, "runs": args.runs, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "queries": {}}
    try:
        import duckdb

        basalt = analytics.Basalt(args.basalt_bin, workdir)
        started = time.time()
        tpch.sql(basalt.http, "CREATE WORKSPACE ap")
        tpch.sql(basalt.http, "CREATE COLLECTION ap.docs WITH (shards = 2)")
        tpch.write_documents(basalt.http, "ap.docs", documents(args.docs))
        report["load_s"] = round(time.time() - started, 1)
        print(f"loaded {args.docs} documents in {report['load_s']} s", file=sys.stderr)
        # Let the background flush turn the last writes into blocks and sealed indexes.
        time.sleep(15)
        duck = duckdb.connect()
        duck.execute("CREATE SCHEMA ap")
        duck.execute(f"""CREATE TABLE ap.docs AS SELECT 'd' || i AS _id, 'r' || (i % 2000) AS rare,
            'c' || (i % 2) AS common, i AS n,
            'document ' || i || ' of the access path benchmark, with a little text to carry along' AS note
            FROM range({args.docs}) t(i)""")
        for case, (sql, paths) in QUERIES.items():
            want = duck.execute(sql).fetchall()
            row = {"duckdb_s": round(analytics.timed(lambda: duck.execute(sql).fetchall(), args.runs)[0], 5)}
            for path in ["auto", *paths]:
                basalt.conn.execute(f"SET basalt.access_path = '{path}'")
                used = chosen_path(basalt, sql)
                seconds, got = analytics.timed(lambda: basalt.query(sql), args.runs)
                if [list(r) for r in got] != [list(r) for r in want]:
                    raise RuntimeError(f"{case} with {path}: {got} != DuckDB's {want}")
                row[path] = {"seconds": round(seconds, 5), "used": used}
            basalt.conn.execute("SET basalt.access_path = 'auto'")
            forced = {p: row[p]["seconds"] for p in paths}
            best = min(forced, key=forced.get)
            row["best_forced"] = best
            row["auto_picked_best"] = row["auto"]["used"] == best
            for p in paths:
                if p != best:
                    row[f"{p}_over_{best}"] = round(forced[p] / forced[best], 1)
            row["ratio_auto_vs_duckdb"] = round(row["auto"]["seconds"] / row["duckdb_s"], 2)
            report["queries"][case] = row
            print(case, json.dumps(row), file=sys.stderr)
        basalt.close()
        duck.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    analytics.write_report(report, args.out)


if __name__ == "__main__":
    main()
