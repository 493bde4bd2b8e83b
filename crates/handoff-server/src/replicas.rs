//! One link over several server replicas (`serve --peers`): who owns a partition, and the
//! planner's calls to the other replicas. Replica 0 plans: it records each commit decision in
//! object storage before any replica publishes it, then asks every owner to apply its part, and
//! seals by sealing every replica. Placement, the record and idempotent applying are the
//! store's; this module only moves them over Flight.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use handoff_client::{ClientConfig, HandoffClient};
use handoff_proto as proto;
use handoff_proto::placement::{MAX_REPLICAS, owner};
use handoff_store::{CommitRecord, ObjectStorage, Store, StoreError};

use crate::error::status_of;
use prost::Message;
use tonic::Status;

/// What applying (or checking) a commit's part did on a replica.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Applied {
    /// Attempts published now.
    pub committed: u64,
    /// Attempts that were published before (a commit applied again).
    pub already: u64,
    /// Rows published now.
    pub rows: u64,
    /// The replica's server instance: a later, different one means it restarted and its memory
    /// started over (`BTreeMap` over replicas once summed up by the planner).
    #[serde(default)]
    pub instance: String,
    #[serde(default)]
    pub instances: BTreeMap<u32, String>,
}

/// How the planner applies (or, with the last flag, checks) its own part of a commit: the
/// attempts, `replace`, `check_only`.
pub(crate) type ApplyHere<'a> =
    dyn Fn(&[(u64, u64)], bool, bool) -> Result<Applied, Status> + Sync + 'a;

/// The replicas of this server, as `serve --peers/--replica-index` gives them.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// Every replica's Flight endpoint, in index order (this server's too).
    peers: Vec<String>,
    index: u32,
    /// The admin token replicas call each other with; `None` when auth is off.
    token: Option<String>,
    /// For grpc+tls:// peers: the CA their certificates chain to (`None`: the system's roots),
    /// and the name to verify instead of each peer's host (an address in a test).
    tls_ca_pem: Option<Vec<u8>>,
    tls_domain: Option<String>,
    /// Idle connections to other replicas, by index: a plan asks every replica for its counts,
    /// and a fresh connection per call would cost more than the call.
    idle: std::sync::Arc<std::sync::Mutex<BTreeMap<u32, Vec<HandoffClient>>>>,
}

/// Idle connections kept per replica: about as many as calls run at once.
const IDLE_PER_REPLICA: usize = 4;

impl ReplicaConfig {
    /// `Err` says what is wrong with the flags, in a sentence that names the fix.
    pub fn new(peers: Vec<String>, index: u32, token: Option<String>) -> Result<Self, String> {
        let count = u32::try_from(peers.len()).unwrap_or(u32::MAX);
        if count == 0 || count > MAX_REPLICAS {
            return Err(format!(
                "--peers lists {} endpoints; give 1 to {MAX_REPLICAS}, one per replica in index order",
                peers.len()
            ));
        }
        if index >= count {
            return Err(format!(
                "--replica-index {index} is past the {count} endpoints of --peers; replicas number from 0"
            ));
        }
        let tls = peers[0].starts_with("grpc+tls://");
        for (i, peer) in peers.iter().enumerate() {
            let scheme_ok = if tls {
                peer.starts_with("grpc+tls://")
            } else {
                peer.starts_with("grpc://")
            };
            if !scheme_ok {
                return Err(format!(
                    "--peers endpoint {i} '{peer}' is not {}HOST:PORT like the first one; \
                     replicas all speak TLS or all plain text",
                    if tls { "grpc+tls://" } else { "grpc://" }
                ));
            }
            if peers[..i].contains(peer) {
                return Err(format!(
                    "--peers names '{peer}' twice; every replica needs its own endpoint"
                ));
            }
        }
        Ok(Self {
            peers,
            index,
            token,
            tls_ca_pem: None,
            tls_domain: None,
            idle: Default::default(),
        })
    }

    /// Whether the replicas speak TLS to each other (their endpoints are grpc+tls://).
    pub fn tls(&self) -> bool {
        self.peers[0].starts_with("grpc+tls://")
    }

    /// Verify peers' certificates against `ca_pem` (PEM), as `domain` when given rather than
    /// by each peer's host name.
    pub fn with_tls(mut self, ca_pem: Option<Vec<u8>>, domain: Option<String>) -> Self {
        self.tls_ca_pem = ca_pem;
        self.tls_domain = domain;
        self
    }

