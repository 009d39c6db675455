"""The psql command-line client against Basalt: the README tour, statement by statement."""

import subprocess


def psql(basalt, sql: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["psql", "-X", "-h", "127.0.0.1", "-p", str(basalt.pg_port), "-U", "basalt", "-v", "ON_ERROR_STOP=1",
         "-At", *extra, "-c", sql],
        capture_output=True, text=True, timeout=60)


def ok(basalt, sql: str) -> str:
    r = psql(basalt, sql)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_readme_tour(basalt):
    assert ok(basalt, "SELECT count(*) FROM demo.events") == "5000"
    ok(basalt, "CREATE COLLECTION users")
    ok(basalt, """INSERT INTO users VALUES ('{"_id": "u1", "name": "Ada", "age": 36, "address": {"city": "London"}, "tags": ["a","b"]}')""")
    assert ok(basalt, "SELECT name, address.city FROM users WHERE age > 30") == "Ada|London"
    ok(basalt, "UPDATE users SET address.city = 'Paris' WHERE _id = 'u1'")
    assert ok(basalt, "SELECT address.city FROM users WHERE _id = 'u1'") == "Paris"
    describe = ok(basalt, "DESCRIBE users")
    assert "address.city|string|1|1|Utf8" in describe.splitlines()
    assert ok(basalt, "SELECT _id FROM users WHERE search(name, 'ada')") == "u1"
    assert "access_path=row_lookup" in ok(basalt, "EXPLAIN SELECT * FROM users WHERE _id = 'u1'")
    ok(basalt, "DELETE FROM users WHERE _id = 'u1'")
    assert ok(basalt, "SELECT count(*) FROM users") == "0"
    assert "users" in ok(basalt, "SHOW COLLECTIONS")


def test_errors_come_back_with_sqlstate(basalt):
    r = psql(basalt, "SELECT * FROM nope", "-v", "VERBOSITY=verbose")
    assert r.returncode != 0
    assert "42P01" in r.stderr


def test_script_with_several_statements(basalt, tmp_path):
    script = tmp_path / "s.sql"
    script.write_text("""
CREATE COLLECTION IF NOT EXISTS scripted;
INSERT INTO scripted VALUES ('{"_id": "a", "v": 1}'), ('{"_id": "b", "v": 2}');
SELECT sum(v) FROM scripted;
""")
    r = subprocess.run(["psql", "-X", "-h", "127.0.0.1", "-p", str(basalt.pg_port), "-U", "basalt",
                        "-v", "ON_ERROR_STOP=1", "-At", "-f", str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "3"
