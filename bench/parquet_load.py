#!/usr/bin/env python3
"""Bulk load of a Parquet file from an S3 server: Basalt vs DuckDB, same file, same run (issue 3).

DuckDB writes a Parquet file (an orders-like table: ints, floats, short strings, a timestamp, a
text comment); it is uploaded to `moto_server` (the S3 API on loopback). Then:

- Basalt (`basalt dev`, release build, a collection with 2 shards) loads it with
  `basalt load --format parquet` (an S3 source that lists once; the object is streamed and every
  field of every row goes into the row store, column store and search index). Timed from the
  command's start to its end (it includes the source's first listing, up to one second).
- DuckDB downloads the same object from the S3 server and runs `CREATE TABLE ... AS SELECT *
  FROM read_parquet(...)` (its httpfs extension cannot be downloaded on this machine, so the
  download is a boto3 GET, timed with the load). DuckDB from a local file is reported too.

Both must end with the same row count and sum. Reported: seconds, rows/s, MB/s and the ratio.

Usage: bench/run.sh parquet_load [--rows 500000] [--out results.json]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import boto3
import duckdb

sys.path.insert(0, os.path.dirname(__file__))
from foundation import Basalt, free_port, machine  # noqa: E402


def moto(workdir):
    port = free_port()
    binary = os.path.join(os.path.dirname(sys.executable), "moto_server")
    log = open(os.path.join(workdir, "moto.log"), "w")
    proc = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                      region_name="us-east-1")
    for _ in range(300):
        try:
            s3.list_buckets()
            return proc, endpoint, s3
        except Exception:
            time.sleep(0.2)
    raise RuntimeError("moto_server did not start")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--basalt-bin", required=True)
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--out")
    args = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="basalt-parquet-")
    procs = []
    try:
        path = os.path.join(workdir, "orders.parquet")
        duckdb.connect().execute(f"""
            COPY (SELECT i AS order_id, 'cust-' || (i % 50000) AS customer, (i * 7919) % 1000 / 10.0 AS price,
                         i % 17 AS quantity, ['open', 'shipped', 'returned', 'lost'][1 + i % 4] AS status,
                         TIMESTAMP '2026-01-01' + INTERVAL (i) SECOND AS ordered_at,
                         'order ' || i || ' of a customer who asked for express delivery to the north gate'
                           AS comment
                  FROM range({args.rows}) t(i))
            TO '{path}' (FORMAT parquet, COMPRESSION snappy, ROW_GROUP_SIZE 100000)""")
        size = os.path.getsize(path)
        proc, endpoint, s3 = moto(workdir)
        procs.append(proc)
        s3.create_bucket(Bucket="bench-data")
        s3.upload_file(path, "bench-data", "orders/orders.parquet")
        expected_sum = sum(range(args.rows))

        # DuckDB: GET from the S3 server, then load; and from the local file.
        con = duckdb.connect(os.path.join(workdir, "duck.db"))
        t0 = time.perf_counter()
        local = os.path.join(workdir, "downloaded.parquet")
        s3.download_file("bench-data", "orders/orders.parquet", local)
        con.execute(f"CREATE TABLE orders AS SELECT * FROM read_parquet('{local}')")
        duck_s3_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        con.execute(f"CREATE TABLE orders2 AS SELECT * FROM read_parquet('{path}')")
        duck_local_s = time.perf_counter() - t0
        n, total = con.execute("SELECT count(*), sum(order_id) FROM orders").fetchone()
        assert (n, total) == (args.rows, expected_sum), (n, total)

        # Basalt: `basalt load` through a running dev process.
        os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_REGION": "us-east-1"})
        b = Basalt(args.basalt_bin, workdir)
        procs.append(b.proc)
        b.conn.execute("CREATE COLLECTION orders WITH (shards = 2)")
        t0 = time.perf_counter()
        out = subprocess.run([args.basalt_bin, "load", "--url", b.url(""), "--collection", "orders",
                              "--bucket", "bench-data", "--prefix", "orders/", "--format", "parquet",
                              "--endpoint", endpoint, "--region", "us-east-1"],
                             capture_output=True, text=True)
        basalt_s = time.perf_counter() - t0
        if out.returncode != 0:
            raise RuntimeError(f"basalt load failed: {out.stdout}\n{out.stderr}")
        n, total = b.conn.execute("SELECT count(*), sum(order_id) FROM orders").fetchone()
        assert (n, total) == (args.rows, expected_sum), (n, total)
        text_hits = b.conn.execute("SELECT count(*) FROM orders WHERE search(comment, 'express')").fetchone()[0]
        assert text_hits == args.rows, text_hits

        r = {
            "machine": machine(),
            "rows": args.rows,
            "parquet_bytes": size,
            "basalt": {"seconds": basalt_s, "rows_per_s": args.rows / basalt_s, "mb_per_s": size / basalt_s / 1e6,
                       "load_output": out.stdout.strip()},
            "duckdb_from_s3_server": {"seconds": duck_s3_s, "rows_per_s": args.rows / duck_s3_s},
            "duckdb_local_file": {"seconds": duck_local_s, "rows_per_s": args.rows / duck_local_s},
            "ratio_basalt_to_duckdb_s3": basalt_s / duck_s3_s,
        }
        print(json.dumps(r, indent=2))
        print(f"\n| load of {args.rows} rows ({size / 1e6:.1f} MB Parquet) | seconds | rows/s |")
        print("|---|---|---|")
        print(f"| Basalt (`basalt load`, full converged index) | {basalt_s:.2f} | {args.rows / basalt_s:,.0f} |")
        print(f"| DuckDB (GET from the S3 server + CREATE TABLE AS) | {duck_s3_s:.2f} | {args.rows / duck_s3_s:,.0f} |")
        print(f"| DuckDB (local file) | {duck_local_s:.2f} | {args.rows / duck_local_s:,.0f} |")
        print(f"\nBasalt / DuckDB time: {basalt_s / duck_s3_s:.1f}x")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(r, f, indent=2)
    finally:
        for p in procs:
            p.kill()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