    pub fn count(&self) -> u32 {
        // At most MAX_REPLICAS, checked in `new`.
        self.peers.len() as u32
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    pub fn peers(&self) -> &[String] {
        &self.peers
    }

    pub fn is_planner(&self) -> bool {
        self.index == 0
    }

    /// The replica that holds `partition` of `link`.
    pub fn owner(&self, link: &str, partition: u64) -> u32 {
        owner(link, partition, self.count())
    }

    pub fn url(&self, replica: u32) -> &str {
        &self.peers[replica as usize]
    }

    /// A client of replica `replica`, with the replicas' token.
    pub(crate) async fn client(&self, replica: u32) -> Result<HandoffClient, Status> {
        let mut config = ClientConfig::new(self.url(replica), self.token.clone());
        if self.tls() {
            config.tls_ca_pem = self.tls_ca_pem.clone();
            config.tls_domain = self.tls_domain.clone();
        }
        HandoffClient::connect_with(config)
            .await
            .map_err(|e| peer_status(self.url(replica), "connect to", e))
    }

    /// The refusal for a write that belongs to another replica.
    pub(crate) fn not_here(&self, link: &str, partition: u64) -> Status {
        let owner = self.owner(link, partition);
        Status::failed_precondition(format!(
            "partition {partition} of link '{}' belongs to replica {owner} ({}), not to this \
             replica {}: write it there. Handoff's clients route by themselves; the 'topology' \
             action lists the replicas",
            handoff_store::echo(link),
            self.url(owner),
            self.index
        ))
    }

    /// The refusal for a call only the planner takes.
    pub(crate) fn planner_only(&self, what: &str) -> Status {
        Status::failed_precondition(format!(
            "{what} goes to the planner, replica 0 ({}); this is replica {}",
            self.url(0),
            self.index
        ))
    }

    /// Split a commit's attempts by owner, every replica listed (a replace clears them all).
    pub fn split(&self, link: &str, attempts: &[(u64, u64)]) -> BTreeMap<u32, Vec<(u64, u64)>> {
        let mut parts: BTreeMap<u32, Vec<(u64, u64)>> =
            (0..self.count()).map(|r| (r, Vec::new())).collect();
        for &(partition, attempt) in attempts {
            parts
                .entry(self.owner(link, partition))
                .or_default()
                .push((partition, attempt));
        }
        parts
    }

    /// Send each owner its part of a commit, this replica's through `local`: to check it
    /// (`check_only`: every attempt staged there or already published) or to publish it.
    pub(crate) async fn each_owner(
        &self,
        link: &str,
        attempts: &[(u64, u64)],
        replace: bool,
        check_only: bool,
        local: &ApplyHere<'_>,
    ) -> Result<Applied, Status> {
        let mut total = Applied::default();
        for (replica, part) in self.split(link, attempts) {
            if part.is_empty() && !replace {
                continue;
            }
            let applied = self
                .apply_at(replica, link, &part, replace, check_only, local)
                .await?;
            total.committed = total.committed.saturating_add(applied.committed);
            total.already = total.already.saturating_add(applied.already);
            total.rows = total.rows.saturating_add(applied.rows);
            total.instances.insert(replica, applied.instance);
        }
        Ok(total)
    }

    /// Check or publish one owner's part of a commit (`part` must be the partitions it owns).
    pub(crate) async fn apply_at(
        &self,
        replica: u32,
        link: &str,
        part: &[(u64, u64)],
        replace: bool,
        check_only: bool,
        local: &ApplyHere<'_>,
    ) -> Result<Applied, Status> {
        if replica == self.index {
            return local(part, replace, check_only);
        }
        let body = proto::Commit {
            link: link.to_string(),
            attempts: proto::PartitionAttempt::list(part),
            replace,
            check_only,
        };
        let reply = self
            .call(replica, proto::actions::APPLY, body.encode_to_vec())
            .await?;
        serde_json::from_slice(&reply).map_err(|e| {
            Status::internal(format!(
                "replica {} answered 'apply' with something else than its counts: {e}",
                self.url(replica)
            ))
        })
    }

    /// Publish a recorded commit on every owner, then mark the record applied. Applying is
    /// idempotent, so this also finishes a record that a crashed planner left behind.
    pub(crate) async fn apply(
        &self,
        storage: &ObjectStorage,
        record: &CommitRecord,
        local: &ApplyHere<'_>,
    ) -> Result<Applied, Status> {
        if record.replicas != self.count() {
            return Err(Status::failed_precondition(format!(
                "commit {} of link '{}' was recorded over {} replicas, and this server runs {}; \
                 start the replicas as they were, so the commit can be finished",
                record.seq,
                record.link,
                record.replicas,
                self.count()
            )));
        }
        let applied = self
            .each_owner(&record.link, &record.attempts, record.replace, false, local)
            .await?;
        storage
            .mark_applied(record, &applied.instances)
            .await
            .map_err(status_of)?;
        Ok(applied)
    }

    /// Call one action on another replica.
    pub(crate) async fn call(
        &self,
        replica: u32,
        action: &str,
        body: Vec<u8>,
    ) -> Result<bytes::Bytes, Status> {
        let idle = self
            .idle
            .lock()
            .ok()
            .and_then(|mut idle| idle.get_mut(&replica).and_then(Vec::pop));
        let mut client = match idle {
            Some(client) => client,
            None => self.client(replica).await?,
        };
        let result = client.raw_action(action, body).await;
        // A connection that answered (even with an error status) is kept; a broken one is not.
        let answered = match &result {
            Ok(_) => true,
            Err(e) => matches!(e, handoff_client::ClientError::Status(_)) && !e.from_transport(),
        };
        if answered && let Ok(mut idle) = self.idle.lock() {
            let list = idle.entry(replica).or_default();
            if list.len() < IDLE_PER_REPLICA {
                list.push(client);
            }
        }
        result.map_err(|e| peer_status(self.url(replica), action, e))
    }
}

/// A link's stats at this server, as the `stats` action answers them (over replicas: this
/// replica's part).
pub(crate) fn local_stats(store: &Store, link: &str) -> Result<serde_json::Value, Status> {
    let stats = store.stats(link).map_err(status_of)?;
    let mut value = serde_json::to_value(&stats).map_err(|e| Status::internal(e.to_string()))?;
    if let Some(map) = value.as_object_mut() {
        let memory = store.memory();
        map.insert("server_memory_used".into(), memory.used().into());
        map.insert("server_memory_limit".into(), memory.limit().into());
        map.insert("server_instance".into(), store.instance().into());
    }
    Ok(value)
}

/// The planner's view of a link over every replica: each replica's stats, their sum, and the
/// partitions a restarted replica lost. The actions (stats, seal, read plans), whole-link
/// FlightInfo and Flight SQL all ask it.
#[derive(Clone)]
pub struct Whole {
    store: Arc<Store>,
    replicas: Arc<ReplicaConfig>,
}

impl Whole {
    pub fn new(store: Arc<Store>, replicas: Arc<ReplicaConfig>) -> Self {
        Self { store, replicas }
    }

