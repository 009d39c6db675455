//! The tailer tier: takes writes (the write API now; Kafka and S3 sources next), validates and
//! normalizes documents, routes each to the shard that owns its `_id`, and reports a status per
//! document.
//!
//! Invariants: every write path routes through `basalt_common::doc::shard_for_id`, so all
//! versions of a document land on one shard. The tailer holds no durable state of its own: a
//! write is acknowledged only when every leaf involved has made it durable.

pub mod avro;
pub mod objects;
pub mod rollup;
pub mod sources;
pub mod transform;

use std::collections::BTreeMap;
use std::sync::LazyLock;

use async_trait::async_trait;
use basalt_common::api::{
    DocStatus, Leaf, Meta, ShardWrite, TailerApi, WriteInput, WriteOp, WriteRequest, WriteResponse,
};
use basalt_common::doc::{DocLimits, normalize_system_fields, now_micros, parse_doc, shard_for_id, validate_value};
use basalt_common::{BasaltError, Result};
use prometheus::{IntCounterVec, register_int_counter_vec};

static DOCS: LazyLock<Option<IntCounterVec>> = LazyLock::new(|| {
    register_int_counter_vec!("basalt_tailer_documents_total", "Documents received by the write API", &["result"]).ok()
});

/// Limits of one write request.
#[derive(Debug, Clone)]
pub struct WriteLimits {
    pub docs_per_request_max: usize,
    pub doc: DocLimits,
}

impl Default for WriteLimits {
    fn default() -> Self {
        Self { docs_per_request_max: 20_000, doc: DocLimits::default() }
    }
}

pub struct Tailer {
    meta: Meta,
    leaf: Leaf,
    limits: WriteLimits,
}

impl Tailer {
    pub fn new(meta: Meta, leaf: Leaf, limits: WriteLimits) -> Self {
        Self { meta, leaf, limits }
    }

    fn prepare(&self, input: WriteInput, now_us: i64) -> Result<WriteOp> {
        match input {
            WriteInput::Upsert { doc } => {
                let mut doc = validate_value(doc, &self.limits.doc)?;
                normalize_system_fields(&mut doc, now_us, &self.limits.doc)?;
                Ok(WriteOp::Upsert { doc: doc.into() })
            }
            WriteInput::UpsertRaw { json } => {
                let mut doc = parse_doc(json.as_bytes(), &self.limits.doc)?;
                normalize_system_fields(&mut doc, now_us, &self.limits.doc)?;
                Ok(WriteOp::Upsert { doc: doc.into() })
            }
            WriteInput::Patch { id, ops, upsert } => {
                if id.is_empty() {
                    return Err(BasaltError::invalid("patch needs an _id"));
                }
                if ops.is_empty() {
                    return Err(BasaltError::invalid("patch needs at least one operation"));
                }
                Ok(if upsert { WriteOp::Merge { id, ops } } else { WriteOp::Patch { id, ops } })
            }
            WriteInput::Invalid { message } => Err(BasaltError::invalid(message)),
            WriteInput::Delete { id } => {
                if id.is_empty() {
                    return Err(BasaltError::invalid("delete needs an _id"));
                }
                Ok(WriteOp::Delete { id })
            }
        }
    }
}

