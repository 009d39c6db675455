"""TPC-H (22 queries) and SSB (13 queries, star and flat) on Basalt and on the engines a user would
otherwise pick, on the same data in the same run: DuckDB, chDB and DataFusion-python read
tpchgen-cli's Parquet files (DuckDB and chDB into their own tables); Basalt bulk-loads the same
Parquet files from an S3 API server on loopback (`moto_server`) with `basalt load` (`--load s3`,
the default) or takes the rows from the CSV files through its HTTP write API (`--load http`),
and answers over pgwire (and, with `--engines basalt-flight,...`, also over Arrow Flight SQL
through ADBC). SSB tables are derived from the TPC-H files in DuckDB and written as
Parquet, which every engine reads the same way. Each query's median of --runs runs; per-query
ratios Basalt / engine and their geometric mean.

    bench/run.sh analytics [--sf 1] [--runs 3] [--suites tpch,ssb] [--leaves 0|2] [--shards 2]
                           [--load s3|http] [--out results.json]
"""

import argparse
import json
import math
import os
import pathlib
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "tpch"))
sys.path.insert(0, str(HERE / "ssb"))
import ssb  # noqa: E402
import tpch  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


def settle(limit_s: float = 180.0, busy_share: float = 0.1) -> float:
    """Wait until the machine is quiet (under `busy_share` of its CPU busy over one second, at
    most `limit_s`): engines loaded just before keep working in the background (chDB merges
    the parts it has just written for several seconds; Basalt seals and merges the indexes of
    what it has just loaded), and the first queries timed would pay for it. Returns the wait."""
    started = time.time()
    while time.time() - started < limit_s:
        b0, t0 = cpu_ticks()
        time.sleep(1.0)
        b1, t1 = cpu_ticks()
        if t1 > t0 and (b1 - b0) / (t1 - t0) < busy_share:
            break
    return round(time.time() - started, 1)


def timed(fn, runs: int, warmup: int = 0):
    times, result = [], None
    for _ in range(warmup):
        fn()
    for _ in range(runs):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


class Basalt:
    """`basalt dev` (leaves=0), or `leaves` leaf processes plus a tailer and an aggregator."""
    name = "basalt"

    def __init__(self, binary: str, workdir: str, leaves: int = 0, data_dir: str | None = None):
        self.pg, self.http, self.flight = free_port(), free_port(), free_port()
        self.procs = []
        clients = ["--pg-addr", f"127.0.0.1:{self.pg}", "--http-addr", f"127.0.0.1:{self.http}",
                   "--flight-addr", f"127.0.0.1:{self.flight}"]
        if leaves == 0:
            self.start(binary, workdir, "basalt", ["dev", "--data-dir", data_dir or os.path.join(workdir, "basalt-data"), *clients])
            health = [self.http]
            self.leaf_http = [self.http]
        else:
            addrs, health = [], []
            for i in range(leaves):
                rpc, http = free_port(), free_port()
                self.start(binary, workdir, f"leaf{i + 1}", ["leaf", "--data-dir", os.path.join(data_dir or workdir, f"leaf{i + 1}"),
                                                            "--rpc-addr", f"127.0.0.1:{rpc}", "--http-addr", f"127.0.0.1:{http}"])
                addrs.append(f"127.0.0.1:{rpc}")
                health.append(http)
            self.leaf_http = list(health)
            tailer_rpc, tailer_http = free_port(), free_port()
            self.start(binary, workdir, "tailer", ["tailer", "--rpc-addr", f"127.0.0.1:{tailer_rpc}",
                                                   "--leaf-addr", ",".join(addrs), "--http-addr", f"127.0.0.1:{tailer_http}"])
            self.start(binary, workdir, "aggregator", ["aggregator", *clients, "--leaf-addr", ",".join(addrs),
                                                       "--tailer-addr", f"127.0.0.1:{tailer_rpc}"])
            health += [tailer_http, self.http]
        deadline = time.time() + 600  # a restart on SF 10 data opens thousands of segments
        for port in health:
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
                    break
                except OSError:
                    if time.time() > deadline or any(p.poll() is not None for p in self.procs):
                        # The processes that did start would outlive the run (and hold the data).
                        for p in self.procs:
                            p.kill()
                            p.wait()
                        raise RuntimeError("basalt did not start (its logs are kept when the run ends)")
                    time.sleep(0.1)
        import psycopg

        self.conn = psycopg.connect(f"host=127.0.0.1 port={self.pg} user=basalt dbname=basalt", autocommit=True)

    def wait_settled(self, limit_s: float = 3600.0) -> float:
        """Wait until every leaf's metric `basalt_leaf_maintenance_settled` is 1: its shards have
        taken no writes for the idle time (30 s) and what a load left is sealed and merged.
        Index merges after a load run once the shards are idle, so without this they run beside
        the first queries timed. Returns the wait."""
        started = time.time()
        last = 0.0
        while time.time() - started < limit_s:
            settled = 0
            for port in self.leaf_http:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
                settled += any(line.split() == ["basalt_leaf_maintenance_settled", "1"] for line in text.splitlines())
            if settled == len(self.leaf_http):
                break
            if time.time() - last >= 30:
                last = time.time()
                print(f"waiting for the leaves' merges: {settled}/{len(self.leaf_http)} settled after "
                      f"{time.time() - started:.0f} s", file=sys.stderr)
            time.sleep(1.0)
        return round(time.time() - started, 1)

    def start(self, binary: str, workdir: str, name: str, args: list):
        log = open(os.path.join(workdir, f"{name}.log"), "w")
        self.procs.append(subprocess.Popen([binary, *args], stdout=log, stderr=subprocess.STDOUT))

    def query(self, sql: str):
        return self.conn.execute(sql).fetchall()

    def close(self):
        self.conn.close()
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(timeout=60)