    pub fn replicas(&self) -> &Arc<ReplicaConfig> {
        &self.replicas
    }

    /// The whole link's stats, summed over the replicas, with each replica's part and, when a
    /// restarted replica lost partitions, `lost`.
    pub(crate) async fn stats(&self, link: &str) -> Result<serde_json::Value, Status> {
        let parts = self.parts(link).await?;
        let mut whole = merge_stats(link, &self.replicas, &parts, self.store.instance());
        let lost = self.lost(link, &parts).await?;
        if !lost.is_empty() {
            whole["lost"] = lost
                .iter()
                .map(|(replica, partitions)| {
                    serde_json::json!({"replica": replica, "endpoint": self.replicas.url(*replica),
                                       "partitions": partitions})
                })
                .collect();
        }
        Ok(whole)
    }

    /// Each replica's committed rows of a link that every replica has sealed and none lost a
    /// part of; else FAILED_PRECONDITION or DATA_LOSS saying which replica is behind.
    pub(crate) async fn sealed_rows(&self, link: &str) -> Result<Vec<u64>, Status> {
        let stats = self.stats(link).await?;
        refuse_lost(&stats, link)?;
        let parts = stats["replicas"].as_array().cloned().unwrap_or_default();
        if let Some(open) = parts.iter().find(|p| p["state"] != "sealed") {
            return Err(Status::failed_precondition(format!(
                "link '{}' is not sealed on replica {} ({}), which holds it {}; seal it at the \
                 planner (replica 0) first",
                handoff_store::echo(link),
                open["replica"],
                open["endpoint"].as_str().unwrap_or(""),
                open["state"].as_str().unwrap_or("none")
            )));
        }
        Ok(parts
            .iter()
            .map(|p| p["rows"].as_u64().unwrap_or(0))
            .collect())
    }

