//! A link: one schema, staged and committed partitions, and its open/sealed/deleted state.

use std::any::Any;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Weak};

use bytes::Bytes;
use futures::future::BoxFuture;
use parking_lot::RwLock;
use serde::Serialize;
use tokio::sync::watch;

use crate::error::{Result, StoreError};
use crate::ipc::{Frame, Incoming, SchemaFrame, check_compatible, validate_message};
use crate::memory::{MemoryPolicy, MemoryPool, Reservation};
use crate::partition::{Partition, now_ms};
use crate::storage::SpillStream;

/// Where memory comes from when a write or read under the `spill` policy is short of it:
/// finished partitions move to object storage, and a partition too large for memory goes
/// there as it arrives. The spill layer implements it; links and reads see only this trait,
/// so they never depend on the layer that uses them.
pub(crate) trait Overflow: Send + Sync + std::fmt::Debug {
    /// Spill least recently used partitions until `needed` bytes were freed, from `only` this
    /// link or from every link under `spill`. Returns the bytes freed; 0: nothing was left.
    fn make_room<'a>(
        &'a self,
        only: Option<&'a Arc<Link>>,
        needed: u64,
    ) -> BoxFuture<'a, Result<u64>>;

    /// An object that a partition still being written of `link` streams to.
    fn stream<'a>(
        &'a self,
        link: &'a str,
        schema_header: &'a Bytes,
    ) -> BoxFuture<'a, Result<SpillStream>>;

    /// Count a finished stream's bytes as spilled.
    fn streamed(&self, bytes: u64);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkState {
    Open,
    Sealed,
    Deleted,
}

impl std::fmt::Display for LinkState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LinkState::Open => "open",
            LinkState::Sealed => "sealed",
            LinkState::Deleted => "deleted",
        })
    }
}

/// A token as the server keeps it: its SHA-256, never the token. Snapshots carry it to a
/// restored server, and a snapshot's reader learns nothing it could present.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    pub fn of(token: &str) -> Self {
        use sha2::Digest;
        Self(sha2::Sha256::digest(token.as_bytes()).into())
    }
}

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenHash(..)")
    }
}

impl From<TokenHash> for String {
    fn from(hash: TokenHash) -> String {
        hash.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl TryFrom<String> for TokenHash {
    type Error = String;

    fn try_from(hex: String) -> std::result::Result<Self, String> {
        let bytes = hex.as_bytes();
        if bytes.len() != 64 {
            return Err(format!(
                "a token hash is 64 hex digits, not {}",
                bytes.len()
            ));
        }
        let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks(2).enumerate() {
            match (digit(pair[0]), digit(pair[1])) {
                (Some(hi), Some(lo)) => out[i] = (hi << 4) | lo,
                _ => return Err("a token hash is hex digits".into()),
            }
        }
        Ok(Self(out))
    }
}

/// Tokens that grant access to this link only, on top of the server-wide ones; kept hashed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct LinkTokens {
    pub writer: Option<TokenHash>,
    pub reader: Option<TokenHash>,
}

impl LinkTokens {
    /// From tokens in clear, as a create request carries them; empty means none.
    pub fn from_clear(writer: &str, reader: &str) -> Self {
        let hash = |t: &str| (!t.is_empty()).then(|| TokenHash::of(t));
        Self {
            writer: hash(writer),
            reader: hash(reader),
        }
    }
}

/// How a link is set up at creation.
#[derive(Debug, Clone, Default)]
pub struct LinkOptions {
    pub tokens: LinkTokens,
    /// Bytes this link may hold, staged and committed, on top of the server limit.
    pub memory_limit: Option<u64>,
    /// What a write does at a limit; `None` takes the server's default.
    pub policy: Option<MemoryPolicy>,
    /// Delete the link this long after its seal.
    pub ttl_after_seal: Option<std::time::Duration>,
    /// Delete the link this long after all ranks of a world finished reading one epoch.
    pub ttl_after_read: Option<std::time::Duration>,
}

/// Why a link was dropped without a delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Its `ttl_seconds_after_seal` passed.
    TtlAfterSeal,
    /// Its `ttl_seconds_after_read` passed after every rank read an epoch.
    TtlAfterRead,
    /// Open, and nobody wrote to it for the server's idle timeout.
    Idle,
}

impl Expiry {
    pub fn label(self) -> &'static str {
        match self {
            Expiry::TtlAfterSeal => "ttl_after_seal",
            Expiry::TtlAfterRead => "ttl_after_read",
            Expiry::Idle => "idle",
        }
    }
}

