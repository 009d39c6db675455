#!/usr/bin/env python3
"""Query latency while writes stream in, Basalt against PostgreSQL 15 in the same run: 8,000
documents loaded, then 200 times one document written and one aggregate query run (the written
document must be counted). In Basalt the recent documents sit in the shards' unsealed tails, the
case a real-time dashboard over a stream hits. Prints JSON.

    bench/run.sh fresh_reads
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
import foundation  # noqa: E402

QUERIES = {
    "basalt": "SELECT count(*) FROM bench WHERE age > %s",
    "postgresql": "SELECT count(*) FROM bench WHERE (doc->>'age')::int > %s",
}


def run(system, docs):
    system.create("bench")
    system.write_batch("bench", docs[:7900])
    times, counts = [], []
    for d in docs[7900:]:
        system.write_batch("bench", [d])
        started = time.perf_counter()
        counts.append(system.conn.execute(QUERIES[system.name], (50,), prepare=True).fetchone()[0])
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return {"median_ms": round(statistics.median(times), 2), "p90_ms": round(times[int(len(times) * 0.9)], 2)}, counts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--basalt-bin", default=os.path.expanduser("~/.cache/basalt/target/release/basalt"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    docs = next(foundation.batches(foundation.docs_file(10_000), 8100))
    result = {}
    all_counts = {}
    for make in (lambda w: foundation.Basalt(args.basalt_bin, w), foundation.Postgres):
        workdir = tempfile.mkdtemp(prefix="basalt-fresh-")
        system = make(workdir)
        try:
            result[system.name], all_counts[system.name] = run(system, docs)
        finally:
            system.close()
            shutil.rmtree(workdir, ignore_errors=True)
    if all_counts["basalt"] != all_counts["postgresql"]:
        raise SystemExit("the systems counted differently")
    result["median_ratio_postgresql_over_basalt"] = round(
        result["postgresql"]["median_ms"] / result["basalt"]["median_ms"], 2)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
