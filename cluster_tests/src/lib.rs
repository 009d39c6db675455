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

/// The S3 API server for tests: `moto_server` from `BASALT_MOTO_SERVER`, or from the test
/// virtualenv the README test command installs it into.
pub fn moto_server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("BASALT_MOTO_SERVER") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let bin = PathBuf::from(home).join(".cache/basalt/venv/bin/moto_server");
    assert!(bin.exists(), "{} not found: run ./scripts/test.sh (it installs moto[server])", bin.display());
    bin
}

/// A running `moto_server` on loopback with one bucket; stopped on drop.
pub struct S3Server {
    pub port: u16,
    pub bucket: String,
    pub proc: Proc,
    _dir: tempfile::TempDir,
}

impl S3Server {
    pub async fn start(bucket: &str) -> S3Server {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let args = vec!["-H".to_string(), "127.0.0.1".to_string(), "-p".to_string(), port.to_string()];
        let proc = Proc::start_program("moto", &moto_server_bin(), &args, &[], dir.path());
        let client = reqwest::Client::new();
        let started = Instant::now();
        loop {
            // Creating the bucket doubles as the readiness check.
            let put = client.put(format!("http://127.0.0.1:{port}/{bucket}")).send().await;
            if put.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "moto_server did not start:\n{}", proc.log_tail());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        S3Server { port, bucket: bucket.to_string(), proc, _dir: dir }
    }

