//! The search index of a shard (tantivy): every document once, with exact terms on every scalar
//! field (raw JSON field) and full text on strings (tokenized JSON field). Hits map back to column
//! store slots through the `_slot` fast field.
//!
//! Commits are lazy: writes go to the index writer; a query that needs the index commits first if
//! anything changed, so a search sees every acknowledged write.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use basalt_common::doc::{Doc, ID_FIELD};
use basalt_common::filter::{CmpOp, Filter, Scalar};
use basalt_common::{BasaltError, Result};
use parking_lot::Mutex;
use tantivy::collector::{Collector, SegmentCollector};
use tantivy::query::{BooleanQuery, EmptyQuery, Occur, Query, TermQuery};
use tantivy::schema::{
    FAST, Field, INDEXED, IndexRecordOption, JsonObjectOptions, OwnedValue, STRING, Schema, TextFieldIndexing,
    TextOptions,
};
use tantivy::{DocId, Index, IndexReader, IndexWriter, ReloadPolicy, Score, SegmentReader, TantivyDocument, Term};

use basalt_common::text::tokenize;

const WRITER_MEMORY_BYTES: usize = 32 * 1024 * 1024;

fn tantivy_err(e: tantivy::TantivyError) -> BasaltError {
    BasaltError::internal(format!("search index: {e}"))
}

pub struct SearchIndex {
    writer: Mutex<IndexWriter>,
    reader: IndexReader,
    dirty: AtomicBool,
    id: Field,
    slot: Field,
    text: Field,
    raw: Field,
}

impl SearchIndex {
    pub fn new() -> Result<Self> {
        let mut sb = Schema::builder();
        let id = sb.add_text_field(ID_FIELD, STRING);
        let slot = sb.add_u64_field("_slot", INDEXED | FAST);
        let text_options: JsonObjectOptions = TextOptions::default()
            .set_indexing_options(
                TextFieldIndexing::default()
                    .set_tokenizer("default")
                    .set_index_option(IndexRecordOption::WithFreqsAndPositions),
            )
            .into();
        let text = sb.add_json_field("text", text_options);
        let raw_options: JsonObjectOptions = TextOptions::default()
            .set_indexing_options(
                TextFieldIndexing::default().set_tokenizer("raw").set_index_option(IndexRecordOption::Basic),
            )
            .into();
        let raw = sb.add_json_field("raw", raw_options);
        let index = Index::create_in_ram(sb.build());
        let writer = index.writer_with_num_threads(1, WRITER_MEMORY_BYTES).map_err(tantivy_err)?;
        let reader = index.reader_builder().reload_policy(ReloadPolicy::Manual).try_into().map_err(tantivy_err)?;
        Ok(Self { writer: Mutex::new(writer), reader, dirty: AtomicBool::new(false), id, slot, text, raw })
    }

    /// Index a document version (`doc == None` deletes it). `replaces` says whether an earlier
    /// version is indexed: only then is a delete needed (deletes cost work in every segment).
    pub fn upsert(&self, id: &str, replaces: bool, slot: Option<u64>, doc: Option<&Doc>) -> Result<()> {
        let writer = self.writer.lock();
        if replaces {
            writer.delete_term(Term::from_field_text(self.id, id));
        }
        if let (Some(slot), Some(doc)) = (slot, doc) {
            let object: BTreeMap<String, OwnedValue> = doc
                .iter()
                .filter(|(k, _)| k.as_str() != ID_FIELD)
                .map(|(k, v)| (k.clone(), OwnedValue::from(v.clone())))
                .collect();
            let mut td = TantivyDocument::default();
            td.add_text(self.id, id);
            td.add_u64(self.slot, slot);
            td.add_object(self.text, object.clone());
            td.add_object(self.raw, object);
            writer.add_document(td).map_err(tantivy_err)?;
        }
        self.dirty.store(true, Ordering::Release);
        Ok(())
    }

