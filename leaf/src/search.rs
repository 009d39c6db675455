//! The search index of a shard (tantivy): every document once, with exact terms on every scalar
//! field (raw JSON field) and full text on strings (tokenized JSON field). Hits map back to column
//! store slots through the `_slot` fast field.
//!
//! A shard has sealed (immutable) indexes over slot ranges, stored as segment files, and one tail
//! index for recent slots that takes all writes. Writes only queue their documents; the tail
//! indexes them when it commits (in the background every `INDEX_REFRESH_INTERVAL`, or by a
//! query first if anything is queued or uncommitted), so a search sees every acknowledged write
//! and a write never waits for a commit (a write drains the queue into the tail itself only
//! when the queue is long: see [`QUEUE_DRAIN`] and [`QUEUE_MAX`]). Old
//! versions are never deleted from an index: the column store's deletion bitmap hides them, and
//! merging sealed indexes drops them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use basalt_common::doc::{Doc, ID_FIELD};
use basalt_common::filter::{CmpOp, Filter, MAX_TERM_BYTES, Scalar};
use basalt_common::{BasaltError, Result};
use parking_lot::{Mutex, RwLock};
use std::sync::Arc;
use tantivy::BitSet;
use tantivy::collector::{Collector, SegmentCollector};
use tantivy::directory::error::{DeleteError, LockError, OpenReadError, OpenWriteError};
use tantivy::directory::{
    Directory, DirectoryLock, FileHandle, Lock, MmapDirectory, OwnedBytes, RamDirectory, WatchCallback, WatchHandle,
    WritePtr,
};
use tantivy::fastfield::{AliveBitSet, write_alive_bitset};
use tantivy::indexer::{NoMergePolicy, merge_filtered_segments};
use tantivy::query::{Bm25StatisticsProvider, BooleanQuery, EmptyQuery, Occur, Query, TermQuery};
use tantivy::schema::{
    FAST, Field, INDEXED, IndexRecordOption, JsonObjectOptions, STRING, Schema, TextFieldIndexing, TextOptions,
};
use tantivy::{DocId, Index, IndexReader, IndexWriter, ReloadPolicy, Score, SegmentReader, Term};

use basalt_common::text::tokenize;

const WRITER_MEMORY_BYTES: usize = 32 * 1024 * 1024;

/// Queued documents past which a write hands the queue to the tail's writer itself, when no
/// commit holds the tail.
const QUEUE_DRAIN: usize = 8192;

/// Queued documents past which a write waits for the tail (a commit in progress) and hands the
/// queue over: the bound on memory held by the queue.
const QUEUE_MAX: usize = 65_536;

/// A document waiting to be indexed: a new version (with its `_id`) or a patch's new fields.
struct Queued {
    id: Option<String>,
    slot: u64,
    doc: Arc<Doc>,
}

fn tantivy_err(e: tantivy::TantivyError) -> BasaltError {
    BasaltError::internal(format!("search index: {e}"))
}

/// The tantivy fields of every index of a shard.
#[derive(Clone, Copy)]
struct Fields {
    id: Field,
    slot: Field,
    text: Field,
    raw: Field,
}

fn schema() -> (Schema, Fields) {
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
    (sb.build(), Fields { id, slot, text, raw })
}

fn manual_reader(index: &Index) -> Result<IndexReader> {
    index.reader_builder().reload_policy(ReloadPolicy::Manual).try_into().map_err(tantivy_err)
}

/// The index of recent documents (slots from `base_slot` on): the only one that takes writes.
struct Tail {
    base_slot: u64,
    index: Index,
    writer: IndexWriter<IndexDoc>,
    reader: IndexReader,
    docs: u64,
}

impl Tail {
    fn new(schema: &Schema, base_slot: u64) -> Result<Tail> {
        let index = Index::create_in_ram(schema.clone());
        let writer: IndexWriter<IndexDoc> =
            index.writer_with_num_threads(1, WRITER_MEMORY_BYTES).map_err(tantivy_err)?;
        // Tail segments are merged once, into one, when the tail is sealed.
        writer.set_merge_policy(Box::new(NoMergePolicy));
        let reader = manual_reader(&index)?;
        Ok(Tail { base_slot, index, writer, reader, docs: 0 })
    }
}

/// An immutable index over the slots `base_slot..end_slot` (documents deleted since are
/// filtered by the column store's deletion bitmap, and dropped when indexes merge).
pub struct Sealed {
    pub base_slot: u64,
    pub end_slot: u64,
    index: Index,
    reader: IndexReader,
    /// Where the segment store holds this index, once it does.
    stored: Mutex<Option<String>>,
    /// Documents for slots outside `base_slot..end_slot`: patches of older slots.
    outside: u64,
    /// Whether the index is read from mapped segment files rather than held in memory.
    mapped: bool,
}

impl Sealed {
    fn new(base_slot: u64, end_slot: u64, index: Index, reader: IndexReader) -> Sealed {
        let mut outside = 0;
        for segment in reader.searcher().segment_readers() {
            if let Ok(slots) = segment.fast_fields().u64("_slot") {
                outside += segment
                    .doc_ids_alive()
                    .filter(|doc| slots.first(*doc).is_some_and(|s| s < base_slot || s >= end_slot))
                    .count() as u64;
            }
        }
        Sealed { base_slot, end_slot, index, reader, stored: Mutex::new(None), outside, mapped: false }
    }

    /// Whether the index is read from mapped segment files rather than held in memory.
    pub fn is_mapped(&self) -> bool {
        self.mapped
    }

    /// Documents for slots outside the index's slot range (patches of older slots).
    pub fn outside(&self) -> u64 {
        self.outside
    }

    pub fn stored(&self) -> Option<String> {
        self.stored.lock().clone()
    }

    pub fn set_stored(&self, dir: String) {
        *self.stored.lock() = Some(dir);
    }

    /// Segments the index holds (a sealed tail keeps one per commit until a merge).
    pub fn segments(&self) -> usize {
        self.reader.searcher().segment_readers().len()
    }

    /// Documents in the index, dead or alive.
    pub fn max_doc(&self) -> u64 {
        self.reader.searcher().segment_readers().iter().map(|s| u64::from(s.max_doc())).sum()
    }

    /// The index's files (name and content), to store as a segment.
    pub fn files(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let metas = self.index.load_metas().map_err(tantivy_err)?;
        let dir = self.index.directory();
        let mut names: Vec<std::path::PathBuf> = metas.list_segment_files().into_iter().collect();
        names.push("meta.json".into());
        names.sort();
        let mut out = Vec::new();
        for name in names {
            if !dir.exists(&name).map_err(|e| BasaltError::internal(format!("search index: {e}")))? {
                continue;
            }
            let bytes = dir.atomic_read(&name).map_err(|e| BasaltError::internal(format!("search index: {e}")))?;
            out.push((name.to_string_lossy().to_string(), bytes));
        }
        Ok(out)
    }

