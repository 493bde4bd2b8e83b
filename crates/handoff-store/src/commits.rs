//! The commit record of a link served by several replicas: the planner writes a job's commit
//! decision (which attempt wins each partition) here before any replica publishes it, and marks
//! it applied once every replica has. A planner that restarts finds the records without a marker
//! and applies them again (applying is idempotent), so a commit is either absent or complete,
//! never half published.
//!
//! Layout under the storage URL's path: `commits/<link>/<seq>.json`, the decision, created with
//! a conditional write so that two planners can never both own one sequence number; and
//! `commits/<link>/<seq>.applied`, the marker. `<seq>` is zero-padded to 20 digits so that
//! names sort in commit order.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use object_store::ObjectMeta;
use object_store::path::Path;
use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};
use crate::storage::ObjectStorage;

/// Tries at a sequence number before giving up: each failure means another planner just
/// recorded a commit of the same link, which a job never does on purpose.
const RECORD_TRIES: u32 = 16;

/// The applied marker's content.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Applied {
    /// Each owner's server instance when it applied its part; older markers have none.
    #[serde(default)]
    instances: BTreeMap<u32, String>,
}

/// One recorded commit decision.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CommitRecord {
    pub link: String,
    pub seq: u64,
    /// The link holds exactly these attempts afterwards, on every replica.
    pub replace: bool,
    /// (partition, attempt) pairs, each applied on the partition's owner.
    pub attempts: Vec<(u64, u64)>,
    /// How many replicas the placement was computed over.
    pub replicas: u32,
    /// Each owner's server instance when it checked its part, before the record: an owner
    /// that has restarted since and lacks an attempt lost it, and the commit can never be
    /// completed (the planner then abandons it). Older records have none.
    #[serde(default)]
    pub instances: BTreeMap<u32, String>,
}

/// An applied commit: its record, and each owner's server instance when it applied its part.
pub type AppliedCommit = (CommitRecord, BTreeMap<u32, String>);

/// The abandoned marker's content.
#[derive(Debug, Serialize, Deserialize)]
struct Abandoned {
    reason: String,
}

impl ObjectStorage {
    fn commits_dir(&self, link: &str) -> Path {
        self.path(&["commits", link])
    }

    fn record_path(&self, link: &str, seq: u64, kind: &str) -> Path {
        self.commits_dir(link).join(format!("{seq:020}.{kind}"))
    }

    /// Record a commit decision durably, at the next free sequence number of its link.
    pub async fn record_commit(
        &self,
        link: &str,
        replace: bool,
        attempts: &[(u64, u64)],
        replicas: u32,
    ) -> Result<CommitRecord> {
        self.record_commit_checked(link, replace, attempts, replicas, BTreeMap::new())
            .await
    }

    /// [`Self::record_commit`], with the owners' instances when they checked their parts.
    pub async fn record_commit_checked(
        &self,
        link: &str,
        replace: bool,
        attempts: &[(u64, u64)],
        replicas: u32,
        instances: BTreeMap<u32, String>,
    ) -> Result<CommitRecord> {
        let mut seq = self
            .list(&self.commits_dir(link))
            .await?
            .iter()
            .filter_map(|m| sequence_of(&m.location))
            .max()
            .map_or(Some(0), |last| last.checked_add(1))
            .ok_or_else(|| full(link))?;
        for _ in 0..RECORD_TRIES {
            let record = CommitRecord {
                link: link.to_string(),
                seq,
                replace,
                attempts: attempts.to_vec(),
                replicas,
                instances: instances.clone(),
            };
            let body = serde_json::to_vec(&record).map_err(|e| StoreError::CommitRecord {
                link: link.to_string(),
                detail: format!("cannot be encoded: {e}"),
            })?;
            if self
                .put_new(&self.record_path(link, seq, "json"), Bytes::from(body))
                .await?
            {
                return Ok(record);
            }
            seq = seq.checked_add(1).ok_or_else(|| full(link))?;
        }
        Err(StoreError::CommitRecord {
            link: link.to_string(),
            detail: format!(
                "{RECORD_TRIES} records were written by someone else while this commit was \
                 being recorded; is a second planner running for this link?"
            ),
        })
    }

