//! Harness for tests that run real `basalt` processes: the embedded `dev` deployment and the
//! three-process deployment (leaf, tailer, aggregator) on loopback, with kill -9 and restart.
//!
//! The binary comes from `BASALT_BIN`, or from the cargo target directory this test was built
//! in (`cargo build -p basalt` first; the README test command does).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod slt;

pub fn basalt_bin() -> PathBuf {
    if let Ok(p) = std::env::var("BASALT_BIN") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test-binary> -> target/<profile>/basalt
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target profile directory");
    let bin = profile_dir.join("basalt");
    assert!(bin.exists(), "{} not found: run `cargo build -p basalt` first or set BASALT_BIN", bin.display());
    bin
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("bind an ephemeral port")
}

/// One `basalt` process, restartable with the same arguments. Killed on drop.
pub struct Proc {
    pub name: String,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    pub fn start(name: &str, args: &[String], log_dir: &Path) -> Proc {
        let mut p =
            Proc { name: name.to_string(), args: args.to_vec(), log: log_dir.join(format!("{name}.log")), child: None };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("open process log");
        let err = log.try_clone().expect("clone log handle");
        let child = Command::new(basalt_bin())
            .args(&self.args)
            .env("BASALT_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.name));
        self.child = Some(child);
    }

    /// SIGKILL: no shutdown, no flush.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        // Fjall's recovery chatter drowns out the rest.
        let lines: Vec<&str> = text.lines().filter(|l| !l.contains("lsm_tree")).collect();
        let keep = std::env::var("BASALT_TEST_LOG_LINES").ok().and_then(|v| v.parse().ok()).unwrap_or(40);
        lines[lines.len().saturating_sub(keep)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Wait until an HTTP endpoint answers 200.
pub async fn wait_http(url: &str, what: &Proc) {
    let started = Instant::now();
    let client = reqwest::Client::new();
    loop {
        if let Ok(r) = client.get(url).timeout(Duration::from_secs(1)).send().await
            && r.status().is_success()
        {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{} did not become ready:\n{}",
            what.name,
            what.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A running deployment: where its SQL and HTTP endpoints are. When a test fails, the end of
/// every process log is printed.
pub struct Deployment {
    pub pg_port: u16,
    pub http_port: u16,
    pub procs: Vec<Proc>,
    pub dir: tempfile::TempDir,
}

impl Drop for Deployment {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for p in &self.procs {
                eprintln!("--- last lines of the {} log ---\n{}", p.name, p.log_tail());
            }
            // BASALT_TEST_KEEP=DIR keeps the deployment's data and logs for a post-mortem.
            if let Ok(keep) = std::env::var("BASALT_TEST_KEEP") {
                for p in &mut self.procs {
                    p.kill9();
                }
                let _ = std::process::Command::new("cp").arg("-a").arg(self.dir.path()).arg(&keep).status();
                eprintln!("deployment kept in {keep}");
            }
        }
    }
}

impl Deployment {
    /// `basalt dev`: every tier in one process.
    pub async fn dev() -> Deployment {
        let dir = tempfile::tempdir().expect("temp dir");
        let (pg_port, http_port) = (free_port(), free_port());
        let args = vec![
            "dev".into(),
            "--data-dir".into(),
            dir.path().join("data").display().to_string(),
            "--pg-addr".into(),
            format!("127.0.0.1:{pg_port}"),
            "--http-addr".into(),
            format!("127.0.0.1:{http_port}"),
        ];
        let p = Proc::start("dev", &args, dir.path());
        wait_http(&format!("http://127.0.0.1:{http_port}/healthz"), &p).await;
        Deployment { pg_port, http_port, procs: vec![p], dir }
    }

    /// Leaf, tailer and aggregator as three processes on loopback.
    pub async fn cluster() -> Deployment {
        let dir = tempfile::tempdir().expect("temp dir");
        let (leaf_rpc, tailer_rpc) = (free_port(), free_port());
        let (leaf_http, tailer_http) = (free_port(), free_port());
        let (pg_port, http_port) = (free_port(), free_port());
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let data = dir.path().join("leaf-data").display().to_string();
        let segments = dir.path().join("segments").display().to_string();
        let leaf = Proc::start(
            "leaf",
            &s(&[
                "leaf",
                "--data-dir",
                &data,
                "--segment-store",
                &segments,
                // Flush often, so tests cross segment flushes and merges.
                "--flush-interval-ms",
                "200",
                "--rpc-addr",
                &format!("127.0.0.1:{leaf_rpc}"),
                "--http-addr",
                &format!("127.0.0.1:{leaf_http}"),
            ]),
            dir.path(),
        );
        let tailer = Proc::start(
            "tailer",
            &s(&[
                "tailer",
                "--rpc-addr",
                &format!("127.0.0.1:{tailer_rpc}"),
                "--leaf-addr",
                &format!("127.0.0.1:{leaf_rpc}"),
                "--http-addr",
                &format!("127.0.0.1:{tailer_http}"),
            ]),
            dir.path(),
        );
        let aggregator = Proc::start(
            "aggregator",
            &s(&[
                "aggregator",
                "--pg-addr",
                &format!("127.0.0.1:{pg_port}"),
                "--http-addr",
                &format!("127.0.0.1:{http_port}"),
                "--leaf-addr",
                &format!("127.0.0.1:{leaf_rpc}"),
                "--tailer-addr",
                &format!("127.0.0.1:{tailer_rpc}"),
            ]),
            dir.path(),
        );
        wait_http(&format!("http://127.0.0.1:{leaf_http}/healthz"), &leaf).await;
        wait_http(&format!("http://127.0.0.1:{tailer_http}/healthz"), &tailer).await;
        wait_http(&format!("http://127.0.0.1:{http_port}/healthz"), &aggregator).await;
        Deployment { pg_port, http_port, procs: vec![leaf, tailer, aggregator], dir }
    }

    pub fn proc(&mut self, name: &str) -> &mut Proc {
        self.procs.iter_mut().find(|p| p.name == name).unwrap_or_else(|| panic!("no process {name}"))
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http_port)
    }

    pub async fn pg(&self) -> tokio_postgres::Client {
        let conn_str = format!("host=127.0.0.1 port={} user=basalt dbname=basalt", self.pg_port);
        let (client, conn) =
            tokio_postgres::connect(&conn_str, tokio_postgres::NoTls).await.expect("connect over pgwire");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }
}
