//! The `basalt` binary: one process per tier (`leaf`, `tailer`, `aggregator`) or all tiers in
//! one process (`dev`, the embedded default). Every option is a flag, a `BASALT_*` environment
//! variable, or a key in the TOML file given with `--config` (flag and environment win).

mod demo;
mod load;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use basalt_aggregator::engine::Engine;
use basalt_common::api::{CollectionName, Leaf, Meta, Tailer, WriteInput, WriteRequest};
use clap::{Args, Parser, Subcommand};
use serde::Deserialize;
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(
    name = "basalt",
    version,
    about = "Basalt: real-time analytics on semi-structured data (aggregator-leaf-tailer)"
)]
struct Cli {
    /// TOML file with option values (keys as the long flag names with '_' for '-').
    #[arg(long, global = true, env = "BASALT_CONFIG")]
    config: Option<PathBuf>,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `basalt_leaf=debug`.
    #[arg(long, global = true, env = "BASALT_LOG")]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every tier in this process (local storage, the embedded default), Kafka sources
    /// included (see `basalt tailer --help` for their settings).
    Dev(DevArgs),
    /// Run a leaf: stores shards (row store, column store, search index) and hosts the catalog.
    /// Serves Arrow Flight RPC on --rpc-addr to tailers and aggregators.
    Leaf(LeafArgs),
    /// Run a tailer: validates writes and routes each document to the shard that owns its _id,
    /// and ingests the partitions of Kafka sources (CREATE SOURCE) it is assigned; tailers split
    /// partitions among themselves through leases in the catalog. Reaches the leaf (and the
    /// catalog it hosts) at --leaf-addr; serves RPC on --rpc-addr. Kafka client settings such as
    /// credentials come from BASALT_KAFKA_<SETTING> environment variables (librdkafka names,
    /// dots as underscores, e.g. BASALT_KAFKA_SASL_USERNAME), never from SQL.
    Tailer(TailerArgs),
    /// Run an aggregator: SQL over the PostgreSQL wire protocol and the HTTP API. Reaches the
    /// leaf at --leaf-addr and the tailer at --tailer-addr.
    Aggregator(AggregatorArgs),
    /// Bulk-load the objects under an S3 prefix (JSON lines, CSV, Parquet) into a collection
    /// through a running Basalt, with progress; S3 credentials come from the tailers' AWS_*
    /// environment.
    Load(load::LoadArgs),
}

#[derive(Args, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct DevArgs {
    /// Directory for all data [default: ./basalt-data]
    #[arg(long, env = "BASALT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// PostgreSQL wire protocol address [default: 127.0.0.1:5433]
    #[arg(long, env = "BASALT_PG_ADDR")]
    pg_addr: Option<SocketAddr>,
    /// HTTP API address [default: 127.0.0.1:8088]
    #[arg(long, env = "BASALT_HTTP_ADDR")]
    http_addr: Option<SocketAddr>,
    /// Arrow Flight SQL address [default: 127.0.0.1:50051]
    #[arg(long, env = "BASALT_FLIGHT_ADDR")]
    flight_addr: Option<SocketAddr>,
    /// Where immutable segments are stored: a directory, file:///dir, or s3://bucket/prefix
    /// (credentials, region and endpoint from AWS_* variables) [default: <data-dir>/leaf/segments]
    #[arg(long, env = "BASALT_SEGMENT_STORE")]
    segment_store: Option<String>,
    /// Flush writes to segments once they are this old (also after 65,536 new documents per
    /// shard) [default: 10000]
    #[arg(long, env = "BASALT_FLUSH_INTERVAL_MS")]
    flush_interval_ms: Option<u64>,
    /// Bytes the leaf keeps derived from stored columns for filters: narrow integer offsets, text
    /// dictionaries, text parsed as dates (past them, filters compare the stored values)
    /// [default: an eighth of the machine's or cgroup's memory, at least 1073741824]
    #[arg(long, alias = "offsets-max-bytes", env = "BASALT_FILTER_CACHE_MAX_BYTES")]
    #[serde(alias = "offsets_max_bytes")]
    filter_cache_max_bytes: Option<u64>,
    /// Load the demo dataset into demo.events (once; kept across restarts)
    #[arg(long, env = "BASALT_DEMO")]
    #[serde(default)]
    demo: bool,
}