    /// Environment for a process that talks to this server through object_store.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT", format!("http://127.0.0.1:{}", self.port)),
            ("AWS_ACCESS_KEY_ID", "testing".to_string()),
            ("AWS_SECRET_ACCESS_KEY", "testing".to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Put an object.
    pub async fn put(&self, key: &str, body: Vec<u8>) {
        self.handle().put(key, body).await
    }

    /// A handle to the bucket that can move into a task.
    pub fn handle(&self) -> S3Bucket {
        S3Bucket { port: self.port, bucket: self.bucket.clone() }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Keys under a prefix (ListObjectsV2, first 1000).
    pub async fn list(&self, prefix: &str) -> Vec<String> {
        let url = format!("http://127.0.0.1:{}/{}?list-type=2&prefix={prefix}", self.port, self.bucket);
        let body = reqwest::get(url).await.expect("list objects").text().await.expect("list body");
        body.split("<Key>").skip(1).filter_map(|s| s.split("</Key>").next()).map(str::to_string).collect()
    }
}

/// Wait until `sql` (one count) returns `want`, for at most two minutes.
pub async fn wait_count(pg: &tokio_postgres::Client, sql: &str, want: i64, what: &str) {
    let started = Instant::now();
    loop {
        let n: i64 = pg.query_one(sql, &[]).await.map(|r| r.get(0)).unwrap_or(-1);
        if n == want {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "{what}: {n} rows, want {want}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A bucket on a running [`S3Server`].
#[derive(Clone)]
pub struct S3Bucket {
    pub port: u16,
    pub bucket: String,
}

impl S3Bucket {
    pub async fn put(&self, key: &str, body: Vec<u8>) {
        let url = format!("http://127.0.0.1:{}/{}/{key}", self.port, self.bucket);
        // moto refuses an anonymous overwrite of an existing key (403); it does not check
        // signatures, so any SigV4-shaped authorization will do.
        let auth = "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, \
                    Signature=0";
        let r = reqwest::Client::new()
            .put(url)
            .header("authorization", auth)
            .header("content-type", "application/octet-stream")
            .body(body)
            .send()
            .await
            .expect("put object");
        assert!(r.status().is_success(), "put {key}: {}", r.status());
    }
}

/// The `tansu` Kafka-protocol broker: `BASALT_TANSU`, else the one `scripts/test.sh` installs.
pub fn tansu_bin() -> PathBuf {
    if let Ok(p) = std::env::var("BASALT_TANSU") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let bin = PathBuf::from(home).join(".cache/basalt/tools/bin/tansu");
    assert!(bin.exists(), "{} not found: run ./scripts/test.sh (it installs tansu)", bin.display());
    bin
}

/// A running `tansu` broker on loopback with in-memory storage; stopped on drop.
pub struct Kafka {
    pub port: u16,
    pub proc: Proc,
    _dir: tempfile::TempDir,
}

impl Kafka {
    pub async fn start() -> Kafka {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let args: Vec<String> = vec![
            "broker".into(),
            "--listener-url".into(),
            url.clone(),
            "--advertised-listener-url".into(),
            url,
            "--storage-engine".into(),
            "memory://tansu/".into(),
        ];
        let proc = Proc::start_program("tansu", &tansu_bin(), &args, &[], dir.path());
        let started = Instant::now();
        let kafka = Kafka { port, proc, _dir: dir };
        loop {
            let brokers = kafka.brokers();
            let ready = tokio::task::spawn_blocking(move || {
                let admin: rdkafka::consumer::BaseConsumer =
                    rdkafka::ClientConfig::new().set("bootstrap.servers", &brokers).create().ok()?;
                rdkafka::consumer::Consumer::fetch_metadata(&admin, None, Duration::from_secs(1)).ok()
            })
            .await
            .ok()
            .flatten();
            if ready.is_some() {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "tansu did not start:\n{}", kafka.proc.log_tail());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        kafka
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub async fn create_topic(&self, name: &str, partitions: i32) {
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        let admin: AdminClient<rdkafka::client::DefaultClientContext> =
            rdkafka::ClientConfig::new().set("bootstrap.servers", self.brokers()).create().expect("admin client");
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let result = admin.create_topics([&topic], &AdminOptions::new()).await.expect("create topic");
        for r in result {
            r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
        }
    }

    /// Produce `(partition, key, value)` records and wait until each is acknowledged.
    pub async fn produce(&self, topic: &str, records: Vec<(i32, Option<String>, String)>) {
        KafkaClient::new(&self.brokers()).produce(topic, records).await
    }

    pub async fn produce_bytes(&self, topic: &str, records: Vec<(i32, Option<String>, Vec<u8>)>) {
        KafkaClient::new(&self.brokers()).produce_bytes(topic, records).await
    }
}

/// A producer for a broker that runs elsewhere (a spawned task).
pub struct KafkaClient {
    brokers: String,
}

impl KafkaClient {
    pub fn new(brokers: &str) -> KafkaClient {
        KafkaClient { brokers: brokers.to_string() }
    }

    /// Produce `(partition, key, value)` records and wait until each is acknowledged.
    pub async fn produce(&self, topic: &str, records: Vec<(i32, Option<String>, String)>) {
        self.produce_bytes(topic, records.into_iter().map(|(p, k, v)| (p, k, v.into_bytes())).collect()).await
    }

    /// Produce records with binary values (Avro, for example).
    pub async fn produce_bytes(&self, topic: &str, records: Vec<(i32, Option<String>, Vec<u8>)>) {
        use rdkafka::producer::{FutureProducer, FutureRecord};
        let producer: FutureProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("linger.ms", "5")
            .create()
            .expect("producer");
        let sends = records.iter().map(|(partition, key, value)| {
            let mut record = FutureRecord::to(topic).partition(*partition).payload(value.as_slice());
            if let Some(k) = key {
                record = record.key(k.as_str());
            }
            producer.send(record, Duration::from_secs(30))
        });
        for r in futures::future::join_all(sends).await {
            r.unwrap_or_else(|(e, _)| panic!("produce: {e}"));
        }
    }
}

/// A port that was free a moment ago, and never handed out before by this process: the kernel
/// may give the same free port to two binds in a row, and two processes of one deployment then
/// race for it (seen in CI: the aggregator could not listen, and the test reached the tailer).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind an ephemeral port");
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// One `basalt` process, restartable with the same arguments. Killed on drop.
pub struct Proc {
    pub name: String,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    /// Start `basalt` with these arguments.
    pub fn start(name: &str, args: &[String], log_dir: &Path) -> Proc {
        Proc::start_program(name, &basalt_bin(), args, &[], log_dir)
    }

    /// Start any program, with extra environment variables.
    pub fn start_program(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        log_dir: &Path,
    ) -> Proc {
        let mut p = Proc {
            name: name.to_string(),
            program: program.to_path_buf(),
            args: args.to_vec(),
            env: env.to_vec(),
            log: log_dir.join(format!("{name}.log")),
            child: None,
        };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("open process log");
        let err = log.try_clone().expect("clone log handle");
        let child = Command::new(&self.program)
            .args(&self.args)
            .envs(self.env.iter().cloned())
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

    /// The running process's id (None after [`Proc::kill9`]).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Whether the process ended by itself (it is gone, or a zombie not yet waited for).
    pub fn exited(&self) -> bool {
        let Some(pid) = self.pid() else { return true };
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
            Err(_) => true,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
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

/// Wait until an HTTP endpoint of `what` answers 200 (a basalt process names itself in
/// `x-basalt-pid`: another deployment's process on the same port does not count).
pub async fn wait_http(url: &str, what: &Proc) {
    assert!(ready(url, what).await, "{} exited before it became ready:\n{}", what.name, what.log_tail());
}

/// [`wait_http`], false when the process exits first.
async fn ready(url: &str, what: &Proc) -> bool {
    let started = Instant::now();
    let client = reqwest::Client::new();
    loop {
        if let Ok(r) = client.get(url).timeout(Duration::from_secs(1)).send().await
            && r.status().is_success()
        {
            let pid = r.headers().get("x-basalt-pid").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
            if pid.is_none() || pid == what.pid() {
                return true;
            }
        }
        if what.exited() {
            return false;
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
    /// Arrow Flight SQL on the aggregator (or dev).
    pub flight_port: u16,
    pub procs: Vec<Proc>,
    pub dir: tempfile::TempDir,
    /// The leaves' RPC addresses, comma-separated, in a cluster deployment (empty for dev).
    pub leaf_addrs: String,
    /// The leaves' HTTP addresses (`/metrics`), in a cluster deployment (empty for dev, whose
    /// leaf's metrics are on `http_port`).
    pub leaf_http: Vec<String>,
    /// Environment for tailer processes (cluster deployments).
    pub tailer_env: Vec<(String, String)>,
}

impl Drop for Deployment {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for p in &self.procs {
                eprintln!("--- last lines of the {} log ---\n{}", p.name, p.log_tail());
            }
            // Again after the logs: CI shows the end of a failing test's output.
            if let Some(message) = LAST_PANIC.lock().ok().and_then(|m| m.clone()) {
                eprintln!("--- the test failed: {message}");
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

/// The message and place of the last panic, printed again after a failed deployment's logs.
static LAST_PANIC: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

fn remember_panics() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Ok(mut last) = LAST_PANIC.lock() {
                *last = Some(info.to_string());
            }
            default(info);
        }));
    });
}

impl Deployment {
    /// `basalt dev`: every tier in one process.
    pub async fn dev() -> Deployment {
        Deployment::dev_with(&[], &[]).await
    }

    /// `basalt dev` with extra arguments and environment variables.
    pub async fn dev_with(extra: &[&str], env: &[(String, String)]) -> Deployment {
        remember_panics();
        let dir = tempfile::tempdir().expect("temp dir");
        // A port free when picked may be taken by another test's process before this one
        // listens on it (`free_port` keeps apart only this test process's ports): start again
        // on other ports.
        let mut attempt = 0;
        let (p, pg_port, http_port, flight_port) = loop {
            attempt += 1;
            let (pg_port, http_port, flight_port) = (free_port(), free_port(), free_port());
            let mut args: Vec<String> = vec![
                "dev".into(),
                "--data-dir".into(),
                dir.path().join("data").display().to_string(),
                "--pg-addr".into(),
                format!("127.0.0.1:{pg_port}"),
                "--http-addr".into(),
                format!("127.0.0.1:{http_port}"),
                "--flight-addr".into(),
                format!("127.0.0.1:{flight_port}"),
            ];
            args.extend(extra.iter().map(|a| a.to_string()));
            let p = Proc::start_program("dev", &basalt_bin(), &args, env, dir.path());
            if ready(&format!("http://127.0.0.1:{http_port}/healthz"), &p).await {
                break (p, pg_port, http_port, flight_port);
            }
            assert!(
                attempt < 5 && p.log().contains("Address already in use"),
                "dev exited before it became ready:\n{}",
                p.log_tail()
            );
        };
        Deployment {
            pg_port,
            http_port,
            flight_port,
            procs: vec![p],
            dir,
            leaf_addrs: String::new(),
            leaf_http: vec![],
            tailer_env: env.to_vec(),
        }
    }

    /// Leaf, tailer and aggregator as three processes on loopback.
    pub async fn cluster() -> Deployment {
        Deployment::cluster_of(1, &[]).await
    }

    /// A cluster whose tailers get these environment variables.
    pub async fn cluster_with(tailer_env: &[(String, String)]) -> Deployment {
        Deployment::cluster_of(1, tailer_env).await
    }

    /// `leaves` leaf processes (`leaf`, `leaf2`, ...; shard `s` on leaf `s mod leaves`, the
    /// catalog on the first), a tailer and an aggregator, on loopback.
    pub async fn cluster_of(leaves: usize, tailer_env: &[(String, String)]) -> Deployment {
        remember_panics();
        let dir = tempfile::tempdir().expect("temp dir");
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let mut procs = vec![];
        let mut leaf_addrs = vec![];
        let mut waits = vec![];
        let mut leaf_http = vec![];
        for i in 0..leaves {
            let name = if i == 0 { "leaf".to_string() } else { format!("leaf{}", i + 1) };
            let (rpc, http) = (free_port(), free_port());
            let data = dir.path().join(format!("{name}-data")).display().to_string();
            let segments = if i == 0 { "segments".to_string() } else { format!("{name}-segments") };
            let segments = dir.path().join(segments).display().to_string();
            let leaf = Proc::start(
                &name,
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
                    &format!("127.0.0.1:{rpc}"),
                    "--http-addr",
                    &format!("127.0.0.1:{http}"),
                ]),
                dir.path(),
            );
            leaf_addrs.push(format!("127.0.0.1:{rpc}"));
            waits.push(format!("http://127.0.0.1:{http}/healthz"));
            leaf_http.push(format!("127.0.0.1:{http}"));
            procs.push(leaf);
        }
        let leaf_addrs = leaf_addrs.join(",");
        let (tailer_rpc, tailer_http) = (free_port(), free_port());
        let (pg_port, http_port, flight_port) = (free_port(), free_port(), free_port());
        let tailer = Proc::start_program(
            "tailer",
            &basalt_bin(),
            &s(&[
                "tailer",
                "--rpc-addr",
                &format!("127.0.0.1:{tailer_rpc}"),
                "--leaf-addr",
                &leaf_addrs,
                "--http-addr",
                &format!("127.0.0.1:{tailer_http}"),
            ]),
            tailer_env,
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
                "--flight-addr",
                &format!("127.0.0.1:{flight_port}"),
                "--leaf-addr",
                &leaf_addrs,
                "--tailer-addr",
                &format!("127.0.0.1:{tailer_rpc}"),
            ]),
            dir.path(),
        );
        for (url, leaf) in waits.iter().zip(&procs) {
            wait_http(url, leaf).await;
        }
        wait_http(&format!("http://127.0.0.1:{tailer_http}/healthz"), &tailer).await;
        wait_http(&format!("http://127.0.0.1:{http_port}/healthz"), &aggregator).await;
        procs.push(tailer);
        procs.push(aggregator);
        Deployment {
            pg_port,
            http_port,
            flight_port,
            procs,
            dir,
            leaf_addrs,
            leaf_http,
            tailer_env: tailer_env.to_vec(),
        }
    }

    /// Start one more tailer process (cluster deployments), named `name`.
    pub async fn add_tailer(&mut self, name: &str) {
        assert!(!self.leaf_addrs.is_empty(), "add_tailer needs a cluster deployment");
        let (rpc, http) = (free_port(), free_port());
        let args: Vec<String> = [
            "tailer",
            "--rpc-addr",
            &format!("127.0.0.1:{rpc}"),
            "--leaf-addr",
            &self.leaf_addrs,
            "--http-addr",
            &format!("127.0.0.1:{http}"),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        let tailer = Proc::start_program(name, &basalt_bin(), &args, &self.tailer_env, self.dir.path());
        wait_http(&format!("http://127.0.0.1:{http}/healthz"), &tailer).await;
        self.procs.push(tailer);
    }

    /// `kill -9` and restart the named processes in turn, waiting `first + step * round` before
    /// each: crashes at different points of whatever the test has running meanwhile.
    pub async fn kill_in_turn(&mut self, victims: &[&str], first: Duration, step: Duration) {
        for (round, victim) in victims.iter().enumerate() {
            tokio::time::sleep(first + step * round as u32).await;
            let p = self.proc(victim);
            p.kill9();
            p.restart();
        }
    }

    /// A SQL connection once the aggregator takes one again (after processes were restarted,
    /// it reconnects to them lazily).
    pub async fn pg_when_ready(&self) -> tokio_postgres::Client {
        loop {
            if let Ok(pg) = tokio::time::timeout(Duration::from_secs(5), self.pg()).await {
                return pg;
            }
        }
    }

    pub fn proc(&mut self, name: &str) -> &mut Proc {
        self.procs.iter_mut().find(|p| p.name == name).unwrap_or_else(|| panic!("no process {name}"))
    }

    /// The deployment's working directory (data directories live under it).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
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