    /// Partitions the commit records put on a replica that has restarted since, and holds
    /// fewer partitions than they name (a snapshot would have brought them all back), by
    /// replica. `parts` are the replicas' stats (null: it has no such link).
    pub(crate) async fn lost(
        &self,
        link: &str,
        parts: &[serde_json::Value],
    ) -> Result<Vec<(u32, Vec<u64>)>, Status> {
        let Some(storage) = self.store.storage() else {
            return Ok(Vec::new());
        };
        let applied = storage.applied_commits(link).await.map_err(status_of)?;
        let now = |replica: u32| {
            parts[replica as usize]["server_instance"]
                .as_str()
                .unwrap_or("")
        };
        let mut expected: BTreeMap<u32, HashSet<u64>> = Default::default();
        let mut stale: BTreeMap<u32, BTreeSet<u64>> = Default::default();
        for commit in &applied {
            let (record, instances) = &**commit;
            if record.replace {
                expected.clear();
                stale.clear();
            }
            for (replica, part) in self.replicas.split(link, &record.attempts) {
                let ids = part.iter().map(|(p, _)| *p);
                expected.entry(replica).or_default().extend(ids.clone());
                if instances
                    .get(&replica)
                    .is_some_and(|then| then != now(replica))
                {
                    stale.entry(replica).or_default().extend(ids);
                }
            }
        }
        Ok(stale
            .into_iter()
            .filter(|(replica, _)| {
                let held = parts[*replica as usize]["partitions"].as_u64().unwrap_or(0);
                let wanted = expected.get(replica).map_or(0, HashSet::len) as u64;
                held < wanted
            })
            .map(|(replica, ids)| (replica, ids.into_iter().collect()))
            .filter(|(_, ids): &(u32, Vec<u64>)| !ids.is_empty())
            .collect())
    }

