//! Where a leaf keeps its immutable segments: an `object_store` (a local directory by default,
//! S3 by configuration). The leaf's shard code is synchronous; this wrapper runs object store
//! calls on a small runtime of its own, so it can be called from any thread.
//!
//! Segments are read through local files ([`SegmentStore::local_file`]), which the leaf maps
//! into memory: a local store's own files, or for a remote store a cache directory on the
//! leaf's disk that every put writes through and every read fills. Objects are immutable
//! (names carry a generation), so a cached file never goes stale; it goes when its object is
//! deleted.

use std::path::PathBuf;
use std::sync::Arc;

use basalt_common::{BasaltError, Result};
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

fn store_err(e: impl std::fmt::Display) -> BasaltError {
    BasaltError::unavailable(format!("segment store: {e}"))
}

/// Handle to the segment store; cheap to clone.
#[derive(Clone)]
pub struct SegmentStore(Arc<Inner>);

struct Inner {
    store: Arc<dyn ObjectStore>,
    /// Root directory when the store is the local file system: puts are fsynced there, since
    /// `LocalFileSystem` does not sync (the write-ahead log is truncated once a manifest is put).
    local_root: Option<PathBuf>,
    /// For a remote store: where local copies of its objects live.
    cache: Option<PathBuf>,
    runtime: Option<tokio::runtime::Runtime>,
    description: String,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which is not allowed inside async code; let it go instead.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl SegmentStore {
    /// Open a store from a URL: `s3://bucket/prefix` (credentials, region and endpoint from the
    /// usual `AWS_*` environment variables), `file:///path`, or a plain directory path. A remote
    /// store keeps local copies of its objects under `cache`.
    pub fn open(location: &str, cache: &std::path::Path) -> Result<SegmentStore> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("segment-io")
            .enable_all()
            .build()
            .map_err(store_err)?;
        let (store, local_root): (Arc<dyn ObjectStore>, Option<PathBuf>) =
            if let Some(rest) = location.strip_prefix("s3://") {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                let s3 = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_allow_http(true)
                    .build()
                    .map_err(store_err)?;
                let s3: Arc<dyn ObjectStore> = Arc::new(s3);
                let prefix = prefix.trim_matches('/');
                if prefix.is_empty() {
                    (s3, None)
                } else {
                    (Arc::new(object_store::prefix::PrefixStore::new(s3, prefix)), None)
                }
            } else {
                let dir = PathBuf::from(location.strip_prefix("file://").unwrap_or(location));
                std::fs::create_dir_all(&dir).map_err(store_err)?;
                let dir = dir.canonicalize().map_err(store_err)?;
                // A merged index's directory goes with its last file, not left behind empty.
                let fs = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                    .map_err(store_err)?
                    .with_automatic_cleanup(true);
                (Arc::new(fs), Some(dir))
            };
        let cache = match local_root {
            Some(_) => None,
            None => {
                std::fs::create_dir_all(cache).map_err(store_err)?;
                Some(cache.to_path_buf())
            }
        };
        Ok(SegmentStore(Arc::new(Inner {
            store,
            local_root,
            cache,
            runtime: Some(runtime),
            description: location.to_string(),
        })))
    }

    pub fn description(&self) -> &str {
        &self.0.description
    }

