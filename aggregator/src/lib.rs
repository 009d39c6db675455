//! The aggregator tier: SQL over the PostgreSQL wire protocol and HTTP, planned by DataFusion,
//! with scans, filters, projections and limits pushed to leaves.
//!
//! Invariants: this crate is the only one that knows pgwire, axum and DataFusion. It reaches
//! leaves, tailers and the catalog only through the traits in `basalt_common::api`.

pub mod catalog;
pub mod compat;
pub mod eager;
pub mod engine;
pub mod fastpath;
pub mod flight;
pub mod floats;
pub mod http;
pub mod joins;
pub mod limits;
pub mod pg;
pub mod shared;
pub mod subqueries;
pub mod table;
pub mod textdates;
pub mod translate;
pub mod udf;
