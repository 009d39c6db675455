"""Start a real `basalt dev` for the Python client tests (binary from BASALT_BIN)."""

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, pg_port: int, http_port: int, flight_port: int, proc: subprocess.Popen, log_path: str):
        self.pg_port = pg_port
        self.http_port = http_port
        self.flight_port = flight_port
        self.proc = proc
        self.log_path = log_path

    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.pg_port} user=basalt dbname=basalt"


def wait_healthy(http_port: int, procs: list, log_paths: list) -> None:
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=1)
            return
        except OSError:
            if time.time() > deadline or any(p.poll() is not None for p in procs):
                for p in procs:
                    p.kill()
                logs = "\n".join(open(path).read() for path in log_paths)
                raise RuntimeError("basalt did not start:\n" + logs)
            time.sleep(0.1)


def stop(procs: list, data: str) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
    # Keep nothing behind (the data of a TPC-H load is hundreds of MB).
    shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="session")
def basalt():
    binary = os.environ.get("BASALT_BIN")
    assert binary, "set BASALT_BIN to the basalt binary (scripts/test.sh does)"
    data = tempfile.mkdtemp(prefix="basalt-py-")
    pg_port, http_port, flight_port = free_port(), free_port(), free_port()
    log_path = os.path.join(data, "basalt.log")
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [binary, "dev", "--demo", "--data-dir", os.path.join(data, "data"),
         "--pg-addr", f"127.0.0.1:{pg_port}", "--http-addr", f"127.0.0.1:{http_port}",
         "--flight-addr", f"127.0.0.1:{flight_port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    wait_healthy(http_port, [proc], [log_path])
    yield Server(pg_port, http_port, flight_port, proc, log_path)
    stop([proc], data)


@pytest.fixture(scope="session")
def two_leaves():
    """Two leaf processes (shard s on leaf s mod 2), a tailer and an aggregator."""
    binary = os.environ.get("BASALT_BIN")
    assert binary, "set BASALT_BIN to the basalt binary (scripts/test.sh does)"
    data = tempfile.mkdtemp(prefix="basalt-py-")
    procs, logs, leaf_addrs = [], [], []

    def start(name: str, args: list) -> subprocess.Popen:
        path = os.path.join(data, f"{name}.log")
        logs.append(path)
        p = subprocess.Popen([binary, *args], stdout=open(path, "w"), stderr=subprocess.STDOUT)
        procs.append(p)
        return p

    leaf_http = []
    for i in (1, 2):
        rpc, http = free_port(), free_port()
        start(f"leaf{i}", ["leaf", "--data-dir", os.path.join(data, f"leaf{i}"),
                           "--rpc-addr", f"127.0.0.1:{rpc}", "--http-addr", f"127.0.0.1:{http}"])
        leaf_addrs.append(f"127.0.0.1:{rpc}")
        leaf_http.append(http)
    leaves = ",".join(leaf_addrs)
    tailer_rpc, tailer_http = free_port(), free_port()
    start("tailer", ["tailer", "--rpc-addr", f"127.0.0.1:{tailer_rpc}", "--leaf-addr", leaves,
                     "--http-addr", f"127.0.0.1:{tailer_http}"])
    pg_port, http_port, flight_port = free_port(), free_port(), free_port()
    aggregator = start("aggregator", [
        "aggregator", "--pg-addr", f"127.0.0.1:{pg_port}", "--http-addr", f"127.0.0.1:{http_port}",
        "--flight-addr", f"127.0.0.1:{flight_port}", "--leaf-addr", leaves,
        "--tailer-addr", f"127.0.0.1:{tailer_rpc}"])
    for port in [*leaf_http, tailer_http, http_port]:
        wait_healthy(port, procs, logs)
    yield Server(pg_port, http_port, flight_port, aggregator, logs[-1])
    stop(procs, data)


@pytest.fixture(scope="module", params=["dev", "two_leaves"])
def deployment(request):
    """The same tests against `basalt dev` and against two leaf processes."""
    return request.getfixturevalue("basalt" if request.param == "dev" else "two_leaves")
