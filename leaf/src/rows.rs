//! The row store of a shard: the current version of every document by `_id`, in one fjall
//! keyspace.
//!
//! A document whose top-level fields are all small is one entry: its JSON. A top-level field
//! whose JSON is at least [`APART_FIELD_BYTES`] is stored apart, under a key of its own; the
//! document's entry (its head) then holds the other fields and the names, sizes and field
//! counts of those stored apart. A patch reads and writes the head and the fields it touches,
//! never a large field it does not touch, so its cost follows the patched fields, not the
//! document.
//!
//! Keys: a document's head is stored under its `_id` (UTF-8). A field stored apart is under
//! `0xFF`, the id's length (u32, big-endian), the id and the field name: `0xFF` never starts a
//! UTF-8 string, so these keys sort after every head and never collide with one.

use std::collections::{BTreeMap, BTreeSet};

use basalt_common::doc::{Doc, Outside, field_count};
use basalt_common::{BasaltError, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Top-level fields at least this large (serialized) are stored apart from the document head.
pub const APART_FIELD_BYTES: usize = 2048;

/// First byte of a head that has fields stored apart (a plain document starts with `{`).
const SPLIT_TAG: u8 = 0x01;
const APART_PREFIX: u8 = 0xFF;

fn store_err(e: impl std::fmt::Display) -> BasaltError {
    BasaltError::internal(format!("row store: {e}"))
}

/// A field stored apart: its serialized size and field count (for the document limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Apart {
    pub bytes: usize,
    pub fields: usize,
}

/// A document's head entry: its fields stored inline, and those stored apart.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Head {
    pub inline: Doc,
    pub apart: BTreeMap<String, Apart>,
}

impl Head {
    /// What the fields stored apart and not in `loaded` add to the document.
    pub fn outside(&self, loaded: &Doc) -> Outside {
        let mut out = Outside::default();
        for (name, a) in self.apart.iter().filter(|(name, _)| !loaded.contains_key(*name)) {
            // `"name":value,`
            out.bytes += a.bytes + name.len() + 4;
            out.fields += a.fields;
        }
        out
    }
}

#[derive(Serialize)]
struct HeadOut<'a> {
    inline: BTreeMap<&'a str, &'a Value>,
    apart: &'a BTreeMap<String, Apart>,
}

fn apart_key(id: &str, field: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(5 + id.len() + field.len());
    key.push(APART_PREFIX);
    key.extend_from_slice(&(id.len() as u32).to_be_bytes());
    key.extend_from_slice(id.as_bytes());
    key.extend_from_slice(field.as_bytes());
    key
}

fn decode_head(bytes: &[u8]) -> Result<Head> {
    match bytes.first() {
        Some(&SPLIT_TAG) => serde_json::from_slice(&bytes[1..]).map_err(store_err),
        _ => Ok(Head { inline: serde_json::from_slice(bytes).map_err(store_err)?, apart: BTreeMap::new() }),
    }
}

#[derive(Clone)]
pub struct RowStore {
    ks: fjall::Keyspace,
}

impl RowStore {
    pub fn new(ks: fjall::Keyspace) -> Self {
        Self { ks }
    }

    pub fn keyspace(&self) -> &fjall::Keyspace {
        &self.ks
    }

    /// The whole current document.
    pub fn get(&self, id: &str) -> Result<Option<Doc>> {
        match self.head(id)? {
            None => Ok(None),
            Some(head) => Ok(Some(self.assemble(id, head)?)),
        }
    }

    /// The document's head entry only.
    pub fn head(&self, id: &str) -> Result<Option<Head>> {
        match self.ks.get(id.as_bytes()).map_err(store_err)? {
            None => Ok(None),
            Some(bytes) => Ok(Some(decode_head(&bytes)?)),
        }
    }

