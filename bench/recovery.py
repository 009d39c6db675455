#!/usr/bin/env python3
"""Restart time of a leaf: from its segments (plus the write-ahead log after them) against a
rebuild from the row store alone, on the same data in the same run.

Loads N RockBench-like documents into `basalt dev`, waits until the segments are flushed, kills
the process with SIGKILL, and times a restart until the first query answers with every document.
Then removes the segments and times the restart again, which now rebuilds the column store and
search index from the row store. Prints JSON.

    bench/run.sh recovery --docs 1000000
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))
import foundation  # noqa: E402  (the document generator and helpers)


def start(binary, workdir, pg_port, http_port):
    log = open(os.path.join(workdir, "basalt.log"), "a")
    return subprocess.Popen(
        [binary, "dev", "--data-dir", os.path.join(workdir, "data"),
         "--pg-addr", f"127.0.0.1:{pg_port}", "--http-addr", f"127.0.0.1:{http_port}"],
        stdout=log, stderr=subprocess.STDOUT)


def count(http_port):
    body = json.dumps({"sql": "SELECT count(*) FROM bench"}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/query", data=body, method="POST",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())["rows"][0][0]


def time_restart(binary, workdir, pg_port, http_port, expected):
    started = time.perf_counter()
    proc = start(binary, workdir, pg_port, http_port)
    while True:
        try:
            if count(http_port) == expected:
                break
        except OSError:
            time.sleep(0.05)
        if proc.poll() is not None:
            raise RuntimeError("basalt exited during recovery")
    return proc, time.perf_counter() - started


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--basalt-bin", default=os.path.expanduser("~/.cache/basalt/target/release/basalt"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    path = foundation.docs_file(args.docs)
    workdir = tempfile.mkdtemp(prefix="basalt-recovery-")
    pg_port, http_port = foundation.free_port(), foundation.free_port()
    proc = start(args.basalt_bin, workdir, pg_port, http_port)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        req = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/collections", method="POST",
                                     data=b'{"name": "bench", "shards": 2}',
                                     headers={"content-type": "application/json"})
        urllib.request.urlopen(req).read()
        done = 0
        for batch in foundation.batches(path, 1000):
            body = ('{"data":[' + ",".join(batch) + "]}").encode()
            req = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/collections/bench/docs", data=body,
                                         method="POST", headers={"content-type": "application/json"})
            urllib.request.urlopen(req, timeout=300).read()
            done += len(batch)
            if done % 200_000 == 0:
                print(f"loaded {done}", file=sys.stderr)
        # Let the background flush persist everything, then die without any shutdown.
        foundation.wait_idle(proc.pid)
        time.sleep(12)
        foundation.wait_idle(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        seg_bytes = sum(os.path.getsize(os.path.join(d, f))
                        for d, _, fs in os.walk(os.path.join(workdir, "data", "leaf", "segments")) for f in fs)
        proc, from_segments = time_restart(args.basalt_bin, workdir, pg_port, http_port, args.docs)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        shutil.rmtree(os.path.join(workdir, "data", "leaf", "segments"))
        proc, from_rows = time_restart(args.basalt_bin, workdir, pg_port, http_port, args.docs)
        result = {
            "docs": args.docs,
            "segment_bytes": seg_bytes,
            "restart_from_segments_s": round(from_segments, 2),
            "restart_rebuilding_from_row_store_s": round(from_rows, 2),
            "speedup": round(from_rows / from_segments, 1),
        }
        print(json.dumps(result, indent=2))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