    /// Every replica's stats of the link (null where it has none), asked at once.
    pub(crate) async fn parts(&self, link: &str) -> Result<Vec<serde_json::Value>, Status> {
        let replicas = &self.replicas;
        // Every replica at once: a plan waits for the slowest, not for the sum.
        let replies = futures::future::join_all((0..replicas.count()).map(|replica| async move {
            if replica == replicas.index() {
                local_stats(&self.store, link).and_then(|value| {
                    serde_json::to_vec(&value)
                        .map(bytes::Bytes::from)
                        .map_err(|e| Status::internal(e.to_string()))
                })
            } else {
                replicas
                    .call(replica, proto::actions::STATS, link.as_bytes().to_vec())
                    .await
            }
        }))
        .await;
        let mut parts = Vec::with_capacity(replies.len());
        for (replica, reply) in replies.into_iter().enumerate() {
            let replica = replica as u32;
            let part: serde_json::Value = match reply {
                Ok(body) => serde_json::from_slice(&body).map_err(|e| {
                    Status::internal(format!(
                        "replica {} answered 'stats' with {e}",
                        replicas.url(replica)
                    ))
                })?,
                // No partition of the link reached this replica yet.
                Err(status) if status.code() == tonic::Code::NotFound => serde_json::Value::Null,
                Err(status) => return Err(status),
            };
            parts.push(part);
        }
        if parts.iter().all(serde_json::Value::is_null) {
            return Err(status_of(StoreError::UnknownLink(handoff_store::echo(
                link,
            ))));
        }
        Ok(parts)
    }
}

/// One link's stats over its replicas: sums, the state of the whole (sealed when every part
/// is), and each replica's part. `parts[i]` is replica i's stats, or null if it has none.
fn merge_stats(
    link: &str,
    replicas: &ReplicaConfig,
    parts: &[serde_json::Value],
    own_instance: &str,
) -> serde_json::Value {
    const SUMMED: [&str; 8] = [
        "partitions",
        "rows",
        "bytes",
        "staged_partitions",
        "staged_bytes",
        "memory_bytes",
        "spilled_partitions",
        "spilled_bytes",
    ];
    let mut whole = serde_json::Map::new();
    whole.insert("link".into(), link.into());
    for key in SUMMED {
        let sum = parts
            .iter()
            .map(|p| p[key].as_u64().unwrap_or(0))
            .fold(0u64, u64::saturating_add);
        whole.insert(key.into(), sum.into());
    }
    let sealed = parts.iter().all(|p| p["state"] == "sealed");
    whole.insert(
        "state".into(),
        if sealed { "sealed" } else { "open" }.into(),
    );
    // A replica that got no rows has an empty schema; one that got rows has the link's.
    let first = parts
        .iter()
        .find(|p| p["schema"].as_array().is_some_and(|s| !s.is_empty()))
        .or_else(|| parts.iter().find(|p| !p.is_null()));
    for key in ["schema", "memory_limit", "memory_policy"] {
        if let Some(value) = first.map(|p| p[key].clone()) {
            whole.insert(key.into(), value);
        }
    }
    let used = parts
        .iter()
        .map(|p| p["server_memory_used"].as_u64().unwrap_or(0))
        .fold(0u64, u64::saturating_add);
    whole.insert("server_memory_used".into(), used.into());
    // The whole link was last written when any part was: the idle timeout counts from it.
    let last_write = parts
        .iter()
        .filter_map(|p| p["last_write_unix_ms"].as_u64())
        .max();
    if let Some(ms) = last_write {
        whole.insert("last_write_unix_ms".into(), ms.into());
    }
    // A restart of any replica changes the whole's instance. The replica answering (the
    // planner) gives its own even where it holds no part of the link, so that its restart
    // shows when its part was empty before and after.
    let instances: Vec<&str> = parts
        .iter()
        .enumerate()
        .map(|(i, p)| match p["server_instance"].as_str() {
            Some(instance) => instance,
            None if i as u32 == replicas.index() => own_instance,
            None => "",
        })
        .collect();
    whole.insert("server_instance".into(), instances.join(",").into());
    let each: Vec<serde_json::Value> = parts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            serde_json::json!({
                "replica": i,
                "endpoint": replicas.url(i as u32),
                "state": p["state"].as_str().unwrap_or("none"),
                "partitions": p["partitions"].as_u64().unwrap_or(0),
                "rows": p["rows"].as_u64().unwrap_or(0),
                "bytes": p["bytes"].as_u64().unwrap_or(0),
                "memory_bytes": p["memory_bytes"].as_u64().unwrap_or(0),
            })
        })
        .collect();
    whole.insert("replicas".into(), each.into());
    serde_json::Value::Object(whole)
}

/// DATA_LOSS for whole-link stats that list partitions lost on a restarted replica: a read of
/// the link would miss them.
pub(crate) fn refuse_lost(stats: &serde_json::Value, link: &str) -> Result<(), Status> {
    match stats["lost"].as_array().and_then(|l| l.first()) {
        Some(lost) => {
            let ids: Vec<u64> = lost["partitions"]
                .as_array()
                .map(|ids| ids.iter().filter_map(serde_json::Value::as_u64).collect())
                .unwrap_or_default();
            Err(Status::data_loss(format!(
                "replica {} ({}) restarted and lost partitions {} of link '{}'; {}",
                lost["replica"],
                lost["endpoint"].as_str().unwrap_or(""),
                lost["partitions"],
                handoff_store::echo(link),
                lost_fix(&ids)
            )))
        }
        None => Ok(()),
    }
}

/// What a writer does about lost partitions: a staged one is written again under its id; an
/// append's id was the server's, so only writing the link again brings its rows back.
pub(crate) fn lost_fix(partitions: &[u64]) -> String {
    let appends = partitions
        .iter()
        .filter(|p| **p >= handoff_store::APPEND_IDS_FROM)
        .count();
    match appends {
        0 => "write them again (rerun the job, or its tasks for them) and commit".into(),
        n if n == partitions.len() => format!(
            "they were {n} appends, which cannot be written again under their ids: delete the \
             link and write it again"
        ),
        n => format!(
            "{n} of them were appends, which cannot be written again under their ids: delete \
             the link and write it again"
        ),
    }
}