    /// One field stored apart.
    pub fn apart_field(&self, id: &str, field: &str) -> Result<Value> {
        let bytes = self
            .ks
            .get(apart_key(id, field))
            .map_err(store_err)?
            .ok_or_else(|| store_err(format!("field {field:?} of {id:?} is missing")))?;
        serde_json::from_slice(&bytes).map_err(store_err)
    }

    /// The whole document from its head and the fields stored apart.
    pub fn assemble(&self, id: &str, head: Head) -> Result<Doc> {
        let Head { mut inline, apart } = head;
        for name in apart.keys() {
            inline.insert(name.clone(), self.apart_field(id, name)?);
        }
        Ok(inline)
    }

    /// Write a whole new version of `id`, replacing the one whose head is `old`.
    pub fn put(&self, batch: &mut fjall::OwnedWriteBatch, id: &str, doc: &Doc, old: Option<&Head>) -> Result<()> {
        let empty = Head::default();
        self.write(batch, id, old.unwrap_or(&empty), doc, None)
    }

    /// Write a patched version: `doc` holds the current value of every field stored inline in
    /// `old` and of every `touched` field (absent: removed); untouched fields stored apart stay
    /// as they are.
    pub fn put_fields(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        id: &str,
        old: &Head,
        doc: &Doc,
        touched: &BTreeSet<String>,
    ) -> Result<()> {
        self.write(batch, id, old, doc, Some(touched))
    }

    fn write(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        id: &str,
        old: &Head,
        doc: &Doc,
        touched: Option<&BTreeSet<String>>,
    ) -> Result<()> {
        // `None`: a whole new version, every field written. A document smaller than the
        // threshold has no field to store apart: one serialization, one entry.
        if touched.is_none() {
            let bytes = serde_json::to_vec(doc).map_err(store_err)?;
            if bytes.len() < APART_FIELD_BYTES {
                for name in old.apart.keys() {
                    batch.remove(&self.ks, apart_key(id, name));
                }
                batch.insert(&self.ks, id.as_bytes(), bytes);
                return Ok(());
            }
        }
        let is_touched = |name: &str| touched.is_none_or(|t| t.contains(name));
        let mut apart = match touched {
            None => BTreeMap::new(),
            Some(touched) => {
                let mut apart = old.apart.clone();
                apart.retain(|name, _| !touched.contains(name));
                apart
            }
        };
        let mut inline: BTreeMap<&str, &Value> = BTreeMap::new();
        for (name, value) in doc {
            if !is_touched(name) {
                if !apart.contains_key(name) {
                    inline.insert(name, value);
                }
                continue; // a loaded field stored apart and unchanged stays where it is
            }
            // Small values are common: only values that could be large are serialized here.
            let bytes = match value {
                Value::Object(_) | Value::Array(_) | Value::String(_) => {
                    let bytes = serde_json::to_vec(value).map_err(store_err)?;
                    (bytes.len() >= APART_FIELD_BYTES).then_some(bytes)
                }
                _ => None,
            };
            match bytes {
                Some(bytes) => {
                    apart.insert(name.clone(), Apart { bytes: bytes.len(), fields: field_count(value) });
                    batch.insert(&self.ks, apart_key(id, name), bytes);
                }
                None => {
                    inline.insert(name, value);
                }
            }
        }
        // Fields that were apart and are not now (removed, or inline now).
        for name in old.apart.keys().filter(|name| !apart.contains_key(*name)) {
            batch.remove(&self.ks, apart_key(id, name));
        }
        let head = if apart.is_empty() {
            serde_json::to_vec(&inline).map_err(store_err)?
        } else {
            let mut out = vec![SPLIT_TAG];
            serde_json::to_writer(&mut out, &HeadOut { inline, apart: &apart }).map_err(store_err)?;
            out
        };
        batch.insert(&self.ks, id.as_bytes(), head);
        Ok(())
    }

    /// Delete `id` (whose head is `old`).
    pub fn delete(&self, batch: &mut fjall::OwnedWriteBatch, id: &str, old: &Head) {
        for name in old.apart.keys() {
            batch.remove(&self.ks, apart_key(id, name));
        }
        batch.remove(&self.ks, id.as_bytes());
    }