    /// Open an index from a directory holding the files [`Sealed::files`] gave (a stored
    /// index's local copy), mapped into memory: the pages are the operating system's to keep
    /// or drop, not the process's heap.
    pub fn open_mapped(base_slot: u64, end_slot: u64, dir: &std::path::Path) -> Result<Sealed> {
        let (index, reader) = MappedDir::open_index(dir)?;
        let mut sealed = Sealed::new(base_slot, end_slot, index, reader);
        sealed.mapped = true;
        Ok(sealed)
    }

    /// The same index opened from its stored (mapped) copy; what the segment store holds is
    /// what was written, so the slot range and the count of outside documents carry over.
    pub fn reopen_mapped(&self, dir: &std::path::Path) -> Result<Sealed> {
        let (index, reader) = MappedDir::open_index(dir)?;
        let max_doc: u64 = reader.searcher().segment_readers().iter().map(|s| u64::from(s.max_doc())).sum();
        if max_doc != self.max_doc() {
            return Err(BasaltError::internal(format!(
                "search index: the stored copy in {} has {max_doc} documents, the index {}",
                dir.display(),
                self.max_doc()
            )));
        }
        Ok(Sealed {
            base_slot: self.base_slot,
            end_slot: self.end_slot,
            index,
            reader,
            stored: Mutex::new(self.stored()),
            outside: self.outside,
            mapped: true,
        })
    }
}

/// A stored index's files mapped read-only: tantivy's `MmapDirectory` without its lock files
/// (a sealed index has no writer, and a lock file would be an object the manifest does not
/// name) and without the watcher thread of its meta file (which never changes).
#[derive(Clone, Debug)]
struct MappedDir(MmapDirectory);

impl MappedDir {
    fn open(dir: &std::path::Path) -> Result<MappedDir> {
        MmapDirectory::open(dir).map(MappedDir).map_err(|e| BasaltError::internal(format!("search index: {e}")))
    }

    /// The index in `dir` with a reader that reloads only when asked.
    fn open_index(dir: &std::path::Path) -> Result<(Index, IndexReader)> {
        let index = Index::open(MappedDir::open(dir)?).map_err(tantivy_err)?;
        let reader = manual_reader(&index)?;
        Ok((index, reader))
    }
}

fn read_only(path: &std::path::Path) -> std::io::Error {
    std::io::Error::other(format!("{}: a stored search index is read-only", path.display()))
}

impl Directory for MappedDir {
    fn get_file_handle(&self, path: &std::path::Path) -> std::result::Result<Arc<dyn FileHandle>, OpenReadError> {
        self.0.get_file_handle(path)
    }

    fn delete(&self, path: &std::path::Path) -> std::result::Result<(), DeleteError> {
        Err(DeleteError::IoError { io_error: Arc::new(read_only(path)), filepath: path.to_path_buf() })
    }

    fn exists(&self, path: &std::path::Path) -> std::result::Result<bool, OpenReadError> {
        self.0.exists(path)
    }

    fn open_write(&self, path: &std::path::Path) -> std::result::Result<WritePtr, OpenWriteError> {
        Err(OpenWriteError::IoError { io_error: Arc::new(read_only(path)), filepath: path.to_path_buf() })
    }

    fn atomic_read(&self, path: &std::path::Path) -> std::result::Result<Vec<u8>, OpenReadError> {
        self.0.atomic_read(path)
    }

    fn atomic_write(&self, path: &std::path::Path, _data: &[u8]) -> std::io::Result<()> {
        Err(read_only(path))
    }

    fn sync_directory(&self) -> std::io::Result<()> {
        Ok(())
    }

    fn acquire_lock(&self, _lock: &Lock) -> std::result::Result<DirectoryLock, LockError> {
        // Readers take the meta lock while they open segments; nothing here ever writes.
        Ok(DirectoryLock::from(Box::new(())))
    }

    fn watch(&self, _callback: WatchCallback) -> tantivy::Result<WatchHandle> {
        Ok(WatchHandle::empty())
    }
}

/// A tail that was just sealed: already searchable, its segments still to be merged into one.
pub struct SealJob {
    pub sealed: Arc<Sealed>,
    writer: IndexWriter<IndexDoc>,
}

pub struct SearchIndex {
    schema: Schema,
    fields: Fields,
    tail: Mutex<Tail>,
    /// Documents written but not yet handed to the tail's writer. Lock order: `tail`, then
    /// `queue`.
    queue: Mutex<Vec<Queued>>,
    sealed: RwLock<Vec<Arc<Sealed>>>,
    /// Set after a document is queued, cleared by a commit (under the tail lock) before it
    /// takes the queue.
    dirty: AtomicBool,
}

/// Values of an `IN` list whose document frequencies estimate the list's postings.
const POSTINGS_SAMPLE: usize = 16;

impl SearchIndex {
    /// An index whose tail starts at `base_slot`, over the given sealed indexes.
    pub fn new(base_slot: u64, sealed: Vec<Arc<Sealed>>) -> Result<Self> {
        let (schema, fields) = schema();
        let tail = Tail::new(&schema, base_slot)?;
        Ok(Self {
            schema,
            fields,
            tail: Mutex::new(tail),
            queue: Mutex::new(Vec::new()),
            sealed: RwLock::new(sealed),
            dirty: AtomicBool::new(false),
        })
    }

    /// Index a new document version at `slot` (which must be in the tail). Older versions are
    /// not deleted here: the column store's deletion bitmap hides them, and merges drop them.
    pub fn add(&self, id: &str, slot: u64, doc: &Arc<Doc>) -> Result<()> {
        self.enqueue(Queued { id: Some(id.to_string()), slot, doc: doc.clone() })
    }

    /// Index the new values of the top-level fields a patch changed in `slot`, which keeps
    /// its earlier documents. A search for a new value finds the slot through this document,
    /// one for an old value through an earlier one: once a shard has patches, the index gives
    /// candidates that the caller checks exactly (see [`SearchIndex::candidate_slots`]).
    pub fn add_patch(&self, slot: u64, fields: Doc) -> Result<()> {
        self.enqueue(Queued { id: None, slot, doc: Arc::new(fields) })
    }

    /// Queue a document for the tail. A long queue is handed to the tail's writer here: when
    /// the tail is free past [`QUEUE_DRAIN`], always (waiting out a commit) past [`QUEUE_MAX`].
    fn enqueue(&self, q: Queued) -> Result<()> {
        let queued = {
            let mut queue = self.queue.lock();
            queue.push(q);
            queue.len()
        };
        self.dirty.store(true, Ordering::Release);
        if queued >= QUEUE_MAX {
            let mut tail = self.tail.lock();
            self.drain(&mut tail)?;
        } else if queued >= QUEUE_DRAIN
            && let Some(mut tail) = self.tail.try_lock()
        {
            self.drain(&mut tail)?;
        }
        Ok(())
    }

    /// Hand every queued document to the tail's writer (indexed by its threads; searchable
    /// after the next commit).
    fn drain(&self, tail: &mut Tail) -> Result<()> {
        let queued = std::mem::take(&mut *self.queue.lock());
        for q in queued {
            tail.writer.add_document(IndexDoc { fields: self.fields, queued: q }).map_err(tantivy_err)?;
            tail.docs += 1;
        }
        Ok(())
    }