class BasaltFlight:
    """The same Basalt through Arrow Flight SQL (ADBC): results arrive as Arrow record batches."""
    name = "basalt-flight"

    def __init__(self, basalt: Basalt):
        import adbc_driver_flightsql.dbapi as flightsql

        self.conn = flightsql.connect(f"grpc://127.0.0.1:{basalt.flight}", autocommit=True)

    def query(self, sql: str):
        with self.conn.cursor() as cur:
            cur.execute(sql)
            table = cur.fetch_arrow_table()
        return [tuple(r.values()) for r in table.to_pylist()]

    def close(self):
        self.conn.close()


def schemas(tables: list) -> list:
    """The schemas (Basalt workspaces) the (name, file) pairs' qualified names use."""
    return sorted({t.split(".")[0] for t, _ in tables if "." in t})


class DuckDB:
    name = "duckdb"

    def __init__(self, tables: list, path: str = ":memory:"):
        import duckdb

        # In memory up to SF 1; above, a database file (its buffer pool caches what queries read),
        # so DuckDB's copy of SF 10 does not compete with the other engines for memory.
        self.con = duckdb.connect(path)
        for schema in schemas(tables):
            self.con.execute(f"CREATE SCHEMA {schema}")
        for t, file in tables:
            self.con.execute(f"CREATE TABLE {t} AS SELECT * FROM read_parquet('{file}')")

    def query(self, sql: str):
        return self.con.execute(sql).fetchall()

    def close(self):
        self.con.close()


class DataFusionPython:
    name = "datafusion-python"

    def __init__(self, tables: list):
        import datafusion

        self.ctx = datafusion.SessionContext()
        for schema in schemas(tables):
            self.ctx.sql(f"CREATE SCHEMA {schema}")
        for t, file in tables:
            self.ctx.register_parquet(t, str(file))

    def query(self, sql: str):
        return self.ctx.sql(sql).to_arrow_table().to_pylist()

    def close(self):
        pass


class ChDB:
    name = "chdb"

    def __init__(self, tables: list, workdir: str):
        from chdb import session

        self.s = session.Session(os.path.join(workdir, "chdb"))
        for schema in schemas(tables):
            self.s.query(f"CREATE DATABASE {schema}")
        for t, file in tables:
            self.s.query(f"CREATE TABLE {t} ENGINE = MergeTree ORDER BY tuple() AS "
                         f"SELECT * FROM file('{file}', Parquet)")
        # Merge every table's parts now (its background merges would otherwise run during the
        # first queries, of any engine): each table ends as one part, its best layout.
        for t, _ in tables:
            self.s.query(f"OPTIMIZE TABLE {t} FINAL")

    def query(self, sql: str):
        return self.s.query(sql, "CSV").bytes()

    def close(self):
        self.s.close()


