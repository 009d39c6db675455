#!/usr/bin/env python3
"""Query latency while writes stream in: one document written, then one aggregate query, 200 times,
on a shard whose unsealed tail holds about 8,000 documents (the worst case before a block seals).
Basalt only for now (a before/after measure of the tail's column blocks); prints JSON.

    bench/run.sh fresh_reads
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import psycopg

sys.path.insert(0, os.path.dirname(__file__))
import foundation  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--basalt-bin", default=os.path.expanduser("~/.cache/basalt/target/release/basalt"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    path = foundation.docs_file(10_000)
    workdir = tempfile.mkdtemp(prefix="basalt-fresh-")
    pg_port, http_port = foundation.free_port(), foundation.free_port()
    proc = subprocess.Popen(
        [args.basalt_bin, "dev", "--data-dir", os.path.join(workdir, "data"),
         "--pg-addr", f"127.0.0.1:{pg_port}", "--http-addr", f"127.0.0.1:{http_port}"],
        stdout=open(os.path.join(workdir, "basalt.log"), "w"), stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        conn = psycopg.connect(f"host=127.0.0.1 port={pg_port} user=basalt dbname=basalt", autocommit=True)
        conn.execute("CREATE COLLECTION bench WITH (shards = 1)")
        docs = next(foundation.batches(path, 8100))

        def post(lines):
            body = ('{"data":[' + ",".join(lines) + "]}").encode()
            req = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/collections/bench/docs", data=body,
                                         method="POST", headers={"content-type": "application/json"})
            urllib.request.urlopen(req, timeout=60).read()

        post(docs[:7900])
        times = []
        for d in docs[7900:]:
            post([d])
            started = time.perf_counter()
            conn.execute("SELECT count(*) FROM bench WHERE age > %s", (50,), prepare=True).fetchall()
            times.append((time.perf_counter() - started) * 1000)
        times.sort()
        result = {"queries": len(times), "median_ms": round(statistics.median(times), 2),
                  "p90_ms": round(times[int(len(times) * 0.9)], 2)}
        print(json.dumps(result, indent=2))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