    /// Make every write so far visible to searches. The flag is checked and cleared under the
    /// tail lock, before the queue is taken and committed: a caller that finds the index clean
    /// knows the reader already has every write (a commit in progress by another thread is
    /// waited for). Writes go on queueing meanwhile.
    pub fn refresh(&self) -> Result<()> {
        let mut tail = self.tail.lock();
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let committed = (|| {
            self.drain(&mut tail)?;
            tail.writer.commit().map_err(tantivy_err)?;
            tail.reader.reload().map_err(tantivy_err)
        })();
        if committed.is_err() {
            self.dirty.store(true, Ordering::Release);
        }
        committed
    }

    /// Searchers over every index, taken together so a concurrent seal is seen whole.
    fn searchers(&self) -> Result<Vec<tantivy::Searcher>> {
        self.refresh()?;
        let tail = self.tail.lock();
        let mut out: Vec<tantivy::Searcher> = self.sealed.read().iter().map(|s| s.reader.searcher()).collect();
        out.push(tail.reader.searcher());
        Ok(out)
    }

    /// Seal the tail (slots up to `end_slot`) into an immutable index and start a new tail
    /// there. Returns `None` when the tail holds nothing. The caller must hold off writers.
    pub fn seal(&self, end_slot: u64) -> Result<Option<SealJob>> {
        let mut tail = self.tail.lock();
        self.dirty.store(false, Ordering::Release);
        self.drain(&mut tail)?;
        if tail.docs == 0 {
            tail.base_slot = end_slot;
            return Ok(None);
        }
        tail.writer.commit().map_err(tantivy_err)?;
        tail.reader.reload().map_err(tantivy_err)?;
        let fresh = Tail::new(&self.schema, end_slot)?;
        let old = std::mem::replace(&mut *tail, fresh);
        let sealed = Arc::new(Sealed::new(old.base_slot, end_slot, old.index, old.reader));
        self.sealed.write().push(sealed.clone());
        Ok(Some(SealJob { sealed, writer: old.writer }))
    }

    /// Let a sealed tail's writer finish. The segments its commits made stay as they are:
    /// merging them here rewrote every document once more on every flush (measured: most of
    /// a flush's time, and the stall behind the data latency tail at 5,000 documents/s);
    /// compaction merges indexes later, and rewrites an idle shard's into one segment each.
    pub fn finish_seal(&self, job: SealJob) -> Result<Arc<Sealed>> {
        let SealJob { sealed, writer } = job;
        writer.wait_merging_threads().map_err(tantivy_err)?;
        sealed.reader.reload().map_err(tantivy_err)?;
        Ok(sealed)
    }

    pub fn sealed(&self) -> Vec<Arc<Sealed>> {
        self.sealed.read().clone()
    }

    /// Put `new` where `old` is (the same index, reopened from its stored copy). False when
    /// `old` is no longer there (a merge replaced it meanwhile).
    pub fn replace_sealed(&self, old: &Arc<Sealed>, new: Arc<Sealed>) -> bool {
        let mut sealed = self.sealed.write();
        match sealed.iter_mut().find(|s| Arc::ptr_eq(s, old)) {
            Some(slot) => {
                *slot = new;
                true
            }
            None => false,
        }
    }

    /// Merge adjacent sealed indexes into one, leaving out documents whose slot `is_dead`.
    pub fn merge(&self, parts: &[Arc<Sealed>], is_dead: impl Fn(u64) -> bool) -> Result<Arc<Sealed>> {
        let (Some(first), Some(last)) = (parts.first(), parts.last()) else {
            return Err(BasaltError::internal("nothing to merge"));
        };
        let mut segments = Vec::new();
        let mut alive = Vec::new();
        for part in parts {
            let searcher = part.reader.searcher();
            for (segment, reader) in
                part.index.searchable_segments().map_err(tantivy_err)?.into_iter().zip(searcher.segment_readers())
            {
                let slots = reader.fast_fields().u64("_slot").map_err(tantivy_err)?;
                let mut bits = BitSet::with_max_value(reader.max_doc());
                for doc in 0..reader.max_doc() {
                    if reader.is_deleted(doc) {
                        continue;
                    }
                    if slots.first(doc).is_some_and(|slot| !is_dead(slot)) {
                        bits.insert(doc);
                    }
                }
                let mut bytes = Vec::new();
                write_alive_bitset(&bits, &mut bytes)
                    .map_err(|e| BasaltError::internal(format!("search index: {e}")))?;
                alive.push(Some(AliveBitSet::open(OwnedBytes::new(bytes))));
                segments.push(segment);
            }
        }
        let settings = first.index.settings().clone();
        let index = merge_filtered_segments(&segments, settings, alive, RamDirectory::create()).map_err(tantivy_err)?;
        let reader = manual_reader(&index)?;
        let merged = Arc::new(Sealed::new(first.base_slot, last.end_slot, index, reader));
        let mut sealed = self.sealed.write();
        let start = sealed.iter().position(|s| Arc::ptr_eq(s, first));
        if let Some(start) = start
            && sealed.len() >= start + parts.len()
            && sealed[start..start + parts.len()].iter().zip(parts).all(|(a, b)| Arc::ptr_eq(a, b))
        {
            sealed.splice(start..start + parts.len(), [merged.clone()]);
            Ok(merged)
        } else {
            Err(BasaltError::internal("sealed indexes changed during a merge"))
        }
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
                        let mut term = Term::from_field_json_path(self.fields.text, path, false);
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
                let terms = values.iter().map(|v| self.raw_term(path, v)).collect::<Result<Vec<_>>>()?;
                if terms.len() >= TERM_LIST_MIN {
                    Box::new(TermListQuery { terms })
                } else {
                    Box::new(BooleanQuery::new(terms.into_iter().map(|t| (Occur::Should, term_query(t))).collect()))
                }
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
            return Ok(Term::from_field_text(self.fields.id, s));
        }
        let mut term = Term::from_field_json_path(self.fields.raw, path, false);
        match value {
            Scalar::Str(s) => term.append_type_and_str(s),
            Scalar::Int(i) => term.append_type_and_fast_value(*i),
            Scalar::Bool(b) => term.append_type_and_fast_value(*b),
            other => return Err(BasaltError::internal(format!("no index term for {other}"))),
        }
        Ok(term)
    }

    /// For each filter that is an `IN` list, the postings of its terms summed over every index
    /// (each term's document frequency: no postings are read), from up to [`POSTINGS_SAMPLE`]
    /// of its values spread over the list and scaled to all of them; None for other filters.
    /// About its matches (an array holding two of the values counts twice, replaced versions
    /// count until their index merges). With them, how many index segments a search looks each
    /// term up in.
    pub fn list_postings(&self, filters: &[&Filter]) -> Result<ListPostings> {
        let searchers = self.searchers()?;
        let segments = searchers.iter().map(|s| s.segment_readers().len()).sum();
        let per_filter = filters
            .iter()
            .map(|f| {
                let Filter::In { path, values } = f else { return Ok(None) };
                let step = values.len().div_ceil(POSTINGS_SAMPLE).max(1);
                let (mut total, mut sampled) = (0u64, 0u64);
                for v in values.iter().step_by(step) {
                    let term = self.raw_term(path, v)?;
                    for searcher in &searchers {
                        total += searcher.doc_freq(&term).map_err(tantivy_err)?;
                    }
                    sampled += 1;
                }
                Ok(Some(total.saturating_mul(values.len() as u64) / sampled.max(1)))
            })
            .collect::<Result<_>>()?;
        Ok(ListPostings { per_filter, segments })
    }

    /// How many indexed documents match all `filters` (each filter index-answerable). Counts
    /// postings only; versions replaced but not yet merged away count too.
    pub fn count(&self, filters: &[&Filter]) -> Result<u64> {
        // One filter is counted by its own query: a term's count is then its document frequency
        // in each index segment without deletes, where a conjunction of one clause walks every
        // posting (a filter half the documents match cost 2.4 ms of 4.5 in a query).
        let query: Box<dyn Query> = match filters {
            [one] => self.query(one)?,
            _ => Box::new(BooleanQuery::new(
                filters.iter().map(|f| Ok((Occur::Must, self.query(f)?))).collect::<Result<Vec<_>>>()?,
            )),
        };
        let mut total = 0u64;
        for searcher in self.searchers()? {
            total += searcher.search(&*query, &tantivy::collector::Count).map_err(tantivy_err)? as u64;
        }
        Ok(total)
    }

    /// Slots of the documents matching all `filters`, sorted, with their BM25 relevance when
    /// `scoring` (else 0).
    pub fn matching_slots(&self, filters: &[&Filter], scoring: bool) -> Result<Vec<(u64, f32)>> {
        let clauses = filters.iter().map(|f| Ok((Occur::Must, self.query(f)?))).collect::<Result<Vec<_>>>()?;
        let query = BooleanQuery::new(clauses);
        let mut slots = Vec::new();
        let searchers = self.searchers()?;
        // Relevance uses statistics over all indexes of the shard, not per index.
        let stats = AllIndexes(&searchers);
        for searcher in &searchers {
            let collector = SlotCollector { scoring };
            slots.extend(searcher.search_with_statistics_provider(&query, &collector, &stats).map_err(tantivy_err)?);
        }
        if scoring {
            slots.sort_unstable_by_key(|(slot, _)| *slot);
            return Ok(slots);
        }
        Ok(in_slot_order(slots))
    }
}