PART_BYTES = 256 << 20


def parts(path: pathlib.Path) -> list:
    """`path`, or for a file over 2 x PART_BYTES its row groups in files of about PART_BYTES
    each (written once beside it, in `<name>.parts/`). moto_server reads the whole object for
    every ranged GET, so one 2.5 GB object served by row group costs it more CPU than the
    load; a prefix of objects of a few hundred MB is also how a data lake is usually laid out."""
    import pyarrow.parquet as pq

    if path.stat().st_size <= 2 * PART_BYTES:
        return [path]
    out = path.parent / f"{path.stem}.parts"
    done = out / "complete"
    if not done.exists():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        src = pq.ParquetFile(path)
        writer, written, n = None, 0, 0
        for g in range(src.num_row_groups):
            if writer is None:
                writer = pq.ParquetWriter(out / f"part-{n:04}.parquet", src.schema_arrow, compression="snappy")
            writer.write_table(src.read_row_group(g))
            group = src.metadata.row_group(g)
            written += sum(group.column(c).total_compressed_size for c in range(group.num_columns))
            if written >= PART_BYTES:
                writer.close()
                writer, written, n = None, 0, n + 1
        if writer is not None:
            writer.close()
        done.touch()
    return sorted(out.glob("part-*.parquet"))


def load_parquet(binary: str, http_port: int, files: list, shards: int, workdir: str) -> dict:
    """Bulk-load each (collection, Parquet file) with `basalt load` from `moto_server` (the S3
    API on loopback): upload (large files as several objects, see `parts`), load, check the row
    count against the file's, delete the objects (moto keeps them in memory). Returns seconds
    per collection."""
    import pyarrow.parquet as pq
    from parquet_load import moto

    proc, endpoint, s3 = moto(workdir)
    seconds = {}
    try:
        s3.create_bucket(Bucket="bench")
        for workspace in schemas(files):
            tpch.sql(http_port, f"CREATE WORKSPACE IF NOT EXISTS {workspace}")
        for collection, path in files:
            keys = []
            for part in parts(path):
                keys.append(f"{collection}/{part.name}")
                s3.upload_file(str(part), "bench", keys[-1])
            started = time.time()
            out = subprocess.run([binary, "load", "--url", f"http://127.0.0.1:{http_port}", "--collection", collection,
                                  "--shards", str(shards), "--bucket", "bench", "--prefix", f"{collection}/",
                                  "--format", "parquet", "--endpoint", endpoint, "--region", "us-east-1"],
                                 stdout=subprocess.PIPE, text=True)
            seconds[collection] = round(time.time() - started, 1)
            if out.returncode != 0:
                raise RuntimeError(f"basalt load {collection} failed: {out.stdout}")
            for key in keys:
                s3.delete_object(Bucket="bench", Key=key)
            want = pq.ParquetFile(path).metadata.num_rows
            got = tpch.sql(http_port, f"SELECT count(*) FROM {collection}")["rows"][0][0]
            if got != want:
                raise RuntimeError(f"{collection}: {got} rows loaded, the file has {want}")
            print(f"{out.stdout.strip()} [{collection}: {want} rows]", file=sys.stderr)
    finally:
        proc.kill()
    return seconds


def write_report(report: dict, out: str | None) -> None:
    """Print the report as JSON and write it to `out` when given."""
    text = json.dumps(report, indent=1)
    if out:
        pathlib.Path(out).write_text(text + "\n")
    print(text)


