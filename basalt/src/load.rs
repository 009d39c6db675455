//! `basalt load`: a one-off bulk load of the objects under an S3 prefix, through a running Basalt.
//! It creates the collection (if missing) and an S3 source that lists the prefix once, shows
//! progress (objects, bytes, documents, rate, ETA) until every object is in, then drops the
//! source. Loading goes through the same exactly-once path as any S3 source, so a load that is
//! interrupted can be resumed by running the same command with `--source` naming the source.

use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{Value, json};

#[derive(Args)]
pub struct LoadArgs {
    /// The Basalt HTTP API to load through
    #[arg(long, default_value = "http://127.0.0.1:8088", env = "BASALT_URL")]
    url: String,
    /// Collection to load into (created when missing)
    #[arg(long)]
    collection: String,
    /// Shards of the collection when it is created
    #[arg(long)]
    shards: Option<u32>,
    #[arg(long)]
    bucket: String,
    #[arg(long, default_value = "")]
    prefix: String,
    /// json (JSON lines), csv (with a header line), parquet or avro (object container files)
    #[arg(long, default_value = "json")]
    format: String,
    /// S3 API endpoint (another service than AWS), e.g. http://127.0.0.1:9000
    #[arg(long)]
    endpoint: Option<String>,
    #[arg(long)]
    region: Option<String>,
    /// Name of the load's source [default: load_<collection>_<unix time>]; an existing one is
    /// resumed
    #[arg(long)]
    source: Option<String>,
    /// Keep the source afterwards (it then keeps listing nothing new: it lists once)
    #[arg(long)]
    keep_source: bool,
    /// Read several objects at once (spread over the tailers) in no particular order, instead
    /// of one at a time in key order (which keeps the files' row order in every shard)
    #[arg(long)]
    unordered: bool,
    /// Give up when no object was found after this many seconds
    #[arg(long, default_value_t = 30)]
    empty_timeout_s: u64,
}

fn http_err(e: impl std::fmt::Display) -> String {
    format!("http: {e}")
}

async fn call(req: reqwest::RequestBuilder) -> Result<(u16, Value), String> {
    let r = req.send().await.map_err(http_err)?;
    let status = r.status().as_u16();
    let body: Value = r.json().await.map_err(http_err)?;
    Ok((status, body))
}

/// `sql` is a `SELECT count(*) ...`: its number.
async fn count(client: &reqwest::Client, url: &str, sql: &str) -> Result<i64, String> {
    let (_, body) = call(client.post(url).json(&json!({"sql": sql}))).await?;
    body["rows"][0][0].as_i64().ok_or_else(|| format!("{sql}: {}", body["error"]))
}

pub async fn run(args: LoadArgs) -> Result<(), String> {
    let client = reqwest::Client::new();
    let url = |p: &str| format!("{}{p}", args.url.trim_end_matches('/'));
    let mut create = json!({"name": args.collection});
    if let Some(n) = args.shards {
        create["shards"] = json!(n);
    }
    let (status, body) = call(client.post(url("/v1/collections")).json(&create)).await?;
    if status != 200 && status != 409 {
        return Err(format!("create collection: {body}"));
    }
    let unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let source = args.source.clone().unwrap_or_else(|| format!("load_{}_{unix}", args.collection.replace('.', "_")));
    let spec = json!({
        "name": source,
        "collection": args.collection,
        "if_not_exists": true,
        "s3": {
            "bucket": args.bucket, "prefix": args.prefix, "format": args.format,
            "endpoint": args.endpoint, "region": args.region, "poll_interval_ms": 0,
            "ordered": !args.unordered,
        },
    });
    let (status, body) = call(client.post(url("/v1/sources")).json(&spec)).await?;
    if status != 200 {
        return Err(format!("create source: {}", body["error"]));
    }
    let query = url("/v1/query");
    let count_sql = format!("SELECT count(*) FROM {}", args.collection);
    let docs_before = count(&client, &query, &count_sql).await?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
        )
        .map_err(|e| e.to_string())?,
    );
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let started = Instant::now();
    let mut last_print = Instant::now();
    let (bytes, objects, docs) = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (_, list) = call(client.get(url("/v1/sources"))).await?;
        let Some(entry) = list["data"].as_array().and_then(|d| {
            d.iter().find(|e| e["source"]["name"]["name"] == source.as_str() || e["source"]["name"] == source.as_str())
        }) else {
            return Err(format!("source {source} vanished"));
        };
        let o = &entry["objects"];
        let (found, done) = (o["found"].as_u64().unwrap_or(0), o["done"].as_u64().unwrap_or(0));
        let partitions = entry["partitions"].as_array().cloned().unwrap_or_default();
        let reading: u64 = partitions
            .iter()
            .filter(|p| p["state"] != "done" && p["partition"].as_i64().unwrap_or(-1) >= 0)
            .map(|p| p["bytes"].as_u64().unwrap_or(0))
            .sum();
        let bytes_found = o["bytes_found"].as_u64().unwrap_or(0);
        let bytes_done = (o["bytes_done"].as_u64().unwrap_or(0) + reading).min(bytes_found);
        let docs = count(&client, &query, &count_sql).await? - docs_before;
        let rate = docs as f64 / started.elapsed().as_secs_f64().max(0.001);
        let error = partitions.iter().find_map(|p| p["last_error"].as_str().map(str::to_string));
        bar.set_length(bytes_found);
        bar.set_position(bytes_done);
        bar.set_message(format!(
            "objects {done}/{found}, {docs} documents, {rate:.0} docs/s{}",
            error.as_ref().map(|e| format!(", last error: {e}")).unwrap_or_default()
        ));
        if !terminal && last_print.elapsed() > Duration::from_secs(5) {
            last_print = Instant::now();
            let eta = if bytes_done > 0 && bytes_found > bytes_done {
                let per_byte = started.elapsed().as_secs_f64() / bytes_done as f64;
                format!("{:.0} s", per_byte * (bytes_found - bytes_done) as f64)
            } else {
                "-".into()
            };
            eprintln!(
                "load {source}: objects {done}/{found}, {bytes_done}/{bytes_found} bytes, {docs} documents, \
                 {rate:.0} docs/s, ETA {eta}"
            );
        }
        if found > 0 && done == found {
            break (bytes_found, found, docs);
        }
        if found == 0 && started.elapsed() > Duration::from_secs(args.empty_timeout_s) {
            bar.abandon();
            return Err(format!(
                "no objects found under s3://{}/{} after {} s{}",
                args.bucket,
                args.prefix,
                args.empty_timeout_s,
                error.map(|e| format!(" (last error: {e})")).unwrap_or_default()
            ));
        }
    };
    bar.finish();
    let secs = started.elapsed().as_secs_f64();
    let errors = count(&client, &query, &format!("SELECT count(*) FROM {source}_errors")).await?;
    if !args.keep_source {
        let (status, body) = call(client.delete(url(&format!("/v1/sources/{source}")))).await?;
        if status != 200 {
            return Err(format!("drop source: {body}"));
        }
    }
    println!(
        "loaded {objects} objects, {bytes} bytes, {docs} documents into {} in {secs:.2} s ({:.0} docs/s, {:.1} MB/s); \
         {errors} bad records in {source}_errors",
        args.collection,
        docs as f64 / secs,
        bytes as f64 / secs / 1e6
    );
    Ok(())
}