    /// Mark a recorded commit as applied on every replica, with each owner's server instance
    /// at the time: a replica whose instance changed since restarted and lost what it held.
    pub async fn mark_applied(
        &self,
        record: &CommitRecord,
        instances: &BTreeMap<u32, String>,
    ) -> Result<()> {
        let body = serde_json::to_vec(&Applied {
            instances: instances.clone(),
        })
        .map_err(|e| StoreError::CommitRecord {
            link: record.link.clone(),
            detail: format!("its applied marker cannot be encoded: {e}"),
        })?;
        self.put(
            &self.record_path(&record.link, record.seq, "applied"),
            vec![Bytes::from(body)],
        )
        .await
    }

    /// Mark a recorded commit as abandoned: it can never be applied (an attempt died with a
    /// replica's restart), what it published was taken back, and it is no longer pending.
    pub async fn mark_abandoned(&self, record: &CommitRecord, reason: &str) -> Result<()> {
        let body = serde_json::to_vec(&Abandoned {
            reason: reason.to_string(),
        })
        .map_err(|e| StoreError::CommitRecord {
            link: record.link.clone(),
            detail: format!("its abandoned marker cannot be encoded: {e}"),
        })?;
        self.put(
            &self.record_path(&record.link, record.seq, "abandoned"),
            vec![Bytes::from(body)],
        )
        .await
    }

    /// Every applied commit of one link, in commit order, with the owners' instances when it
    /// was applied. A record and its marker never change once the marker is written, and over
    /// replicas every plan and stats call goes through all of a link's applied commits: so each
    /// is read from object storage once and kept decoded (a job of thousands of task commits
    /// would otherwise cost two reads per commit per rank's plan). A call lists the records.
    pub async fn applied_commits(&self, link: &str) -> Result<Vec<Arc<AppliedCommit>>> {
        let dir = self.commits_dir(link);
        let objects = self.list(&dir).await?;
        let markers: Vec<&ObjectMeta> = objects
            .iter()
            .filter(|m| m.location.extension() == Some("applied"))
            .collect();
        let mut applied = Vec::with_capacity(markers.len());
        for meta in &markers {
            if let Some(commit) = self.decoded.get::<AppliedCommit>(meta) {
                applied.push(commit);
                continue;
            }
            let record_path = with_extension(&meta.location, "json");
            let bad = |what: &str, e: serde_json::Error| StoreError::CommitRecord {
                link: link.to_string(),
                detail: format!("{what} {} is not valid ({e})", meta.location),
            };
            let record: CommitRecord = serde_json::from_slice(&self.get(&record_path).await?)
                .map_err(|e| bad("the record of", e))?;
            let marker: Applied = serde_json::from_slice(&self.get(&meta.location).await?)
                .map_err(|e| bad("the applied marker", e))?;
            let commit = Arc::new((record, marker.instances));
            self.decoded.put(meta, Arc::clone(&commit));
            applied.push(commit);
        }
        self.decoded.retain_under(&dir, &markers);
        applied.sort_by_key(|commit| commit.0.seq);
        Ok(applied)
    }

    /// Every recorded commit without its applied marker, in commit order per link. A record
    /// that cannot be read is an error naming it: skipping it would lose a commit silently.
    pub async fn pending_commits(&self) -> Result<Vec<CommitRecord>> {
        self.pending_under(&self.path(&["commits"])).await
    }

    /// [`Self::pending_commits`] of one link.
    pub async fn pending_commits_of(&self, link: &str) -> Result<Vec<CommitRecord>> {
        self.pending_under(&self.commits_dir(link)).await
    }

    async fn pending_under(&self, prefix: &Path) -> Result<Vec<CommitRecord>> {
        let objects = self.list(prefix).await?;
        // Applied or abandoned: settled either way.
        let settled: std::collections::HashSet<Path> = objects
            .iter()
            .filter(|m| matches!(m.location.extension(), Some("applied" | "abandoned")))
            .map(|m| with_extension(&m.location, "json"))
            .collect();
        let mut pending = Vec::new();
        for meta in objects
            .iter()
            .filter(|m| m.location.extension() == Some("json"))
        {
            if settled.contains(&meta.location) {
                continue;
            }
            let body = self.get(&meta.location).await?;
            let record: CommitRecord =
                serde_json::from_slice(&body).map_err(|e| StoreError::CommitRecord {
                    link: meta.location.to_string(),
                    detail: format!(
                        "{} under {} is not valid ({e}); repair or remove it, then restart: \
                         until then the commit it held is neither applied nor dropped",
                        meta.location,
                        self.url()
                    ),
                })?;
            pending.push(record);
        }
        pending.sort_by(|a, b| (&a.link, a.seq).cmp(&(&b.link, b.seq)));
        Ok(pending)
    }