def geomean(xs):
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--basalt-bin", required=True)
    ap.add_argument("--sf", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed runs of each query on every engine before the timed ones (hot runs: a process "
                         "started on kept data reads its columns and builds its planner sketches on first use)")
    ap.add_argument("--suites", default="tpch,ssb")
    ap.add_argument("--ssb-forms", default="star,flat",
                    help="the SSB forms to load and run: star (lineorder and its dimensions), flat (lineorder_flat) "
                         "or both (at SF 10 the two do not fit on a small disk together)")
    ap.add_argument("--engines", default="basalt-flight,duckdb,chdb,datafusion-python",
                    help="besides Basalt over pgwire: basalt-flight (the same Basalt over Flight SQL), duckdb, chdb, "
                         "datafusion-python")
    ap.add_argument("--leaves", type=int, default=0,
                    help="0: basalt dev; n: n leaf processes, a tailer and an aggregator")
    ap.add_argument("--shards", type=int, default=2, help="shards per collection")
    ap.add_argument("--load", choices=("s3", "http"), default="s3",
                    help="s3: `basalt load` of the Parquet files from moto_server; http: CSV rows through the write API")
    ap.add_argument("--basalt-data", default=None,
                    help="run Basalt on this data directory (with --leaves n: its leaf1..leafn), already loaded by an "
                         "earlier run, and load nothing")
    ap.add_argument("--keep-data", default=None,
                    help="after the run, move the loaded data directory (or the leaves' directories) here "
                         "(for --basalt-data later)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    # The S3 source reads its credentials from the environment of the process running it.
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"})
    suites = args.suites.split(",")
    forms = [f for f in ("star", "flat") if f in args.ssb_forms.split(",")]
    ssb_tables = [t for t in ssb.TABLES if ("flat" if t == "lineorder_flat" else "star") in forms]
    cache = pathlib.Path.home() / f".cache/basalt/bench/tpch-sf{args.sf}"
    parquet_dir = tpch.generate(args.sf, cache / "parquet", fmt="parquet")
    csv_dir = tpch.generate(args.sf, cache) if args.load == "http" else None
    ssb_dir = None
    if "ssb" in suites:
        ssb_dir = cache / "ssb"
        ssb.derive(parquet_dir, ssb_dir, source="parquet", write="parquet")
    # (name, Parquet file) of every table the suites read: each engine loads these.
    files = [(t, parquet_dir / f"{t}.parquet") for t in tpch.TABLES] if "tpch" in suites else []
    files += [(f"ssb.{t}", ssb_dir / f"{t}.parquet") for t in ssb_tables] if ssb_dir else []
    workdir = tempfile.mkdtemp(prefix="basalt-analytics-")
    report = {"sf": args.sf, "runs": args.runs, "warmup_runs": args.warmup,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "basalt": "dev" if args.leaves == 0 else f"{args.leaves} leaves, 1 tailer, 1 aggregator",
              "shards": args.shards, "ssb_forms": forms if "ssb" in suites else [], "load_s": {}, "queries": {}}
    basalt = None
    try:
        started = time.time()
        basalt = Basalt(args.basalt_bin, workdir, args.leaves, args.basalt_data)
        report["basalt_start_s"] = round(time.time() - started, 1)
        started = time.time()
        if args.basalt_data:
            report["load"] = f"none: an earlier run's data in {args.basalt_data}"
        elif args.load == "s3":
            report["load_s_per_collection"] = load_parquet(args.basalt_bin, basalt.http, files, args.shards, workdir)
        else:
            if "tpch" in suites:
                tpch.load_basalt(basalt.http, csv_dir, shards=args.shards, progress=lambda m: print(m, file=sys.stderr))
            if ssb_dir:
                ssb.derive(csv_dir, cache / "ssb-jsonl").close()
                ssb.load_basalt(basalt.http, cache / "ssb-jsonl", shards=args.shards,
                                progress=lambda m: print(m, file=sys.stderr))
        if not args.basalt_data:
            report["load_s"]["basalt"] = round(time.time() - started, 1)
            report["load"] = args.load
        engines = [basalt]
        wanted = args.engines.split(",") if args.engines else []
        for name, make in (("basalt-flight", lambda: BasaltFlight(basalt)),
                           ("duckdb", lambda: DuckDB(files, ":memory:" if args.sf <= 1 else os.path.join(workdir, "duck.db"))),
                           ("chdb", lambda: ChDB(files, workdir)),
                           ("datafusion-python", lambda: DataFusionPython(files))):
            if name in wanted:
                started = time.time()
                engines.append(make())
                report["load_s"][name] = round(time.time() - started, 1)
        # Every engine's queries timed on a quiet machine: Basalt's leaves done merging what was
        # loaded (see `Basalt.wait_settled`), then nothing busy (see `settle`).
        report["basalt_settle_s"] = basalt.wait_settled()
        print(f"basalt settled after {report['basalt_settle_s']} s", file=sys.stderr)
        report["settle_s"] = settle()
        print(f"machine quiet after {report['settle_s']} s", file=sys.stderr)
        cases = []
        if "tpch" in suites:
            cases += [(f"tpch/q{n}", tpch.query_text(n)) for n in range(1, 23)]
        if "ssb" in suites:
            cases += [(f"ssb-{form}/{q}", ssb.query_text(form, q)) for form in forms for q in ssb.QUERIES]
        for case, sql in cases:
            row, answers = {}, {}
            for e in engines:
                try:
                    seconds, answer = timed(lambda: e.query(sql), args.runs, args.warmup)
                    row[e.name] = round(seconds, 4)
                    answers[e.name] = answer
                except Exception as ex:  # noqa: BLE001 - an engine that cannot run a query is reported
                    row[e.name] = f"error: {str(ex).splitlines()[0][:120]}"
            # Basalt's answer (over pgwire, and over Flight) checked against DuckDB's on the same
            # data (rows in order).
            for mine, key in (("basalt", "same_answer_as_duckdb"), ("basalt-flight", "flight_same_answer_as_duckdb")):
                if mine in answers and "duckdb" in answers:
                    norm = [[[tpch.normalize(v) for v in r] for r in answers[n]] for n in (mine, "duckdb")]
                    row[key] = tpch.compare(norm[0], norm[1]) is None
            for e in engines[1:]:
                if e.name == "basalt-flight":
                    continue
                for mine, key in (("basalt", f"ratio_vs_{e.name}"), ("basalt-flight", f"flight_ratio_vs_{e.name}")):
                    b, o = row.get(mine), row.get(e.name)
                    if isinstance(b, float) and isinstance(o, float) and o > 0:
                        row[key] = round(b / o, 2)
            report["queries"][case] = row
            print(case, json.dumps(row), file=sys.stderr)
        summary = {}
        for e in engines[1:]:
            for prefix in ("tpch/", "ssb-star/", "ssb-flat/"):
                for mine, key in (("basalt", f"ratio_vs_{e.name}"), ("basalt-flight", f"flight_ratio_vs_{e.name}")):
                    ratios = [r[key] for c, r in report["queries"].items() if c.startswith(prefix) and key in r]
                    if ratios:
                        summary[f"{prefix.rstrip('/')} geomean {mine}/{e.name}"] = round(geomean(ratios), 2)
                        summary[f"{prefix.rstrip('/')} queries {mine} compared with {e.name}"] = len(ratios)
        report["summary"] = summary
        for e in engines:
            e.close()
    finally:
        # A failed load leaves Basalt running: stop it before its files go (deleted files it
        # still holds open would keep their disk space).
        if basalt is not None and "summary" not in report:
            basalt.close()
        if args.keep_data and not args.basalt_data:
            if args.leaves == 0:
                moves = [(os.path.join(workdir, "basalt-data"), args.keep_data)]
            else:
                os.makedirs(args.keep_data, exist_ok=True)
                moves = [(os.path.join(workdir, f"leaf{i + 1}"), os.path.join(args.keep_data, f"leaf{i + 1}"))
                         for i in range(args.leaves)]
            for loaded, kept in moves:
                if os.path.isdir(loaded):
                    shutil.move(loaded, kept)
            print(f"loaded data kept in {args.keep_data}", file=sys.stderr)
        if "summary" not in report:
            logs = tempfile.mkdtemp(prefix="basalt-analytics-logs-")
            for name in os.listdir(workdir):
                if name.endswith(".log"):
                    shutil.move(os.path.join(workdir, name), logs)
            print(f"the run failed: Basalt's logs kept in {logs}", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)
    write_report(report, args.out)


if __name__ == "__main__":
    main()
