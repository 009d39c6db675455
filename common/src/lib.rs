//! Types shared by every Basalt tier: documents and their limits, smart-schema kinds, the filter
//! IR pushed to leaves, write and scan messages, and the traits through which tiers talk.
//!
//! This crate knows no transport, no storage engine and no SQL engine: it must never depend on
//! tantivy, fjall, pgwire, tonic or DataFusion.

pub mod api;
pub mod arrays;
pub mod doc;
pub mod error;
pub mod filter;
pub mod placement;
pub mod schema;
pub mod sketch;
pub mod text;

pub use error::{BasaltError, ErrorCode, Result};
