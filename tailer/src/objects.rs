//! S3 objects as record streams: JSON lines, CSV with a header line, Parquet. An object is read
//! as a stream (never whole into memory), record by record; a record's offset is its line or row
//! index, so reading the object again gives every record the same offset (positions work as
//! for Kafka partitions).

use std::collections::VecDeque;
use std::io::Read;
use std::sync::Arc;

use basalt_common::api::{FoundObject, S3Source, SourceFormat};
use basalt_common::{BasaltError, Result};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};

pub(crate) fn s3_err(e: impl std::fmt::Display) -> BasaltError {
    BasaltError::unavailable(format!("s3: {e}"))
}

/// A store for the source's bucket: credentials and defaults from the environment (`AWS_*`),
/// endpoint and region from the source.
pub fn store(spec: &S3Source) -> Result<Arc<dyn ObjectStore>> {
    let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(&spec.bucket);
    if let Some(endpoint) = &spec.endpoint {
        b = b.with_endpoint(endpoint).with_allow_http(endpoint.starts_with("http://"));
    }
    if let Some(region) = &spec.region {
        b = b.with_region(region);
    }
    Ok(Arc::new(b.build().map_err(s3_err)?))
}

/// The objects under the source's prefix (directory markers and empty objects left out).
pub async fn list(store: &dyn ObjectStore, spec: &S3Source) -> Result<Vec<FoundObject>> {
    let prefix = (!spec.prefix.is_empty()).then(|| ObjectPath::from(spec.prefix.as_str()));
    let mut out = Vec::new();
    let mut listing = store.list(prefix.as_ref());
    while let Some(meta) = listing.next().await {
        let meta = meta.map_err(s3_err)?;
        let key = meta.location.to_string();
        // A prefix "2026/" lists "2026/..." only, not "2026-old/...".
        if !key.starts_with(spec.prefix.trim_start_matches('/')) || meta.size == 0 || key.ends_with('/') {
            continue;
        }
        out.push(FoundObject { key, etag: meta.e_tag.unwrap_or_default(), size: meta.size });
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

/// One record of an object: its index, and its payload as JSON text (JSON lines) or as a
/// document already (CSV, Parquet), or the raw text when it could not be read, with the error.
pub struct ObjectRecord {
    pub index: i64,
    pub payload: Vec<u8>,
    pub doc: Option<serde_json::Map<String, serde_json::Value>>,
    pub error: Option<BasaltError>,
}

/// Blocking reads from an object's byte stream (the worker thread drives the async stream).
struct StreamRead {
    rt: tokio::runtime::Handle,
    stream: BoxStream<'static, object_store::Result<Bytes>>,
    current: Bytes,
    bytes: Arc<std::sync::atomic::AtomicU64>,
}

impl StreamRead {
    /// Start reading an object's bytes; `bytes` counts what arrives.
    fn open(
        rt: &tokio::runtime::Handle,
        store: &Arc<dyn ObjectStore>,
        path: &ObjectPath,
        bytes: &Arc<std::sync::atomic::AtomicU64>,
    ) -> Result<StreamRead> {
        let get = rt.block_on(store.get(path)).map_err(s3_err)?;
        Ok(StreamRead { rt: rt.clone(), stream: get.into_stream(), current: Bytes::new(), bytes: bytes.clone() })
    }
}

impl Read for StreamRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rt.block_on(self.stream.next()) {
                None => return Ok(0),
                Some(Ok(b)) => {
                    self.bytes.fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    self.current = b;
                }
                Some(Err(e)) => return Err(std::io::Error::other(e.to_string())),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current = self.current.slice(n..);
        Ok(n)
    }
}

enum Inner {
    Lines(std::io::BufReader<StreamRead>),
    Csv {
        reader: csv::Reader<StreamRead>,
        headers: Vec<String>,
    },
    /// Parquet: the batches' stream, the rows of the batch being read, and the object's size
    /// and row count (its bytes count as read in proportion to its rows decoded: the row groups
    /// are fetched whole, so the bytes fetched say little about how far the load is).
    Parquet {
        stream: BoxStream<'static, parquet::errors::Result<arrow::array::RecordBatch>>,
        rows: VecDeque<serde_json::Map<String, serde_json::Value>>,
        size: u64,
        total: u64,
    },
    /// An Avro object container file: values block by block, as documents of its schema.
    /// After a block fails to decode, the rest of the file is unreadable: it ends there.
    Avro {
        reader: Box<apache_avro::Reader<'static, std::io::BufReader<StreamRead>>>,
        decoder: Box<crate::avro::AvroDecoder>,
        failed: bool,
    },
}

/// The bytes of a Parquet object of `size` bytes and `total` rows that count as read once its
/// rows before `through` are decoded.
fn parquet_progress(size: u64, total: u64, through: i64) -> u64 {
    let through = u64::try_from(through).unwrap_or(0).min(total);
    if total == 0 { size } else { (u128::from(size) * u128::from(through) / u128::from(total)) as u64 }
}

/// Reads an object's records from a given index on.
pub struct ObjectReader {
    inner: Inner,
    next_index: i64,
    /// The largest record accepted (a longer line is an error record; reading goes on).
    record_bytes_max: usize,
    bytes: Arc<std::sync::atomic::AtomicU64>,
    rt: tokio::runtime::Handle,
}

impl ObjectReader {
    /// Open `key` and skip to record `from`.
    pub fn open(
        rt: tokio::runtime::Handle,
        store: Arc<dyn ObjectStore>,
        key: &str,
        size: u64,
        format: SourceFormat,
        from: i64,
        record_bytes_max: usize,
    ) -> Result<ObjectReader> {
        let path = ObjectPath::from(key);
        let bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let from = from.max(0);
        let inner = match format {
            SourceFormat::Json | SourceFormat::Csv => {
                let read = StreamRead::open(&rt, &store, &path, &bytes)?;
                if format == SourceFormat::Json {
                    Inner::Lines(std::io::BufReader::with_capacity(256 * 1024, read))
                } else {
                    let mut reader = csv::ReaderBuilder::new().has_headers(true).flexible(true).from_reader(read);
                    let headers = reader
                        .headers()
                        .map_err(|e| {
                            if e.is_io_error() {
                                s3_err(e)
                            } else {
                                BasaltError::invalid(format!("csv header of {key}: {e}"))
                            }
                        })?
                        .iter()
                        .map(str::to_string)
                        .collect();
                    Inner::Csv { reader, headers }
                }
            }
            SourceFormat::Avro => {
                let read = StreamRead::open(&rt, &store, &path, &bytes)?;
                let reader = apache_avro::Reader::new(std::io::BufReader::with_capacity(256 * 1024, read)).map_err(
                    |e| match e.details() {
                        apache_avro::error::Details::ReadIntoBuf(io) | apache_avro::error::Details::ReadBytes(io)
                            if io.kind() != std::io::ErrorKind::UnexpectedEof =>
                        {
                            s3_err(format!("avro object {key}: {e}"))
                        }
                        _ => BasaltError::invalid(format!("avro object {key}: {e}")),
                    },
                )?;
                let decoder = crate::avro::AvroDecoder::from_schema(
                    reader.writer_schema().clone(),
                    basalt_common::api::AvroFraming::Bare,
                    None,
                )?;
                Inner::Avro { reader: Box::new(reader), decoder: Box::new(decoder), failed: false }
            }
            SourceFormat::Parquet => {
                use parquet::arrow::ParquetRecordBatchStreamBuilder;
                let reader = ParquetObject { store, path, size };
                let builder =
                    rt.block_on(ParquetRecordBatchStreamBuilder::new(reader)).map_err(|e| parquet_open_err(key, e))?;
                let total = u64::try_from(builder.metadata().file_metadata().num_rows()).unwrap_or(0);
                bytes.store(parquet_progress(size, total, from), std::sync::atomic::Ordering::Relaxed);
                let stream = builder
                    .with_batch_size(1024)
                    .with_offset(from as usize)
                    .build()
                    .map_err(|e| BasaltError::invalid(format!("parquet {key}: {e}")))?;
                Inner::Parquet { stream: stream.boxed(), rows: VecDeque::new(), size, total }
            }
        };
        // Parquet skipped to `from` already (`with_offset`); lines and CSV rows are read past.
        let next_index = if matches!(inner, Inner::Parquet { .. }) { from } else { 0 };
        let mut reader = ObjectReader { inner, next_index, record_bytes_max, bytes, rt };
        while reader.next_index < from {
            if reader.next_record()?.is_none() {
                break;
            }
        }
        Ok(reader)
    }

    /// The object's record count when its format says it before reading (Parquet's footer).
    pub fn records(&self) -> Option<i64> {
        match &self.inner {
            Inner::Parquet { total, .. } => i64::try_from(*total).ok(),
            _ => None,
        }
    }

    /// The next record, or None at the end of the object. An error is a failure to read the
    /// object (retried by the worker); a record that cannot be decoded is an error record.
    pub fn next_record(&mut self) -> Result<Option<ObjectRecord>> {
        let index = self.next_index;
        let record = match &mut self.inner {
            Inner::Lines(reader) => match read_line(reader, self.record_bytes_max)? {
                None => return Ok(None),
                Some(Ok(line)) => ObjectRecord { index, payload: line, doc: None, error: None },
                Some(Err(prefix)) => ObjectRecord {
                    index,
                    payload: prefix,
                    doc: None,
                    error: Some(BasaltError::limit(format!("line is over {} bytes", self.record_bytes_max))),
                },
            },
            Inner::Csv { reader, headers } => {
                let mut row = csv::StringRecord::new();
                match reader.read_record(&mut row) {
                    Ok(false) => return Ok(None),
                    Ok(true) => csv_record(index, headers, &row, self.record_bytes_max),
                    Err(e) if e.is_io_error() => return Err(s3_err(e)),
                    Err(e) => ObjectRecord {
                        index,
                        payload: Vec::new(),
                        doc: None,
                        error: Some(BasaltError::invalid(format!("csv: {e}"))),
                    },
                }
            }
            Inner::Parquet { stream, rows, size, total } => {
                while rows.is_empty() {
                    match self.rt.block_on(stream.next()) {
                        None => {
                            self.bytes.store(*size, std::sync::atomic::Ordering::Relaxed);
                            return Ok(None);
                        }
                        Some(Err(e)) => return Err(s3_err(format!("parquet: {e}"))),
                        Some(Ok(batch)) => {
                            let through = index.saturating_add(batch.num_rows() as i64);
                            let progress = parquet_progress(*size, *total, through);
                            self.bytes.store(progress, std::sync::atomic::Ordering::Relaxed);
                            rows.extend(crate::transform::objects(&batch, None)?);
                        }
                    }
                }
                ObjectRecord { index, payload: Vec::new(), doc: rows.pop_front(), error: None }
            }
            Inner::Avro { reader, decoder, failed } => {
                if *failed {
                    return Ok(None);
                }
                match reader.next() {
                    None => return Ok(None),
                    Some(Ok(value)) => match decoder.document(value) {
                        Ok(doc) => ObjectRecord { index, payload: Vec::new(), doc: Some(doc), error: None },
                        Err(e) => ObjectRecord { index, payload: Vec::new(), doc: None, error: Some(e) },
                    },
                    Some(Err(e)) => {
                        if let apache_avro::error::Details::ReadIntoBuf(io) | apache_avro::error::Details::ReadBytes(io) =
                            e.details()
                            && io.kind() != std::io::ErrorKind::UnexpectedEof
                        {
                            return Err(s3_err(format!("avro: {e}")));
                        }
                        *failed = true;
                        ObjectRecord {
                            index,
                            payload: Vec::new(),
                            doc: None,
                            error: Some(BasaltError::invalid(format!(
                                "avro: {e}; the rest of the object cannot be read"
                            ))),
                        }
                    }
                }
            }
        };
        self.next_index += 1;
        Ok(Some(record))
    }
}

/// Records read ahead by one batch.
const PREFETCH_RECORDS: usize = 1024;
/// Payload bytes in one read-ahead batch (JSON lines can be long).
const PREFETCH_BYTES: usize = 4 * 1024 * 1024;
/// Batches read ahead: bounds the memory a reader holds to about this many batches.
const PREFETCH_BATCHES: usize = 4;

enum Prefetched {
    Records(Vec<ObjectRecord>),
    Failed(BasaltError),
    End,
}

/// An [`ObjectReader`] on a thread of its own, a few batches ahead of the worker: reading and
/// decoding the object (Parquet pages, Arrow rows to documents) overlaps with the leaves
/// writing the previous chunk. The queue between them is bounded; the thread ends when the
/// object does or when the worker drops this.
pub struct Prefetch {
    rx: std::sync::mpsc::Receiver<Prefetched>,
    ready: VecDeque<ObjectRecord>,
    bytes: Arc<std::sync::atomic::AtomicU64>,
    records: Option<i64>,
    ended: bool,
}

impl Prefetch {
    pub fn start(mut reader: ObjectReader) -> Result<Prefetch> {
        let (bytes, records) = (reader.bytes.clone(), reader.records());
        let (tx, rx) = std::sync::mpsc::sync_channel(PREFETCH_BATCHES);
        std::thread::Builder::new()
            .name("object-read".into())
            .spawn(move || {
                loop {
                    let mut batch = Vec::with_capacity(PREFETCH_RECORDS);
                    let mut size = 0;
                    let mut end = false;
                    while batch.len() < PREFETCH_RECORDS && size < PREFETCH_BYTES {
                        match reader.next_record() {
                            Ok(Some(r)) => {
                                size += r.payload.len();
                                batch.push(r);
                            }
                            Ok(None) => {
                                end = true;
                                break;
                            }
                            Err(e) => {
                                let _ = tx.send(Prefetched::Failed(e));
                                return;
                            }
                        }
                    }
                    if !batch.is_empty() && tx.send(Prefetched::Records(batch)).is_err() {
                        return;
                    }
                    if end {
                        let _ = tx.send(Prefetched::End);
                        return;
                    }
                }
            })
            .map_err(|e| BasaltError::internal(format!("cannot start an object reader: {e}")))?;
        Ok(Prefetch { rx, ready: VecDeque::new(), bytes, records, ended: false })
    }

    /// [`ObjectReader::records`] of the object.
    pub fn records(&self) -> Option<i64> {
        self.records
    }

    /// Bytes of the object read so far (read ahead included).
    pub fn bytes_read(&self) -> u64 {
        self.bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The next record, None at the end of the object; an error as [`ObjectReader::next_record`].
    pub fn next_record(&mut self) -> Result<Option<ObjectRecord>> {
        loop {
            if let Some(r) = self.ready.pop_front() {
                return Ok(Some(r));
            }
            if self.ended {
                return Ok(None);
            }
            match self.rx.recv() {
                Ok(Prefetched::Records(batch)) => self.ready.extend(batch),
                Ok(Prefetched::End) => self.ended = true,
                Ok(Prefetched::Failed(e)) => return Err(e),
                // Not the end of the object: the reader thread died without saying so.
                Err(_) => return Err(BasaltError::internal("the object reader stopped")),
            }
        }
    }
}

/// A Parquet file that cannot be opened: the store failing is retried (unavailable), a file
/// that is not Parquet is invalid input.
fn parquet_open_err(key: &str, e: parquet::errors::ParquetError) -> BasaltError {
    match e {
        parquet::errors::ParquetError::External(e) => s3_err(format!("parquet {key}: {e}")),
        e => BasaltError::invalid(format!("parquet {key}: {e}")),
    }
}

/// A Parquet file in the store, read by byte ranges (footer first, then the column chunks).
struct ParquetObject {
    store: Arc<dyn ObjectStore>,
    path: ObjectPath,
    size: u64,
}

impl parquet::arrow::async_reader::AsyncFileReader for ParquetObject {
    fn get_bytes(
        &mut self,
        range: std::ops::Range<u64>,
    ) -> futures::future::BoxFuture<'_, parquet::errors::Result<Bytes>> {
        Box::pin(async move {
            self.store
                .get_range(&self.path, range)
                .await
                .map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))
        })
    }

    /// A row group's column chunks in as few requests as possible: `object_store` merges
    /// ranges less than 1 MiB apart into one GET (the trait's default asked for each column
    /// chunk alone: 16 GETs per row group of TPC-H `lineitem`; an S3 server that copies the
    /// object per request, as `moto_server` does, spent a third of a load's CPU on them).
    fn get_byte_ranges(
        &mut self,
        ranges: Vec<std::ops::Range<u64>>,
    ) -> futures::future::BoxFuture<'_, parquet::errors::Result<Vec<Bytes>>> {
        Box::pin(async move {
            self.store
                .get_ranges(&self.path, &ranges)
                .await
                .map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))
        })
    }

    fn get_metadata<'a>(
        &'a mut self,
        _options: Option<&'a parquet::arrow::arrow_reader::ArrowReaderOptions>,
    ) -> futures::future::BoxFuture<'a, parquet::errors::Result<Arc<parquet::file::metadata::ParquetMetaData>>> {
        Box::pin(async move {
            let size = self.size;
            let metadata = parquet::file::metadata::ParquetMetaDataReader::new()
                .with_prefetch_hint(Some(64 * 1024))
                .load_and_finish(self, size)
                .await?;
            Ok(Arc::new(metadata))
        })
    }
}