/// Matches without relevance in slot order, distinct: many as a bit set over the slots (a
/// counting sort), few by sorting. Sorting SSB star q1.2's 39,000 matches per shard (a key
/// list of 31 dates) was a seventh of the query's CPU.
fn in_slot_order(mut slots: Vec<(u64, f32)>) -> Vec<(u64, f32)> {
    let max = slots.iter().map(|(slot, _)| *slot).max().unwrap_or(0);
    // The bit set costs a word per 64 slots of the range: worth it when the matches are at
    // least one in 256 slots, and at most 32 MiB.
    let words = usize::try_from(max / 64 + 1).unwrap_or(usize::MAX);
    if slots.len() < 1024 || words > 4 * slots.len() || words > 1 << 22 {
        slots.sort_unstable_by_key(|(slot, _)| *slot);
        slots.dedup_by_key(|(slot, _)| *slot);
        return slots;
    }
    let mut bits = vec![0u64; words];
    for (slot, _) in &slots {
        if let Some(word) = bits.get_mut((slot / 64) as usize) {
            *word |= 1 << (slot % 64);
        }
    }
    slots.clear();
    for (w, word) in bits.iter().enumerate() {
        let mut left = *word;
        while left != 0 {
            slots.push((w as u64 * 64 + u64::from(left.trailing_zeros()), 1.0));
            left &= left - 1;
        }
    }
    slots
}

/// [`SearchIndex::list_postings`]: per filter, an `IN` list's estimated postings (None for
/// other filters), and the index segments each term is looked up in.
#[derive(Debug, PartialEq)]
pub struct ListPostings {
    pub per_filter: Vec<Option<u64>>,
    pub segments: usize,
}

/// `IN` lists of this many terms or more are searched as one [`TermListQuery`].
const TERM_LIST_MIN: usize = 16;

fn term_query(term: Term) -> Box<dyn Query> {
    Box::new(TermQuery::new(term, IndexRecordOption::Basic))
}

/// The documents holding any of `terms` (an `IN` list). Without scoring, each segment's
/// matches are read from every term's postings at once into a sorted list (a bit set when
/// dense) instead of a union of one scorer per term: tantivy's union moves its scorers (over
/// a kilobyte each) whenever one runs out, and an `IN` list of a join's keys has hundreds.
/// With scoring, it is the union of term queries (each term adds its BM25).
#[derive(Clone, Debug)]
struct TermListQuery {
    terms: Vec<Term>,
}

impl Query for TermListQuery {
    fn weight(&self, scoring: tantivy::query::EnableScoring<'_>) -> tantivy::Result<Box<dyn tantivy::query::Weight>> {
        if scoring.is_scoring_enabled() {
            let clauses = self.terms.iter().map(|t| (Occur::Should, term_query(t.clone()))).collect();
            return BooleanQuery::new(clauses).weight(scoring);
        }
        let mut terms = self.terms.clone();
        terms.sort_unstable();
        terms.dedup();
        Ok(Box::new(TermListWeight { terms }))
    }
}

struct TermListWeight {
    /// Sorted, distinct.
    terms: Vec<Term>,
}

impl TermListWeight {
    fn docs(&self, reader: &SegmentReader) -> tantivy::Result<Box<dyn tantivy::query::Scorer>> {
        use tantivy::query::{BitSetDocSet, ConstScorer};
        let max_doc = reader.max_doc();
        let mut docs: Vec<DocId> = Vec::new();
        let mut bits: Option<BitSet> = None;
        // The terms are sorted, so those of one field (all of them, for one `IN` list) are
        // together: the field's inverted index is opened once.
        let mut index: Option<(tantivy::schema::Field, Arc<tantivy::InvertedIndexReader>)> = None;
        for term in &self.terms {
            if index.as_ref().is_none_or(|(field, _)| *field != term.field()) {
                index = Some((term.field(), reader.inverted_index(term.field())?));
            }
            let Some((_, index)) = &index else { continue };
            let Some(info) = index.get_term_info(term)? else { continue };
            let mut postings = index.read_block_postings_from_terminfo(&info, IndexRecordOption::Basic)?;
            loop {
                let block = postings.docs();
                if block.is_empty() {
                    break;
                }
                match bits.as_mut() {
                    Some(bits) => block.iter().for_each(|d| {
                        bits.insert(*d);
                    }),
                    None => docs.extend_from_slice(block),
                }
                postings.advance();
            }
            // Past one match in 32 documents a bit set is smaller and quicker to build.
            if bits.is_none() && docs.len() as u64 * 32 > u64::from(max_doc) {
                let mut set = BitSet::with_max_value(max_doc);
                docs.drain(..).for_each(|d| {
                    set.insert(d);
                });
                bits = Some(set);
            }
        }
        Ok(match bits {
            Some(bits) => Box::new(ConstScorer::new(BitSetDocSet::from(bits), 1.0)),
            None => {
                docs.sort_unstable();
                docs.dedup();
                Box::new(ConstScorer::new(SortedDocs { docs, cursor: 0 }, 1.0))
            }
        })
    }
}

