"""Arrow Flight SQL on Basalt through ADBC (adbc-driver-flightsql) into pyarrow tables: queries,
parameters, statements that write, large results streamed, and errors."""

import adbc_driver_flightsql.dbapi as flightsql
import pyarrow as pa
import pytest


@pytest.fixture()
def conn(basalt):
    with flightsql.connect(f"grpc://127.0.0.1:{basalt.flight_port}", autocommit=True) as c:
        yield c


def test_queries_come_back_as_arrow(conn):
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) AS n FROM demo.events")
        assert cur.fetchone() == (5000,)
        cur.execute("SELECT kind, count(*) AS n FROM demo.events GROUP BY kind ORDER BY kind")
        table = cur.fetch_arrow_table()
    assert table.column_names == ["kind", "n"]
    assert table.schema.field("n").type == pa.int64()
    assert sum(table.column("n").to_pylist()) == 5000


def test_parameters_bind_through_prepared_statements(conn):
    with conn.cursor() as cur:
        cur.execute("SELECT kind FROM demo.events GROUP BY kind ORDER BY kind LIMIT 1")
        kind = cur.fetchone()[0]
        cur.execute("SELECT count(*) FROM demo.events WHERE kind = $1", parameters=(kind,))
        (n,) = cur.fetchone()
        cur.execute("SELECT count(*) FROM demo.events WHERE kind = 'no such kind' OR kind = $1", parameters=(kind,))
        assert cur.fetchone() == (n,)
    assert 0 < n < 5000


def test_statements_that_write(conn):
    with conn.cursor() as cur:
        cur.execute("CREATE COLLECTION IF NOT EXISTS flight_docs")
        cur.execute("""INSERT INTO flight_docs VALUES ('{"_id": "a", "v": 1}'), ('{"_id": "b", "v": 2}')""")
        assert cur.fetchone() == ("INSERT", 2)
        cur.execute("SELECT sum(v) FROM flight_docs")
        assert cur.fetchone() == (3,)


def test_large_results_stream(conn):
    with conn.cursor() as cur:
        cur.execute("SELECT value AS v, value * 2 AS w FROM generate_series(1, 2000000)")
        reader = cur.fetch_record_batch()
        rows, total, batches = 0, 0, 0
        for batch in reader:
            batches += 1
            rows += batch.num_rows
            total += pa.compute.sum(batch.column(0)).as_py()
    assert rows == 2_000_000
    assert total == 2_000_000 * 2_000_001 // 2
    assert batches > 1, "the result arrives in several batches, not as one"


def test_errors_name_the_problem(conn):
    with conn.cursor() as cur:
        with pytest.raises(Exception) as e:
            cur.execute("SELECT * FROM no_such_collection")
        assert "42P01" in str(e.value) or "not found" in str(e.value)
        with pytest.raises(Exception) as e:
            cur.execute("SELEC 1")
        assert "42601" in str(e.value)
        # The connection still works.
        cur.execute("SELECT 1 + 1")
        assert cur.fetchone() == (2,)


def test_metadata_calls_list_workspaces_collections_and_columns(conn):
    """ADBC's catalog calls: workspaces are schemas, collections tables, with their Arrow schema."""
    with conn.cursor() as cur:
        cur.execute("CREATE COLLECTION IF NOT EXISTS flight_meta")
        cur.execute("""INSERT INTO flight_meta VALUES ('{"_id": "m1", "n": 1, "name": "x", "tags": ["a"]}')""")
    assert "TABLE" in conn.adbc_get_table_types()
    objects = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
    assert [c["catalog_name"] for c in objects] == ["basalt"]
    schemas = {s["db_schema_name"]: s for s in objects[0]["catalog_db_schemas"]}
    assert {"commons", "demo"} <= set(schemas)
    tables = {t["table_name"]: t["table_type"] for t in schemas["commons"]["db_schema_tables"]}
    assert tables.get("flight_meta") == "TABLE"
    # Patterns narrow the listing on the server.
    only = conn.adbc_get_objects(depth="tables", db_schema_filter="demo", table_name_filter="ev%").read_all()
    names = [t["table_name"] for c in only.to_pylist() for s in c["catalog_db_schemas"] for t in s["db_schema_tables"]]
    assert names == ["events"]
    schema = conn.adbc_get_table_schema("flight_meta", db_schema_filter="commons")
    assert schema.field("_id").type == pa.string()
    assert schema.field("n").type == pa.int64()
    assert schema.field("name").type == pa.string()
    assert schema.field("tags").type == pa.list_(pa.string())