/// Where a DoPut's data goes when its stream ends cleanly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutTarget {
    /// Commit at once under the next free partition id (PATH descriptor).
    Append,
    /// Stage under (partition, attempt) for a later `commit` (CMD descriptor, two-phase commit).
    Staged { partition: u64, attempt: u64 },
    /// Stage an append under a server-chosen id from [`APPEND_IDS_FROM`] up (attempt 0), which
    /// the planner of a link over replicas then commits: recorded like any commit, an append a
    /// restarted replica lost is reported rather than missing unnoticed.
    StagedAppend { partition: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PutOutcome {
    pub partition: u64,
    pub attempt: u64,
    pub rows: u64,
    pub bytes: u64,
    pub committed: bool,
}

#[derive(Debug)]
pub(crate) struct LinkInner {
    pub state: LinkState,
    pub schema: Option<SchemaFrame>,
    pub committed: Vec<Arc<Partition>>,
    committed_ids: HashMap<u64, u64>,
    staged: BTreeMap<(u64, u64), Arc<Partition>>,
    pub rows: u64,
    pub bytes: u64,
    /// Bumped when a replacing commit drops what was committed before.
    pub generation: u64,
    pub sealed_at_ms: Option<u64>,
    pub last_write_ms: u64,
    /// When every rank of some world size had read one whole epoch.
    pub read_done_at_ms: Option<u64>,
}

impl LinkInner {
    /// Every finished partition: committed, then staged.
    fn finished(&self) -> impl Iterator<Item = &Arc<Partition>> {
        self.committed.iter().chain(self.staged.values())
    }

    /// How many finished partitions were spilled, and their bytes.
    fn spilled(&self) -> (u64, u64) {
        self.finished()
            .filter(|p| p.is_spilled())
            .fold((0, 0), |(n, b), p| (n + 1, b + p.bytes))
    }
}

/// A consistent view of a link's committed data at one instant.
#[derive(Debug, Clone)]
pub struct LinkSnapshot {
    pub name: String,
    pub state: LinkState,
    pub schema: Option<SchemaFrame>,
    pub partitions: Vec<Arc<Partition>>,
    pub rows: u64,
    pub bytes: u64,
    /// Changes only when a replacing commit dropped earlier partitions.
    pub generation: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LinkStats {
    pub link: String,
    pub state: LinkState,
    pub partitions: u64,
    pub rows: u64,
    pub bytes: u64,
    pub staged_partitions: u64,
    pub staged_bytes: u64,
    /// Bytes of this link's data held in memory, staged and committed.
    pub memory_bytes: u64,
    /// Partitions, staged or committed, whose data was moved to object storage.
    pub spilled_partitions: u64,
    pub spilled_bytes: u64,
    pub schema: Vec<String>,
    pub created_unix_ms: u64,
    pub sealed_unix_ms: Option<u64>,
    /// The last partition finished or committed here (creation, if none): the idle timeout
    /// counts from it.
    pub last_write_unix_ms: u64,
    /// This link's own quota, if it has one.
    pub memory_limit: Option<u64>,
    /// `reject`, `wait` or `spill`.
    pub memory_policy: String,
}

#[derive(Debug)]
pub struct Link {
    name: String,
    tokens: LinkTokens,
    policy: MemoryPolicy,
    quota: Option<Arc<MemoryPool>>,
    ttl_after_seal: Option<std::time::Duration>,
    ttl_after_read: Option<std::time::Duration>,
    /// Ranks that finished a whole shard, by (world_size, epoch).
    finished_reads: parking_lot::Mutex<HashMap<(u32, u64), HashSet<u32>>>,
    /// At the planner of a link over replicas: the replicas each planned rank still has to
    /// finish reading from, by (world_size, epoch, rank).
    pending_parts: parking_lot::Mutex<HashMap<(u32, u64, u32), Vec<u32>>>,
    created_ms: u64,
    inner: RwLock<LinkInner>,
    /// Bumped on every commit, seal and delete, so readers can wait for news.
    version: watch::Sender<u64>,
    /// State that concurrent readers share (a shuffled epoch), by key. Held weakly: it lives
    /// while some reader uses it. Typed by the reader, so the link need not know read's types.
    shared_reads: SharedReads,
}

type SharedReads = parking_lot::Mutex<Vec<(String, Weak<dyn Any + Send + Sync>)>>;

impl Link {
    pub(crate) fn new(
        name: String,
        schema: Option<SchemaFrame>,
        options: LinkOptions,
        default_policy: MemoryPolicy,
    ) -> Self {
        let now = now_ms();
        Self {
            quota: options
                .memory_limit
                .map(|limit| MemoryPool::named(format!("link '{name}'"), Some(limit))),
            policy: options.policy.unwrap_or(default_policy),
            ttl_after_seal: options.ttl_after_seal,
            ttl_after_read: options.ttl_after_read,
            finished_reads: Default::default(),
            pending_parts: Default::default(),
            name,
            tokens: options.tokens,
            created_ms: now,
            inner: RwLock::new(LinkInner {
                state: LinkState::Open,
                schema,
                committed: Vec::new(),
                committed_ids: HashMap::new(),
                staged: BTreeMap::new(),
                rows: 0,
                bytes: 0,
                generation: 0,
                sealed_at_ms: None,
                last_write_ms: now,
                read_done_at_ms: None,
            }),
            version: watch::channel(0).0,
            shared_reads: Default::default(),
        }
    }

    /// The state readers under `key` share: the live one, or a new one from `make`.
    pub(crate) fn shared_read<T: Any + Send + Sync>(
        &self,
        key: &str,
        make: impl FnOnce() -> T,
    ) -> Arc<T> {
        let mut shared = self.shared_reads.lock();
        shared.retain(|(_, state)| state.strong_count() > 0);
        if let Some(state) = shared
            .iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, state)| state.upgrade())
            .and_then(|state| state.downcast::<T>().ok())
        {
            return state;
        }
        let state = Arc::new(make());
        let erased: Arc<dyn Any + Send + Sync> = Arc::clone(&state) as _;
        shared.push((key.to_string(), Arc::downgrade(&erased)));
        state
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn tokens(&self) -> &LinkTokens {
        &self.tokens
    }

    /// What of `options` this link does not have, in words (never the tokens themselves);
    /// `None` when every option the caller set matches.
    pub fn differs_from(&self, options: &LinkOptions) -> Option<String> {
        let mut differences = Vec::new();
        let token_differs =
            |asked: &Option<TokenHash>, have: &Option<TokenHash>| asked.is_some() && asked != have;
        if token_differs(&options.tokens.writer, &self.tokens.writer) {
            differences.push("another writer token".to_string());
        }
        if token_differs(&options.tokens.reader, &self.tokens.reader) {
            differences.push("another reader token".to_string());
        }
        let limit = self.quota.as_ref().and_then(|q| q.limit());
        if let Some(asked) = options.memory_limit
            && Some(asked) != limit
        {
            differences.push(match limit {
                Some(have) => format!("a memory limit of {have} bytes, not {asked}"),
                None => format!("no memory limit of its own, not {asked} bytes"),
            });
        }
        if let Some(asked) = options.policy
            && asked.label() != self.policy.label()
        {
            differences.push(format!(
                "memory policy {}, not {}",
                self.policy.label(),
                asked.label()
            ));
        }
        if options.ttl_after_seal.is_some() && options.ttl_after_seal != self.ttl_after_seal {
            differences.push("another ttl_seconds_after_seal".to_string());
        }
        if options.ttl_after_read.is_some() && options.ttl_after_read != self.ttl_after_read {
            differences.push("another ttl_seconds_after_read".to_string());
        }
        (!differences.is_empty()).then(|| differences.join(", "))
    }

    pub fn policy(&self) -> MemoryPolicy {
        self.policy
    }

    /// What this link was created with, to recreate it as it was (a snapshot's restore).
    pub fn options(&self) -> LinkOptions {
        LinkOptions {
            tokens: self.tokens.clone(),
            memory_limit: self.quota.as_ref().and_then(|q| q.limit()),
            policy: Some(self.policy),
            ttl_after_seal: self.ttl_after_seal,
            ttl_after_read: self.ttl_after_read,
        }
    }

    pub(crate) fn quota(&self) -> Option<Arc<MemoryPool>> {
        self.quota.clone()
    }

    pub fn state(&self) -> LinkState {
        self.inner.read().state
    }

    pub fn schema(&self) -> Option<SchemaFrame> {
        self.inner.read().schema.clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    pub fn snapshot(&self) -> LinkSnapshot {
        let inner = self.inner.read();
        LinkSnapshot {
            name: self.name.clone(),
            state: inner.state,
            schema: inner.schema.clone(),
            partitions: inner.committed.clone(),
            rows: inner.rows,
            bytes: inner.bytes,
            generation: inner.generation,
        }
    }

    /// Finished partitions, staged or committed, whose frames are still in memory.
    pub(crate) fn spillable(&self) -> Vec<Arc<Partition>> {
        let inner = self.inner.read();
        inner
            .finished()
            .filter(|p| !p.is_spilled())
            .cloned()
            .collect()
    }

    pub fn spilled_bytes(&self) -> u64 {
        self.inner.read().spilled().1
    }

    pub fn staged_bytes(&self) -> u64 {
        self.inner.read().staged.values().map(|p| p.bytes).sum()
    }

    pub fn stats(&self) -> LinkStats {
        let inner = self.inner.read();
        let staged_bytes: u64 = inner.staged.values().map(|p| p.bytes).sum();
        let (spilled_partitions, spilled_bytes) = inner.spilled();
        LinkStats {
            link: self.name.clone(),
            state: inner.state,
            partitions: inner.committed.len() as u64,
            rows: inner.rows,
            bytes: inner.bytes,
            staged_partitions: inner.staged.len() as u64,
            staged_bytes,
            memory_bytes: inner.bytes + staged_bytes - spilled_bytes,
            spilled_partitions,
            spilled_bytes,
            schema: inner
                .schema
                .as_ref()
                .map(|s| {
                    s.schema
                        .fields()
                        .iter()
                        .map(|f| format!("{}: {}", f.name(), f.data_type()))
                        .collect()
                })
                .unwrap_or_default(),
            created_unix_ms: self.created_ms,
            sealed_unix_ms: inner.sealed_at_ms,
            last_write_unix_ms: inner.last_write_ms,
            memory_limit: self.quota.as_ref().and_then(|q| q.limit()),
            memory_policy: self.policy.label().into(),
        }
    }

    fn ensure_open(&self, inner: &LinkInner) -> Result<()> {
        match inner.state {
            LinkState::Open => Ok(()),
            LinkState::Sealed => Err(StoreError::Sealed(self.name.clone())),
            LinkState::Deleted => Err(StoreError::Deleted(self.name.clone())),
        }
    }

    pub(crate) fn check_writable(&self) -> Result<()> {
        self.ensure_open(&self.inner.read())
    }

    fn check_schema(&self, inner: &LinkInner, schema: &SchemaFrame) -> Result<()> {
        match &inner.schema {
            Some(expected) => check_compatible(&self.name, &expected.schema, &schema.schema),
            None => Ok(()),
        }
    }

    /// Stage or append a finished partition.
    pub(crate) fn finish_put(&self, target: PutTarget, partition: Partition) -> Result<PutOutcome> {
        let mut inner = self.inner.write();
        self.ensure_open(&inner)?;
        self.check_schema(&inner, &partition.schema)?;
        inner.last_write_ms = now_ms();
        match target {
            PutTarget::Append => {
                // Appends number from APPEND_IDS_FROM up, writers' staged ids stay below it: an
                // append can never take an id that a task stages later (the task would then read
                // ALREADY_EXISTS as "done" and its rows would be lost).
                let id = match inner
                    .committed_ids
                    .keys()
                    .filter(|id| **id >= APPEND_IDS_FROM)
                    .max()
                {
                    None => APPEND_IDS_FROM,
                    Some(last) => last.checked_add(1).ok_or_else(|| {
                        StoreError::InvalidArgument(format!(
                            "link '{}' has used every partition id for appends; write a new link",
                            self.name
                        ))
                    })?,
                };
                let partition = partition.numbered(id, 0);
                let outcome = outcome(&partition, true);
                Self::publish(&mut inner, Arc::new(partition));
                drop(inner);
                self.bump();
                Ok(outcome)
            }
            PutTarget::Staged { .. } | PutTarget::StagedAppend { .. } => {
                let (id, attempt) = match target {
                    PutTarget::Staged { partition, attempt } => {
                        check_staged_id(partition)?;
                        (partition, attempt)
                    }
                    PutTarget::StagedAppend { partition } => {
                        check_append_id(partition)?;
                        (partition, 0)
                    }
                    PutTarget::Append => unreachable!("matched above"),
                };
                if let Some(committed) = inner.committed_ids.get(&id) {
                    return Err(StoreError::AlreadyCommitted {
                        link: self.name.clone(),
                        partition: id,
                        attempt: *committed,
                    });
                }
                let partition = partition.numbered(id, attempt);
                let outcome = outcome(&partition, false);
                // A retried stream of the same attempt replaces what it staged before.
                inner.staged.insert((id, attempt), Arc::new(partition));
                Ok(outcome)
            }
        }
    }

    fn publish(inner: &mut LinkInner, partition: Arc<Partition>) {
        if inner.schema.is_none() {
            inner.schema = Some(partition.schema.clone());
        }
        inner.rows += partition.rows;
        inner.bytes += partition.bytes;
        inner.committed_ids.insert(partition.id, partition.attempt);
        inner.committed.push(partition);
    }

    /// Publish exactly these attempts, atomically, and drop the other staged attempts of the
    /// same partitions. With `replace`, everything committed before goes in the same step.
    /// Nothing changes unless every attempt can commit.
    /// The published attempt of every published partition.
    pub fn published(&self) -> HashMap<u64, u64> {
        self.inner.read().committed_ids.clone()
    }

    /// Whether [`Self::apply`] of these attempts would succeed now, publishing nothing: each is
    /// staged here or already published, and the link is open.
    pub fn check_apply(&self, attempts: &[(u64, u64)], replace: bool) -> Result<()> {
        let inner = self.inner.read();
        self.ensure_open(&inner)?;
        for &(partition, attempt) in attempts {
            match inner.committed_ids.get(&partition) {
                Some(&committed) if committed == attempt => continue,
                Some(&committed) if !replace => {
                    return Err(StoreError::AlreadyCommitted {
                        link: self.name.clone(),
                        partition,
                        attempt: committed,
                    });
                }
                _ => {}
            }
            if !inner.staged.contains_key(&(partition, attempt)) {
                return Err(StoreError::NotStaged {
                    link: self.name.clone(),
                    partition,
                    attempt,
                });
            }
        }
        Ok(())
    }

    /// Publish a recorded commit's attempts on this replica, idempotently: attempts already
    /// published are skipped (and counted), so a planner that applies a record again after a
    /// crash changes nothing. A partition published under another attempt is a conflict. With
    /// `replace`, it was applied when the link holds exactly these attempts.
    pub fn apply(
        &self,
        attempts: &[(u64, u64)],
        replace: bool,
    ) -> Result<(Vec<PutOutcome>, usize)> {
        let todo: Vec<(u64, u64)> = {
            let inner = self.inner.read();
            if replace {
                let held: HashSet<(u64, u64)> =
                    inner.committed_ids.iter().map(|(p, a)| (*p, *a)).collect();
                let wanted: HashSet<(u64, u64)> = attempts.iter().copied().collect();
                if held == wanted && wanted.len() == attempts.len() {
                    return Ok((Vec::new(), attempts.len()));
                }
                attempts.to_vec()
            } else {
                attempts
                    .iter()
                    .filter(|(p, a)| inner.committed_ids.get(p) != Some(a))
                    .copied()
                    .collect()
            }
        };
        let skipped = attempts.len() - todo.len();
        if todo.is_empty() && !replace {
            return Ok((Vec::new(), skipped));
        }
        Ok((self.commit(&todo, replace)?, skipped))
    }

    pub fn commit(&self, attempts: &[(u64, u64)], replace: bool) -> Result<Vec<PutOutcome>> {
        let mut inner = self.inner.write();
        self.ensure_open(&inner)?;
        let mut seen = HashSet::new();
        // Replaced contents may come with a new schema.
        let mut schema = if replace { None } else { inner.schema.clone() };
        for &(partition, attempt) in attempts {
            if !seen.insert(partition) {
                return Err(StoreError::InvalidArgument(format!(
                    "partition {partition} appears twice in one commit; commit one attempt per partition"
                )));
            }
            if let Some(committed) = inner.committed_ids.get(&partition)
                && !replace
            {
                return Err(StoreError::AlreadyCommitted {
                    link: self.name.clone(),
                    partition,
                    attempt: *committed,
                });
            }
            let staged =
                inner
                    .staged
                    .get(&(partition, attempt))
                    .ok_or_else(|| StoreError::NotStaged {
                        link: self.name.clone(),
                        partition,
                        attempt,
                    })?;
            match &schema {
                Some(expected) => {
                    check_compatible(&self.name, &expected.schema, &staged.schema.schema)?
                }
                None => schema = Some(staged.schema.clone()),
            }
        }
        if replace {
            inner.committed.clear();
            inner.committed_ids.clear();
            inner.rows = 0;
            inner.bytes = 0;
            inner.schema = schema;
            inner.generation += 1;
        }
        let mut ordered: Vec<(u64, u64)> = attempts.to_vec();
        ordered.sort_unstable();
        let mut outcomes = Vec::with_capacity(ordered.len());
        for (partition, attempt) in ordered {
            let Some(staged) = inner.staged.remove(&(partition, attempt)) else {
                continue;
            };
            let losers: Vec<(u64, u64)> = inner
                .staged
                .range((partition, 0)..=(partition, u64::MAX))
                .map(|(k, _)| *k)
                .collect();
            for key in losers {
                inner.staged.remove(&key);
            }
            outcomes.push(outcome(&staged, true));
            Self::publish(&mut inner, staged);
        }
        inner.last_write_ms = now_ms();
        drop(inner);
        self.bump();
        Ok(outcomes)
    }

    /// Take back published attempts of an open link (those of `attempts` that are published
    /// as named), for a recorded commit over replicas that can never be completed: the planner
    /// abandons it, and what it already published elsewhere goes, so the job's next commit
    /// starts clean. Readers in flight see the link as replaced. Returns how many went.
    pub fn unapply(&self, attempts: &[(u64, u64)]) -> Result<usize> {
        let mut inner = self.inner.write();
        self.ensure_open(&inner)?;
        let gone: HashSet<u64> = attempts
            .iter()
            .filter(|(p, a)| inner.committed_ids.get(p) == Some(a))
            .map(|(p, _)| *p)
            .collect();
        if gone.is_empty() {
            return Ok(0);
        }
        let (mut rows, mut bytes) = (0u64, 0u64);
        inner.committed.retain(|partition| {
            let keep = !gone.contains(&partition.id);
            if !keep {
                rows += partition.rows;
                bytes += partition.bytes;
            }
            keep
        });
        for id in &gone {
            inner.committed_ids.remove(id);
        }
        inner.rows -= rows;
        inner.bytes -= bytes;
        inner.generation += 1;
        drop(inner);
        self.bump();
        Ok(gone.len())
    }

    /// Drop staged attempts; all of them when `attempts` is empty. Returns how many were dropped.
    pub fn abort(&self, attempts: &[(u64, u64)]) -> usize {
        let mut inner = self.inner.write();
        if attempts.is_empty() {
            let n = inner.staged.len();
            inner.staged.clear();
            return n;
        }
        attempts
            .iter()
            .filter(|key| inner.staged.remove(key).is_some())
            .count()
    }

    /// No more writes. Staged attempts can never commit after this, so they are dropped.
    pub fn seal(&self) -> Result<LinkStats> {
        let mut inner = self.inner.write();
        match inner.state {
            LinkState::Deleted => return Err(StoreError::Deleted(self.name.clone())),
            LinkState::Sealed => {}
            LinkState::Open => {
                let dropped = inner.staged.len();
                if dropped > 0 {
                    tracing::warn!(link = %self.name, dropped, "sealing drops uncommitted staged attempts");
                }
                inner.staged.clear();
                inner.state = LinkState::Sealed;
                inner.sealed_at_ms = Some(now_ms());
            }
        }
        drop(inner);
        self.bump();
        Ok(self.stats())
    }

    pub(crate) fn mark_deleted(&self) {
        let mut inner = self.inner.write();
        inner.state = LinkState::Deleted;
        inner.staged.clear();
        inner.committed.clear();
        inner.committed_ids.clear();
        inner.rows = 0;
        inner.bytes = 0;
        drop(inner);
        self.bump();
    }

    /// Whether reads of this link still count towards its read TTL: it has one, not started.
    pub fn counts_reads(&self) -> bool {
        self.ttl_after_read.is_some() && self.inner.read().read_done_at_ms.is_none()
    }

    /// A rank read its whole shard of the sealed link for one epoch. When all ranks of that world
    /// size have, the read TTL starts.
    pub fn finish_read(&self, world_size: u32, epoch: u64, rank: u32) {
        // Only links with a read TTL track readers, and only until the TTL has started.
        if !self.counts_reads() || rank >= world_size {
            return;
        }
        let all_done = {
            let mut finished = self.finished_reads.lock();
            // Ranks come from readers: the tracking is bounded. Past the bound, the other
            // epochs' progress goes (a world that large is read one epoch at a time).
            let tracked: usize = finished.values().map(HashSet::len).sum();
            if tracked >= MAX_TRACKED_READS {
                finished.retain(|key, _| *key == (world_size, epoch));
            }
            let ranks = finished.entry((world_size, epoch)).or_default();
            if ranks.len() < MAX_TRACKED_READS {
                ranks.insert(rank);
            }
            ranks.len() == world_size as usize
        };
        if all_done {
            let mut inner = self.inner.write();
            if inner.read_done_at_ms.is_none() {
                inner.read_done_at_ms = Some(now_ms());
                self.finished_reads.lock().clear();
                self.pending_parts.lock().clear();
                tracing::info!(link = %self.name, world_size, epoch, "every rank finished an epoch");
            }
        }
    }

    /// At the planner of a link over replicas: `rank` of (`world_size`, `epoch`) was planned to
    /// read from `replicas`. The rank counts as done (see [`Self::finish_read`]) once each of
    /// them said it served its whole part ([`Self::finish_part_read`]); at once if none.
    pub fn expect_read(&self, world_size: u32, epoch: u64, rank: u32, replicas: Vec<u32>) {
        if !self.counts_reads() || rank >= world_size {
            return;
        }
        if replicas.is_empty() {
            return self.finish_read(world_size, epoch, rank);
        }
        let mut pending = self.pending_parts.lock();
        if pending.len() >= MAX_TRACKED_READS {
            pending.retain(|(w, e, _), _| (*w, *e) == (world_size, epoch));
        }
        if pending.len() < MAX_TRACKED_READS {
            // A rank planned again (a restarted loader) reads the new plan's parts.
            pending.insert((world_size, epoch, rank), replicas);
        }
    }

    /// At the planner: `replica` served its whole part of a planned rank's read. Reports of
    /// reads that were never planned here (or planned before a restart) are ignored.
    pub fn finish_part_read(&self, world_size: u32, epoch: u64, rank: u32, replica: u32) {
        if !self.counts_reads() {
            return;
        }
        let done = {
            let mut pending = self.pending_parts.lock();
            let key = (world_size, epoch, rank);
            match pending.get_mut(&key) {
                Some(left) => {
                    left.retain(|r| *r != replica);
                    let done = left.is_empty();
                    if done {
                        pending.remove(&key);
                    }
                    done
                }
                None => false,
            }
        };
        if done {
            self.finish_read(world_size, epoch, rank);
        }
    }

    /// Why this link should be dropped at `now_ms`, if it should.
    pub fn expiry(&self, now_ms: u64, idle_timeout: Option<std::time::Duration>) -> Option<Expiry> {
        let inner = self.inner.read();
        match inner.state {
            LinkState::Sealed => {
                let passed =
                    |ttl: Option<std::time::Duration>, since: Option<u64>| match (ttl, since) {
                        (Some(ttl), Some(since)) => now_ms.saturating_sub(since) >= millis(ttl),
                        _ => false,
                    };
                if passed(self.ttl_after_seal, inner.sealed_at_ms) {
                    Some(Expiry::TtlAfterSeal)
                } else if passed(self.ttl_after_read, inner.read_done_at_ms) {
                    Some(Expiry::TtlAfterRead)
                } else {
                    None
                }
            }
            LinkState::Open => {
                let idle = idle_timeout?;
                (now_ms.saturating_sub(inner.last_write_ms) >= millis(idle)).then_some(Expiry::Idle)
            }
            LinkState::Deleted => None,
        }
    }
}

/// The most ranks (or planned ranks' parts) a link tracks for its read TTL: far above a real
/// world size, and a few MiB at most, whatever readers send.
pub const MAX_TRACKED_READS: usize = 1 << 16;

/// Partition ids from here up are the server's, given to appends in order; writers stage under
/// ids below it (the Spark sink and import pick random bases under 2^63).
pub const APPEND_IDS_FROM: u64 = 1 << 63;

/// A staged append's id must be the server's.
pub(crate) fn check_append_id(id: u64) -> Result<()> {
    if id < APPEND_IDS_FROM {
        return Err(StoreError::InvalidArgument(format!(
            "append id {id} is a writer's: appends are staged under ids from {APPEND_IDS_FROM} up"
        )));
    }
    Ok(())
}

/// A random append id from [`APPEND_IDS_FROM`] up that `owns` accepts: the id of an append to
/// one of several replicas, which must be a partition that replica owns. Random, so no two
/// replicas (or restarts) need to agree on a counter; 2^63 ids make a collision negligible.
pub fn random_append_id(owns: impl Fn(u64) -> bool) -> Result<u64> {
    // One draw in n is owned by a given replica of n.
    for _ in 0..1 << 16 {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes)
            .map_err(|e| StoreError::Unsupported(format!("no randomness for an append id: {e}")))?;
        let id = u64::from_le_bytes(bytes) | APPEND_IDS_FROM;
        if owns(id) {
            return Ok(id);
        }
    }
    Err(StoreError::Unsupported(
        "no append id owned by this replica in 65,536 draws; check the replica count".into(),
    ))
}

/// A staged partition id must be a writer's.
pub(crate) fn check_staged_id(id: u64) -> Result<()> {
    if id >= APPEND_IDS_FROM {
        return Err(StoreError::InvalidArgument(format!(
            "staged partition id {id} is reserved: ids from 2^63 up number appends; stage under ids below {APPEND_IDS_FROM}"
        )));
    }
    Ok(())
}

/// A duration in whole milliseconds, saturating: a TTL of centuries must not wrap into "now".
fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn outcome(p: &Partition, committed: bool) -> PutOutcome {
    PutOutcome {
        partition: p.id,
        attempt: p.attempt,
        rows: p.rows,
        bytes: p.bytes,
        committed,
    }
}

/// Collects one DoPut stream. Dropping it unfinished (a broken stream) leaves nothing behind and
/// releases its memory.
pub struct PartitionWriter {
    link: Arc<Link>,
    link_name: Arc<str>,
    target: PutTarget,
    schema: Option<SchemaFrame>,
    frames: Vec<Frame>,
    rows: u64,
    bytes: u64,
    frame_rows: Vec<u64>,
    frame_bytes: Vec<u64>,
    /// Grows as frames arrive; each frame then takes its share along with its body.
    reservation: Reservation,
    spiller: Option<Arc<dyn Overflow>>,
    /// Under `spill`, once nothing finished was left to move out: where this partition's frames
    /// go as they arrive, so that a partition larger than memory lands.
    stream: Option<SpillStream>,
}

impl PartitionWriter {
    pub(crate) fn new(
        link: Arc<Link>,
        target: PutTarget,
        reservation: Reservation,
        spiller: Option<Arc<dyn Overflow>>,
    ) -> Self {
        Self {
            link_name: Arc::from(link.name()),
            link,
            target,
            schema: None,
            frames: Vec::new(),
            rows: 0,
            bytes: 0,
            frame_rows: Vec::new(),
            frame_bytes: Vec::new(),
            reservation,
            spiller,
            stream: None,
        }
    }

    pub fn link(&self) -> &Arc<Link> {
        &self.link
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Validate and keep one IPC message of the stream. Under the `wait` policy this waits for
    /// memory, which stalls the sender through gRPC flow control; under `spill` it first moves
    /// finished partitions to object storage.
    pub async fn push(&mut self, header: Bytes, body: Bytes) -> Result<()> {
        self.push_arrived(header, body, None).await
    }

    /// [`Self::push`] of a message whose bytes were reserved as it arrived (`arrived`, from the
    /// server's pool): the frame keeps that reservation instead of taking a second one, so a
    /// writer that waits for memory never holds a message nobody counts.
    pub async fn push_arrived(
        &mut self,
        header: Bytes,
        body: Bytes,
        arrived: Option<Reservation>,
    ) -> Result<()> {
        match validate_message(self.schema.as_ref().map(|s| &s.schema), header, body)? {
            Incoming::Schema(schema) => {
                if self.schema.is_some() {
                    return Err(StoreError::InvalidIpc(
                        "a second schema message in one stream; send one schema per DoPut".into(),
                    ));
                }
                {
                    let inner = self.link.inner.read();
                    self.link.ensure_open(&inner)?;
                    self.link.check_schema(&inner, &schema)?;
                }
                self.schema = Some(schema);
            }
            Incoming::Batch(frame) => {
                self.link.check_writable()?;
                let bytes = frame.bytes();
                if self.stream.is_none() && !self.reserve(bytes, arrived).await? {
                    self.start_stream().await?;
                }
                let rows = frame.rows;
                match self.stream.as_mut() {
                    Some(stream) => stream.push(&frame).await?,
                    None => {
                        let held = self.reservation.split(bytes);
                        self.frames.push(frame.owned(held));
                    }
                }
                self.rows += rows;
                self.bytes += bytes;
                self.frame_rows.push(rows);
                self.frame_bytes.push(bytes);
            }
        }
        Ok(())
    }

    /// Reserve a frame's bytes. `Ok(false)`: under `spill` nothing finished is left to move
    /// out, and this partition must go out as it is written.
    async fn reserve(&mut self, bytes: u64, arrived: Option<Reservation>) -> Result<bool> {
        if let Some(mut arrived) = arrived
            && self.reservation.take_from(&mut arrived, bytes).is_ok()
        {
            return Ok(true);
        }
        let policy = self.link.policy;
        if policy != MemoryPolicy::Spill {
            return self.reservation.grow(bytes, policy).await.map(|()| true);
        }
        let spiller = self.spiller.clone().ok_or_else(|| {
            StoreError::InvalidArgument(
                "link uses the spill policy but this server has no object storage; start it with --spill-url".into(),
            )
        })?;
        loop {
            if self.reservation.try_grow(bytes).is_ok() {
                return Ok(true);
            }
            let only = self
                .reservation
                .link_quota_is_short(bytes)
                .then_some(&self.link);
            if spiller.make_room(only, bytes).await? == 0 {
                // Another writer may have spilled and freed memory meanwhile.
                return Ok(self.reservation.try_grow(bytes).is_ok());
            }
        }
    }

    /// Send this partition's frames so far, and every later one, to object storage.
    async fn start_stream(&mut self) -> Result<()> {
        let (Some(spiller), Some(schema)) = (self.spiller.clone(), self.schema.as_ref()) else {
            return Err(StoreError::InvalidArgument(
                "link uses the spill policy but this server has no object storage; start it with --spill-url".into(),
            ));
        };
        let mut stream = spiller.stream(&self.link_name, &schema.header).await?;
        for frame in std::mem::take(&mut self.frames) {
            stream.push(&frame).await?;
        }
        stream.count_buffers(self.reservation.split(0));
        self.stream = Some(stream);
        Ok(())
    }

    /// The stream ended cleanly: stage or commit what it carried.
    pub async fn finish(self) -> Result<PutOutcome> {
        let schema = self.schema.ok_or_else(|| {
            StoreError::InvalidIpc(
                "the DoPut stream carried no schema message; nothing was written".into(),
            )
        })?;
        let partition = match self.stream {
            Some(stream) => {
                let spilled = stream.finish().await?;
                if let Some(spiller) = &self.spiller {
                    spiller.streamed(self.bytes);
                }
                Partition::streamed(
                    self.link_name,
                    schema,
                    spilled,
                    self.frame_rows,
                    self.frame_bytes,
                )
            }
            None => Partition::new(self.link_name, schema, self.frames),
        };
        self.link.finish_put(self.target, partition)
    }
}
