//! The catalog of workspaces and collections behind [`MetaApi`], with a durable local
//! implementation: one JSON file replaced atomically (write, fsync, rename, fsync directory).
//!
//! This crate knows nothing of leaves, SQL or transports. openraft will replace the local file
//! behind the same trait.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use basalt_common::api::{
    CollectionInfo, CollectionName, DEFAULT_WORKSPACE, FoundObject, MetaApi, PartitionStatus, RollupInfo, SHARDS_MAX,
    SourceInfo, SourceObject, SourceSpec, validate_identifier,
};
use basalt_common::doc::now_micros;
use basalt_common::{BasaltError, ErrorCode, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Catalog {
    next_collection_id: u64,
    workspaces: BTreeMap<String, Workspace>,
    /// Objects S3 sources found, by source id (kept while the source exists, so an object is
    /// ingested once per (key, ETag)).
    #[serde(default)]
    objects: BTreeMap<u64, Vec<SourceObject>>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Workspace {
    created_at_us: i64,
    collections: BTreeMap<String, CollectionInfo>,
    #[serde(default)]
    sources: BTreeMap<String, SourceInfo>,
}

/// How long a tailer stays a live member without a heartbeat.
pub const LEASE: std::time::Duration = std::time::Duration::from_secs(6);

/// Tailer leases and reports: in memory only (tailers renew them every second).
#[derive(Default)]
struct Members {
    seen: BTreeMap<String, (std::time::Instant, Vec<PartitionStatus>)>,
}

impl Members {
    fn live(&mut self) -> Vec<String> {
        self.seen.retain(|_, (at, _)| at.elapsed() < LEASE);
        self.seen.keys().cloned().collect()
    }
}

pub struct LocalMeta {
    path: PathBuf,
    catalog: Mutex<Catalog>,
    members: parking_lot::Mutex<Members>,
}

impl LocalMeta {
    /// Open (or create) the catalog stored in `dir/catalog.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| BasaltError::internal(format!("create {}: {e}", dir.display())))?;
        let path = dir.join("catalog.json");
        let mut catalog = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| BasaltError::internal(format!("catalog {} is corrupt: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Catalog { next_collection_id: 1, ..Default::default() }
            }
            Err(e) => return Err(BasaltError::internal(format!("read {}: {e}", path.display()))),
        };
        catalog
            .workspaces
            .entry(DEFAULT_WORKSPACE.to_string())
            .or_insert_with(|| Workspace { created_at_us: now_micros(), ..Default::default() });
        let meta = Self { path, catalog: Mutex::new(catalog.clone()), members: Default::default() };
        meta.persist(&catalog)?;
        Ok(meta)
    }

    fn persist(&self, catalog: &Catalog) -> Result<()> {
        let bytes =
            serde_json::to_vec_pretty(catalog).map_err(|e| BasaltError::internal(format!("encode catalog: {e}")))?;
        let tmp = self.path.with_extension("json.tmp");
        let io = |e: std::io::Error| BasaltError::internal(format!("write catalog {}: {e}", self.path.display()));
        let mut file = std::fs::File::create(&tmp).map_err(io)?;
        file.write_all(&bytes).map_err(io)?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        Ok(())
    }

    /// Apply a change to a copy, persist it, then publish it: a failed write changes nothing.
    async fn update<T>(&self, f: impl FnOnce(&mut Catalog) -> Result<T>) -> Result<T> {
        let mut guard = self.catalog.lock().await;
        let mut next = guard.clone();
        let out = f(&mut next)?;
        self.persist(&next)?;
        *guard = next;
        Ok(out)
    }
}

/// Names and shard count of a collection to create.
fn check_new_collection(name: &CollectionName, shards: u32) -> Result<()> {
    validate_identifier(&name.workspace)?;
    validate_identifier(&name.name)?;
    if shards == 0 || shards > SHARDS_MAX {
        return Err(BasaltError::invalid(format!("shards must be between 1 and {SHARDS_MAX}")));
    }
    Ok(())
}

/// Add a collection to the catalog; with `if_not_exists` an existing one is returned instead
/// (with `false`: not created).
fn add_collection(
    c: &mut Catalog,
    name: &CollectionName,
    shards: u32,
    if_not_exists: bool,
) -> Result<(CollectionInfo, bool)> {
    let id = c.next_collection_id;
    let ws = c.workspaces.get_mut(&name.workspace).ok_or_else(|| workspace_missing(&name.workspace))?;
    if let Some(existing) = ws.collections.get(&name.name) {
        if if_not_exists {
            return Ok((existing.clone(), false));
        }
        return Err(BasaltError::new(ErrorCode::AlreadyExists, format!("collection {name} already exists")));
    }
    let info = CollectionInfo { id, name: name.clone(), shards, created_at_us: now_micros() };
    ws.collections.insert(name.name.clone(), info.clone());
    c.next_collection_id += 1;
    tracing::info!(collection = %name, id, shards, "collection created");
    Ok((info, true))
}

fn workspace_missing(name: &str) -> BasaltError {
    BasaltError::not_found(format!("workspace {name} does not exist"))
}

#[async_trait]
impl MetaApi for LocalMeta {
    async fn create_workspace(&self, name: String, if_not_exists: bool) -> Result<()> {
        validate_identifier(&name)?;
        self.update(|c| {
            if c.workspaces.contains_key(&name) {
                if if_not_exists {
                    return Ok(());
                }
                return Err(BasaltError::new(ErrorCode::AlreadyExists, format!("workspace {name} already exists")));
            }
            c.workspaces.insert(name.clone(), Workspace { created_at_us: now_micros(), ..Default::default() });
            tracing::info!(workspace = %name, "workspace created");
            Ok(())
        })
        .await
    }

    async fn list_workspaces(&self) -> Result<Vec<String>> {
        Ok(self.catalog.lock().await.workspaces.keys().cloned().collect())
    }

    async fn create_collection(
        &self,
        name: CollectionName,
        shards: u32,
        if_not_exists: bool,
    ) -> Result<CollectionInfo> {
        check_new_collection(&name, shards)?;
        self.update(|c| add_collection(c, &name, shards, if_not_exists).map(|(info, _)| info)).await
    }

    async fn drop_collection(&self, name: CollectionName, if_exists: bool) -> Result<Option<CollectionInfo>> {
        self.update(|c| {
            let removed = c.workspaces.get_mut(&name.workspace).and_then(|ws| ws.collections.remove(&name.name));
            match removed {
                Some(info) => {
                    // Sources that fed it go with it.
                    for ws in c.workspaces.values_mut() {
                        ws.sources.retain(|_, s| s.collection != name);
                        for s in ws.sources.values_mut() {
                            s.rollups.retain(|r| r.collection != name);
                        }
                    }
                    tracing::info!(collection = %name, id = info.id, "collection dropped");
                    Ok(Some(info))
                }
                None if if_exists => Ok(None),
                None => Err(BasaltError::not_found(format!("collection {name} does not exist"))),
            }
        })
        .await
    }

    async fn get_collection(&self, name: CollectionName) -> Result<CollectionInfo> {
        let c = self.catalog.lock().await;
        let ws = c.workspaces.get(&name.workspace).ok_or_else(|| workspace_missing(&name.workspace))?;
        ws.collections
            .get(&name.name)
            .cloned()
            .ok_or_else(|| BasaltError::not_found(format!("collection {name} does not exist")))
    }

    async fn list_collections(&self, workspace: Option<String>) -> Result<Vec<CollectionInfo>> {
        let c = self.catalog.lock().await;
        if let Some(ws) = &workspace
            && !c.workspaces.contains_key(ws)
        {
            return Err(workspace_missing(ws));
        }
        Ok(c.workspaces
            .iter()
            .filter(|(name, _)| workspace.as_ref().is_none_or(|w| w == *name))
            .flat_map(|(_, ws)| ws.collections.values().cloned())
            .collect())
    }

    async fn create_source(
        &self,
        name: CollectionName,
        collection: CollectionName,
        spec: SourceSpec,
        if_not_exists: bool,
    ) -> Result<SourceInfo> {
        validate_identifier(&name.workspace)?;
        validate_identifier(&name.name)?;
        match &spec {
            SourceSpec::Kafka(kafka) if kafka.brokers.trim().is_empty() || kafka.topic.trim().is_empty() => {
                return Err(BasaltError::invalid("a kafka source needs brokers and a topic"));
            }
            SourceSpec::S3(s3) if s3.bucket.trim().is_empty() => {
                return Err(BasaltError::invalid("an s3 source needs a bucket"));
            }
            _ => {}
        }
        self.update(|c| {
            let exists =
                c.workspaces.get(&collection.workspace).is_some_and(|ws| ws.collections.contains_key(&collection.name));
            if !exists {
                return Err(BasaltError::not_found(format!("collection {collection} does not exist")));
            }
            let id = c.next_collection_id;
            let ws = c.workspaces.get_mut(&name.workspace).ok_or_else(|| workspace_missing(&name.workspace))?;
            if let Some(existing) = ws.sources.get(&name.name) {
                if if_not_exists {
                    return Ok(existing.clone());
                }
                return Err(BasaltError::new(ErrorCode::AlreadyExists, format!("source {name} already exists")));
            }
            let errors = CollectionName::new(name.workspace.clone(), format!("{}_errors", name.name));
            validate_identifier(&errors.name)?;
            let info = SourceInfo {
                id,
                name: name.clone(),
                collection,
                spec,
                created_at_us: now_micros(),
                errors: Some(errors.clone()),
                rollups: Vec::new(),
            };
            ws.sources.insert(name.name.clone(), info.clone());
            c.next_collection_id += 1;
            if !ws.collections.contains_key(&errors.name) {
                let id = c.next_collection_id;
                let errors_info = CollectionInfo { id, name: errors.clone(), shards: 1, created_at_us: now_micros() };
                ws.collections.insert(errors.name.clone(), errors_info);
                c.next_collection_id += 1;
            }
            tracing::info!(source = %name, id, collection = %info.collection, "source created");
            Ok(info)
        })
        .await
    }

    async fn drop_source(&self, name: CollectionName, if_exists: bool) -> Result<Option<SourceInfo>> {
        self.update(|c| match c.workspaces.get_mut(&name.workspace).and_then(|ws| ws.sources.remove(&name.name)) {
            Some(info) => {
                c.objects.remove(&info.id);
                tracing::info!(source = %name, id = info.id, "source dropped");
                Ok(Some(info))
            }
            None if if_exists => Ok(None),
            None => Err(BasaltError::not_found(format!("source {name} does not exist"))),
        })
        .await
    }

    async fn list_sources(&self) -> Result<Vec<SourceInfo>> {
        let c = self.catalog.lock().await;
        Ok(c.workspaces.values().flat_map(|ws| ws.sources.values().cloned()).collect())
    }

    async fn create_rollup(
        &self,
        name: CollectionName,
        shards: u32,
        source: CollectionName,
        sql: String,
        if_not_exists: bool,
    ) -> Result<CollectionInfo> {
        check_new_collection(&name, shards)?;
        self.update(|c| {
            let src = c
                .workspaces
                .get(&source.workspace)
                .and_then(|ws| ws.sources.get(&source.name))
                .ok_or_else(|| BasaltError::not_found(format!("source {source} does not exist")))?;
            if src.collection == name {
                return Err(BasaltError::invalid("a rollup cannot be its own source's collection"));
            }
            let (info, created) = add_collection(c, &name, shards, if_not_exists)?;
            if !created {
                return Ok(info);
            }
            let id = info.id;
            let src = c
                .workspaces
                .get_mut(&source.workspace)
                .and_then(|ws| ws.sources.get_mut(&source.name))
                .ok_or_else(|| BasaltError::internal("source vanished"))?;
            src.rollups.push(RollupInfo { collection: name.clone(), sql: sql.clone() });
            tracing::info!(collection = %name, id, source = %source, "rollup created");
            Ok(info)
        })
        .await
    }

    async fn source_heartbeat(&self, member: String, report: Vec<PartitionStatus>) -> Result<Vec<String>> {
        let mut members = self.members.lock();
        members.seen.insert(member, (std::time::Instant::now(), report));
        Ok(members.live())
    }

    async fn source_status(&self) -> Result<Vec<PartitionStatus>> {
        let mut members = self.members.lock();
        members.live();
        Ok(members.seen.values().flat_map(|(_, report)| report.iter().cloned()).collect())
    }

    async fn source_objects(&self, source_id: u64, found: Vec<FoundObject>) -> Result<Vec<SourceObject>> {
        let exists = |c: &Catalog| c.workspaces.values().any(|ws| ws.sources.values().any(|s| s.id == source_id));
        let new = {
            let c = self.catalog.lock().await;
            if !exists(&c) {
                return Err(BasaltError::not_found(format!("source {source_id} does not exist")));
            }
            let known = c.objects.get(&source_id);
            found
                .into_iter()
                .filter(|f| !known.is_some_and(|k| k.iter().any(|o| o.key == f.key && o.etag == f.etag)))
                .collect::<Vec<_>>()
        };
        if new.is_empty() {
            return Ok(self.catalog.lock().await.objects.get(&source_id).cloned().unwrap_or_default());
        }
        self.update(|c| {
            if !exists(c) {
                return Err(BasaltError::not_found(format!("source {source_id} does not exist")));
            }
            let objects = c.objects.entry(source_id).or_default();
            for f in new {
                if objects.iter().any(|o| o.key == f.key && o.etag == f.etag) {
                    continue;
                }
                let number = i32::try_from(objects.len())
                    .map_err(|_| BasaltError::limit("a source can track at most 2^31 objects"))?;
                tracing::info!(source_id, key = %f.key, number, "object found");
                objects.push(SourceObject { number, key: f.key, etag: f.etag, size: f.size, done: false });
            }
            Ok(objects.clone())
        })
        .await
    }

    async fn source_object_done(&self, source_id: u64, number: i32) -> Result<()> {
        self.update(|c| {
            let object = c
                .objects
                .get_mut(&source_id)
                .and_then(|o| o.get_mut(number as usize))
                .ok_or_else(|| BasaltError::not_found(format!("object {number} of source {source_id}")))?;
            object.done = true;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn catalog_survives_reopen_and_never_reuses_ids() {
        let dir = tempfile::tempdir().unwrap();
        let name = CollectionName::new("commons", "users");
        {
            let meta = LocalMeta::open(dir.path()).unwrap();
            let a = meta.create_collection(name.clone(), 2, false).await.unwrap();
            assert_eq!(
                meta.create_collection(name.clone(), 2, false).await.unwrap_err().code,
                ErrorCode::AlreadyExists
            );
            assert_eq!(meta.create_collection(name.clone(), 2, true).await.unwrap().id, a.id);
            meta.drop_collection(name.clone(), false).await.unwrap();
            assert!(meta.drop_collection(name.clone(), true).await.unwrap().is_none());
            let b = meta.create_collection(name.clone(), 3, false).await.unwrap();
            assert!(b.id > a.id);
            meta.create_workspace("demo".into(), false).await.unwrap();
        }
        let meta = LocalMeta::open(dir.path()).unwrap();
        assert_eq!(meta.get_collection(name.clone()).await.unwrap().shards, 3);
        assert_eq!(meta.list_workspaces().await.unwrap(), vec!["commons".to_string(), "demo".to_string()]);
        let missing = CollectionName::new("nope", "x");
        assert_eq!(meta.create_collection(missing, 1, false).await.unwrap_err().code, ErrorCode::NotFound);
        assert!(meta.create_collection(CollectionName::new("commons", "y"), 0, false).await.is_err());
    }
}