/// A segment's matching documents, sorted and distinct.
struct SortedDocs {
    docs: Vec<DocId>,
    cursor: usize,
}

impl tantivy::DocSet for SortedDocs {
    fn advance(&mut self) -> DocId {
        self.cursor = (self.cursor + 1).min(self.docs.len());
        self.doc()
    }

    fn seek(&mut self, target: DocId) -> DocId {
        self.cursor += self.docs[self.cursor..].partition_point(|d| *d < target);
        self.doc()
    }

    fn doc(&self) -> DocId {
        self.docs.get(self.cursor).copied().unwrap_or(tantivy::TERMINATED)
    }

    fn size_hint(&self) -> u32 {
        (self.docs.len() - self.cursor) as u32
    }
}

impl tantivy::query::Weight for TermListWeight {
    fn scorer(&self, reader: &SegmentReader, _boost: Score) -> tantivy::Result<Box<dyn tantivy::query::Scorer>> {
        self.docs(reader)
    }

    fn explain(&self, reader: &SegmentReader, doc: DocId) -> tantivy::Result<tantivy::query::Explanation> {
        let mut scorer = self.docs(reader)?;
        if scorer.seek(doc) == doc {
            Ok(tantivy::query::Explanation::new("TermListQuery", 1.0))
        } else {
            Err(tantivy::TantivyError::InvalidArgument(format!("document {doc} does not match")))
        }
    }
}

type SlotHits = HashMap<u64, f32>;

impl SearchIndex {
    /// Slots that may match all `filters`, with relevance when `scoring`: each conjunct and
    /// disjunct is searched alone and the slot sets intersected or joined, so a slot whose
    /// documents match different parts (an earlier version and a patch) is found. Slots
    /// matching only through values a patch replaced are included too: the caller evaluates
    /// the filters exactly on the current values.
    pub fn candidate_slots(&self, filters: &[&Filter], scoring: bool) -> Result<Vec<(u64, f32)>> {
        let searchers = self.searchers()?;
        let stats = AllIndexes(&searchers);
        let mut acc: Option<SlotHits> = None;
        for f in filters {
            let hits = self.slot_set(f, &searchers, &stats, scoring)?;
            acc = Some(match acc {
                None => hits,
                Some(a) => intersect(a, hits),
            });
        }
        let mut out: Vec<(u64, f32)> = acc.unwrap_or_default().into_iter().collect();
        out.sort_unstable_by_key(|(slot, _)| *slot);
        Ok(out)
    }

    fn slot_set(
        &self,
        f: &Filter,
        searchers: &[tantivy::Searcher],
        stats: &AllIndexes,
        scoring: bool,
    ) -> Result<SlotHits> {
        match f {
            Filter::And(items) | Filter::Or(items) if !items.is_empty() => {
                let mut acc: Option<SlotHits> = None;
                for item in items {
                    let hits = self.slot_set(item, searchers, stats, scoring)?;
                    acc = Some(match (acc, matches!(f, Filter::And(_))) {
                        (None, _) => hits,
                        (Some(a), true) => intersect(a, hits),
                        (Some(mut a), false) => {
                            for (slot, score) in hits {
                                *a.entry(slot).or_insert(0.0) += score;
                            }
                            a
                        }
                    });
                }
                Ok(acc.unwrap_or_default())
            }
            _ => {
                let query = self.query(f)?;
                let mut hits = SlotHits::new();
                for searcher in searchers {
                    let collector = SlotCollector { scoring };
                    for (slot, score) in
                        searcher.search_with_statistics_provider(&query, &collector, stats).map_err(tantivy_err)?
                    {
                        let best = hits.entry(slot).or_insert(score);
                        *best = best.max(score);
                    }
                }
                Ok(hits)
            }
        }
    }
}

fn intersect(a: SlotHits, b: SlotHits) -> SlotHits {
    let (small, large) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    small.into_iter().filter_map(|(slot, score)| Some((slot, score + large.get(&slot)?))).collect()
}

/// A queued document as tantivy indexes it, read in place (no copy of its values): `_id`,
/// `_slot`, and two views of the document's fields (but `_id`): full text holds strings only;
/// exact terms hold strings up to MAX_TERM_BYTES, integers and booleans (what term filters
/// use). Floats, nulls and long strings are not exact terms: no index query reads them, and long
/// unique keys are most of the cost of building a segment's term dictionary. Objects and arrays
/// with nothing kept are left out. The tantivy writer's thread turns it into its own document
/// form; building intermediate tantivy values here was a sixth of a bulk load's CPU.
struct IndexDoc {
    fields: Fields,
    queued: Queued,
}

#[derive(Clone, Copy, Debug)]
enum Keep {
    Text,
    Raw,
}

impl Keep {
    fn scalar(self, v: &serde_json::Value) -> bool {
        match (self, v) {
            (Keep::Text, v) => v.is_string(),
            (Keep::Raw, serde_json::Value::String(s)) => s.len() <= MAX_TERM_BYTES,
            (Keep::Raw, v) => v.is_i64() || v.is_u64() || v.is_boolean(),
        }
    }

    /// Whether anything in `v` is kept.
    fn any(self, v: &serde_json::Value) -> bool {
        match v {
            serde_json::Value::Object(map) => map.values().any(|v| self.any(v)),
            serde_json::Value::Array(items) => items.iter().any(|v| self.any(v)),
            scalar => self.scalar(scalar),
        }
    }
}

/// A value of an [`IndexDoc`] for tantivy.
#[derive(Clone, Debug)]
enum View<'a> {
    Id(&'a str),
    Slot(u64),
    /// The document's top level (without `_id`).
    Root(&'a Doc, Keep),
    Json(&'a serde_json::Value, Keep),
}

impl<'a> tantivy::schema::Value<'a> for View<'a> {
    type ArrayIter = ViewItems<'a>;
    type ObjectIter = ViewMembers<'a>;

    fn as_value(&self) -> tantivy::schema::document::ReferenceValue<'a, Self> {
        use tantivy::schema::document::{ReferenceValue, ReferenceValueLeaf};
        match *self {
            View::Id(id) => ReferenceValue::Leaf(ReferenceValueLeaf::Str(id)),
            View::Slot(slot) => ReferenceValue::Leaf(ReferenceValueLeaf::U64(slot)),
            View::Root(doc, keep) => ReferenceValue::Object(ViewMembers { members: doc.iter(), keep, root: true }),
            View::Json(serde_json::Value::Object(map), keep) => {
                ReferenceValue::Object(ViewMembers { members: map.iter(), keep, root: false })
            }
            View::Json(serde_json::Value::Array(items), keep) => {
                ReferenceValue::Array(ViewItems { items: items.iter(), keep })
            }
            // Scalars as tantivy reads serde_json values (text that parses as RFC 3339 is a
            // date), so the index holds the same terms as with tantivy's own conversion.
            View::Json(scalar, _) => ReferenceValue::Leaf(json_leaf(scalar)),
        }
    }
}