#[derive(Args, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct LeafArgs {
    /// Directory for the leaf's shards and the catalog [default: ./basalt-data]
    #[arg(long, env = "BASALT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Where immutable segments are stored: a directory, file:///dir, or s3://bucket/prefix
    /// (credentials, region and endpoint from AWS_* variables) [default: <data-dir>/leaf/segments]
    #[arg(long, env = "BASALT_SEGMENT_STORE")]
    segment_store: Option<String>,
    /// Flush writes to segments once they are this old (also after 65,536 new documents per
    /// shard) [default: 10000]
    #[arg(long, env = "BASALT_FLUSH_INTERVAL_MS")]
    flush_interval_ms: Option<u64>,
    /// Bytes the leaf keeps derived from stored columns for filters: narrow integer offsets, text
    /// dictionaries, text parsed as dates (past them, filters compare the stored values)
    /// [default: an eighth of the machine's or cgroup's memory, at least 1073741824]
    #[arg(long, alias = "offsets-max-bytes", env = "BASALT_FILTER_CACHE_MAX_BYTES")]
    #[serde(alias = "offsets_max_bytes")]
    filter_cache_max_bytes: Option<u64>,
    /// Arrow Flight RPC address [default: 127.0.0.1:50061]
    #[arg(long, env = "BASALT_RPC_ADDR")]
    rpc_addr: Option<SocketAddr>,
    /// HTTP address for /metrics and /healthz [default: 127.0.0.1:8091]
    #[arg(long, env = "BASALT_HTTP_ADDR")]
    http_addr: Option<SocketAddr>,
}

#[derive(Args, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct TailerArgs {
    /// Arrow Flight RPC address [default: 127.0.0.1:50062]
    #[arg(long, env = "BASALT_RPC_ADDR")]
    rpc_addr: Option<SocketAddr>,
    /// Leaf RPC addresses, comma-separated, in the same order everywhere: shard `s` lives on
    /// leaf `s mod n`; the first leaf hosts the catalog [default: 127.0.0.1:50061]
    #[arg(long, env = "BASALT_LEAF_ADDR", value_delimiter = ',')]
    leaf_addr: Vec<SocketAddr>,
    /// HTTP address for /metrics and /healthz [default: 127.0.0.1:8092]
    #[arg(long, env = "BASALT_HTTP_ADDR")]
    http_addr: Option<SocketAddr>,
}

#[derive(Args, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct AggregatorArgs {
    /// PostgreSQL wire protocol address [default: 127.0.0.1:5433]
    #[arg(long, env = "BASALT_PG_ADDR")]
    pg_addr: Option<SocketAddr>,
    /// HTTP API address [default: 127.0.0.1:8088]
    #[arg(long, env = "BASALT_HTTP_ADDR")]
    http_addr: Option<SocketAddr>,
    /// Arrow Flight SQL address [default: 127.0.0.1:50051]
    #[arg(long, env = "BASALT_FLIGHT_ADDR")]
    flight_addr: Option<SocketAddr>,
    /// Leaf RPC addresses, comma-separated, in the same order everywhere: shard `s` lives on
    /// leaf `s mod n`; the first leaf hosts the catalog [default: 127.0.0.1:50061]
    #[arg(long, env = "BASALT_LEAF_ADDR", value_delimiter = ',')]
    leaf_addr: Vec<SocketAddr>,
    /// Tailer RPC address [default: 127.0.0.1:50062]
    #[arg(long, env = "BASALT_TAILER_ADDR")]
    tailer_addr: Option<SocketAddr>,
}

/// Leaf addresses from the flags, else the config file, else the default.
fn leaf_addrs(flags: Vec<SocketAddr>, file: Vec<SocketAddr>) -> Vec<SocketAddr> {
    if !flags.is_empty() {
        flags
    } else if !file.is_empty() {
        file
    } else {
        vec![addr("127.0.0.1:50061")]
    }
}

/// The catalog (on the first leaf) and the leaves, shards placed `s mod n`.
fn connect_leaves(addrs: &[SocketAddr]) -> Result<(Meta, Leaf), String> {
    let clients = addrs
        .iter()
        .map(|a| basalt_rpc::Client::connect(*a).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, String>>()?;
    let first = clients.first().cloned().ok_or("at least one leaf address is needed")?;
    let meta: Meta = Arc::new(first);
    let leaves: Vec<Leaf> = clients.into_iter().map(|c| Arc::new(c) as Leaf).collect();
    let leaf = basalt_common::placement::PlacedLeaves::build(leaves).map_err(|e| e.to_string())?;
    Ok((meta, leaf))
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| panic!("built-in default address {s} is valid: {e}"))
}