/// The next line without its line end: Err(first bytes) when it is longer than `max` (the rest
/// is skipped), None at the end.
fn read_line(reader: &mut impl std::io::BufRead, max: usize) -> Result<Option<Result<Vec<u8>, Vec<u8>>>> {
    let mut line = Vec::new();
    let mut over = false;
    let mut any = false;
    loop {
        let buf = reader.fill_buf().map_err(s3_err)?;
        if buf.is_empty() {
            break;
        }
        any = true;
        let (chunk, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        if !over {
            if line.len() + chunk.len() > max {
                over = true;
                let keep = 1024usize.saturating_sub(line.len()).min(chunk.len());
                line.extend_from_slice(&chunk[..keep]);
            } else {
                line.extend_from_slice(chunk);
            }
        }
        let consumed = done.unwrap_or(buf.len());
        reader.consume(consumed);
        if done.is_some() {
            break;
        }
    }
    if !any {
        return Ok(None);
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(if over { Err(line) } else { Ok(line) }))
}

/// A CSV row as a JSON object: header names as fields; integers, floats and `true`/`false`
/// typed, empty cells left out, everything else text.
fn csv_record(index: i64, headers: &[String], row: &csv::StringRecord, max: usize) -> ObjectRecord {
    let raw = || row.iter().collect::<Vec<_>>().join(",").into_bytes();
    if row.as_slice().len() > max {
        let mut p = raw();
        p.truncate(1024);
        return ObjectRecord {
            index,
            payload: p,
            doc: None,
            error: Some(BasaltError::limit(format!("row is over {max} bytes"))),
        };
    }
    if row.len() > headers.len() {
        return ObjectRecord {
            index,
            payload: raw(),
            doc: None,
            error: Some(BasaltError::invalid(format!("csv row has {} cells, the header {}", row.len(), headers.len()))),
        };
    }
    ObjectRecord { index, payload: Vec::new(), doc: Some(csv_doc(headers, row)), error: None }
}

/// A CSV row as a document: a field per named cell, typed by its text (integer, float,
/// `true`/`false`, else string); empty cells are absent fields.
pub(crate) fn csv_doc(names: &[String], row: &csv::StringRecord) -> basalt_common::doc::Doc {
    let mut object = serde_json::Map::new();
    for (name, cell) in names.iter().zip(row.iter()) {
        if cell.is_empty() {
            continue;
        }
        let value = if let Ok(i) = cell.parse::<i64>() {
            serde_json::Value::from(i)
        } else if let Some(f) = cell.parse::<f64>().ok().filter(|f| f.is_finite()) {
            serde_json::Value::from(f)
        } else if cell == "true" || cell == "false" {
            serde_json::Value::Bool(cell == "true")
        } else {
            serde_json::Value::String(cell.to_string())
        };
        object.insert(name.clone(), value);
    }
    object
}

/// A Kafka message holding one CSV row (no header: the source names the columns), of at most
/// `max` bytes.
pub(crate) fn csv_message(names: &[String], payload: &[u8], max: usize) -> Result<basalt_common::doc::Doc> {
    if payload.len() > max {
        return Err(BasaltError::limit(format!("message is over {max} bytes")));
    }
    let mut reader = csv::ReaderBuilder::new().has_headers(false).flexible(true).from_reader(payload);
    let mut row = csv::StringRecord::new();
    match reader.read_record(&mut row) {
        Ok(true) => {}
        Ok(false) => return Err(BasaltError::invalid("csv message is empty")),
        Err(e) => return Err(BasaltError::invalid(format!("csv: {e}"))),
    }
    if row.len() > names.len() {
        return Err(BasaltError::invalid(format!("csv row has {} cells, the source names {}", row.len(), names.len())));
    }
    let mut more = csv::StringRecord::new();
    if reader.read_record(&mut more).map_err(|e| BasaltError::invalid(format!("csv: {e}")))? {
        return Err(BasaltError::invalid("csv message holds more than one row"));
    }
    Ok(csv_doc(names, &row))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_and_long_lines_become_errors() {
        let text = b"{\"a\":1}\r\n\n{\"b\":2}\nxxxxxxxxxxxxxxxxxxxx\n{\"c\":3}";
        let mut r = std::io::BufReader::with_capacity(4, &text[..]);
        let mut out = Vec::new();
        while let Some(l) = read_line(&mut r, 10).unwrap() {
            out.push(l.map(|b| String::from_utf8(b).unwrap()).map_err(|b| b.len() >= 10));
        }
        assert_eq!(
            out,
            vec![Ok("{\"a\":1}".into()), Ok(String::new()), Ok("{\"b\":2}".into()), Err(true), Ok("{\"c\":3}".into())]
        );
    }

    #[test]
    fn csv_cells_are_typed() {
        let headers: Vec<String> = ["id", "n", "x", "ok", "name", "empty"].iter().map(|s| s.to_string()).collect();
        let row = csv::StringRecord::from(vec!["7", "-3", "2.5", "true", "Ada, L.", ""]);
        let r = csv_record(0, &headers, &row, 1000);
        let v = serde_json::Value::Object(r.doc.unwrap());
        assert_eq!(v, serde_json::json!({"id": 7, "n": -3, "x": 2.5, "ok": true, "name": "Ada, L."}));
        let long = csv::StringRecord::from(vec!["1", "2", "3", "4", "5", "6", "7"]);
        assert!(csv_record(1, &headers, &long, 1000).error.is_some());
    }

    #[test]
    fn csv_messages_are_one_row() {
        let names: Vec<String> = ["a", "b"].iter().map(|s| s.to_string()).collect();
        let doc = csv_message(&names, b"1,\"x, y\"", 100).unwrap();
        assert_eq!(serde_json::Value::Object(doc), serde_json::json!({"a": 1, "b": "x, y"}));
        assert!(csv_message(&names, b"1,2,3", 100).is_err());
        assert!(csv_message(&names, b"1,2\n3,4", 100).is_err());
        assert!(csv_message(&names, b"", 100).is_err());
        assert!(csv_message(&names, b"1,22", 3).is_err());
    }

    /// A Parquet object's bytes count as read in proportion to the rows decoded (its row groups
    /// arrive whole): `basalt load`'s progress and ETA come from these. Reading from an offset
    /// counts the rows skipped; the end counts the whole object.
    #[test]
    fn parquet_bytes_follow_the_rows_decoded() {
        use arrow::array::{Int64Array, RecordBatch};
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let n = Arc::new(Int64Array::from_iter_values(0..20_000)) as arrow::array::ArrayRef;
        let batch = RecordBatch::try_from_iter([("n", n)]).unwrap();
        let mut file = Vec::new();
        let props =
            parquet::file::properties::WriterProperties::builder().set_max_row_group_row_count(Some(5_000)).build();
        let mut writer = parquet::arrow::ArrowWriter::try_new(&mut file, batch.schema(), Some(props)).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        let size = file.len() as u64;
        rt.block_on(store.put(&ObjectPath::from("k.parquet"), file.into())).unwrap();
        let open = |from| {
            ObjectReader::open(rt.handle().clone(), store.clone(), "k.parquet", size, SourceFormat::Parquet, from, 1000)
                .unwrap()
        };
        let mut reader = open(0);
        assert_eq!(reader.bytes.load(std::sync::atomic::Ordering::Relaxed), 0);
        let first = reader.next_record().unwrap().unwrap();
        assert_eq!(first.doc.unwrap()["n"], 0);
        // One batch of 1,024 rows decoded of 20,000.
        assert_eq!(reader.bytes.load(std::sync::atomic::Ordering::Relaxed), size * 1024 / 20_000);
        let mut reader = open(10_000);
        assert_eq!(reader.bytes.load(std::sync::atomic::Ordering::Relaxed), size / 2);
        let mut count = 0;
        while let Some(r) = reader.next_record().unwrap() {
            assert_eq!(r.doc.unwrap()["n"], 10_000 + count);
            count += 1;
        }
        assert_eq!(count, 10_000);
        assert_eq!(reader.bytes.load(std::sync::atomic::Ordering::Relaxed), size);
    }

    /// A read-ahead reader returns every record from where it starts, in order, across more
    /// batches than its queue holds, then the end.
    #[test]
    fn prefetch_reads_ahead_in_order() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let text: String = (0..5000).map(|i| format!("{{\"n\":{i}}}\n")).collect();
        let size = text.len() as u64;
        rt.block_on(store.put(&ObjectPath::from("k.jsonl"), text.into_bytes().into())).unwrap();
        let reader =
            ObjectReader::open(rt.handle().clone(), store, "k.jsonl", size, SourceFormat::Json, 10, 1000).unwrap();
        let mut prefetch = Prefetch::start(reader).unwrap();
        let mut indexes = Vec::new();
        while let Some(r) = prefetch.next_record().unwrap() {
            assert_eq!(r.payload, format!("{{\"n\":{}}}", r.index).into_bytes());
            indexes.push(r.index);
        }
        assert_eq!(indexes, (10..5000).collect::<Vec<i64>>());
        assert_eq!(prefetch.bytes_read(), size);
        assert!(prefetch.next_record().unwrap().is_none());
    }
}
