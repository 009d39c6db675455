#!/usr/bin/env python3
"""Data latency and ingest rate of a Kafka source (issue 3).

A RockBench-style generator (the ~1 KiB documents of foundation.py) writes to the `tansu` broker
open loop at fixed rates; each document's `_event_time` is the generator clock when it is sent.
Basalt (`basalt dev`, a collection with 2 shards, a Kafka source on a 2-partition topic) ingests
them. A poller asks `SELECT max(_event_time)` every 100 ms; data latency is the poll's clock
minus the newest visible `_event_time` (so it includes up to one poll interval of staleness and
the query itself). Reported: p50/p95/p99 at each rate after a 3 s warm-up, and the rate Basalt
reaches on a backlog (documents produced beforehand) as documents/s and MB/s per core.

The broker is `tansu` with its SQLite storage engine by default (`--tansu-storage memory` for the
in-memory engine, whose every fetch lists all batches the partition holds: at 5k docs/s the
broker's CPU grows with the topic and records wait up to seconds before a consumer gets them).
Each rate also reports how long records waited between the producer and the tailer's read
(Basalt's `basalt_source_fetch_delay_seconds`, as bucket bounds): the broker's share.

There is no peer system in this run: the numbers are against the issue's targets (p50 < 100 ms
and p99 < 500 ms at 5k docs/s; 10 MB/s per core into the full converged index).

Usage: bench/run.sh kafka_latency [--rates 1000,5000] [--seconds 20] [--backlog 200000]
"""

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import psycopg
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

sys.path.insert(0, os.path.dirname(__file__))
from foundation import Basalt, free_port, make_doc, machine  # noqa: E402


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


class Tansu:
    def __init__(self, binary, workdir, storage="memory", prefix=()):
        self.port = free_port()
        engine = {"memory": "memory://tansu/", "sqlite": "sqlite://tansu.db"}[storage]
        url = f"tcp://127.0.0.1:{self.port}"
        self.log = open(os.path.join(workdir, "tansu.log"), "w")
        self.proc = subprocess.Popen([*prefix, binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                                      "--storage-engine", engine], stdout=self.log, cwd=workdir,
                                     stderr=subprocess.STDOUT)
        self.brokers = f"127.0.0.1:{self.port}"
        admin = AdminClient({"bootstrap.servers": self.brokers})
        for _ in range(300):
            try:
                admin.list_topics(timeout=1)
                return
            except Exception:
                time.sleep(0.2)
        raise RuntimeError("tansu did not start")

    def create_topic(self, name, partitions):
        admin = AdminClient({"bootstrap.servers": self.brokers})
        for f in admin.create_topics([NewTopic(name, partitions, 1)]).values():
            f.result()

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def documents(n, offset):
    """Serialized documents with a placeholder for the send-time `_event_time`."""
    rng = random.Random(42 + offset)
    out = []
    for i in range(n):
        d = make_doc(offset + i, rng)
        d["_event_time"] = 0
        s = json.dumps(d, separators=(",", ":"))
        out.append(s.replace('"_event_time":0', '"_event_time":%d', 1))
    return out


def produce_open_loop(brokers, topic, docs, rate, stop_at):
    """Send `docs` at `rate` per second on a fixed schedule (late sends go at once, no waiting)."""
    p = Producer({"bootstrap.servers": brokers, "linger.ms": 2, "queue.buffering.max.messages": 1_000_000})
    start = time.time()
    sent = 0
    for i, template in enumerate(docs):
        due = start + i / rate
        now = time.time()
        if now >= stop_at:
            break
        if due > now:
            time.sleep(due - now)
        p.produce(topic, (template % int(time.time() * 1000)).encode(), partition=i % 2)
        sent += 1
        if i % 500 == 0:
            p.poll(0)
    p.flush(30)
    return sent