/// Options from the TOML file for one role, or defaults when there is no file.
fn file_options<T: for<'de> Deserialize<'de> + Default>(path: Option<&PathBuf>) -> Result<T, String> {
    let Some(path) = path else { return Ok(T::default()) };
    let text = std::fs::read_to_string(path).map_err(|e| format!("read config {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("config {}: {e}", path.display()))
}

async fn bind(what: &str, a: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(a).await.map_err(|e| format!("cannot listen for {what} on {a}: {e}"))
}

fn spawn_server<F>(what: &'static str, fut: F)
where
    F: std::future::Future<Output = std::io::Result<()>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = fut.await {
            tracing::error!(error = %e, "{what} server stopped");
            std::process::exit(1);
        }
    });
}

async fn load_demo(meta: &Meta, tailer: &Tailer) -> Result<(), String> {
    let name = CollectionName::new("demo", "events");
    if meta.get_collection(name.clone()).await.is_ok() {
        tracing::info!("demo.events exists; not loading the demo again");
        return Ok(());
    }
    meta.create_workspace("demo".into(), true).await.map_err(|e| e.to_string())?;
    meta.create_collection(name.clone(), 2, true).await.map_err(|e| e.to_string())?;
    let events = demo::events();
    let total = events.len();
    let mut done = 0;
    for chunk in events.chunks(1000) {
        let inputs = chunk.iter().map(|doc| WriteInput::Upsert { doc: doc.clone() }).collect();
        let resp = tailer.write(WriteRequest { collection: name.clone(), inputs }).await.map_err(|e| e.to_string())?;
        if let Some(bad) = resp.statuses.iter().find(|s| !s.is_ok()) {
            return Err(format!("demo document failed: {bad:?}"));
        }
        done += chunk.len();
        tracing::info!(loaded = done, total, "loading demo.events");
    }
    Ok(())
}

fn print_connect(pg: SocketAddr, http: SocketAddr, flight: SocketAddr) {
    println!("Basalt is ready.");
    println!("  SQL:  psql -h {} -p {} -U basalt", pg.ip(), pg.port());
    println!("  Arrow Flight SQL: grpc://{flight} (adbc-driver-flightsql, pyarrow)");
    println!(
        "  HTTP: curl -s http://{http}/v1/query -H 'content-type: application/json' -d '{{\"sql\": \"SELECT count(*) FROM demo.events\"}}'"
    );
    println!("  Metrics: http://{http}/metrics");
}

fn open_local(
    data_dir: &std::path::Path,
    segment_store: Option<String>,
    flush_interval_ms: Option<u64>,
    filter_cache_max_bytes: Option<u64>,
) -> Result<(Meta, basalt_leaf::Leaf), String> {
    basalt_leaf::columns::set_filter_cache_max_bytes(
        filter_cache_max_bytes.unwrap_or_else(basalt_leaf::columns::default_filter_cache_max_bytes),
    );
    let meta: Meta = Arc::new(basalt_meta::LocalMeta::open(&data_dir.join("meta")).map_err(|e| e.to_string())?);
    let leaf = basalt_leaf::Leaf::open(&basalt_leaf::LeafConfig {
        data_dir: data_dir.join("leaf"),
        segment_store,
        flush: basalt_leaf::FlushPolicy {
            max_age: std::time::Duration::from_millis(flush_interval_ms.unwrap_or(10_000)),
            ..Default::default()
        },
        ..Default::default()
    })
    .map_err(|e| e.to_string())?;
    Ok((meta, leaf))
}

