//! A runtime key list (`k IN (1,000 keys)`) answered by Basalt's search index
//! (`SearchIndex::matching_slots`: one `TermListQuery`, slots sorted) and by raw tantivy on the
//! same documents in the same number of segments: a union of term queries (what
//! `BooleanQuery` of `Should` clauses gives) and tantivy's `TermSetQuery`. 400,000 documents
//! `{"k": i % 40,000, "g": i % 7}` in 8 segments of 50,000 (a shard after its idle merges);
//! 1,000 keys match 10,000 documents.

use std::sync::Arc;

use basalt_common::filter::{Filter, Scalar};
use basalt_leaf::search::SearchIndex;
use criterion::{Criterion, criterion_group, criterion_main};
use tantivy::collector::DocSetCollector;
use tantivy::indexer::NoMergePolicy;
use tantivy::query::{BooleanQuery, Occur, Query, TermQuery, TermSetQuery};
use tantivy::schema::{INDEXED, IndexRecordOption, Schema};
use tantivy::{Index, Term, doc};

const DOCS: u64 = 400_000;
const SEGMENT: u64 = 50_000;
const DISTINCT: u64 = 40_000;

fn keys() -> Vec<i64> {
    (0..1_000).map(|i| (i * 37 % DISTINCT) as i64).collect()
}

fn basalt_index() -> SearchIndex {
    let idx = SearchIndex::new(0, Vec::new()).expect("index");
    for i in 0..DOCS {
        let doc = serde_json::json!({"k": i % DISTINCT, "g": i % 7});
        let doc = Arc::new(doc.as_object().cloned().unwrap_or_default());
        idx.add(&format!("d{i}"), i, &doc).expect("add");
        if (i + 1) % SEGMENT == 0 {
            let job = idx.seal(i + 1).expect("seal").expect("a sealed index");
            idx.finish_seal(job).expect("finish seal");
        }
    }
    idx
}

fn tantivy_index() -> (Index, tantivy::schema::Field) {
    let mut schema = Schema::builder();
    let k = schema.add_i64_field("k", INDEXED);
    let g = schema.add_i64_field("g", INDEXED);
    let index = Index::create_in_ram(schema.build());
    let mut writer = index.writer_with_num_threads(1, 50_000_000).expect("writer");
    writer.set_merge_policy(Box::new(NoMergePolicy));
    for i in 0..DOCS {
        writer.add_document(doc!(k => (i % DISTINCT) as i64, g => (i % 7) as i64)).expect("add");
        if (i + 1) % SEGMENT == 0 {
            writer.commit().expect("commit");
        }
    }
    (index, k)
}

fn bench(c: &mut Criterion) {
    let keys = keys();
    let basalt = basalt_index();
    let list = Filter::In { path: "k".into(), values: keys.iter().map(|k| Scalar::Int(*k)).collect() };
    let (index, k) = tantivy_index();
    let reader = index.reader().expect("reader");
    let searcher = reader.searcher();
    assert_eq!(searcher.segment_readers().len(), (DOCS / SEGMENT) as usize);
    let terms: Vec<Term> = keys.iter().map(|v| Term::from_field_i64(k, *v)).collect();
    let union = BooleanQuery::new(
        terms
            .iter()
            .map(|t| (Occur::Should, Box::new(TermQuery::new(t.clone(), IndexRecordOption::Basic)) as Box<dyn Query>))
            .collect(),
    );
    let set = TermSetQuery::new(terms.clone());
    let expected = (keys.len() as u64 * DOCS / DISTINCT) as usize;
    assert_eq!(basalt.matching_slots(&[&list], false).expect("search").len(), expected);
    assert_eq!(searcher.search(&union, &DocSetCollector).expect("search").len(), expected);
    assert_eq!(searcher.search(&set, &DocSetCollector).expect("search").len(), expected);

    let mut group = c.benchmark_group("in_list_1000_keys_8_segments");
    group.bench_function("basalt_search_index", |b| b.iter(|| basalt.matching_slots(&[&list], false).expect("search")));
    group.bench_function("tantivy_union_of_term_queries", |b| {
        b.iter(|| searcher.search(&union, &DocSetCollector).expect("search"))
    });
    group.bench_function("tantivy_term_set_query", |b| {
        b.iter(|| searcher.search(&set, &DocSetCollector).expect("search"))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
