"""Start a real `basalt dev` for the Python client tests (binary from BASALT_BIN)."""

import os
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
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=1)
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("basalt did not start:\n" + open(log_path).read())
            time.sleep(0.1)
    yield Server(pg_port, http_port, flight_port, proc, log_path)
    proc.terminate()
    proc.wait(timeout=10)