async fn run(cli: Cli) -> Result<(), String> {
    let mut local_leaf: Option<basalt_leaf::Leaf> = None;
    match cli.command {
        Command::Load(args) => return load::run(args).await,
        Command::Dev(args) => {
            let file: DevArgs = file_options(cli.config.as_ref())?;
            let data_dir = args.data_dir.or(file.data_dir).unwrap_or_else(|| PathBuf::from("basalt-data"));
            let pg_addr = args.pg_addr.or(file.pg_addr).unwrap_or_else(|| addr("127.0.0.1:5433"));
            let http_addr = args.http_addr.or(file.http_addr).unwrap_or_else(|| addr("127.0.0.1:8088"));
            let flight_addr = args.flight_addr.or(file.flight_addr).unwrap_or_else(|| addr("127.0.0.1:50051"));
            let (meta, leaf_impl) = open_local(
                &data_dir,
                args.segment_store.or(file.segment_store),
                args.flush_interval_ms.or(file.flush_interval_ms),
                args.filter_cache_max_bytes.or(file.filter_cache_max_bytes),
            )?;
            local_leaf = Some(leaf_impl.clone());
            let leaf: Leaf = Arc::new(basalt_fragment::FragmentLeaf::new(Arc::new(leaf_impl)));
            let tailer: Tailer = Arc::new(basalt_tailer::Tailer::new(meta.clone(), leaf.clone(), Default::default()));
            if args.demo || file.demo {
                load_demo(&meta, &tailer).await?;
            }
            basalt_tailer::sources::SourceRunner::spawn(meta.clone(), leaf.clone(), Default::default());
            let engine = Engine::new(meta, tailer, leaf);
            let pg = bind("postgres wire protocol", pg_addr).await?;
            let http = bind("http", http_addr).await?;
            let flight = bind("flight sql", flight_addr).await?;
            spawn_server("pgwire", basalt_aggregator::pg::serve(pg, engine.clone()));
            spawn_server("flight sql", basalt_aggregator::flight::serve(flight, engine.clone()));
            spawn_server("http", basalt_aggregator::http::serve(http, engine));
            tracing::info!(data_dir = %data_dir.display(), %pg_addr, %http_addr, %flight_addr, "basalt dev running");
            print_connect(pg_addr, http_addr, flight_addr);
        }
        Command::Leaf(args) => {
            let file: LeafArgs = file_options(cli.config.as_ref())?;
            let data_dir = args.data_dir.or(file.data_dir).unwrap_or_else(|| PathBuf::from("basalt-data"));
            let rpc_addr = args.rpc_addr.or(file.rpc_addr).unwrap_or_else(|| addr("127.0.0.1:50061"));
            let http_addr = args.http_addr.or(file.http_addr).unwrap_or_else(|| addr("127.0.0.1:8091"));
            let (meta, leaf) = open_local(
                &data_dir,
                args.segment_store.or(file.segment_store),
                args.flush_interval_ms.or(file.flush_interval_ms),
                args.filter_cache_max_bytes.or(file.filter_cache_max_bytes),
            )?;
            local_leaf = Some(leaf.clone());
            let services = basalt_rpc::Services {
                leaf: Some(Arc::new(basalt_fragment::FragmentLeaf::new(Arc::new(leaf)))),
                meta: Some(meta),
                tailer: None,
            };
            let rpc = bind("rpc", rpc_addr).await?;
            let http = bind("http", http_addr).await?;
            spawn_server("rpc", basalt_rpc::serve(rpc, services));
            spawn_server("http", basalt_aggregator::http::serve_ops(http));
            tracing::info!(data_dir = %data_dir.display(), %rpc_addr, %http_addr, "basalt leaf running");
        }
        Command::Tailer(args) => {
            let file: TailerArgs = file_options(cli.config.as_ref())?;
            let rpc_addr = args.rpc_addr.or(file.rpc_addr).unwrap_or_else(|| addr("127.0.0.1:50062"));
            let leaf_addr = leaf_addrs(args.leaf_addr, file.leaf_addr);
            let http_addr = args.http_addr.or(file.http_addr).unwrap_or_else(|| addr("127.0.0.1:8092"));
            let (meta, leaf) = connect_leaves(&leaf_addr)?;
            let tailer: Tailer = Arc::new(basalt_tailer::Tailer::new(meta.clone(), leaf.clone(), Default::default()));
            basalt_tailer::sources::SourceRunner::spawn(meta, leaf, Default::default());
            let services = basalt_rpc::Services { leaf: None, meta: None, tailer: Some(tailer) };
            let rpc = bind("rpc", rpc_addr).await?;
            let http = bind("http", http_addr).await?;
            spawn_server("rpc", basalt_rpc::serve(rpc, services));
            spawn_server("http", basalt_aggregator::http::serve_ops(http));
            tracing::info!(%rpc_addr, ?leaf_addr, %http_addr, "basalt tailer running");
        }
        Command::Aggregator(args) => {
            let file: AggregatorArgs = file_options(cli.config.as_ref())?;
            let pg_addr = args.pg_addr.or(file.pg_addr).unwrap_or_else(|| addr("127.0.0.1:5433"));
            let http_addr = args.http_addr.or(file.http_addr).unwrap_or_else(|| addr("127.0.0.1:8088"));
            let flight_addr = args.flight_addr.or(file.flight_addr).unwrap_or_else(|| addr("127.0.0.1:50051"));
            let leaf_addr = leaf_addrs(args.leaf_addr, file.leaf_addr);
            let tailer_addr = args.tailer_addr.or(file.tailer_addr).unwrap_or_else(|| addr("127.0.0.1:50062"));
            let (meta, leaf) = connect_leaves(&leaf_addr)?;
            let tailer = basalt_rpc::Client::connect(tailer_addr).map_err(|e| e.to_string())?;
            let engine = Engine::new(meta, Arc::new(tailer), leaf);
            let pg = bind("postgres wire protocol", pg_addr).await?;
            let http = bind("http", http_addr).await?;
            let flight = bind("flight sql", flight_addr).await?;
            spawn_server("pgwire", basalt_aggregator::pg::serve(pg, engine.clone()));
            spawn_server("flight sql", basalt_aggregator::flight::serve(flight, engine.clone()));
            spawn_server("http", basalt_aggregator::http::serve(http, engine));
            tracing::info!(%pg_addr, %http_addr, %flight_addr, ?leaf_addr, %tailer_addr, "basalt aggregator running");
            print_connect(pg_addr, http_addr, flight_addr);
        }
    }
    shutdown_signal().await;
    tracing::info!("shutting down");
    if let Some(leaf) = local_leaf {
        // Not needed for durability (the log has every write); it makes the next start faster.
        match tokio::task::spawn_blocking(move || leaf.shutdown()).await {
            Ok(r) => tracing::info!(flushed = r.flushed, busy = r.busy, failed_shards = r.failed, "flushed segments"),
            Err(e) => tracing::warn!(error = %e, "flush at shutdown did not finish"),
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Turn transparent huge pages off for this process unless `MIMALLOC_ALLOW_THP` says
/// otherwise (what mimalloc does with `MIMALLOC_ALLOW_THP=0`): as a fresh process's heap grows,
/// the kernel zeroes a whole 2 MiB page on the first touch of each, and the first queries after
/// a start paid for it. Two leaf processes at SF 1: TPC-H q5's first runs 120, 81, 65 ms with huge
/// pages, 63, 79, 59 without; q3 50-95 against 37-44; the same once warm (docs/BENCHMARKS.md).
fn without_huge_pages() {
    #[cfg(target_os = "linux")]
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: PR_SET_THP_DISABLE takes an integer flag and touches no memory of ours.
        let failed = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0;
        if failed {
            tracing::debug!("could not turn transparent huge pages off: {}", std::io::Error::last_os_error());
        }
    }
}

/// mimalloc's `mi_option_purge_delay` (its `mi_option_e`, v2 and v3 alike).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;
/// Freed memory is never handed back to the kernel (mimalloc's `-1`; its default purges what is
/// free 1 s after a free).
const PURGE_DELAY_MS: std::ffi::c_long = -1;

unsafe extern "C" {
    /// mimalloc's option setter (in the allocator the `mimalloc` crate links).
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// Keep freed memory for reuse (unless `MIMALLOC_PURGE_DELAY` says otherwise): a join's hash
/// tables and batches are freed and the next statement's allocated again, and memory handed
/// back is faulted in anew, every page zeroed by the kernel. mimalloc purges everything free
/// in an arena once the first free's delay expires, so under steady queries a longer delay
/// still purges every cycle. TPC-H at SF 10 on two leaves, the same build, 4 warm runs each,
/// alternated: q9 1.58-1.99 s never purging against 1.97-2.65 s with 1 s; q21 0.88-1.20 against
/// 0.99-1.42 (docs/BENCHMARKS.md, session 34). A process holds its peak: the statements' memory
/// pools bound that peak, as the leaves' cache budgets bound theirs.
fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: called first in `main`, before any other thread exists (the setter is not
        // thread-safe); it stores an integer option.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
}

fn main() -> std::process::ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    let filter = cli.log.clone().or_else(|| std::env::var("RUST_LOG").ok()).unwrap_or_else(|| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    without_huge_pages();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