    fn run<T: Send + 'static>(
        &self,
        fut: impl std::future::Future<Output = object_store::Result<T>> + Send + 'static,
    ) -> Result<T> {
        let rt = self.0.runtime.as_ref().ok_or_else(|| store_err("shut down"))?;
        // A std channel, not a JoinHandle: polling a tokio handle from inside another runtime's
        // task uses that task's cooperative budget and can wait forever for a deferred wake.
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().map_err(|_| store_err("segment io task ended"))?.map_err(store_err)
    }

    /// Write an object; durable when this returns.
    pub fn put(&self, path: &str, data: Bytes) -> Result<()> {
        let store = self.0.store.clone();
        let location = ObjectPath::from(path);
        if let Some(cache) = &self.0.cache {
            // Written through, so a segment just flushed is mapped without a download.
            write_cache_file(&cache.join(path), &data)?;
        }
        self.run(async move { store.put(&location, PutPayload::from(data)).await.map(|_| ()) })?;
        if let Some(root) = &self.0.local_root {
            let file = root.join(path);
            std::fs::File::open(&file).and_then(|f| f.sync_all()).map_err(store_err)?;
            if let Some(parent) = file.parent() {
                std::fs::File::open(parent).and_then(|f| f.sync_all()).map_err(store_err)?;
            }
        }
        Ok(())
    }

    /// Read an object; `None` if it does not exist.
    pub fn get(&self, path: &str) -> Result<Option<Bytes>> {
        let store = self.0.store.clone();
        let location = ObjectPath::from(path);
        self.run(async move {
            match store.get(&location).await {
                Ok(r) => r.bytes().await.map(Some),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        })
    }

    /// A local file holding the object (for a remote store, its cached copy, downloaded
    /// first if need be); `None` if the object does not exist. The file never changes; it may
    /// be unlinked when the object is deleted (a mapping of it stays valid).
    pub fn local_file(&self, path: &str) -> Result<Option<PathBuf>> {
        if let Some(root) = &self.0.local_root {
            let file = root.join(path);
            return Ok(file.exists().then_some(file));
        }
        let Some(cache) = &self.0.cache else { return Err(store_err("no local cache")) };
        let file = cache.join(path);
        if file.exists() {
            return Ok(Some(file));
        }
        let Some(bytes) = self.get(path)? else { return Ok(None) };
        write_cache_file(&file, &bytes)?;
        Ok(Some(file))
    }

    /// Delete an object (missing objects are fine).
    pub fn delete(&self, path: &str) -> Result<()> {
        if let Some(cache) = &self.0.cache {
            missing_is_fine(std::fs::remove_file(cache.join(path)))?;
        }
        let store = self.0.store.clone();
        let location = ObjectPath::from(path);
        self.run(async move {
            match store.delete(&location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(e),
            }
        })
    }

    /// Every object under a prefix.
    pub fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let store = self.0.store.clone();
        let location = ObjectPath::from(prefix);
        self.run(async move {
            let metas: Vec<_> = store.list(Some(&location)).try_collect().await?;
            Ok(metas.into_iter().map(|m| m.location.to_string()).collect())
        })
    }

    /// Delete every object under a prefix.
    pub fn delete_prefix(&self, prefix: &str) -> Result<()> {
        for path in self.list(prefix)? {
            self.delete(&path)?;
        }
        if let Some(cache) = &self.0.cache {
            missing_is_fine(std::fs::remove_dir_all(cache.join(prefix)))?;
        }
        Ok(())
    }

    /// Remove cached copies under `prefix` that `keep` (paths relative to the prefix) does not
    /// name: left by a process that died between a delete of the object and of its copy.
    pub fn prune_cache(&self, prefix: &str, keep: &std::collections::HashSet<String>) -> Result<usize> {
        let Some(cache) = &self.0.cache else { return Ok(0) };
        let root = cache.join(prefix);
        let mut removed = 0;
        let mut dirs = vec![root.clone()];
        while let Some(dir) = dirs.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(store_err(e)),
            };
            for entry in entries {
                let path = entry.map_err(store_err)?.path();
                if path.is_dir() {
                    dirs.push(path);
                    continue;
                }
                let rel = path.strip_prefix(&root).map_err(store_err)?.to_string_lossy().to_string();
                if !keep.contains(&rel) {
                    std::fs::remove_file(&path).map_err(store_err)?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}

/// A removal of something already gone is a success.
fn missing_is_fine(removed: std::io::Result<()>) -> Result<()> {
    match removed {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(store_err(e)),
        _ => Ok(()),
    }
}

/// Write a cache file whole or not at all (a temporary file renamed into place), so a reader
/// never maps a partial copy.
fn write_cache_file(file: &std::path::Path, data: &[u8]) -> Result<()> {
    if let Some(parent) = file.parent() {
        std::fs::create_dir_all(parent).map_err(store_err)?;
    }
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = file.with_extension(format!("tmp-{}-{n}", std::process::id()));
    std::fs::write(&tmp, data).map_err(store_err)?;
    std::fs::rename(&tmp, file).map_err(store_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_store_round_trip_from_async_code() {
        let dir = tempfile::tempdir().unwrap();
        let store = SegmentStore::open(dir.path().to_str().unwrap(), &dir.path().join("cache")).unwrap();
        // Many calls from one async task (this used to exhaust the task's cooperative budget
        // and hang).
        for i in 0..300 {
            assert_eq!(store.get(&format!("none/{i}")).unwrap(), None);
        }
        assert_eq!(store.get("a/b.bin").unwrap(), None);
        store.put("a/b.bin", Bytes::from_static(b"hello")).unwrap();
        store.put("a/c.bin", Bytes::from_static(b"x")).unwrap();
        assert_eq!(store.get("a/b.bin").unwrap().as_deref(), Some(&b"hello"[..]));
        let mut listed = store.list("a").unwrap();
        listed.sort();
        assert_eq!(listed, vec!["a/b.bin".to_string(), "a/c.bin".to_string()]);
        store.delete_prefix("a").unwrap();
        assert!(store.list("a").unwrap().is_empty());
        store.delete("a/b.bin").unwrap();
    }
}
