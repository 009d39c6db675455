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
