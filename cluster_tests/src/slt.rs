//! sqllogictest over the PostgreSQL wire protocol, with a real client (tokio-postgres, simple
//! query protocol). Values are compared as the server's text form; NULL prints as `NULL` and an
//! empty string as `(empty)`.

use std::path::Path;

use async_trait::async_trait;
use sqllogictest::{DBOutput, DefaultColumnType};
use tokio_postgres::SimpleQueryMessage;

pub struct PgDb {
    client: tokio_postgres::Client,
}

#[derive(Debug)]
pub struct PgError(String);

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PgError {}

#[async_trait]
impl sqllogictest::AsyncDB for PgDb {
    type Error = PgError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, PgError> {
        let messages = self.client.simple_query(sql).await.map_err(|e| {
            let text = match e.as_db_error() {
                Some(db) => format!("{}: {}", db.code().code(), db.message()),
                None => e.to_string(),
            };
            PgError(text)
        })?;
        let mut rows = Vec::new();
        let mut columns = None;
        let mut complete = 0;
        for m in messages {
            match m {
                SimpleQueryMessage::RowDescription(cols) => columns = Some(cols.len()),
                SimpleQueryMessage::Row(row) => {
                    columns = Some(row.len());
                    rows.push(
                        (0..row.len())
                            .map(|i| match row.get(i) {
                                None => "NULL".to_string(),
                                Some("") => "(empty)".to_string(),
                                Some(v) => v.to_string(),
                            })
                            .collect(),
                    );
                }
                SimpleQueryMessage::CommandComplete(n) => complete = n,
                _ => {}
            }
        }
        match columns {
            Some(n) => Ok(DBOutput::Rows { types: vec![DefaultColumnType::Any; n], rows }),
            None => Ok(DBOutput::StatementComplete(complete)),
        }
    }

    async fn shutdown(&mut self) {}

    fn engine_name(&self) -> &str {
        "basalt"
    }
}

/// Rows are compared line by line: a value with newlines (EXPLAIN plans) spans several lines.
/// Runs of whitespace inside a line compare equal; trailing whitespace and blank lines are ignored.
fn multiline_validator(_normalizer: sqllogictest::Normalizer, actual: &[Vec<String>], expected: &[String]) -> bool {
    let clean = |s: &str| s.split_ascii_whitespace().collect::<Vec<_>>().join(" ");
    let actual: Vec<String> = actual
        .iter()
        .flat_map(|row| row.join(" ").lines().map(clean).collect::<Vec<_>>())
        .filter(|l| !l.is_empty())
        .collect();
    let expected: Vec<String> =
        expected.iter().flat_map(|l| l.lines().map(clean).collect::<Vec<_>>()).filter(|l| !l.is_empty()).collect();
    actual == expected
}

/// Run every `.slt` file in `dir` (sorted) against the deployment at `pg_port`.
pub async fn run_dir(dir: &Path, pg_port: u16) {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("slt directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "slt"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .slt files in {}", dir.display());
    let mut failures = Vec::new();
    for file in files {
        let mut runner = sqllogictest::Runner::new(move || async move {
            let conn_str = format!("host=127.0.0.1 port={pg_port} user=basalt dbname=basalt");
            let (client, conn) =
                tokio_postgres::connect(&conn_str, tokio_postgres::NoTls).await.map_err(|e| PgError(e.to_string()))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(PgDb { client })
        });
        runner.with_column_validator(|_, _| true);
        runner.with_validator(multiline_validator);
        if let Err(e) = runner.run_file_async(&file).await {
            failures.push(format!("{}:\n{e}", file.display()));
        }
    }
    assert!(failures.is_empty(), "sqllogictest failures:\n{}", failures.join("\n\n"));
}