    /// Every document, in id order.
    pub fn for_each(&self, mut f: impl FnMut(String, Doc) -> Result<()>) -> Result<()> {
        for item in self.ks.iter() {
            let (k, v) = item.into_inner().map_err(store_err)?;
            if k.first() == Some(&APART_PREFIX) {
                break; // fields stored apart sort after every head
            }
            let id = String::from_utf8(k.to_vec()).map_err(store_err)?;
            let doc = self.assemble(&id, decode_head(&v)?)?;
            f(id, doc)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc(v: Value) -> Doc {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    fn store() -> (tempfile::TempDir, fjall::Database, RowStore) {
        let dir = tempfile::tempdir().unwrap();
        let db = fjall::Database::builder(dir.path()).open().unwrap();
        let ks = db.keyspace("docs", fjall::KeyspaceCreateOptions::default).unwrap();
        (dir, db, RowStore::new(ks))
    }

    #[test]
    fn large_fields_live_apart_and_patches_touch_only_their_fields() {
        let (_dir, db, rows) = store();
        let big = "x".repeat(10_000);
        let d = doc(json!({"_id": "a", "n": 1, "blob": big, "o": {"k": "v"}}));
        let mut batch = db.batch();
        rows.put(&mut batch, "a", &d, None).unwrap();
        rows.put(&mut batch, "b", &doc(json!({"_id": "b", "n": 2})), None).unwrap();
        batch.commit().unwrap();
        let head = rows.head("a").unwrap().unwrap();
        assert_eq!(head.apart.keys().collect::<Vec<_>>(), ["blob"]);
        assert!(!head.inline.contains_key("blob"));
        assert_eq!(rows.get("a").unwrap().unwrap(), d);
        assert_eq!(head.outside(&Doc::new()).bytes, 10_002 + 4 + 4);

        // Patch `n` without loading `blob`: the blob entry is not rewritten.
        let mut partial = head.inline.clone();
        partial.insert("n".into(), json!(5));
        let touched = BTreeSet::from(["n".to_string()]);
        let mut batch = db.batch();
        rows.put_fields(&mut batch, "a", &head, &partial, &touched).unwrap();
        assert_eq!(batch.len(), 1, "only the head is written");
        batch.commit().unwrap();
        let mut want = d.clone();
        want.insert("n".into(), json!(5));
        assert_eq!(rows.get("a").unwrap().unwrap(), want);

        // Shrinking the big field moves it inline and deletes its entry.
        let head = rows.head("a").unwrap().unwrap();
        let mut partial = head.inline.clone();
        partial.insert("blob".into(), json!("small"));
        let touched = BTreeSet::from(["blob".to_string()]);
        let mut batch = db.batch();
        rows.put_fields(&mut batch, "a", &head, &partial, &touched).unwrap();
        batch.commit().unwrap();
        assert!(rows.head("a").unwrap().unwrap().apart.is_empty());
        want.insert("blob".into(), json!("small"));
        assert_eq!(rows.get("a").unwrap().unwrap(), want);
        assert!(rows.ks.get(apart_key("a", "blob")).unwrap().is_none());

        // A whole new version replaces fields apart; a delete removes them.
        let head = rows.head("a").unwrap().unwrap();
        let mut batch = db.batch();
        rows.put(&mut batch, "a", &d, Some(&head)).unwrap();
        batch.commit().unwrap();
        let head = rows.head("a").unwrap().unwrap();
        let mut batch = db.batch();
        rows.delete(&mut batch, "a", &head);
        batch.commit().unwrap();
        assert!(rows.get("a").unwrap().is_none());
        assert!(rows.ks.get(apart_key("a", "blob")).unwrap().is_none());
        let mut seen = Vec::new();
        rows.for_each(|id, d| {
            seen.push((id, d));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![("b".to_string(), doc(json!({"_id": "b", "n": 2})))]);
    }
}
