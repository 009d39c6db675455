"""psycopg 3 against Basalt: prepared statements, parameters, type round-trips, errors."""

import datetime
import json

import psycopg
import pytest
from psycopg import errors


def connect(basalt, **kw):
    return psycopg.connect(basalt.dsn(), **kw)


def test_demo_data_is_queryable(basalt):
    with connect(basalt, autocommit=True) as conn:
        (n,) = conn.execute("SELECT count(*) FROM demo.events").fetchone()
        assert n == 5000
        rows = conn.execute(
            "SELECT kind, count(*) AS n FROM demo.events GROUP BY kind ORDER BY n DESC, kind").fetchall()
        assert len(rows) == 5 and sum(r[1] for r in rows) == 5000


def test_parameters_and_prepared_statements(basalt):
    with connect(basalt, autocommit=True) as conn:
        conn.execute("CREATE COLLECTION IF NOT EXISTS py_items")
        docs = [{"_id": f"i{i}", "n": i, "price": i * 1.5, "name": f"item {i}", "ok": i % 2 == 0,
                 "meta": {"color": "red" if i < 5 else "blue"}} for i in range(10)]
        with conn.cursor() as cur:
            # executemany prepares once and binds each JSON document as a text parameter.
            cur.executemany("INSERT INTO py_items VALUES (%s)", [(json.dumps(d),) for d in docs])
        for _ in range(3):  # prepare=True: a named server-side prepared statement, reused
            rows = conn.execute(
                "SELECT _id, n FROM py_items WHERE n >= %s AND meta.color = %s ORDER BY n",
                (7, "blue"), prepare=True).fetchall()
            assert rows == [("i7", 7), ("i8", 8), ("i9", 9)]
        (cnt,) = conn.execute("SELECT count(*) FROM py_items WHERE price > %s", (6.0,)).fetchone()
        assert cnt == 5
        (cnt,) = conn.execute("SELECT count(*) FROM py_items WHERE ok = %s", (True,)).fetchone()
        assert cnt == 5
        cur = conn.execute("UPDATE py_items SET meta.color = %s WHERE _id = %s", ("green", "i1"))
        assert cur.rowcount == 1
        (color,) = conn.execute("SELECT meta.color FROM py_items WHERE _id = %s", ("i1",)).fetchone()
        assert color == "green"
        cur = conn.execute("DELETE FROM py_items WHERE n < %s", (3,))
        assert cur.rowcount == 3


def test_type_round_trips(basalt):
    with connect(basalt, autocommit=True) as conn:
        conn.execute("CREATE COLLECTION IF NOT EXISTS py_types")
        conn.execute("INSERT INTO py_types VALUES (%s)", (json.dumps({
            "_id": "t1", "i": 42, "f": 2.5, "s": "héllo", "b": True, "arr": [1, 2, 3],
            "_event_time": "2026-11-01T12:30:00Z"}),))
        for binary in (False, True):
            cur = conn.cursor(binary=binary)
            row = cur.execute("SELECT i, f, s, b, _event_time, arr FROM py_types WHERE _id = 't1'").fetchone()
            i, f, s, b, t, arr = row
            assert (i, f, s, b) == (42, 2.5, "héllo", True)
            assert t == datetime.datetime(2026, 11, 1, 12, 30, tzinfo=datetime.timezone.utc)
            assert arr == [1, 2, 3], (binary, arr)
            types = [d.type_code for d in cur.description]
            assert types[:5] == [20, 701, 25, 16, 1184]  # int8, float8, text, bool, timestamptz
        # Typed parameters of several kinds.
        row = conn.execute("SELECT %s::BIGINT + 1, %s::DOUBLE * 2, upper(%s), NOT %s",
                           (41, 1.25, "abc", False)).fetchone()
        assert row == (42, 2.5, "ABC", True)
        (n,) = conn.execute("SELECT count(*) FROM py_types WHERE _event_time < %s",
                            (datetime.datetime(2027, 1, 1, tzinfo=datetime.timezone.utc),)).fetchone()
        assert n == 1


def test_errors_have_sqlstates_and_connection_survives(basalt):
    with connect(basalt, autocommit=True) as conn:
        with pytest.raises(errors.SyntaxError):
            conn.execute("SELEC 1")
        with pytest.raises(errors.UndefinedTable):
            conn.execute("SELECT * FROM no_such_collection")
        with pytest.raises(errors.DuplicateTable):
            conn.execute("CREATE COLLECTION py_dup")
            conn.execute("CREATE COLLECTION py_dup")
        with pytest.raises(psycopg.Error) as e:
            conn.execute("INSERT INTO py_dup VALUES (%s)", ("{not json",))
        assert "malformed json" in str(e.value)
        (one,) = conn.execute("SELECT 1").fetchone()
        assert one == 1


def test_transactions_are_accepted(basalt):
    # psycopg opens a transaction implicitly when autocommit is off.
    with connect(basalt) as conn:
        (n,) = conn.execute("SELECT count(*) FROM demo.events WHERE kind = %s", ("purchase",)).fetchone()
        assert n > 0
        conn.commit()
        conn.execute("SELECT 1")
        conn.rollback()


def _parse_plans(basalt) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{basalt.http_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    counts = {"reused": 0, "planned": 0}
    for line in text.splitlines():
        if line.startswith("basalt_pg_parse_plans_total{"):
            counts[line.split('plan="', 1)[1].split('"', 1)[0]] = int(float(line.rsplit(" ", 1)[1]))
    return counts


def test_extended_protocol_queries_plan_once(basalt):
    """Parse plans a query for its Describe; the Execute right after runs that plan with the
    parameters bound. A named statement's later executions plan again, with the same answers."""
    with connect(basalt, autocommit=True) as conn:
        sql = "SELECT kind, count(*) FROM demo.events WHERE kind <> %s GROUP BY kind ORDER BY kind"
        (kind,) = conn.execute("SELECT min(kind) FROM demo.events").fetchone()
        before = _parse_plans(basalt)
        first = conn.execute(sql, (kind,)).fetchall()
        after = _parse_plans(basalt)
        assert (after["reused"] - before["reused"], after["planned"] - before["planned"]) == (1, 0)
        assert kind not in [r[0] for r in first] and len(first) == 4
        # A named prepared statement: the first execution runs Parse's plan, the next plan again.
        answers = [conn.execute(sql, (kind,), prepare=True).fetchall() for _ in range(3)]
        end = _parse_plans(basalt)
        assert end["reused"] - after["reused"] == 1 and end["planned"] - after["planned"] == 2
        assert answers == [first] * 3