    /// Make every write so far visible to searches. The flag is checked and cleared under the
    /// writer lock, after the reader is reloaded: a caller that finds the index clean knows the
    /// reader already has every write (a commit in progress by another thread is waited for).
    pub fn refresh(&self) -> Result<()> {
        let mut writer = self.writer.lock();
        if !self.dirty.load(Ordering::Acquire) {
            return Ok(());
        }
        writer.commit().map_err(tantivy_err)?;
        self.reader.reload().map_err(tantivy_err)?;
        self.dirty.store(false, Ordering::Release);
        Ok(())
    }

    /// Build a tantivy query for a filter the index can answer exactly (see
    /// `basalt_common::filter::index_answerable`).
    fn query(&self, f: &Filter) -> Result<Box<dyn Query>> {
        Ok(match f {
            Filter::Search { path, query } => {
                let tokens = tokenize(query);
                if tokens.is_empty() {
                    return Ok(Box::new(EmptyQuery));
                }
                let clauses = tokens
                    .iter()
                    .map(|t| {
                        let mut term = Term::from_field_json_path(self.text, path, false);
                        term.append_type_and_str(t);
                        (Occur::Must, Box::new(TermQuery::new(term, IndexRecordOption::WithFreqs)) as Box<dyn Query>)
                    })
                    .collect();
                Box::new(BooleanQuery::new(clauses))
            }
            Filter::Cmp { path, op: CmpOp::Eq, value } => {
                Box::new(TermQuery::new(self.raw_term(path, value)?, IndexRecordOption::Basic))
            }
            Filter::In { path, values } => {
                let clauses = values
                    .iter()
                    .map(|v| {
                        Ok((
                            Occur::Should,
                            Box::new(TermQuery::new(self.raw_term(path, v)?, IndexRecordOption::Basic))
                                as Box<dyn Query>,
                        ))
                    })
                    .collect::<Result<Vec<_>>>()?;
                Box::new(BooleanQuery::new(clauses))
            }
            Filter::And(items) | Filter::Or(items) => {
                let occur = if matches!(f, Filter::And(_)) { Occur::Must } else { Occur::Should };
                let clauses = items.iter().map(|i| Ok((occur, self.query(i)?))).collect::<Result<Vec<_>>>()?;
                Box::new(BooleanQuery::new(clauses))
            }
            other => {
                return Err(BasaltError::internal(format!("filter {other} is not answerable by the search index")));
            }
        })
    }

    fn raw_term(&self, path: &str, value: &Scalar) -> Result<Term> {
        if path == ID_FIELD
            && let Scalar::Str(s) = value
        {
            return Ok(Term::from_field_text(self.id, s));
        }
        let mut term = Term::from_field_json_path(self.raw, path, false);
        match value {
            Scalar::Str(s) => term.append_type_and_str(s),
            Scalar::Int(i) => term.append_type_and_fast_value(*i),
            Scalar::Bool(b) => term.append_type_and_fast_value(*b),
            other => return Err(BasaltError::internal(format!("no index term for {other}"))),
        }
        Ok(term)
    }

    /// Slots of the documents matching all `filters`, sorted, with their BM25 relevance when
    /// `scoring` (else 0).
    pub fn matching_slots(&self, filters: &[&Filter], scoring: bool) -> Result<Vec<(u64, f32)>> {
        self.refresh()?;
        let clauses = filters.iter().map(|f| Ok((Occur::Must, self.query(f)?))).collect::<Result<Vec<_>>>()?;
        let query = BooleanQuery::new(clauses);
        let searcher = self.reader.searcher();
        let mut slots = searcher.search(&query, &SlotCollector { scoring }).map_err(tantivy_err)?;
        slots.sort_unstable_by_key(|(slot, _)| *slot);
        Ok(slots)
    }
}

/// Collects the `_slot` fast field (and the score) of every hit.
struct SlotCollector {
    scoring: bool,
}

struct SlotSegmentCollector {
    column: tantivy::columnar::Column<u64>,
    slots: Vec<(u64, f32)>,
}

impl Collector for SlotCollector {
    type Fruit = Vec<(u64, f32)>;
    type Child = SlotSegmentCollector;

    fn for_segment(&self, _ord: u32, segment: &SegmentReader) -> tantivy::Result<Self::Child> {
        Ok(SlotSegmentCollector { column: segment.fast_fields().u64("_slot")?, slots: Vec::new() })
    }

    fn requires_scoring(&self) -> bool {
        self.scoring
    }

