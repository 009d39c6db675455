//! The .slt suite against `basalt dev` and against a leaf + tailer + aggregator deployment.

use basalt_cluster_tests::{Deployment, slt};

fn slt_dir() -> std::path::PathBuf {
    // The test runner sets the package directory at run time; the compile-time one can be stale
    // when a shared target directory holds a binary built from another checkout.
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string());
    std::path::Path::new(&dir).join("slt")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slt_against_dev() {
    let d = Deployment::dev().await;
    slt::run_dir(&slt_dir(), d.pg_port).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slt_against_three_processes() {
    let d = Deployment::cluster().await;
    slt::run_dir(&slt_dir(), d.pg_port).await;
}

/// Two leaf processes: a collection's shards are spread over both, and every query over a
/// multi-shard collection runs fragments on each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slt_against_two_leaves() {
    let d = Deployment::cluster_of(2, &[]).await;
    slt::run_dir(&slt_dir(), d.pg_port).await;
}