#[async_trait]
impl TailerApi for Tailer {
    async fn write(&self, request: WriteRequest) -> Result<WriteResponse> {
        if request.inputs.len() > self.limits.docs_per_request_max {
            return Err(BasaltError::limit(format!(
                "a write request may hold at most {} documents, got {}",
                self.limits.docs_per_request_max,
                request.inputs.len()
            )));
        }
        let info = self.meta.get_collection(request.collection.clone()).await?;
        let now_us = now_micros();
        let mut statuses: Vec<Option<DocStatus>> = vec![None; request.inputs.len()];
        // shard -> (input positions, ops)
        let mut per_shard: BTreeMap<u32, (Vec<usize>, Vec<WriteOp>)> = BTreeMap::new();
        for (i, input) in request.inputs.into_iter().enumerate() {
            match self.prepare(input, now_us) {
                Ok(op) => {
                    let shard = shard_for_id(op.id(), info.shards);
                    let entry = per_shard.entry(shard).or_default();
                    entry.0.push(i);
                    entry.1.push(op);
                }
                Err(e) => statuses[i] = Some(DocStatus::error(None, e)),
            }
        }
        let writes = per_shard.into_iter().map(|(shard, (positions, ops))| {
            let leaf = self.leaf.clone();
            let write = ShardWrite { collection_id: info.id, shard, ops, position: None };
            async move { (shard, positions, leaf.apply(write).await) }
        });
        let mut offsets = Vec::new();
        let mut first_error = None;
        for (shard, positions, result) in futures::future::join_all(writes).await {
            match result {
                Ok(r) => {
                    offsets.push(format!("{shard}:{}", r.seq));
                    for (pos, status) in positions.into_iter().zip(r.statuses) {
                        statuses[pos] = Some(status);
                    }
                }
                Err(e) => {
                    tracing::warn!(collection = %info.name, shard, error = %e, "shard write failed");
                    for pos in positions {
                        statuses[pos] = Some(DocStatus::error(None, e.clone()));
                    }
                    first_error.get_or_insert(e);
                }
            }
        }
        let statuses: Vec<DocStatus> = statuses
            .into_iter()
            .map(|s| s.unwrap_or_else(|| DocStatus::error(None, BasaltError::internal("document was not processed"))))
            .collect();
        if let Some(counter) = DOCS.as_ref() {
            let ok = statuses.iter().filter(|s| s.is_ok()).count() as u64;
            counter.with_label_values(&["ok"]).inc_by(ok);
            counter.with_label_values(&["error"]).inc_by(statuses.len() as u64 - ok);
        }
        // A shard that failed as a whole (leaf down) fails the request when nothing succeeded,
        // so clients retry; partial success reports per-document errors.
        if let Some(e) = first_error
            && offsets.is_empty()
        {
            return Err(e);
        }
        Ok(WriteResponse { statuses, last_offset: offsets.join(",") })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use basalt_common::ErrorCode;
    use basalt_common::api::CollectionName;
    use basalt_common::doc::{PatchKind, PatchOp};
    use serde_json::json;

    use super::*;

    #[tokio::test]
    async fn routes_validates_and_reports_per_document() {
        let dir = tempfile::tempdir().unwrap();
        let meta: Meta = Arc::new(basalt_meta::LocalMeta::open(&dir.path().join("meta")).unwrap());
        let leaf_impl = basalt_leaf::Leaf::open(&basalt_leaf::LeafConfig {
            data_dir: dir.path().join("leaf"),
            ..Default::default()
        })
        .unwrap();
        let leaf: Leaf = Arc::new(leaf_impl.clone());
        let name = CollectionName::new("commons", "t");
        let info = meta.create_collection(name.clone(), 4, false).await.unwrap();
        let tailer = Tailer::new(meta.clone(), leaf.clone(), WriteLimits::default());
        let mut inputs: Vec<WriteInput> =
            (0..40).map(|i| WriteInput::Upsert { doc: json!({"_id": format!("d{i}"), "v": i}) }).collect();
        inputs.push(WriteInput::Upsert { doc: json!([1]) });
        inputs.push(WriteInput::UpsertRaw { json: "{bad".into() });
        inputs.push(WriteInput::Upsert { doc: json!({"no_id": true}) });
        inputs.push(WriteInput::Patch {
            upsert: false,
            id: "d3".into(),
            ops: vec![PatchOp { op: PatchKind::Increment, path: "/v".into(), value: Some(json!(10)) }],
        });
        let r = tailer.write(WriteRequest { collection: name.clone(), inputs }).await.unwrap();
        assert_eq!(r.statuses.len(), 44);
        assert!(r.statuses[..40].iter().all(|s| s.is_ok()));
        assert!(!r.statuses[40].is_ok() && !r.statuses[41].is_ok());
        assert!(r.statuses[42].is_ok() && r.statuses[42].id.as_deref().is_some_and(|id| id.len() == 32));
        assert!(r.statuses[43].is_ok());
        assert_eq!(r.last_offset.split(',').count(), 4);
        assert_eq!(leaf_impl.live_docs(info.id), 41);
        let stats = leaf.stats(info.id, (0..4).collect()).await.unwrap();
        assert_eq!(stats.doc_count, 41);
        let missing =
            tailer.write(WriteRequest { collection: CollectionName::new("commons", "nope"), inputs: vec![] }).await;
        assert_eq!(missing.unwrap_err().code, ErrorCode::NotFound);
        let small = Tailer::new(meta, leaf, WriteLimits { docs_per_request_max: 1, ..Default::default() });
        let over = small
            .write(WriteRequest {
                collection: name,
                inputs: vec![WriteInput::Delete { id: "a".into() }, WriteInput::Delete { id: "b".into() }],
            })
            .await;
        assert_eq!(over.unwrap_err().code, ErrorCode::LimitExceeded);
    }
}