/// A JSON scalar as tantivy's own conversion reads it.
fn json_leaf(scalar: &serde_json::Value) -> tantivy::schema::document::ReferenceValueLeaf<'_> {
    use tantivy::schema::document::{ReferenceValue, ReferenceValueLeaf};
    match <&serde_json::Value as tantivy::schema::Value>::as_value(&scalar) {
        ReferenceValue::Leaf(leaf) => leaf,
        // Not reached: objects and arrays are views of their own.
        _ => ReferenceValueLeaf::Null,
    }
}

struct ViewItems<'a> {
    items: std::slice::Iter<'a, serde_json::Value>,
    keep: Keep,
}

impl<'a> Iterator for ViewItems<'a> {
    type Item = View<'a>;

    fn next(&mut self) -> Option<View<'a>> {
        let keep = self.keep;
        self.items.find(|v| keep.any(v)).map(|v| View::Json(v, keep))
    }
}

struct ViewMembers<'a> {
    members: serde_json::map::Iter<'a>,
    keep: Keep,
    root: bool,
}

impl<'a> Iterator for ViewMembers<'a> {
    type Item = (&'a str, View<'a>);

    fn next(&mut self) -> Option<(&'a str, View<'a>)> {
        let (keep, root) = (self.keep, self.root);
        self.members
            .find(|(k, v)| !(root && k.as_str() == ID_FIELD) && keep.any(v))
            .map(|(k, v)| (k.as_str(), View::Json(v, keep)))
    }
}

impl tantivy::schema::Document for IndexDoc {
    type Value<'a> = View<'a>;
    type FieldsValuesIter<'a> = std::vec::IntoIter<(Field, View<'a>)>;

    fn iter_fields_and_values(&self) -> Self::FieldsValuesIter<'_> {
        let f = self.fields;
        let q = &self.queued;
        let doc = q.doc.as_ref();
        let mut values = Vec::with_capacity(4);
        // A patch document has no `_id`.
        if let Some(id) = &q.id {
            values.push((f.id, View::Id(id)));
        }
        values.push((f.slot, View::Slot(q.slot)));
        values.push((f.text, View::Root(doc, Keep::Text)));
        values.push((f.raw, View::Root(doc, Keep::Raw)));
        values.into_iter()
    }
}

/// BM25 statistics summed over every index of a shard.
struct AllIndexes<'a>(&'a [tantivy::Searcher]);

