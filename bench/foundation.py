#!/usr/bin/env python3
"""Basalt vs PostgreSQL 15 on the same RockBench-like documents, in one run (issue 2).

Measures: ingest throughput over each system's write path; `_id` point lookups over the
PostgreSQL wire protocol (p50/p99); a selective full-text query; a selective term filter; a scan
with GROUP BY; field-level patch throughput at 1 KiB and 64 KiB documents.

PostgreSQL stores each document as jsonb with a GIN index (jsonb_path_ops) and a GIN tsvector
index on the text; it commits every batch (synchronous_commit on), as Basalt fsyncs every batch.

Usage: bench/run.sh foundation [--docs N]   (or run this file with the bench virtualenv)
"""

import argparse
import concurrent.futures as cf
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import psycopg

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu amber basalt cobalt dune ember "
         "fjord glacier harbor island jungle karst lagoon mesa nebula oasis prairie quarry reef savanna tundra "
         "upland valley wadi xeric yardang zephyr").split()
COUNTRIES = [f"country_{i:02d}" for i in range(20)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_doc(n: int, rng: random.Random) -> dict:
    """About 1 KiB: names, address with coordinates, tags, 5 friends, a paragraph, `_event_time`."""
    return {
        "_id": f"doc{n}",
        "_event_time": 1_793_491_200_000 + n,
        "name": f"user {n}",
        "email": f"user{n}@example.com",
        "age": 18 + rng.randrange(60),
        "score": round(rng.random() * 100, 3),
        "address": {
            "street": f"{rng.randrange(1, 999)} {rng.choice(WORDS)} street",
            "city": f"city_{rng.randrange(1000)}",
            "zip": f"{rng.randrange(10000, 99999)}",
            "country": rng.choice(COUNTRIES),
            "coordinates": {"lat": round(rng.uniform(-90, 90), 5), "lon": round(rng.uniform(-180, 180), 5)},
        },
        "tags": rng.sample(WORDS, 5),
        "friends": [{"name": f"friend {rng.randrange(10**6)}", "age": 18 + rng.randrange(60)} for _ in range(5)],
        # One rare token per document (zq0..zq4999): a selective full-text term (~0.02%).
        "text": " ".join(rng.choice(WORDS) for _ in range(60)) + f" zq{n % 5000}",
        "counter": 0,
    }


def docs_file(n_docs: int) -> str:
    cache = os.path.expanduser("~/.cache/basalt/bench")
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, f"docs_{n_docs}.jsonl")
    if not os.path.exists(path):
        rng = random.Random(42)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            for n in range(n_docs):
                f.write(json.dumps(make_doc(n, rng), separators=(",", ":")) + "\n")
                if n % 200_000 == 0:
                    print(f"  generating documents: {n}/{n_docs}", file=sys.stderr)
        os.replace(tmp, path)
    return path


def batches(path: str, size: int):
    batch = []
    with open(path) as f:
        for line in f:
            batch.append(line.rstrip("\n"))
            if len(batch) == size:
                yield batch
                batch = []
    if batch:
        yield batch


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and its children that were waited for (Linux /proc)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def wait_idle(pid: int, limit_s: float = 180.0):
    """Wait until the process uses under 5% of a core over a second (at most `limit_s`)."""
    started = time.time()
    while time.time() - started < limit_s:
        before = cpu_seconds(pid)
        time.sleep(1.0)
        if cpu_seconds(pid) - before < 0.05:
            return
    print(f"  process {pid} still busy after {limit_s:.0f} s", file=sys.stderr)


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