def fetch_delay_buckets(basalt, source):
    """The cumulative buckets of `basalt_source_fetch_delay_seconds` for `source`: how long records
    waited between the producer (the Kafka timestamp) and the tailer reading them."""
    with urllib.request.urlopen(basalt.url("/metrics"), timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("basalt_source_fetch_delay_seconds_bucket{") and f'source="{source}"' in line:
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[float("inf") if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
    return out


def bucket_quantile(before, after, q):
    """The upper bound of the bucket holding quantile `q` of what was observed between two scrapes."""
    counts = sorted((le, after.get(le, 0) - before.get(le, 0)) for le in after)
    if not counts or counts[-1][1] <= 0:
        return None
    for le, c in counts:
        if c >= q * counts[-1][1]:
            return le * 1000
    return None


def latency_run(basalt, tansu, collection, topic, rate, seconds, offset):
    docs = documents(int(rate * seconds), offset)
    buckets_before = fetch_delay_buckets(basalt, f"commons.{collection}_src")
    samples = []
    stop = threading.Event()

    def poll():
        conn = psycopg.connect(basalt.dsn(), autocommit=True)
        while not stop.is_set():
            t = time.time()
            row = conn.execute(f"SELECT max(_event_time) FROM {collection}").fetchone()
            if row[0] is not None:
                samples.append((t, t * 1000 - row[0].timestamp() * 1000))
            time.sleep(max(0.0, 0.1 - (time.time() - t)))
        conn.close()

    poller = threading.Thread(target=poll)
    poller.start()
    started = time.time()
    sent = produce_open_loop(tansu.brokers, topic, docs, rate, started + seconds + 5)
    elapsed = time.time() - started
    time.sleep(1.0)
    stop.set()
    poller.join()
    steady = [lat for (t, lat) in samples if started + 3 <= t <= started + elapsed]
    buckets_after = fetch_delay_buckets(basalt, f"commons.{collection}_src")
    # Producer to tailer read: the broker's share of the latency (bucket upper bounds, ms).
    broker = {f"p{q}_ms": bucket_quantile(buckets_before, buckets_after, q / 100) for q in (50, 99)}
    return {"rate": rate, "fetch_delay": broker, "sent": sent, "started": round(started, 3), "send_seconds": round(elapsed, 2), "samples": len(steady),
            "p50_ms": round(percentile(steady, 50), 1), "p95_ms": round(percentile(steady, 95), 1),
            "p99_ms": round(percentile(steady, 99), 1),
            "series": [[round(t - started, 2), round(lat, 1)] for (t, lat) in samples]}


def backlog_run(basalt, tansu, n, offset, workdir):
    """Produce `n` documents first, then start a source on them: documents/s on a backlog."""
    topic = "backlog"
    tansu.create_topic(topic, 2)
    docs = documents(n, offset)
    p = Producer({"bootstrap.servers": tansu.brokers, "linger.ms": 20, "queue.buffering.max.messages": 2_000_000})
    size = 0
    for i, template in enumerate(docs):
        v = (template % (1_793_491_200_000 + i)).encode()
        size += len(v)
        while True:
            try:
                p.produce(topic, v, partition=i % 2)
                break
            except BufferError:
                p.poll(0.05)
        if i % 1000 == 0:
            p.poll(0)
    p.flush(120)
    basalt.conn.execute("CREATE COLLECTION backlog WITH (shards = 2)")
    cpu0 = cpu_seconds(basalt.proc.pid)
    started = time.time()
    basalt.conn.execute(f"CREATE SOURCE backlog_src FROM KAFKA (brokers = '{tansu.brokers}', "
                        f"topic = '{topic}') INTO backlog")
    last = 0
    while True:
        c = basalt.conn.execute("SELECT count(*) FROM backlog").fetchone()[0]
        if c >= n:
            break
        if c // 50_000 > last // 50_000:
            print(f"  backlog: {c}/{n} ({c / (time.time() - started):,.0f} docs/s)", file=sys.stderr)
        last = c
        time.sleep(0.2)
    seconds = time.time() - started
    cpu = cpu_seconds(basalt.proc.pid) - cpu0
    return {"docs": n, "bytes": size, "seconds": round(seconds, 2), "docs_per_s": round(n / seconds),
            "mb_per_s": round(size / seconds / 1e6, 2), "basalt_cpu_seconds": round(cpu, 1),
            "mb_per_s_per_core": round(size / seconds / 1e6 / (os.cpu_count() or 1), 2),
            "mb_per_basalt_cpu_second": round(size / cpu / 1e6, 2) if cpu > 0 else None}


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--basalt-bin", default=os.path.expanduser("~/.cache/basalt/target/release/basalt"))
    ap.add_argument("--tansu-bin", default=os.path.expanduser("~/.cache/basalt/tools/bin/tansu"))
    ap.add_argument("--rates", default="1000,5000")
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--backlog", type=int, default=200_000)
    ap.add_argument("--out", default=None)
    ap.add_argument("--pin", action="store_true",
                    help="Basalt alone on one CPU (the broker and generator on the others): MB/s per Basalt core")
    ap.add_argument("--tansu-storage", default="sqlite", choices=["memory", "sqlite"],
                    help="the broker's storage engine; its in-memory engine lists every stored batch of a "
                         "partition on every fetch, so its fetches slow down as the topic grows")
    ap.add_argument("--log", default=None, help="copy Basalt's log here at the end (and /metrics to LOG.metrics)")
    args = ap.parse_args()
    # --pin: Basalt alone on the last CPU, the broker and this script on the others, so the
    # backlog's MB/s is what one core of Basalt ingests.
    cpus = os.cpu_count() or 1
    pin = args.pin and cpus >= 2
    if pin:
        os.sched_setaffinity(0, set(range(cpus - 1)))
    others = ("taskset", "-c", f"0-{cpus - 2}") if pin else ()
    workdir = tempfile.mkdtemp(prefix="basalt-kafka-bench-")
    results = {"machine": machine(), "tansu_storage": args.tansu_storage, "basalt_pinned_to_one_cpu": pin,
               "runs": []}
    tansu = Tansu(args.tansu_bin, workdir, args.tansu_storage, others)
    basalt = Basalt(args.basalt_bin, workdir, ("taskset", "-c", str(cpus - 1)) if pin else ())
    try:
        tansu.create_topic("events", 2)
        basalt.conn.execute("CREATE COLLECTION events WITH (shards = 2)")
        basalt.conn.execute(f"CREATE SOURCE events_src FROM KAFKA (brokers = '{tansu.brokers}', "
                            "topic = 'events', start = 'earliest') INTO events")
        offset = 0
        for rate in [int(r) for r in args.rates.split(",") if r]:
            r = latency_run(basalt, tansu, "events", "events", rate, args.seconds, offset)
            offset += r["sent"]
            results["runs"].append(r)
            print(f"rate {rate}/s: p50 {r['p50_ms']} ms, p95 {r['p95_ms']} ms, p99 {r['p99_ms']} ms "
                  f"({r['samples']} samples); producer to tailer read (bucket bounds): "
                  f"p50 <= {r['fetch_delay']['p50_ms']} ms, p99 <= {r['fetch_delay']['p99_ms']} ms", file=sys.stderr)
        if args.backlog:
            results["backlog"] = backlog_run(basalt, tansu, args.backlog, 10_000_000, workdir)
            print(f"backlog: {results['backlog']}", file=sys.stderr)
    finally:
        if args.log:
            try:
                with urllib.request.urlopen(basalt.url("/metrics"), timeout=10) as resp:
                    with open(args.log + ".metrics", "wb") as f:
                        f.write(resp.read())
            except Exception as e:  # the metrics are a diagnostic; the run's results stand
                print(f"could not read /metrics: {e}", file=sys.stderr)
        basalt.close()
        tansu.close()
        if args.log:
            shutil.copy(os.path.join(workdir, "basalt.log"), args.log)
        shutil.rmtree(workdir, ignore_errors=True)
    print(report(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


def report(r):
    out = [f"{r['machine']['cpus']} cores ({r['machine']['cpu']})", "",
           f"broker: tansu, {r['tansu_storage']} storage", "",
           "| generator rate (docs/s) | sent | p50 (ms) | p95 (ms) | p99 (ms) | producer to tailer p50 / p99 (ms, bucket bound) |",
           "|---:|---:|---:|---:|---:|---:|"]
    for run in r["runs"]:
        fd = run.get("fetch_delay", {})
        out.append(f"| {run['rate']:,} | {run['sent']:,} | {run['p50_ms']} | {run['p95_ms']} | {run['p99_ms']} | "
                   f"{fd.get('p50_ms')} / {fd.get('p99_ms')} |")
    if "backlog" in r:
        b = r["backlog"]
        per_core = (f"Basalt alone on one CPU: {b['mb_per_s']} MB/s on that core" if r.get("basalt_pinned_to_one_cpu")
                    else f"{b['mb_per_s_per_core']} MB/s per machine core")
        out += ["", f"Backlog of {b['docs']:,} documents ({b['bytes'] / 1e6:.0f} MB): {b['docs_per_s']:,} docs/s, "
                    f"{b['mb_per_s']} MB/s ({per_core}; "
                    f"{b['mb_per_basalt_cpu_second']} MB per Basalt CPU-second)"]
    return "\n".join(out)


if __name__ == "__main__":
    main()