    /// Remove a link's commit records, when the link is deleted.
    pub async fn forget_commits(&self, link: &str) -> Result<usize> {
        let dir = self.commits_dir(link);
        self.decoded.retain_under(&dir, &[]);
        self.remove_prefix(&dir).await
    }
}

fn full(link: &str) -> StoreError {
    StoreError::InvalidArgument(format!(
        "link '{link}' has used every commit sequence number; write a new link"
    ))
}

fn sequence_of(path: &Path) -> Option<u64> {
    path.filename()?.split('.').next()?.parse().ok()
}

fn with_extension(path: &Path, extension: &str) -> Path {
    let mut parts: Vec<_> = path.parts().collect();
    let name = parts
        .pop()
        .map(|p| p.as_ref().to_string())
        .unwrap_or_default();
    let stem = name.split('.').next().unwrap_or_default();
    Path::from_iter(parts).join(format!("{stem}.{extension}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage() -> (tempfile::TempDir, ObjectStorage) {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage =
            ObjectStorage::from_url(&format!("file://{}", dir.path().display())).expect("url");
        (dir, storage)
    }

    #[tokio::test]
    async fn records_take_the_next_number_and_stay_pending_until_marked() {
        let (_dir, storage) = storage();
        let first = storage
            .record_commit("team/a", false, &[(0, 1), (3, 0)], 3)
            .await
            .expect("record");
        let second = storage
            .record_commit("team/a", true, &[], 3)
            .await
            .expect("record");
        let other = storage
            .record_commit("b", false, &[(7, 2)], 2)
            .await
            .expect("record");
        assert_eq!((first.seq, second.seq, other.seq), (0, 1, 0));
        let pending = storage.pending_commits().await.expect("pending");
        assert_eq!(pending, vec![other.clone(), first.clone(), second.clone()]);
        storage
            .mark_applied(&first, &BTreeMap::from([(0, "i0".to_string())]))
            .await
            .expect("mark");
        let applied = storage.applied_commits("team/a").await.expect("applied");
        assert_eq!(applied.len(), 1);
        assert_eq!(applied[0].0, first);
        assert_eq!(applied[0].1[&0], "i0");
        // Read once: a second call takes the same commit from the cache.
        let again = storage.applied_commits("team/a").await.expect("applied");
        assert!(Arc::ptr_eq(&applied[0], &again[0]));
        assert_eq!(storage.decoded.len(), 1);
        let pending = storage.pending_commits().await.expect("pending");
        assert_eq!(pending, vec![other.clone(), second.clone()]);
        // An abandoned record is settled too, and never counted as applied.
        storage
            .mark_abandoned(&second, "an attempt died")
            .await
            .expect("abandon");
        let pending = storage.pending_commits().await.expect("pending");
        assert_eq!(pending, vec![other]);
        assert_eq!(
            storage
                .applied_commits("team/a")
                .await
                .expect("applied")
                .len(),
            1
        );
        assert_eq!(storage.forget_commits("team/a").await.expect("forget"), 4);
        assert_eq!(storage.pending_commits().await.expect("pending").len(), 1);
        assert_eq!(
            storage.decoded.len(),
            0,
            "the link's commits left the cache"
        );
    }

    #[tokio::test]
    async fn a_taken_number_moves_the_record_on_and_never_overwrites() {
        let (_dir, storage) = storage();
        let path = storage.record_path("l", 0, "json");
        assert!(
            storage
                .put_new(&path, Bytes::from_static(b"x"))
                .await
                .expect("put")
        );
        assert!(
            !storage
                .put_new(&path, Bytes::from_static(b"y"))
                .await
                .expect("put")
        );
        assert_eq!(storage.get(&path).await.expect("get").as_ref(), b"x");
        // A record that cannot be read is an error that names it, not a skipped commit.
        let err = storage.pending_commits().await.expect_err("corrupt");
        assert!(err.to_string().contains("not valid"), "{err}");
        let record = storage
            .record_commit("l", false, &[(1, 0)], 1)
            .await
            .expect("record");
        assert_eq!(record.seq, 1);
    }
}