def _flight_sql_command(sql: str) -> bytes:
    """A `CommandStatementQuery` in its `Any` wrapper, encoded by hand (pyarrow has no Flight SQL
    messages): what ADBC sends as a GetFlightInfo descriptor."""
    def varint(n):
        out = b""
        while True:
            b, n = n & 0x7F, n >> 7
            if not n:
                return out + bytes([b])
            out += bytes([b | 0x80])

    def field(number, data):
        return bytes([(number << 3) | 2]) + varint(len(data)) + data

    type_url = b"type.googleapis.com/arrow.flight.protocol.sql.CommandStatementQuery"
    return field(1, type_url) + field(2, field(1, sql.encode()))


def _plans_counted(basalt, metric: str = "basalt_flight_plans_total") -> dict:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{basalt.http_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    counts = {"reused": 0, "planned": 0}
    for line in text.splitlines():
        if line.startswith(metric + "{"):
            label = line.split('plan="', 1)[1].split('"', 1)[0]
            counts[label] = int(float(line.rsplit(" ", 1)[1]))
    return counts


def _counted(basalt) -> tuple:
    plans = _plans_counted(basalt)
    prepared = _plans_counted(basalt, "basalt_flight_prepared_plans_total")
    return plans["reused"], plans["planned"], prepared["reused"], prepared["planned"]


def test_adbc_statements_are_planned_once(conn, basalt):
    """ADBC prepares each new statement text, then gets its FlightInfo and its data: the plan made
    when it was prepared serves both. Running the same text again plans again (a kept plan is
    used once), with the same answer."""
    sql = "SELECT kind, count(*) AS n FROM demo.events WHERE kind IS NOT NULL GROUP BY kind ORDER BY kind"
    with conn.cursor() as cur:
        before = _counted(basalt)
        cur.execute(sql)
        first = cur.fetch_arrow_table()
        after_first = _counted(basalt)
        # DoGet and GetFlightInfo both used the prepared plan.
        assert tuple(a - b for a, b in zip(after_first, before)) == (1, 0, 1, 0)
        cur.execute(sql)
        second = cur.fetch_arrow_table()
        after_second = _counted(basalt)
        # Same text on the same cursor: not prepared again; GetFlightInfo plans, DoGet reuses that.
        assert tuple(a - b for a, b in zip(after_second, after_first)) == (1, 0, 0, 1)
    assert first.equals(second)
    assert sum(first.column("n").to_pylist()) == 5000


def test_a_ticket_runs_the_plan_made_for_it_and_plans_again_when_used_twice(basalt):
    """GetFlightInfo plans the query once and DoGet runs that plan; the same ticket fetched
    again (the kept plan is used once) plans again from its SQL and answers the same."""
    import pyarrow.flight as flight

    client = flight.FlightClient(f"grpc://127.0.0.1:{basalt.flight_port}")
    sql = "SELECT kind, count(*) AS n FROM demo.events GROUP BY kind ORDER BY kind"
    before = _plans_counted(basalt)
    info = client.get_flight_info(flight.FlightDescriptor.for_command(_flight_sql_command(sql)))
    assert info.schema.names == ["kind", "n"]
    first = client.do_get(info.endpoints[0].ticket).read_all()
    mid = _plans_counted(basalt)
    assert (mid["reused"] - before["reused"], mid["planned"] - before["planned"]) == (1, 0)
    second = client.do_get(info.endpoints[0].ticket).read_all()
    after = _plans_counted(basalt)
    assert (after["reused"] - mid["reused"], after["planned"] - mid["planned"]) == (0, 1)
    assert first.equals(second)
    assert first.schema.equals(info.schema)
    assert sum(first.column("n").to_pylist()) == 5000
    client.close()
