"""Statement timeout, the pgwire cancel request and the per-statement memory limit: each stops
the statement with its SQLSTATE and leaves the connection and the server working."""

import threading
import time

import psycopg
import pytest

# Hours of work (5,000^3 rows crossed before the join), so the timeout and the cancel below
# always land while it runs: the three-table form finished in 0.65 s once small join sides were
# built once, racing the cancel sent at 0.5 s. Its work is all in joins of in-memory batches,
# which must still stop (see `YieldInAmplifiers`).
SLOW = (
    "SELECT count(*) FROM demo.events a, demo.events b, demo.events c, demo.events d "
    "WHERE a.price + b.price + c.price = d.price"
)


def answers_promptly(basalt):
    """The server is not still busy with a stopped statement: a small query over HTTP answers
    within seconds (a stopped statement whose work went on used to hold every worker thread,
    and then nothing answered at all)."""
    import json
    import urllib.request

    body = json.dumps({"sql": "SELECT count(*) AS n FROM demo.events"}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{basalt.http_port}/v1/query", data=body,
                                 headers={"content-type": "application/json"})
    started = time.time()
    with urllib.request.urlopen(req, timeout=10) as r:
        assert json.loads(r.read())["rows"] == [[5000]]
    assert time.time() - started < 5


def test_statement_timeout(basalt):
    with psycopg.connect(basalt.dsn(), autocommit=True) as c:
        c.execute("SET statement_timeout = 300")
        assert c.execute("SHOW statement_timeout").fetchone() == ("300ms",)
        started = time.time()
        with pytest.raises(psycopg.errors.QueryCanceled) as e:
            c.execute(SLOW)
        assert time.time() - started < 10
        assert "statement timeout" in str(e.value)
        assert e.value.sqlstate == "57014"
        answers_promptly(basalt)
        # The connection goes on; a timeout of 0 turns it off.
        assert c.execute("SELECT count(*) FROM demo.events").fetchone() == (5000,)
        c.execute("SET statement_timeout = 0")
        assert c.execute("SHOW statement_timeout").fetchone() == ("0",)


def test_cancel_request_stops_a_running_query(basalt):
    with psycopg.connect(basalt.dsn(), autocommit=True) as c:
        timer = threading.Timer(0.5, c.cancel)
        timer.start()
        started = time.time()
        with pytest.raises(psycopg.errors.QueryCanceled) as e:
            c.execute(SLOW)
        timer.join()
        assert time.time() - started < 10
        assert "user request" in str(e.value)
        answers_promptly(basalt)
        assert c.execute("SELECT 1").fetchone() == (1,)


def test_memory_limit(basalt):
    big = "SELECT v, count(*) FROM (SELECT value AS v FROM generate_series(1, 2000000)) GROUP BY v ORDER BY v DESC LIMIT 1"
    with psycopg.connect(basalt.dsn(), autocommit=True) as c:
        c.execute("SET basalt.memory_limit = '2MB'")
        assert c.execute("SHOW basalt.memory_limit").fetchone() == ("2.0 MB",)
        with pytest.raises(psycopg.errors.OutOfMemory) as e:
            c.execute(big)
        assert "memory limit" in str(e.value)
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            c.execute("SET basalt.memory_limit = '10kB'")
        c.execute("SET basalt.memory_limit = '1GB'")
        assert c.execute(big).fetchone() == (2000000, 1)


def test_http_queries_take_a_timeout(basalt):
    import json
    import urllib.error
    import urllib.request

    body = json.dumps({"sql": SLOW, "timeout_ms": 300}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{basalt.http_port}/v1/query", data=body,
                                 headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 408
    error = json.loads(e.value.read())["error"]
    assert error["code"] == "query_canceled" and "statement timeout" in error["message"]
    answers_promptly(basalt)