impl Bm25StatisticsProvider for AllIndexes<'_> {
    fn total_num_tokens(&self, field: Field) -> tantivy::Result<u64> {
        self.0.iter().map(|s| s.total_num_tokens(field)).sum()
    }

    fn total_num_docs(&self) -> tantivy::Result<u64> {
        self.0.iter().map(|s| s.total_num_docs()).sum()
    }

    fn doc_freq(&self, term: &Term) -> tantivy::Result<u64> {
        self.0.iter().map(|s| s.doc_freq(term)).sum()
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
    /// Slots come out sorted and distinct by either way: few, many dense, many sparse.
    #[test]
    fn matches_come_in_slot_order_once() {
        for (n, spread) in [(0u64, 1u64), (10, 1_000), (5_000, 3), (5_000, 7_919), (40_000, 150)] {
            // Runs out of order with repeats, as several index segments give them.
            let slots: Vec<(u64, f32)> = (0..n).map(|i| (((i * 7_919) % (n.max(1))) * spread / 2, 0.5)).collect();
            let mut want: Vec<u64> = slots.iter().map(|(s, _)| *s).collect();
            want.sort_unstable();
            want.dedup();
            let got: Vec<u64> = super::in_slot_order(slots).into_iter().map(|(s, _)| s).collect();
            assert_eq!(got, want, "{n} slots spread {spread}");
        }
    }

    use super::*;
    use serde_json::json;

    fn slots(idx: &SearchIndex, f: &Filter) -> Vec<u64> {
        idx.matching_slots(&[f], false).unwrap().into_iter().map(|(s, _)| s).collect()
    }

    /// Tantivy's own document for the same values, built by copying them into tantivy values
    /// (how documents were indexed before [`IndexDoc`] read them in place).
    fn copied(fields: Fields, id: Option<&str>, slot: u64, doc: &Doc) -> tantivy::TantivyDocument {
        use std::collections::BTreeMap;
        use tantivy::schema::OwnedValue;
        fn walk(v: &serde_json::Value, keep: Keep) -> Option<OwnedValue> {
            match v {
                serde_json::Value::Object(map) => {
                    let inner: Vec<(String, OwnedValue)> =
                        map.iter().filter_map(|(k, v)| Some((k.clone(), walk(v, keep)?))).collect();
                    (!inner.is_empty()).then_some(OwnedValue::Object(inner))
                }
                serde_json::Value::Array(items) => {
                    let inner: Vec<OwnedValue> = items.iter().filter_map(|v| walk(v, keep)).collect();
                    (!inner.is_empty()).then_some(OwnedValue::Array(inner))
                }
                scalar if keep.scalar(scalar) => Some(OwnedValue::from(scalar.clone())),
                _ => None,
            }
        }
        let pick = |keep: Keep| -> BTreeMap<String, OwnedValue> {
            doc.iter()
                .filter(|(k, _)| k.as_str() != ID_FIELD)
                .filter_map(|(k, v)| Some((k.clone(), walk(v, keep)?)))
                .collect()
        };
        let mut td = tantivy::TantivyDocument::default();
        if let Some(id) = id {
            td.add_text(fields.id, id);
        }
        td.add_u64(fields.slot, slot);
        td.add_object(fields.text, pick(Keep::Text));
        td.add_object(fields.raw, pick(Keep::Raw));
        td
    }

    #[test]
    fn documents_are_indexed_in_place_as_tantivy_would_copy_them() {
        use tantivy::schema::Document;
        let (schema, fields) = schema();
        let long = "k".repeat(MAX_TERM_BYTES + 1);
        let docs = [
            json!({"_id": "a1", "name": "Ada Lovelace", "n": 7, "big": u64::MAX, "f": 1.5, "ok": true, "none": null,
                   "when": "2026-01-02T03:04:05Z", "digits": "12 apples", "long": long,
                   "address": {"city": "London", "geo": {"lat": 51.5, "lon": -0.12}, "empty": {}},
                   "tags": ["x", 3, 2.5, null, ["nested", 1.0]], "floats": [1.5, 2.5], "objs": [{"f": 1.0}, {"s": "y"}]}),
            json!({"_id": "only-id"}),
            json!({"x": {"y": {"z": 0.5}}, "n": -3}),
        ];
        for (i, doc) in docs.iter().enumerate() {
            let doc: Doc = doc.as_object().unwrap().clone();
            for id in [Some("a1"), None] {
                let queued = Queued { id: id.map(str::to_string), slot: i as u64, doc: Arc::new(doc.clone()) };
                let in_place = IndexDoc { fields, queued }.into_tantivy_document();
                let want = copied(fields, id, i as u64, &doc);
                let json = in_place.to_json(&schema);
                assert_eq!(json, want.to_json(&schema), "document {i}, id {id:?}");
                if i == 0 {
                    assert!(json.contains("London") && json.contains("nested"), "{json}");
                }
            }
        }
    }

    #[test]
    fn searches_see_every_write_while_a_background_refresh_runs() {
        use std::sync::Arc;
        use std::sync::atomic::AtomicBool;
        let idx = Arc::new(SearchIndex::new(0, Vec::new()).unwrap());
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
            let doc = Arc::new(json!({"k": format!("v{i}")}).as_object().unwrap().clone());
            idx.add(&format!("d{i}"), i, &doc).unwrap();
            let f = Filter::Cmp { path: "k".into(), op: CmpOp::Eq, value: Scalar::Str(format!("v{i}")) };
            assert_eq!(slots(&idx, &f), vec![i], "write {i} is not visible to the next search");
        }
        stop.store(true, Ordering::Relaxed);
        background.join().unwrap();
    }

    #[test]
    fn writes_queue_while_a_commit_holds_the_tail_and_long_queues_drain() {
        let idx = SearchIndex::new(0, Vec::new()).unwrap();
        let doc = |i: u64| Arc::new(json!({"k": format!("v{i}")}).as_object().unwrap().clone());
        // A commit in progress holds the tail: writes below the hard bound only queue.
        {
            let _commit = idx.tail.lock();
            for i in 0..(QUEUE_DRAIN as u64 + 10) {
                idx.add(&format!("d{i}"), i, &doc(i)).unwrap();
            }
            assert_eq!(idx.queue.lock().len(), QUEUE_DRAIN + 10);
        }
        // With the tail free, the next write past QUEUE_DRAIN hands the queue to the writer.
        let next = QUEUE_DRAIN as u64 + 10;
        idx.add(&format!("d{next}"), next, &doc(next)).unwrap();
        assert_eq!(idx.queue.lock().len(), 0);
        assert_eq!(idx.tail.lock().docs, next + 1);
        // Handed over but not committed: a search still commits first and sees every write.
        for i in [0, next / 2, next] {
            let f = Filter::Cmp { path: "k".into(), op: CmpOp::Eq, value: Scalar::Str(format!("v{i}")) };
            assert_eq!(slots(&idx, &f), vec![i]);
        }
        // Queued-only writes are sealed with the tail.
        idx.add("last", next + 1, &doc(next + 1)).unwrap();
        let sealed = idx.finish_seal(idx.seal(next + 2).unwrap().unwrap()).unwrap();
        assert_eq!(sealed.max_doc(), next + 2);
        assert!(idx.queue.lock().is_empty());
    }

    /// Long `IN` lists find what one-value lists find, across sealed indexes and the tail, for
    /// numbers, strings, `_id`s and array elements; the postings summed per list count every
    /// match. (A `TermSetQuery`, one automaton over each term dictionary, was slower than a term
    /// query per value for lists of 31 to 485 keys over 40 indexes: TPC-H q19 27 -> 43 ms.)
    #[test]
    fn long_in_lists_find_what_short_ones_find() {
        let idx = SearchIndex::new(0, Vec::new()).unwrap();
        let d = |v: serde_json::Value| Arc::new(v.as_object().unwrap().clone());
        for i in 0..40u64 {
            let doc = json!({"_id": format!("d{i}"), "n": i % 10, "s": format!("v{}", i % 7), "tags": [format!("t{}", i % 3)]});
            idx.add(&format!("d{i}"), i, &d(doc)).unwrap();
            if i == 19 {
                idx.finish_seal(idx.seal(20).unwrap().unwrap()).unwrap();
            }
        }
        let ints = |vs: &[i64]| Filter::In { path: "n".into(), values: vs.iter().map(|v| Scalar::Int(*v)).collect() };
        let strs = |path: &str, vs: &[&str]| Filter::In {
            path: path.into(),
            values: vs.iter().map(|v| Scalar::Str(v.to_string())).collect(),
        };
        let one_by_one = |parts: Vec<Filter>| {
            let mut all: Vec<u64> = parts.iter().flat_map(|p| slots(&idx, p)).collect();
            all.sort_unstable();
            all.dedup();
            all
        };
        let long = ints(&[1, 3, 5, 7, 9, 11, 13, 15]);
        let expected = one_by_one([1, 3, 5, 7, 9].iter().map(|v| ints(&[*v])).collect());
        assert_eq!(slots(&idx, &long), expected);
        assert_eq!(expected.len(), 20);
        let long = strs("s", &["v0", "v2", "v4", "v6", "x", "y", "z", "w"]);
        let expected = one_by_one(["v0", "v2", "v4", "v6"].iter().map(|v| strs("s", &[v])).collect());
        assert_eq!(slots(&idx, &long), expected);
        let ids: Vec<String> = (0..40).step_by(4).map(|i| format!("d{i}")).collect();
        let long = strs("_id", &ids.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(slots(&idx, &long), (0..40).step_by(4).collect::<Vec<u64>>());
        let long = strs("tags", &["t1", "a", "b", "c", "d", "e", "f", "g"]);
        assert_eq!(slots(&idx, &long), (0..40).filter(|i| i % 3 == 1).collect::<Vec<u64>>());
        // Postings per list: 20 documents have an odd `n`; a term is not a list.
        let term = Filter::Cmp { path: "n".into(), op: CmpOp::Eq, value: Scalar::Int(1) };
        let odd = ints(&[1, 3, 5, 7, 9, 11, 13, 15]);
        assert_eq!(
            idx.list_postings(&[&odd, &term]).unwrap(),
            ListPostings { per_filter: vec![Some(20), None], segments: 2 }
        );
    }

    /// Lists of [`TERM_LIST_MIN`] terms or more (read as one sorted list per segment, or a bit
    /// set when dense) find what their terms find one at a time, alone, intersected with
    /// another filter (seeks) and counted, across sealed indexes and the tail, with and
    /// without scoring.
    #[test]
    fn term_lists_find_what_their_terms_find() {
        let idx = SearchIndex::new(0, Vec::new()).unwrap();
        let d = |v: serde_json::Value| Arc::new(v.as_object().unwrap().clone());
        for i in 0..5000u64 {
            idx.add(&format!("d{i}"), i, &d(json!({"n": i % 1000, "m": i % 4}))).unwrap();
            if i == 1999 || i == 3999 {
                idx.finish_seal(idx.seal(i + 1).unwrap().unwrap()).unwrap();
            }
        }
        let ints = |vs: &[i64]| Filter::In { path: "n".into(), values: vs.iter().map(|v| Scalar::Int(*v)).collect() };
        let m1 = Filter::Cmp { path: "m".into(), op: CmpOp::Eq, value: Scalar::Int(1) };
        let one_by_one = |values: &[i64], and: Option<&Filter>| {
            let mut all: Vec<u64> = Vec::new();
            for v in values {
                let term = Filter::Cmp { path: "n".into(), op: CmpOp::Eq, value: Scalar::Int(*v) };
                let filters: Vec<&Filter> = std::iter::once(&term).chain(and).collect();
                all.extend(idx.matching_slots(&filters, false).unwrap().into_iter().map(|(s, _)| s));
            }
            all.sort_unstable();
            all.dedup();
            all
        };
        // Sparse (a sorted list per segment): 16 present values (and duplicates), 4 absent.
        let mut sparse: Vec<i64> = (0..16).map(|v| v * 37 + 5).collect();
        sparse.extend([5, 42, 2000, 3000, -1, 1_000_000]);
        // Dense (a bit set): 400 values, 800 of each sealed index's 2000 documents.
        let dense: Vec<i64> = (0..400).map(|v| v * 2 + 1).collect();
        for values in [&sparse, &dense] {
            let list = ints(values);
            assert!(values.len() >= TERM_LIST_MIN);
            let expected = one_by_one(values, None);
            assert_eq!(slots(&idx, &list), expected);
            assert_eq!(idx.count(&[&list]).unwrap(), expected.len() as u64);
            let scored: Vec<u64> = idx.matching_slots(&[&list], true).unwrap().into_iter().map(|(s, _)| s).collect();
            assert_eq!(scored, expected);
            let expected = one_by_one(values, Some(&m1));
            let found: Vec<u64> =
                idx.matching_slots(&[&list, &m1], false).unwrap().into_iter().map(|(s, _)| s).collect();
            assert_eq!(found, expected);
            assert_eq!(idx.count(&[&m1, &list]).unwrap(), expected.len() as u64);
            assert!(!expected.is_empty());
        }
        assert_eq!(slots(&idx, &ints(&sparse)).len(), 16 * 5);
        // One term alone is counted by its document frequency in each index: the same count.
        for value in [0, 1, 7] {
            let term = Filter::Cmp { path: "m".into(), op: CmpOp::Eq, value: Scalar::Int(value) };
            let found = idx.matching_slots(&[&term], false).unwrap().len() as u64;
            assert_eq!(idx.count(&[&term]).unwrap(), found);
            assert_eq!(found, if value < 4 { 1250 } else { 0 });
        }
    }

    #[test]
    fn scores_rank_better_matches_higher() {
        let idx = SearchIndex::new(0, Vec::new()).unwrap();
        let d = |v: serde_json::Value| Arc::new(v.as_object().unwrap().clone());
        idx.add("a", 0, &d(json!({"t": "coffee and tea and more words here"}))).unwrap();
        idx.add("b", 1, &d(json!({"t": "coffee coffee coffee"}))).unwrap();
        let q = Filter::Search { path: "t".into(), query: "coffee".into() };
        let hits = idx.matching_slots(&[&q], true).unwrap();
        assert_eq!(hits.len(), 2);
        assert!(hits[1].1 > hits[0].1, "{hits:?}");
        // Scores use statistics over all indexes: sealing one part does not change them.
        idx.finish_seal(idx.seal(2).unwrap().unwrap()).unwrap();
        idx.add("c", 2, &d(json!({"t": "tea only"}))).unwrap();
        let before: Vec<f32> = hits.iter().map(|h| h.1).collect();
        let fresh = SearchIndex::new(0, Vec::new()).unwrap();
        fresh.add("a", 0, &d(json!({"t": "coffee and tea and more words here"}))).unwrap();
        fresh.add("b", 1, &d(json!({"t": "coffee coffee coffee"}))).unwrap();
        fresh.add("c", 2, &d(json!({"t": "tea only"}))).unwrap();
        let split: Vec<f32> = idx.matching_slots(&[&q], true).unwrap().iter().map(|h| h.1).collect();
        let whole: Vec<f32> = fresh.matching_slots(&[&q], true).unwrap().iter().map(|h| h.1).collect();
        assert_eq!(split, whole);
        assert_ne!(split, before, "a third document changes the statistics");
    }

    #[test]
    fn finds_terms_text_and_replaces_versions() {
        let idx = SearchIndex::new(0, Vec::new()).unwrap();
        let d = |v: serde_json::Value| Arc::new(v.as_object().unwrap().clone());
        idx.add("u1", 0, &d(json!({"_id": "u1", "name": "Ada Lovelace", "age": 36, "address": {"city": "London"}})))
            .unwrap();
        idx.add("u2", 1, &d(json!({"_id": "u2", "name": "Alan Turing", "age": 41, "ok": true}))).unwrap();
        let search = Filter::Search { path: "name".into(), query: "ada".into() };
        assert_eq!(slots(&idx, &search), vec![0]);
        let city = Filter::Cmp { path: "address.city".into(), op: CmpOp::Eq, value: Scalar::Str("London".into()) };
        assert_eq!(slots(&idx, &city), vec![0]);
        let age = Filter::In { path: "age".into(), values: vec![Scalar::Int(41), Scalar::Int(36)] };
        assert_eq!(slots(&idx, &age), vec![0, 1]);
        let ok = Filter::Cmp { path: "ok".into(), op: CmpOp::Eq, value: Scalar::Bool(true) };
        assert_eq!(slots(&idx, &ok), vec![1]);
        // A new version at slot 2 in a new tail; the old one stays until a merge drops it.
        let job = idx.seal(2).unwrap().unwrap();
        idx.add("u1", 2, &d(json!({"_id": "u1", "name": "Ada King"}))).unwrap();
        assert_eq!(slots(&idx, &search), vec![0, 2]);
        let first = idx.finish_seal(job).unwrap();
        // Round trip through segment files.
        let files = first.files().unwrap();
        assert!(files.iter().any(|(n, _)| n == "meta.json"));
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in &files {
            std::fs::write(dir.path().join(name), bytes).unwrap();
        }
        let copy = Sealed::open_mapped(first.base_slot, first.end_slot, dir.path()).unwrap();
        assert_eq!(copy.max_doc(), 2);
        // The stored copy answers as the index it was written from, in its place.
        let mapped = Arc::new(first.reopen_mapped(dir.path()).unwrap());
        assert!(idx.replace_sealed(&first, mapped.clone()));
        assert_eq!(slots(&idx, &search), vec![0, 2]);
        assert_eq!(slots(&idx, &city), vec![0]);
        assert!(!idx.replace_sealed(&first, mapped.clone()), "first is no longer there");
        // Read-only: tantivy cannot write into it, and opening it left no lock files.
        assert!(MappedDir::open(dir.path()).unwrap().atomic_write(std::path::Path::new("x"), b"x").is_err());
        let mut listed: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        listed.sort();
        assert_eq!(listed, files.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>());
        // A copy that is not this index is refused.
        let other = idx.finish_seal(idx.seal(3).unwrap().unwrap()).unwrap();
        assert!(other.reopen_mapped(dir.path()).is_err());
        let first = mapped;
        let second = other;
        assert!(idx.seal(3).unwrap().is_none(), "an empty tail seals to nothing");
        let merged = idx.merge(&[first, second], |slot| slot == 0).unwrap();
        assert_eq!((merged.base_slot, merged.end_slot, merged.max_doc()), (0, 3, 2));
        assert_eq!(idx.sealed().len(), 1);
        assert_eq!(slots(&idx, &search), vec![2]);
        assert_eq!(slots(&idx, &age), vec![1]);
        let id = Filter::Cmp { path: "_id".into(), op: CmpOp::Eq, value: Scalar::Str("u2".into()) };
        assert_eq!(slots(&idx, &id), vec![1]);
    }
}