    fn merge_fruits(&self, fruits: Vec<Vec<(u64, f32)>>) -> tantivy::Result<Vec<(u64, f32)>> {
        Ok(fruits.into_iter().flatten().collect())
    }
}

impl SegmentCollector for SlotSegmentCollector {
    type Fruit = Vec<(u64, f32)>;

    fn collect(&mut self, doc: DocId, score: Score) {
        if let Some(slot) = self.column.first(doc) {
            self.slots.push((slot, score));
        }
    }

    fn harvest(self) -> Vec<(u64, f32)> {
        self.slots
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slots(idx: &SearchIndex, f: &Filter) -> Vec<u64> {
        idx.matching_slots(&[f], false).unwrap().into_iter().map(|(s, _)| s).collect()
    }

    #[test]
    fn searches_see_every_write_while_a_background_refresh_runs() {
        use std::sync::Arc;
        use std::sync::atomic::AtomicBool;
        let idx = Arc::new(SearchIndex::new().unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let background = {
            let (idx, stop) = (idx.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    idx.refresh().unwrap();
                }
            })
        };
        for i in 0..100u64 {
            let doc = json!({"k": format!("v{i}")}).as_object().unwrap().clone();
            idx.upsert(&format!("d{i}"), false, Some(i), Some(&doc)).unwrap();
            let f = Filter::Cmp { path: "k".into(), op: CmpOp::Eq, value: Scalar::Str(format!("v{i}")) };
            assert_eq!(slots(&idx, &f), vec![i], "write {i} is not visible to the next search");
        }
        stop.store(true, Ordering::Relaxed);
        background.join().unwrap();
    }

    #[test]
    fn scores_rank_better_matches_higher() {
        let idx = SearchIndex::new().unwrap();
        let d = |v: serde_json::Value| v.as_object().unwrap().clone();
        idx.upsert("a", false, Some(0), Some(&d(json!({"t": "coffee and tea and more words here"})))).unwrap();
        idx.upsert("b", false, Some(1), Some(&d(json!({"t": "coffee coffee coffee"})))).unwrap();
        let q = Filter::Search { path: "t".into(), query: "coffee".into() };
        let hits = idx.matching_slots(&[&q], true).unwrap();
        assert_eq!(hits.len(), 2);
        assert!(hits[1].1 > hits[0].1, "{hits:?}");
    }

    #[test]
    fn finds_terms_text_and_replaces_versions() {
        let idx = SearchIndex::new().unwrap();
        let d = |v: serde_json::Value| v.as_object().unwrap().clone();
        idx.upsert(
            "u1",
            false,
            Some(0),
            Some(&d(json!({"_id": "u1", "name": "Ada Lovelace", "age": 36, "address": {"city": "London"}}))),
        )
        .unwrap();
        idx.upsert("u2", false, Some(1), Some(&d(json!({"_id": "u2", "name": "Alan Turing", "age": 41, "ok": true}))))
            .unwrap();
        let search = Filter::Search { path: "name".into(), query: "ada".into() };
        assert_eq!(slots(&idx, &search), vec![0]);
        let city = Filter::Cmp { path: "address.city".into(), op: CmpOp::Eq, value: Scalar::Str("London".into()) };
        assert_eq!(slots(&idx, &city), vec![0]);
        let age = Filter::In { path: "age".into(), values: vec![Scalar::Int(41), Scalar::Int(36)] };
        assert_eq!(slots(&idx, &age), vec![0, 1]);
        let ok = Filter::Cmp { path: "ok".into(), op: CmpOp::Eq, value: Scalar::Bool(true) };
        assert_eq!(slots(&idx, &ok), vec![1]);
        idx.upsert("u1", true, Some(2), Some(&d(json!({"_id": "u1", "name": "Ada King"})))).unwrap();
        assert_eq!(slots(&idx, &search), vec![2]);
        idx.upsert("u1", true, None, None).unwrap();
        assert!(slots(&idx, &search).is_empty());
        let id = Filter::Cmp { path: "_id".into(), op: CmpOp::Eq, value: Scalar::Str("u2".into()) };
        assert_eq!(slots(&idx, &id), vec![1]);
    }
}