/// A peer's failure, as the caller's status: its code, and which replica said it.
fn peer_status(url: &str, what: &str, e: handoff_client::ClientError) -> Status {
    let transport = e.from_transport();
    match e {
        // The peer's own sentence, not tonic's description of its code. A status the transport
        // made (a connection to a replica that went down closes mid-call as CANCELLED) is the
        // peer being unreachable, below: the caller retries that, not a cancellation.
        handoff_client::ClientError::Status(status) if !transport => Status::new(
            status.code(),
            format!("replica {url} ({what}): {}", status.message()),
        ),
        // The caller reached this replica; this replica could not reach the other one.
        e => Status::unavailable(format!(
            "replica {url} ({what}) is unreachable from this replica: {e}; check that it runs, \
             that every replica has the same --peers, and over TLS that --peer-ca is the CA \
             its certificate chains to"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("grpc://127.0.0.1:{}", 9000 + i))
            .collect()
    }

    #[test]
    fn flags_are_checked_with_a_fix_in_the_message() {
        assert!(ReplicaConfig::new(peers(3), 2, None).is_ok());
        let err = ReplicaConfig::new(peers(3), 3, None).expect_err("index");
        assert!(err.contains("--replica-index 3"), "{err}");
        let err = ReplicaConfig::new(Vec::new(), 0, None).expect_err("none");
        assert!(err.contains("give 1 to"), "{err}");
        let mut twice = peers(2);
        twice.push(twice[0].clone());
        let err = ReplicaConfig::new(twice, 0, None).expect_err("twice");
        assert!(err.contains("twice"), "{err}");
        let tls = vec!["grpc+tls://h-0:1".to_string(), "grpc+tls://h-1:1".into()];
        assert!(ReplicaConfig::new(tls.clone(), 1, None).expect("tls").tls());
        let mixed = vec![tls[0].clone(), "grpc://h-1:1".into()];
        let err = ReplicaConfig::new(mixed, 0, None).expect_err("mixed");
        assert!(err.contains("all speak TLS or all plain text"), "{err}");
        let err = ReplicaConfig::new(vec!["http://h:1".into()], 0, None).expect_err("scheme");
        assert!(err.contains("not grpc://HOST:PORT"), "{err}");
    }

    #[test]
    fn a_peer_that_went_down_mid_call_is_unavailable_not_cancelled() {
        /// A transport failure whose cause tonic reads a code from, as it reads CANCELLED from
        /// hyper's "operation was canceled" when a replica's connection closes under a call.
        #[derive(Debug)]
        struct Closed(tonic::Status);
        impl std::fmt::Display for Closed {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("connection closed")
            }
        }
        impl std::error::Error for Closed {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let url = "grpc://127.0.0.1:9000";
        let closed = tonic::Status::from_error(Box::new(Closed(tonic::Status::cancelled(
            "operation was canceled",
        ))));
        assert_eq!(closed.code(), tonic::Code::Cancelled);
        let err = peer_status(url, "commit", handoff_client::ClientError::Status(closed));
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
        assert!(
            err.message().contains("is unreachable from this replica"),
            "{err}"
        );
        assert!(err.message().contains("connection closed"), "{err}");
        // The peer's own status (no source) keeps its code and sentence.
        let own = tonic::Status::cancelled("the seal was cancelled");
        let err = peer_status(url, "seal", handoff_client::ClientError::Status(own));
        assert_eq!(err.code(), tonic::Code::Cancelled, "{err}");
        assert_eq!(
            err.message(),
            "replica grpc://127.0.0.1:9000 (seal): the seal was cancelled"
        );
    }

    #[test]
    fn a_commit_splits_by_owner_and_lists_every_replica() {
        let config = ReplicaConfig::new(peers(3), 0, None).expect("config");
        let attempts: Vec<(u64, u64)> = (0..8).map(|p| (p, 1)).collect();
        let parts = config.split("demo/features", &attempts);
        assert_eq!(parts.len(), 3);
        // owner("demo/features", 0..8, 3) = [0, 1, 1, 0, 2, 2, 0, 0], pinned in the store.
        assert_eq!(parts[&0], vec![(0, 1), (3, 1), (6, 1), (7, 1)]);
        assert_eq!(parts[&1], vec![(1, 1), (2, 1)]);
        assert_eq!(parts[&2], vec![(4, 1), (5, 1)]);
        let status = config.not_here("demo/features", 4);
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert!(
            status
                .message()
                .contains("replica 2 (grpc://127.0.0.1:9002)"),
            "{}",
            status.message()
        );
    }
}
