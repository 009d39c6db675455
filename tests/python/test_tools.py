"""Postgres tools against Basalt: psql's meta-commands, SQLAlchemy (reflection and ORM queries)
and pandas, through Basalt's pg_catalog emulation."""

import subprocess

import pandas as pd
import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column


def psql(basalt, *commands: str) -> str:
    args = ["psql", "-X", "-h", "127.0.0.1", "-p", str(basalt.pg_port), "-U", "basalt", "-v", "ON_ERROR_STOP=1"]
    for c in commands:
        args += ["-c", c]
    r = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def people(basalt):
    with psycopg.connect(basalt.dsn(), autocommit=True) as c:
        c.execute("CREATE WORKSPACE IF NOT EXISTS tools")
        c.execute("CREATE COLLECTION IF NOT EXISTS tools.people")
        c.execute("""INSERT INTO tools.people VALUES
            ('{"_id": "p1", "name": "Ada", "age": 36, "tags": ["math", "c,d"], "address": {"city": "London"}}'),
            ('{"_id": "p2", "name": "Grace", "age": 45, "tags": [], "address": {"city": "Arlington"}}'),
            ('{"_id": "p3", "name": "Edsger", "age": 72}')""")
    return "tools.people"


def engine(basalt) -> sa.Engine:
    return sa.create_engine(f"postgresql+psycopg://basalt@127.0.0.1:{basalt.pg_port}/basalt")


def test_psql_meta_commands_list_and_describe_collections(basalt, people):
    out = psql(basalt, r"\dn")
    assert "tools" in out and "demo" in out
    out = psql(basalt, r"\dt tools.*")
    assert "people" in out and "table" in out
    out = psql(basalt, r"\d tools.people")
    assert 'Table "tools.people"' in out
    rows = {line.split("|")[0].strip(): line.split("|")[1].strip() for line in out.splitlines() if "|" in line}
    assert rows["_id"] == "text"
    assert rows["age"] == "bigint"
    assert rows["name"] == "text"
    assert rows["tags"] == "text[]"
    assert rows["address.city"] == "text"
    # \d+ adds storage, compression, statistics target and description columns.
    out = psql(basalt, r"\d+ tools.people")
    assert 'Table "tools.people"' in out and "Storage" in out and "Description" in out
    plus = {line.split("|")[0].strip(): line.split("|")[1].strip() for line in out.splitlines() if "|" in line}
    assert plus["age"] == "bigint" and plus["tags"] == "text[]"
    # Demo data is listed too, and an unknown name says so.
    assert "events" in psql(basalt, r"\dt demo.*")
    r = subprocess.run(["psql", "-X", "-h", "127.0.0.1", "-p", str(basalt.pg_port), "-U", "basalt",
                        "-c", r"\d tools.nope"], capture_output=True, text=True, timeout=60)
    assert "Did not find any relation" in r.stderr + r.stdout


def test_driver_catalog_queries_and_settings(basalt, people):
    with psycopg.connect(basalt.dsn()) as c:
        version = c.execute("SELECT version()").fetchone()[0]
        assert version.startswith("PostgreSQL 16.0")
        assert c.execute("SHOW standard_conforming_strings").fetchone()[0] == "on"
        assert c.execute("SHOW transaction isolation level").fetchone()[0] == "read committed"
        assert c.execute("SELECT current_setting('server_version')").fetchone()[0] == "16.0"
        # psycopg's own type lookup (in a savepoint): a type Basalt lacks is None, not an error.
        assert psycopg.types.TypeInfo.fetch(c, "hstore") is None
        names = [r[0] for r in c.execute(
            "SELECT c.relname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'tools' AND c.relkind = 'r'").fetchall()]
        assert names == ["people"]
        # Arrays come back as arrays, NULLs as None.
        row = c.execute("SELECT tags, NULL AS nothing FROM tools.people WHERE _id = 'p1'").fetchone()
        assert row == (["math", "c,d"], None)


def test_sqlalchemy_reflects_collections(basalt, people):
    e = engine(basalt)
    insp = sa.inspect(e)
    assert "tools" in insp.get_schema_names()
    assert insp.get_table_names(schema="tools") == ["people"]
    assert insp.has_table("people", schema="tools")
    assert not insp.has_table("nope", schema="tools")
    columns = {c["name"]: c for c in insp.get_columns("people", schema="tools")}
    assert isinstance(columns["age"]["type"], sa.BigInteger)
    assert isinstance(columns["name"]["type"], sa.Text)
    assert isinstance(columns["tags"]["type"], sa.ARRAY)
    assert columns["_id"]["nullable"] is False
    table = sa.Table("people", sa.MetaData(), autoload_with=e, schema="tools")
    assert {"_id", "name", "age", "tags", "address.city"} <= set(table.c.keys())
    with e.connect() as c:
        rows = c.execute(sa.select(table.c.name).where(table.c.age > 40).order_by(table.c.name)).all()
    assert [r.name for r in rows] == ["Edsger", "Grace"]


def test_sqlalchemy_orm_queries(basalt, people):
    class Base(DeclarativeBase):
        pass

    class Person(Base):
        __tablename__ = "people"
        __table_args__ = {"schema": "tools"}
        id: Mapped[str] = mapped_column("_id", primary_key=True)
        name: Mapped[str]
        age: Mapped[int]

    with Session(engine(basalt)) as s:
        ada = s.get(Person, "p1")
        assert (ada.name, ada.age) == ("Ada", 36)
        older = s.scalars(sa.select(Person).where(Person.age >= 45).order_by(Person.age)).all()
        assert [p.name for p in older] == ["Grace", "Edsger"]
        assert s.scalar(sa.select(sa.func.count()).select_from(Person)) == 3
        assert s.scalar(sa.select(sa.func.avg(Person.age))) == pytest.approx(51.0)


def test_pandas_read_sql(basalt, people):
    e = engine(basalt)
    df = pd.read_sql("SELECT name, age FROM tools.people ORDER BY age", e)
    assert list(df["name"]) == ["Ada", "Grace", "Edsger"]
    assert list(df["age"]) == [36, 45, 72]
    df = pd.read_sql_table("people", e, schema="tools")
    assert len(df) == 3 and {"_id", "name", "age"} <= set(df.columns)
    with psycopg.connect(basalt.dsn()) as c:
        df = pd.read_sql("SELECT kind, count(*) AS n FROM demo.events GROUP BY kind ORDER BY kind", c)
    assert df["n"].sum() == 5000
