//! Shards spread over several leaf processes.
//!
//! Placement is static and the same for every collection: shard `s` lives on leaf `s mod n`,
//! where the leaves are listed in the same order to every tailer and aggregator
//! (`--leaf-addr a,b`). The catalog is hosted by the first leaf. [`PlacedLeaves`] implements
//! [`LeafApi`] by sending each call to the leaf that owns the shard (calls over several shards
//! go to each owner and their answers are combined), so nothing above it knows how many leaves
//! there are.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;

use crate::api::{
    BatchStream, Estimate, FragmentRequest, Leaf, LeafApi, ScanRequest, ShardPosition, ShardWrite, ShardWriteResult,
};
use crate::error::{BasaltError, Result};
use crate::filter::Filter;
use crate::schema::SchemaStats;

pub struct PlacedLeaves {
    leaves: Vec<Leaf>,
}

impl PlacedLeaves {
    /// One leaf is returned as it is; several are wrapped.
    pub fn build(mut leaves: Vec<Leaf>) -> Result<Leaf> {
        match leaves.len() {
            0 => Err(BasaltError::invalid("at least one leaf address is needed")),
            1 => Ok(leaves.remove(0)),
            _ => Ok(Arc::new(PlacedLeaves { leaves })),
        }
    }

    /// The index of the leaf that owns `shard`.
    pub fn owner(shard: u32, leaves: usize) -> usize {
        shard as usize % leaves.max(1)
    }

    fn leaf(&self, shard: u32) -> &Leaf {
        &self.leaves[Self::owner(shard, self.leaves.len())]
    }

    /// The given shards grouped by the leaf that owns them.
    fn by_owner(&self, shards: Vec<u32>) -> BTreeMap<usize, Vec<u32>> {
        let mut groups: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
        for shard in shards {
            groups.entry(Self::owner(shard, self.leaves.len())).or_default().push(shard);
        }
        groups
    }
}

/// The statistics of several leaves merged into one.
async fn merged(
    calls: impl Iterator<Item = impl std::future::Future<Output = Result<SchemaStats>>>,
) -> Result<SchemaStats> {
    let mut out = SchemaStats::default();
    for stats in futures::future::try_join_all(calls).await? {
        out.merge(&stats);
    }
    Ok(out)
}

#[async_trait]
impl LeafApi for PlacedLeaves {
    fn in_process(&self) -> bool {
        self.leaves.iter().all(|l| l.in_process())
    }

    async fn apply(&self, write: ShardWrite) -> Result<ShardWriteResult> {
        self.leaf(write.shard).apply(write).await
    }

    async fn scan(&self, request: ScanRequest) -> Result<BatchStream> {
        self.leaf(request.shard).scan(request).await
    }

    async fn execute(&self, request: FragmentRequest) -> Result<BatchStream> {
        self.leaf(request.shard).execute(request).await
    }

    async fn stats(&self, collection_id: u64, shards: Vec<u32>) -> Result<SchemaStats> {
        let calls =
            self.by_owner(shards).into_iter().map(|(owner, shards)| self.leaves[owner].stats(collection_id, shards));
        merged(calls).await
    }

    async fn planner_stats(&self, collection_id: u64, shards: Vec<u32>, sketches: bool) -> Result<SchemaStats> {
        let calls = self
            .by_owner(shards)
            .into_iter()
            .map(|(owner, shards)| self.leaves[owner].planner_stats(collection_id, shards, sketches));
        merged(calls).await
    }

    async fn estimate(&self, collection_id: u64, shards: Vec<u32>, filters: Vec<Filter>) -> Result<Estimate> {
        let calls = self
            .by_owner(shards)
            .into_iter()
            .map(|(owner, shards)| self.leaves[owner].estimate(collection_id, shards, filters.clone()));
        let mut out = Estimate::default();
        for e in futures::future::try_join_all(calls).await? {
            out.add(e);
        }
        Ok(out)
    }

    async fn drop_collection(&self, collection_id: u64) -> Result<()> {
        futures::future::try_join_all(self.leaves.iter().map(|l| l.drop_collection(collection_id))).await?;
        Ok(())
    }

    async fn positions(&self, collection_id: u64, shards: Vec<u32>, stream: u64) -> Result<Vec<ShardPosition>> {
        let calls = self
            .by_owner(shards)
            .into_iter()
            .map(|(owner, shards)| self.leaves[owner].positions(collection_id, shards, stream));
        Ok(futures::future::try_join_all(calls).await?.into_iter().flatten().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_spread_round_robin() {
        let owners: Vec<usize> = (0..6).map(|s| PlacedLeaves::owner(s, 2)).collect();
        assert_eq!(owners, vec![0, 1, 0, 1, 0, 1]);
        assert_eq!(PlacedLeaves::owner(5, 1), 0);
        assert!(PlacedLeaves::build(vec![]).is_err());
    }
}