class Basalt:
    name = "basalt"

    def __init__(self, binary: str, workdir: str, prefix=()):
        self.pg_port, self.http_port = free_port(), free_port()
        self.log = open(os.path.join(workdir, "basalt.log"), "w")
        self.proc = subprocess.Popen(
            [*prefix, binary, "dev", "--data-dir", os.path.join(workdir, "basalt-data"),
             "--pg-addr", f"127.0.0.1:{self.pg_port}", "--http-addr", f"127.0.0.1:{self.http_port}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        for _ in range(600):
            try:
                urllib.request.urlopen(self.url("/healthz"), timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        self.conn = psycopg.connect(self.dsn(), autocommit=True)

    def dsn(self):
        return f"host=127.0.0.1 port={self.pg_port} user=basalt dbname=basalt"

    def settle(self):
        """Wait until background work after ingest (index commits and merges) is done."""
        wait_idle(self.proc.pid)

    def url(self, path):
        return f"http://127.0.0.1:{self.http_port}{path}"

    def http(self, method, path, body: bytes):
        req = urllib.request.Request(self.url(path), data=body, method=method,
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            out = json.loads(r.read())
        bad = [s for s in out.get("data", []) if s.get("status") != "ok"]
        if bad:
            raise RuntimeError(f"write failed: {bad[:3]}")
        return out

    def create(self, name):
        self.conn.execute(f"CREATE COLLECTION {name} WITH (shards = 2)")

    def write_batch(self, name, lines):
        self.http("POST", f"/v1/collections/{name}/docs", ('{"data":[' + ",".join(lines) + "]}").encode())

    def patch_batch(self, name, ids):
        items = [{"_id": i, "patch": [{"op": "increment", "path": "/counter", "value": 1}]} for i in ids]
        self.http("PATCH", f"/v1/collections/{name}/docs", json.dumps({"data": items}).encode())

    def lookup_sql(self):
        return "SELECT * FROM bench WHERE _id = %s"

    def fulltext_sql(self):
        return "SELECT count(*) FROM bench WHERE search(text, %s)"

    def term_sql(self):
        return "SELECT count(*) FROM bench WHERE address.city = %s"

    def groupby_sql(self):
        return "SELECT address.country, count(*), avg(age) FROM bench GROUP BY address.country"

    def patched_sum_sql(self, name):
        return f"SELECT sum(counter), count(*) FROM {name}"

    def close(self):
        self.conn.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)


class Postgres:
    name = "postgresql"

    def __init__(self, workdir: str):
        self._local = threading.local()
        self.port = free_port()
        self.dir = os.path.join(workdir, "pg")
        os.makedirs(self.dir)
        user = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            if subprocess.run(["id", "basaltbench"], capture_output=True).returncode != 0:
                subprocess.run(["useradd", "-M", "basaltbench"], check=True)
            shutil.chown(self.dir, "basaltbench")
            os.chmod(workdir, 0o755)
            user = ["runuser", "-u", "basaltbench", "--"]
        bindir = os.path.dirname(shutil.which("initdb") or "/usr/lib/postgresql/15/bin/initdb")
        subprocess.run(user + [f"{bindir}/initdb", "-D", self.dir, "-U", "bench", "--auth=trust", "-E", "UTF8"],
                       check=True, capture_output=True)
        self.proc = subprocess.Popen(
            user + [f"{bindir}/postgres", "-D", self.dir, "-p", str(self.port), "-k", self.dir,
                    "-c", "listen_addresses=127.0.0.1", "-c", "shared_buffers=2GB", "-c", "max_wal_size=8GB",
                    "-c", "synchronous_commit=on", "-c", "fsync=on"],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(workdir, "pg.log"), "w"))
        for _ in range(300):
            try:
                self.conn = psycopg.connect(self.dsn(), autocommit=True)
                break
            except psycopg.OperationalError:
                time.sleep(0.1)

    def dsn(self):
        return f"host=127.0.0.1 port={self.port} user=bench dbname=postgres"

    def settle(self):
        """What a PostgreSQL user does after a bulk load: statistics, visibility map, checkpoint."""
        self.conn.execute("VACUUM ANALYZE bench")
        self.conn.execute("CHECKPOINT")

    def create(self, name):
        self.conn.execute(f"CREATE TABLE {name} (id text PRIMARY KEY, doc jsonb NOT NULL)")
        self.conn.execute(f"CREATE INDEX ON {name} USING gin (doc jsonb_path_ops)")
        self.conn.execute(f"CREATE INDEX ON {name} USING gin (to_tsvector('simple', doc->>'text'))")

    def _conn(self):
        """One connection per worker thread, kept open (no connection cost per batch)."""
        if not hasattr(self._local, "conn"):
            self._local.conn = psycopg.connect(self.dsn(), autocommit=True)
        return self._local.conn

    def write_batch(self, name, lines):
        self._conn().execute(
                f"INSERT INTO {name} (id, doc) SELECT e->>'_id', e FROM jsonb_array_elements(%s::jsonb) e "
            f"ON CONFLICT (id) DO UPDATE SET doc = EXCLUDED.doc", ("[" + ",".join(lines) + "]",))

    def patch_batch(self, name, ids):
        self._conn().execute(f"UPDATE {name} SET doc = jsonb_set(doc, '{{counter}}', "
                             f"to_jsonb(coalesce((doc->>'counter')::bigint, 0) + 1)) WHERE id = ANY(%s)", (ids,))

    def lookup_sql(self):
        return "SELECT doc FROM bench WHERE id = %s"

    def fulltext_sql(self):
        return "SELECT count(*) FROM bench WHERE to_tsvector('simple', doc->>'text') @@ plainto_tsquery('simple', %s)"

    def term_sql(self):
        return "SELECT count(*) FROM bench WHERE doc @> jsonb_build_object('address', jsonb_build_object('city', %s::text))"

    def groupby_sql(self):
        return ("SELECT doc->'address'->>'country', count(*), avg((doc->>'age')::int) FROM bench "
                "GROUP BY doc->'address'->>'country'")

    def patched_sum_sql(self, name):
        return f"SELECT sum((doc->>'counter')::bigint), count(*) FROM {name}"

    def close(self):
        self.conn.close()
        self.proc.terminate()
        self.proc.wait(timeout=60)


def ingest(system, path, n_docs, batch_size, workers):
    system.create("bench")
    started = time.perf_counter()
    done = 0
    with cf.ThreadPoolExecutor(workers) as pool:
        pending = set()
        for b in batches(path, batch_size):
            pending.add(pool.submit(system.write_batch, "bench", b))
            if len(pending) >= workers * 2:
                finished, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for f in finished:
                    f.result()
                    done += batch_size
                if done % 100_000 < batch_size:
                    rate = done / (time.perf_counter() - started)
                    print(f"  {system.name}: ingested {done}/{n_docs} ({rate:,.0f} docs/s)", file=sys.stderr)
        for f in cf.as_completed(pending):
            f.result()
    return n_docs / (time.perf_counter() - started)


def timed(conn, sql, params, runs):
    times = []
    result = None
    for _ in range(runs):
        t = time.perf_counter()
        result = conn.execute(sql, params, prepare=True).fetchall()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), result


def lookups(system, n_docs, count):
    rng = random.Random(7)
    ids = [f"doc{rng.randrange(n_docs)}" for _ in range(count)]
    conn = psycopg.connect(system.dsn(), autocommit=True)
    for i in ids[:50]:  # warm up the prepared statement
        conn.execute(system.lookup_sql(), (i,), prepare=True).fetchall()
    times = []
    for i in ids:
        t = time.perf_counter()
        rows = conn.execute(system.lookup_sql(), (i,), prepare=True).fetchall()
        times.append((time.perf_counter() - t) * 1000)
        assert len(rows) == 1, (system.name, i, rows)
    conn.close()
    return percentile(times, 50), percentile(times, 99)


def patch_throughput(system, doc_bytes, n_docs, n_patches, batch):
    name = f"patch_{doc_bytes // 1024}k"
    system.create(name)
    blob = "x" * max(0, doc_bytes - 1024)
    rng = random.Random(3)
    lines = []
    for n in range(n_docs):
        d = make_doc(n, rng)
        d["_id"] = f"p{n}"
        if blob:
            d["blob"] = blob
        lines.append(json.dumps(d, separators=(",", ":")))
    per_request = max(1, (8 << 20) // doc_bytes)  # stay under the 10 MiB request limit
    for i in range(0, n_docs, per_request):
        system.write_batch(name, lines[i:i + per_request])
    # Distinct ids within a batch: PostgreSQL's UPDATE ... WHERE id = ANY(...) changes a row once
    # however often its id repeats, Basalt applies every patch; this way both do the same work.
    ids = [f"p{n}" for _ in range(0, n_patches, batch) for n in rng.sample(range(n_docs), batch)][:n_patches]
    started = time.perf_counter()
    for i in range(0, n_patches, batch):
        system.patch_batch(name, ids[i:i + batch])
    rate = n_patches / (time.perf_counter() - started)
    # Every patch is visible to a scan of the patched collection right away.
    conn = psycopg.connect(system.dsn(), autocommit=True)
    ms, rows = timed(conn, system.patched_sum_sql(name), None, 5)
    conn.close()
    assert (int(rows[0][0]), int(rows[0][1])) == (n_patches, n_docs), (system.name, name, rows)
    return rate, ms


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--basalt-bin", default=os.path.expanduser("~/.cache/basalt/target/release/basalt"))
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--lookups", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default=None, help="write results as JSON here")
    args = ap.parse_args()

    path = docs_file(args.docs)
    avg_bytes = os.path.getsize(path) / args.docs
    workdir = tempfile.mkdtemp(prefix="basalt-bench-")
    results = {"docs": args.docs, "avg_doc_bytes": round(avg_bytes), "machine": machine()}
    systems = [Basalt(args.basalt_bin, workdir), Postgres(workdir)]
    try:
        for s in systems:
            r = results.setdefault(s.name, {})
            r["ingest_docs_per_s"] = ingest(s, path, args.docs, args.batch, args.workers)
            r["ingest_mb_per_s"] = r["ingest_docs_per_s"] * avg_bytes / 1e6
            print(f"{s.name}: ingest {r['ingest_docs_per_s']:,.0f} docs/s", file=sys.stderr)
        for s in systems:
            s.settle()
        for s in systems:
            r = results[s.name]
            r["lookup_p50_ms"], r["lookup_p99_ms"] = lookups(s, args.docs, args.lookups)
            conn = psycopg.connect(s.dsn(), autocommit=True)
            r["fulltext_ms"], ft = timed(conn, s.fulltext_sql(), ("zq1234",), args.runs)
            r["fulltext_rows"] = ft[0][0]
            r["term_ms"], tm = timed(conn, s.term_sql(), ("city_123",), args.runs)
            r["term_rows"] = tm[0][0]
            r["groupby_ms"], gb = timed(conn, s.groupby_sql(), None, args.runs)
            r["groupby_groups"] = len(gb)
            conn.close()
            print(f"{s.name}: queries done", file=sys.stderr)
        for s in systems:
            r = results[s.name]
            r["patch_1k_per_s"], r["patched_scan_1k_ms"] = patch_throughput(s, 1024, 2000, 4000, 100)
            r["patch_64k_per_s"], r["patched_scan_64k_ms"] = patch_throughput(s, 64 * 1024, 2000, 4000, 100)
            r["patch_ratio_1k_over_64k"] = r["patch_1k_per_s"] / r["patch_64k_per_s"]
            print(f"{s.name}: patches done", file=sys.stderr)
    finally:
        for s in systems:
            s.close()
        shutil.rmtree(workdir, ignore_errors=True)
    b, p = results["basalt"], results["postgresql"]
    for k in ("fulltext_rows", "term_rows", "groupby_groups"):
        assert b[k] == p[k], f"systems disagree on {k}: basalt {b[k]} vs postgresql {p[k]}"
    print(report(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


def machine():
    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")}


def report(r):
    b, p = r["basalt"], r["postgresql"]
    rows = [
        ("ingest (docs/s, higher is better)", b["ingest_docs_per_s"], p["ingest_docs_per_s"], True),
        ("`_id` lookup p50 (ms)", b["lookup_p50_ms"], p["lookup_p50_ms"], False),
        ("`_id` lookup p99 (ms)", b["lookup_p99_ms"], p["lookup_p99_ms"], False),
        (f"selective full text, {b['fulltext_rows']} rows (ms)", b["fulltext_ms"], p["fulltext_ms"], False),
        (f"selective term filter, {b['term_rows']} rows (ms)", b["term_ms"], p["term_ms"], False),
        (f"scan + GROUP BY, {b['groupby_groups']} groups (ms)", b["groupby_ms"], p["groupby_ms"], False),
        ("patch 1 KiB docs (patches/s)", b["patch_1k_per_s"], p["patch_1k_per_s"], True),
        ("patch 64 KiB docs (patches/s)", b["patch_64k_per_s"], p["patch_64k_per_s"], True),
        ("sum of the patched field after the patches, 1 KiB docs (ms)", b["patched_scan_1k_ms"],
         p["patched_scan_1k_ms"], False),
        ("sum of the patched field after the patches, 64 KiB docs (ms)", b["patched_scan_64k_ms"],
         p["patched_scan_64k_ms"], False),
    ]
    out = [f"{r['docs']:,} documents, {r['avg_doc_bytes']} bytes on average; {r['machine']['cpus']} cores "
           f"({r['machine']['cpu']})", "",
           "| measure | Basalt | PostgreSQL 15 | Basalt advantage |", "|---|---:|---:|---:|"]
    for name, bv, pv, higher in rows:
        ratio = (bv / pv) if higher else (pv / bv)
        out.append(f"| {name} | {bv:,.2f} | {pv:,.2f} | {ratio:.2f}x |")
    out.append("")
    out.append(f"Patch throughput ratio 1 KiB / 64 KiB: Basalt {b['patch_ratio_1k_over_64k']:.2f}, "
               f"PostgreSQL {p['patch_ratio_1k_over_64k']:.2f} (target: Basalt within 2x)")
    return "\n".join(out)


if __name__ == "__main__":
    main()
