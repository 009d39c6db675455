//! The persisted form of a shard's column store and search index: immutable segment objects
//! (one Arrow IPC file per column block, one directory of tantivy files per sealed index, one
//! deletion bitmap) and a manifest naming them, all under the shard's prefix in the
//! [`SegmentStore`]. The manifest is replaced in one put; objects it does not name are garbage.
//!
//! A manifest is a consistent cut at shard sequence number `seq`: every write up to `seq` is in
//! it, none after. Recovery loads it and replays the shard log (kept in the row store) from
//! `seq + 1`.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use basalt_common::schema::SchemaStats;
use basalt_common::{BasaltError, Result};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::columns::{Block, Deletions, Overlay};
use crate::search::Sealed;
use crate::store::SegmentStore;

pub const MANIFEST: &str = "manifest.json";
const FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockRef {
    pub base_slot: u64,
    pub rows: usize,
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexRef {
    pub base_slot: u64,
    pub end_slot: u64,
    pub dir: String,
    pub files: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// Bumped by every manifest written; names new objects so they never collide.
    pub generation: u64,
    pub seq: u64,
    pub next_slot: u64,
    pub blocks: Vec<BlockRef>,
    pub indexes: Vec<IndexRef>,
    pub deletions: Option<String>,
    /// Files of patch overlays (slot and new top-level field values), applied in order; a
    /// later entry for a slot replaces an earlier one.
    #[serde(default)]
    pub patches: Vec<String>,
    pub stats: SchemaStats,
}

impl Manifest {
    /// Every object the manifest names (paths relative to the shard prefix).
    pub fn objects(&self) -> HashSet<String> {
        let mut out: HashSet<String> = self.blocks.iter().map(|b| b.path.clone()).collect();
        for index in &self.indexes {
            out.extend(index.files.iter().map(|f| format!("{}/{f}", index.dir)));
        }
        out.extend(self.deletions.clone());
        out.extend(self.patches.iter().cloned());
        out.insert(MANIFEST.to_string());
        out
    }
}

/// A shard's view of the segment store.
#[derive(Clone)]
pub struct ShardSegments {
    store: SegmentStore,
    prefix: String,
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> BasaltError {
    BasaltError::internal(format!("segment {what}: {e}"))
}

impl ShardSegments {
    pub fn new(store: SegmentStore, prefix: String) -> Self {
        Self { store, prefix }
    }

    fn path(&self, rel: &str) -> String {
        format!("{}/{rel}", self.prefix)
    }

    pub fn load_manifest(&self) -> Result<Option<Manifest>> {
        let Some(bytes) = self.store.get(&self.path(MANIFEST))? else { return Ok(None) };
        let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| corrupt(MANIFEST, e))?;
        if manifest.format != FORMAT {
            return Err(corrupt(MANIFEST, format!("unknown format {}", manifest.format)));
        }
        Ok(Some(manifest))
    }

    pub fn put_manifest(&self, manifest: &Manifest) -> Result<()> {
        let mut manifest = manifest.clone();
        manifest.format = FORMAT;
        let bytes = serde_json::to_vec(&manifest).map_err(|e| corrupt(MANIFEST, e))?;
        self.store.put(&self.path(MANIFEST), Bytes::from(bytes))
    }

    pub fn put_block(&self, generation: u64, block: &Block) -> Result<BlockRef> {
        let path = format!("blocks/{:020}-{generation}.arrow", block.base_slot);
        self.store.put(&self.path(&path), Bytes::from(block.to_ipc()?))?;
        Ok(BlockRef { base_slot: block.base_slot, rows: block.rows, path })
    }

    /// Open a stored block mapped from its local file (see [`Block::open_mapped`]).
    pub fn load_block(&self, r: &BlockRef) -> Result<Block> {
        let file = self.store.local_file(&self.path(&r.path))?.ok_or_else(|| corrupt(&r.path, "missing"))?;
        let block = Block::open_mapped(&file)?;
        if block.base_slot != r.base_slot || block.rows != r.rows {
            return Err(corrupt(&r.path, "does not match the manifest"));
        }
        Ok(block)
    }

    pub fn put_index(&self, generation: u64, index: &Sealed) -> Result<IndexRef> {
        let dir = format!("index/{:020}-{generation}", index.base_slot);
        let mut files = Vec::new();
        for (name, bytes) in index.files()? {
            self.store.put(&self.path(&format!("{dir}/{name}")), Bytes::from(bytes))?;
            files.push(name);
        }
        index.set_stored(dir.clone());
        Ok(IndexRef { base_slot: index.base_slot, end_slot: index.end_slot, dir, files })
    }

    /// The local directory holding a stored index's files (for a remote store, its cached
    /// copies, downloaded first if need be).
    fn index_dir(&self, r: &IndexRef) -> Result<PathBuf> {
        let mut dir = None;
        for name in &r.files {
            let path = format!("{}/{name}", r.dir);
            let file = self.store.local_file(&self.path(&path))?.ok_or_else(|| corrupt(&path, "missing"))?;
            dir = file.parent().map(PathBuf::from);
        }
        dir.ok_or_else(|| corrupt(&r.dir, "no files"))
    }

    /// Open a stored index mapped from its local files.
    pub fn load_index(&self, r: &IndexRef) -> Result<Sealed> {
        let index = Sealed::open_mapped(r.base_slot, r.end_slot, &self.index_dir(r)?)?;
        index.set_stored(r.dir.clone());
        Ok(index)
    }

    /// `index` (just stored as `r`) opened again from its stored copy, mapped.
    pub fn map_index(&self, r: &IndexRef, index: &Sealed) -> Result<Sealed> {
        index.reopen_mapped(&self.index_dir(r)?)
    }

    pub fn put_deletions(&self, generation: u64, deletions: &Deletions) -> Result<String> {
        let path = format!("deletions-{generation}.bin");
        self.store.put(&self.path(&path), Bytes::from(deletions.to_bytes()))?;
        Ok(path)
    }

    pub fn load_deletions(&self, path: &str) -> Result<Deletions> {
        let bytes = self.store.get(&self.path(path))?.ok_or_else(|| corrupt(path, "missing"))?;
        Deletions::from_bytes(&bytes)
    }

    pub fn put_patches(&self, generation: u64, entries: &[(u64, Arc<Overlay>)]) -> Result<String> {
        let path = format!("patches-{generation}.json");
        let entries: Vec<(u64, &Overlay)> = entries.iter().map(|(slot, o)| (*slot, o.as_ref())).collect();
        let bytes = serde_json::to_vec(&entries).map_err(|e| corrupt(&path, e))?;
        self.store.put(&self.path(&path), Bytes::from(bytes))?;
        Ok(path)
    }

    pub fn load_patches(&self, path: &str) -> Result<Vec<(u64, Overlay)>> {
        let bytes = self.store.get(&self.path(path))?.ok_or_else(|| corrupt(path, "missing"))?;
        serde_json::from_slice(&bytes).map_err(|e| corrupt(path, e))
    }

    /// Delete objects named by `old` but not by `new`.
    pub fn delete_replaced(&self, old: &Manifest, new: &Manifest) -> Result<()> {
        let keep = new.objects();
        for rel in old.objects().difference(&keep) {
            self.store.delete(&self.path(rel))?;
        }
        Ok(())
    }

    /// Delete objects under the prefix that `manifest` does not name (left by a flush or merge
    /// that died before its manifest was written).
    pub fn delete_unreferenced(&self, manifest: &Manifest) -> Result<usize> {
        let keep = manifest.objects();
        let mut n = 0;
        for path in self.store.list(&self.prefix)? {
            let rel = path.strip_prefix(&format!("{}/", self.prefix)).unwrap_or(&path);
            if !keep.contains(rel) {
                self.store.delete(&path)?;
                n += 1;
            }
        }
        Ok(n + self.store.prune_cache(&self.prefix, &keep)?)
    }

    pub fn delete_all(&self) -> Result<()> {
        self.store.delete_prefix(&self.prefix)
    }
}

/// Blocks and indexes loaded from a manifest.
pub struct Loaded {
    pub blocks: Vec<Arc<Block>>,
    pub indexes: Vec<Arc<Sealed>>,
    pub deletions: Deletions,
    /// Patch overlays in the order to apply them.
    pub patches: Vec<(u64, Overlay)>,
}

impl ShardSegments {
    /// Load everything a manifest names, logging progress.
    pub fn load(&self, manifest: &Manifest) -> Result<Loaded> {
        let total = manifest.blocks.len() + manifest.indexes.len();
        let mut done = 0usize;
        let mut progress = |what: &str| {
            done += 1;
            if done.is_multiple_of(50) || done == total {
                tracing::info!(shard = %self.prefix, done, total, what, "loading segments");
            }
        };
        let mut blocks = Vec::with_capacity(manifest.blocks.len());
        for r in &manifest.blocks {
            blocks.push(Arc::new(self.load_block(r)?));
            progress("block");
        }
        let mut indexes = Vec::with_capacity(manifest.indexes.len());
        for r in &manifest.indexes {
            indexes.push(Arc::new(self.load_index(r)?));
            progress("index");
        }
        let deletions = match &manifest.deletions {
            Some(path) => self.load_deletions(path)?,
            None => Deletions::default(),
        };
        let mut patches = Vec::new();
        for path in &manifest.patches {
            patches.extend(self.load_patches(path)?);
        }
        Ok(Loaded { blocks, indexes, deletions, patches })
    }
}
