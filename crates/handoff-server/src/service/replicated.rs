//! Actions of a link over several replicas: the planner's commit, seal, create, delete and
//! stats, which reach every replica, and the replica-to-replica `apply` and `seal-replica`.

use std::collections::{HashMap, HashSet};

use handoff_store::echo;

use super::*;
use crate::replicas::{Applied, ReplicaConfig, Whole};

/// How often, and how far apart, a restarted planner tries to finish a recorded commit while
/// a replica is not reachable yet (replicas start in any order).
const FINISH_TRIES: u32 = 60;
const FINISH_PAUSE: std::time::Duration = std::time::Duration::from_secs(2);
/// How long the planner waits before it tries again to delete an expired link that a replica
/// did not let it delete.
const EXPIRY_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

impl HandoffService {
    /// The replicas when there is more than one; one server otherwise.
    pub(super) fn several(&self) -> Option<Arc<ReplicaConfig>> {
        self.replicas.clone().filter(|r| r.count() > 1)
    }

    /// This replica's part of a commit: checked (`check_only`), or published idempotently.
    fn apply_local(
        &self,
        link: &str,
        attempts: &[(u64, u64)],
        replace: bool,
        check_only: bool,
    ) -> Result<Applied, Status> {
        let link = match self.store.link(link) {
            Ok(link) => link,
            // No partition of it was written here; a replace leaves it empty anyway.
            Err(StoreError::UnknownLink(_)) if attempts.is_empty() => {
                return Ok(Applied {
                    instance: self.store.instance().to_string(),
                    ..Applied::default()
                });
            }
            Err(e) => return Err(status_of(e)),
        };
        if check_only {
            link.check_apply(attempts, replace).map_err(status_of)?;
            // What is published already, so a commit repeated whole records nothing new.
            let published = link.published();
            let already = attempts
                .iter()
                .filter(|(p, a)| published.get(p) == Some(a))
                .count();
            return Ok(Applied {
                already: already as u64,
                instance: self.store.instance().to_string(),
                ..Applied::default()
            });
        }
        let (outcomes, already) = link.apply(attempts, replace).map_err(status_of)?;
        Ok(Applied {
            committed: outcomes.len() as u64,
            already: already as u64,
            rows: outcomes.iter().map(|o| o.rows).sum(),
            instance: self.store.instance().to_string(),
            ..Applied::default()
        })
    }

    /// The planner's commit: every owner confirms its part, the decision is recorded in object
    /// storage, then every owner publishes its part. A crash after the record leaves a commit
    /// that the restarted planner finishes; before it, nothing was published.
    pub(super) async fn commit_over_replicas(
        &self,
        replicas: &Arc<ReplicaConfig>,
        link: &str,
        attempts: &[(u64, u64)],
        replace: bool,
    ) -> Result<arrow_flight::Result, Status> {
        if !replicas.is_planner() {
            return Err(replicas.planner_only("a commit"));
        }
        let storage = self.store.storage().ok_or_else(|| {
            Status::failed_precondition(
                "a link over several replicas records its commits in object storage; start \
                 the planner with --spill-url",
            )
        })?;
        let mut seen = HashSet::with_capacity(attempts.len());
        if let Some((partition, _)) = attempts.iter().find(|(p, _)| !seen.insert(*p)) {
            return Err(invalid(format!(
                "partition {partition} appears twice in one commit; commit one attempt per partition"
            )));
        }
        // Commits apply in the order they were recorded: an earlier one left pending is
        // finished (or abandoned, if it never can be) first.
        self.settle_pending(replicas, storage, link).await?;
        let local = |a: &[(u64, u64)], r: bool, c: bool| self.apply_local(link, a, r, c);
        let checked = replicas
            .each_owner(link, attempts, replace, true, &local)
            .await?;
        if !replace && checked.already == attempts.len() as u64 {
            // A driver that retries a commit it already made: nothing to record or publish.
            return json_result(&serde_json::json!({
                "committed": checked.already,
                "already": checked.already,
                "rows": 0,
            }));
        }
        let record = storage
            .record_commit_checked(
                link,
                replace,
                attempts,
                replicas.count(),
                checked.instances.clone(),
            )
            .await
            .map_err(status_of)?;
        let applied = replicas
            .apply(storage, &record, &local)
            .await
            .map_err(|status| {
                Status::new(
                    status.code(),
                    format!(
                        "commit {} of link '{}' is recorded but not applied on every replica yet: \
                         {}; retry the commit (applying again is harmless), or restart the \
                         planner, which finishes recorded commits",
                        record.seq,
                        echo(link),
                        status.message()
                    ),
                )
            })?;
        json_result(&serde_json::json!({
            "committed": applied.committed + applied.already,
            "already": applied.already,
            "rows": applied.rows,
            "record": record.seq,
        }))
    }

    /// Finish the link's recorded commits that are not applied everywhere yet (a replica was
    /// unreachable for a moment, or a writer went away before retrying; applying is
    /// idempotent), and abandon those that never can be. One that can be neither is
    /// FAILED_PRECONDITION with the reason.
    async fn settle_pending(
        &self,
        replicas: &Arc<ReplicaConfig>,
        storage: &handoff_store::ObjectStorage,
        link: &str,
    ) -> Result<(), Status> {
        let pending = storage.pending_commits_of(link).await.map_err(status_of)?;
        let local = |a: &[(u64, u64)], r: bool, c: bool| self.apply_local(link, a, r, c);
        for record in &pending {
            if let Some(what) = self.abandon_if_lost(replicas, storage, record).await? {
                tracing::warn!("{what}");
                continue;
            }
            if let Err(status) = replicas.apply(storage, record, &local).await {
                return Err(Status::failed_precondition(format!(
                    "commit {} of link '{}' is recorded but cannot be applied on every \
                     replica: {}; fix that (or restart the planner), then try again",
                    record.seq,
                    echo(link),
                    status.message()
                )));
            }
        }
        Ok(())
    }

    /// A recorded commit that can never be applied, because an owner restarted after checking
    /// its part and no longer has an attempt of it (it died with the process), is taken back:
    /// each owner unpublishes what this record published there (not what an earlier applied
    /// record did), and the record is marked abandoned. Returns the sentence said about it;
    /// `None` if the record can still be applied, or cannot be judged (a replace, whose
    /// applies dropped older data, or a record from before owners' instances were kept).
    async fn abandon_if_lost(
        &self,
        replicas: &Arc<ReplicaConfig>,
        storage: &handoff_store::ObjectStorage,
        record: &handoff_store::CommitRecord,
    ) -> Result<Option<String>, Status> {
        if record.replace || record.instances.is_empty() {
            return Ok(None);
        }
        let link = record.link.as_str();
        let local = |a: &[(u64, u64)], r: bool, c: bool| self.apply_local(link, a, r, c);
        let mut lost: Vec<(u32, Vec<u64>)> = Vec::new();
        for (replica, part) in replicas.split(link, &record.attempts) {
            if part.is_empty() {
                continue;
            }
            let Err(status) = replicas
                .apply_at(replica, link, &part, false, true, &local)
                .await
            else {
                continue;
            };
            if !matches!(
                status.code(),
                tonic::Code::FailedPrecondition | tonic::Code::NotFound
            ) {
                return Err(status);
            }
            // Its instance now (an empty check always answers).
            let now = replicas
                .apply_at(replica, link, &[], false, true, &local)
                .await?;
            if record
                .instances
                .get(&replica)
                .is_some_and(|then| *then != now.instance)
            {
                lost.push((replica, part.iter().map(|(p, _)| *p).collect()));
            }
        }
        if lost.is_empty() {
            return Ok(None);
        }
        let earlier: HashSet<(u64, u64)> = storage
            .applied_commits(link)
            .await
            .map_err(status_of)?
            .iter()
            .filter(|commit| commit.0.seq < record.seq)
            .flat_map(|commit| commit.0.attempts.iter().copied())
            .collect();
        let revert: Vec<(u64, u64)> = record
            .attempts
            .iter()
            .filter(|a| !earlier.contains(a))
            .copied()
            .collect();
        let mut reverted = 0u64;
        for (replica, part) in replicas.split(link, &revert) {
            if part.is_empty() {
                continue;
            }
            let count = if replica == replicas.index() {
                self.unapply_local(link, &part)?
            } else {
                let body = proto::Commit {
                    link: link.to_string(),
                    attempts: proto::PartitionAttempt::list(&part),
                    ..Default::default()
                };
                let reply = replicas
                    .call(replica, proto::actions::UNAPPLY, body.encode_to_vec())
                    .await?;
                serde_json::from_slice::<serde_json::Value>(&reply)
                    .ok()
                    .and_then(|v| v["reverted"].as_u64())
                    .unwrap_or(0)
            };
            reverted = reverted.saturating_add(count);
        }
        let lost_text: Vec<String> = lost
            .iter()
            .map(|(replica, ids)| format!("replica {replica}: partitions {ids:?}"))
            .collect();
        let what = format!(
            "abandoned commit {} of link '{}': its owners restarted after it was recorded and \
             lost attempts it names ({}), so it can never be completed; the {reverted} \
             partitions it had published were taken back, and nothing of it is published. The \
             job must write and commit those partitions again (rerun it, or its tasks)",
            record.seq,
            echo(link),
            lost_text.join("; ")
        );
        storage
            .mark_abandoned(record, &what)
            .await
            .map_err(status_of)?;
        Ok(Some(what))
    }

    /// Take back this replica's published part of an abandoned commit.
    fn unapply_local(&self, link: &str, attempts: &[(u64, u64)]) -> Result<u64, Status> {
        match self.store.link(link) {
            Ok(link) => link.unapply(attempts).map(|n| n as u64).map_err(status_of),
            Err(StoreError::UnknownLink(_)) => Ok(0),
            Err(e) => Err(status_of(e)),
        }
    }

    /// The attempts of a commit sent to this replica, each of a partition it owns.
    fn owned_here(&self, req: &proto::Commit) -> Result<Vec<(u64, u64)>, Status> {
        let attempts = proto::PartitionAttempt::pairs(&req.attempts);
        if let Some(replicas) = &self.replicas
            && let Some((partition, _)) = attempts
                .iter()
                .find(|(p, _)| replicas.owner(&req.link, *p) != replicas.index())
        {
            return Err(replicas.not_here(&req.link, *partition));
        }
        Ok(attempts)
    }

    /// Replica to replica: take back this replica's part of an abandoned commit.
    pub(super) fn unapply_action(
        &self,
        md: &MetadataMap,
        body: &Bytes,
    ) -> Result<arrow_flight::Result, Status> {
        let req = body_of::<proto::Commit>(&body, "unapply", "Commit")?;
        self.authorize(md, Access::Admin, Some(&req.link))?;
        let attempts = self.owned_here(&req)?;
        let reverted = self.unapply_local(&req.link, &attempts)?;
        json_result(&serde_json::json!({ "reverted": reverted }))
    }

    /// An import into a link over replicas, at the planner: it lists the files and infers their
    /// schema once, gives each replica a share of the files (balanced by size), has every
    /// replica stage its share at once under ids it owns, and commits all of it as one
    /// recorded commit. If any share fails, the others' staged attempts are dropped: all or
    /// nothing, as on one server.
    pub(super) async fn import_over_replicas(
        &self,
        replicas: &Arc<ReplicaConfig>,
        request: &proto::Import,
        may_create: bool,
    ) -> Result<arrow_flight::Result, Status> {
        if !replicas.is_planner() {
            return Err(replicas.planner_only("an import"));
        }
        let link = request.link.as_str();
        if self.store.storage().is_none() {
            return Err(Status::failed_precondition(
                "a link over several replicas records its commits in object storage; start \
                 the planner with --spill-url",
            ));
        }
        if let Err(StoreError::UnknownLink(_)) = self.store.link(link) {
            if !may_create {
                return Err(status_of(StoreError::UnknownLink(echo(link))));
            }
            self.store
                .create_link(link, None, LinkOptions::default(), true)
                .map_err(status_of)?;
            self.create_on_others(replicas, &proto::CreateLink::keeping(link))
                .await?;
        }
        let listing = handoff_query::list_parquet(&request.url)
            .await
            .map_err(import_status)?;
        let options = arrow_ipc::writer::IpcWriteOptions::default();
        let schema = arrow_flight::SchemaAsIpc::new(&listing.schema, &options);
        let arrow_flight::IpcMessage(schema) = schema
            .try_into()
            .map_err(|e: arrow_schema::ArrowError| Status::internal(e.to_string()))?;
        // Largest files first, each to the replica with the fewest bytes so far.
        let mut by_size = listing.files.clone();
        by_size.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let mut shares: Vec<(u64, Vec<String>)> = vec![(0, Vec::new()); replicas.count() as usize];
        for (file, size) in by_size {
            if let Some(share) = shares.iter_mut().min_by_key(|(bytes, _)| *bytes) {
                share.0 = share.0.saturating_add(size);
                share.1.push(file);
            }
        }
        let parts = futures::future::join_all(shares.into_iter().enumerate().map(
            |(replica, (_, files))| {
                let schema = schema.clone();
                async move {
                    let replica = replica as u32;
                    if files.is_empty() {
                        return Ok(Vec::new());
                    }
                    if replica == replicas.index() {
                        return self.stage_import(replicas, link, &files, &schema).await;
                    }
                    let body = proto::ImportPart {
                        link: link.to_string(),
                        files,
                        schema,
                    };
                    let reply = replicas
                        .call(replica, proto::actions::IMPORT_PART, body.encode_to_vec())
                        .await?;
                    let reply: serde_json::Value = serde_json::from_slice(&reply)
                        .map_err(|e| Status::internal(format!("import-part reply: {e}")))?;
                    Ok(reply["attempts"]
                        .as_array()
                        .map(|list| {
                            list.iter()
                                .filter_map(|a| {
                                    Some((a[0].as_u64()?, a[1].as_u64()?, a[2].as_u64()?))
                                })
                                .collect()
                        })
                        .unwrap_or_default())
                }
            },
        ))
        .await;
        let mut staged: Vec<(u64, u64, u64)> = Vec::new();
        let mut failed = None;
        for (replica, part) in parts.into_iter().enumerate() {
            match part {
                Ok(attempts) => staged.extend(attempts),
                Err(status) if failed.is_none() => {
                    failed = Some(Status::new(
                        status.code(),
                        format!(
                            "importing into replica {replica} ({}): {}",
                            replicas.url(replica as u32),
                            status.message()
                        ),
                    ))
                }
                Err(_) => {}
            }
        }
        staged.sort_unstable();
        let attempts: Vec<(u64, u64)> = staged.iter().map(|(p, _, _)| (*p, 0)).collect();
        if let Some(status) = failed {
            // All or nothing: what the other shares staged goes.
            let abort = proto::Abort {
                link: link.to_string(),
                attempts: proto::PartitionAttempt::list(&attempts),
            };
            if !attempts.is_empty()
                && let Err(e) = self.abort_over_replicas(replicas, &abort, &attempts).await
            {
                tracing::warn!(link, error = %e.message(), "an import failed and its staged partitions could not all be dropped; the seal drops them");
            }
            return Err(status);
        }
        // A commit that fails is left to the record: if it was recorded, the next commit or
        // the seal applies it; if not, the seal drops the staged attempts.
        let committed = self
            .commit_over_replicas(replicas, link, &attempts, false)
            .await?;
        let committed: serde_json::Value =
            serde_json::from_slice(&committed.body).unwrap_or_default();
        let rows: u64 = staged
            .iter()
            .map(|(_, r, _)| *r)
            .fold(0, u64::saturating_add);
        let bytes: u64 = staged
            .iter()
            .map(|(_, _, b)| *b)
            .fold(0, u64::saturating_add);
        self.metrics.ingested_bytes.inc_by(bytes);
        self.metrics.ingested_rows.inc_by(rows);
        if request.seal {
            self.seal_over_replicas(replicas, link).await?;
        }
        json_result(&serde_json::json!({
            "link": link, "files": listing.files.len(), "partitions": attempts.len(),
            "rows": rows, "bytes": bytes, "sealed": request.seal,
            "record": committed["record"],
        }))
    }

    /// Stage this replica's share of an import, under ids it owns.
    async fn stage_import(
        &self,
        replicas: &Arc<ReplicaConfig>,
        link: &str,
        files: &[String],
        schema: &Bytes,
    ) -> Result<Vec<(u64, u64, u64)>, Status> {
        for file in files {
            self.imports.check(file)?;
        }
        let schema = SchemaFrame::parse(strip_encapsulation(schema.clone()))
            .map_err(|e| invalid(format!("the import's schema: {e}")))?
            .schema;
        let owner = Arc::clone(replicas);
        let (name, index) = (link.to_string(), replicas.index());
        let owns: handoff_query::Owns = Arc::new(move |id| owner.owner(&name, id) == index);
        let store = Arc::clone(&self.store);
        let staged = handoff_query::stage_parquet(
            &store,
            link,
            files,
            schema,
            super::import_parallelism(),
            self.max_flight_data_size,
            owns,
        )
        .await
        .map_err(import_status)?;
        Ok(staged.attempts)
    }

    /// Planner to replica: stage this replica's share of an import.
    pub(super) async fn import_part_action(
        &self,
        md: &MetadataMap,
        body: &Bytes,
    ) -> Result<arrow_flight::Result, Status> {
        let req = body_of::<proto::ImportPart>(&body, "import-part", "ImportPart")?;
        self.authorize(md, Access::Admin, Some(&req.link))?;
        let Some(replicas) = self.several() else {
            return Err(Status::failed_precondition(
                "'import-part' is sent by the planner of a link over replicas; use 'import'",
            ));
        };
        let attempts = self
            .stage_import(&replicas, &req.link, &req.files, &req.schema)
            .await?;
        json_result(&serde_json::json!({ "files": req.files.len(), "attempts": attempts }))
    }

    /// An append staged here as `partition` (attempt 0), committed by the planner. If that
    /// fails it stays staged: should the planner have recorded it, the seal applies it;
    /// otherwise the seal drops it. Either way the writer is told, and nothing is published
    /// twice by a writer that writes it again.
    pub(super) async fn commit_append(
        &self,
        replicas: &Arc<ReplicaConfig>,
        link: &str,
        partition: u64,
    ) -> Result<(), Status> {
        let attempts = [(partition, 0)];
        let committed = if replicas.is_planner() {
            self.commit_over_replicas(replicas, link, &attempts, false)
                .await
                .map(|_| ())
        } else {
            let body = proto::Commit {
                link: link.to_string(),
                attempts: proto::PartitionAttempt::list(&attempts),
                ..Default::default()
            };
            replicas
                .call(0, proto::actions::COMMIT, body.encode_to_vec())
                .await
                .map(|_| ())
        };
        committed.map_err(|status| {
            Status::new(
                status.code(),
                format!(
                    "the append to link '{}' reached replica {} but the planner (replica 0) did \
                     not commit it: {} It is not published now; if the planner recorded it, \
                     the seal publishes it, so check `stats` before writing these rows again",
                    echo(link),
                    replicas.index(),
                    status.message()
                ),
            )
        })
    }

    /// Seal every replica's part, once no recorded commit of the link waits to be applied.
    pub(super) async fn seal_over_replicas(
        &self,
        replicas: &Arc<ReplicaConfig>,
        link: &str,
    ) -> Result<arrow_flight::Result, Status> {
        if !replicas.is_planner() {
            return Err(replicas.planner_only("a seal"));
        }
        if let Some(storage) = self.store.storage() {
            self.settle_pending(replicas, storage, link).await?;
        }
        // A replica that restarted after commits were applied there lost them: sealing would
        // publish the link without them.
        let whole = self.whole(replicas);
        let parts = whole.parts(link).await?;
        let lost = whole.lost(link, &parts).await?;
        if let Some((replica, partitions)) = lost.first() {
            return Err(Status::data_loss(format!(
                "replica {replica} ({}) restarted after partitions {partitions:?} of link '{}' \
                 were published there, and no longer holds them: they are lost. To seal, {}",
                replicas.url(*replica),
                echo(link),
                crate::replicas::lost_fix(partitions)
            )));
        }
        for replica in 0..replicas.count() {
            if replica == replicas.index() {
                self.seal_local(link).await?;
            } else {
                replicas
                    .call(
                        replica,
                        proto::actions::SEAL_REPLICA,
                        link.as_bytes().to_vec(),
                    )
                    .await?;
            }
        }
        self.stats_over_replicas(replicas, link).await
    }

    /// Seal this replica's part; a replica that got no partition gets an empty sealed link.
    pub(super) async fn seal_local(&self, link: &str) -> Result<(), Status> {
        if let Err(StoreError::UnknownLink(_)) = self.store.link(link) {
            self.store
                .create_link(link, None, LinkOptions::default(), true)
                .map_err(status_of)?;
        }
        self.store.seal(link).map_err(status_of)?;
        if self.store.snapshot_on_seal() {
            self.store.snapshot(link).await.map_err(status_of)?;
        }
        Ok(())
    }

    /// The whole link's stats, summed over the replicas, with each replica's part.
    pub(super) async fn stats_over_replicas(
        &self,
        replicas: &Arc<ReplicaConfig>,
        link: &str,
    ) -> Result<arrow_flight::Result, Status> {
        json_result(&self.whole(replicas).stats(link).await?)
    }

    /// The planner's view of links over `replicas`.
    pub(super) fn whole(&self, replicas: &Arc<ReplicaConfig>) -> Whole {
        Whole::new(Arc::clone(&self.store), Arc::clone(replicas))
    }

    /// Create the link on this replica, then on every other (existing ones are kept).
    pub(super) async fn create_over_replicas(
        &self,
        replicas: &Arc<ReplicaConfig>,
        md: &MetadataMap,
        body: &Bytes,
    ) -> Result<arrow_flight::Result, Status> {
        let created = self.create(md, body)?;
        let mut request = body_of::<proto::CreateLink>(&body, "create", "CreateLink")?;
        request.exist_ok = true;
        self.create_on_others(replicas, &request).await?;
        Ok(created)
    }

    /// Send `request` (with `exist_ok`) to every other replica.
    async fn create_on_others(
        &self,
        replicas: &Arc<ReplicaConfig>,
        request: &proto::CreateLink,
    ) -> Result<(), Status> {
        let body = request.encode_to_vec();
        for replica in (0..replicas.count()).filter(|r| *r != replicas.index()) {
            replicas
                .call(replica, proto::actions::CREATE, body.clone())
                .await?;
        }
        Ok(())
    }

    /// Delete the link on every replica, and its commit records. The planner's own part goes
    /// last: while another replica cannot be reached, the link stays whole enough to delete
    /// again (by a user, or by the planner's expiry on its next try).
    pub(super) async fn delete_over_replicas(
        &self,
        replicas: &Arc<ReplicaConfig>,
        link: &str,
    ) -> Result<arrow_flight::Result, Status> {
        if !replicas.is_planner() {
            return Err(replicas.planner_only("deleting a link"));
        }
        let mut deleted = 0u32;
        let others = (0..replicas.count()).filter(|r| *r != replicas.index());
        for replica in others.chain([replicas.index()]) {
            let result = if replica == replicas.index() {
                self.store.delete(link).map(|_| ()).map_err(status_of)
            } else {
                replicas
                    .call(replica, proto::actions::DELETE, link.as_bytes().to_vec())
                    .await
                    .map(|_| ())
            };
            match result {
                Ok(()) => deleted += 1,
                Err(status) if status.code() == tonic::Code::NotFound => {}
                Err(status) => return Err(status),
            }
        }
        if deleted == 0 {
            return Err(status_of(StoreError::UnknownLink(echo(link))));
        }
        if let Some(storage) = self.store.storage() {
            storage.forget_commits(link).await.map_err(status_of)?;
        }
        self.store.forget_snapshot(link).await.map_err(status_of)?;
        json_result(&serde_json::json!({"link": link, "replicas": deleted}))
    }

    /// The planner's expiry of links over replicas, once a second: a link whose TTL after seal
    /// or after read passed at the planner, or that no replica wrote to for `idle`, is deleted
    /// on every replica. A delete that fails (a replica unreachable) is tried again after
    /// `EXPIRY_RETRY`, by link, in `retry_at`. Returns what was deleted.
    pub async fn expire_over_replicas(
        &self,
        idle: Option<std::time::Duration>,
        retry_at: &mut HashMap<String, std::time::Instant>,
    ) -> Vec<(String, handoff_store::Expiry)> {
        let Some(replicas) = self.several().filter(|r| r.is_planner()) else {
            return Vec::new();
        };
        let now = std::time::Instant::now();
        retry_at.retain(|_, at| *at > now);
        let mut deleted = Vec::new();
        for (link, why) in self.store.due(idle) {
            if retry_at.contains_key(&link) {
                continue;
            }
            if why == handoff_store::Expiry::Idle
                && let Some(idle) = idle
            {
                // Writes land on every replica: idle at the planner is not idle everywhere.
                let written = match self.whole(&replicas).parts(&link).await {
                    Ok(parts) => parts
                        .iter()
                        .filter_map(|p| p["last_write_unix_ms"].as_u64())
                        .max()
                        .unwrap_or(0),
                    Err(status) => {
                        tracing::warn!(link = %link, error = %status.message(), "idle at the planner; cannot ask the other replicas, trying again later");
                        retry_at.insert(link, now + EXPIRY_RETRY);
                        continue;
                    }
                };
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                let since = now_ms.saturating_sub(written);
                if u128::from(since) < idle.as_millis() {
                    continue;
                }
            }
            match self.delete_over_replicas(&replicas, &link).await {
                Ok(_) => {
                    tracing::info!(link = %link, reason = why.label(), "link expired and was deleted on every replica");
                    deleted.push((link, why));
                }
                Err(status) => {
                    tracing::warn!(link = %link, reason = why.label(), error = %status.message(), "link expired, but deleting it on every replica failed; trying again later");
                    retry_at.insert(link, now + EXPIRY_RETRY);
                }
            }
        }
        deleted
    }

    /// Drop staged attempts where they are staged: each on its owner; all of them on every
    /// replica for an empty list.
    pub(super) async fn abort_over_replicas(
        &self,
        replicas: &Arc<ReplicaConfig>,
        request: &proto::Abort,
        attempts: &[(u64, u64)],
    ) -> Result<arrow_flight::Result, Status> {
        let mut dropped = 0u64;
        for (replica, part) in replicas.split(&request.link, attempts) {
            if part.is_empty() && !attempts.is_empty() {
                continue;
            }
            let count = if replica == replicas.index() {
                match self.store.abort(&request.link, &part) {
                    Ok(count) => count as u64,
                    Err(StoreError::UnknownLink(_)) => 0,
                    Err(e) => return Err(status_of(e)),
                }
            } else {
                let body = proto::Abort {
                    link: request.link.clone(),
                    attempts: proto::PartitionAttempt::list(&part),
                };
                match replicas
                    .call(replica, proto::actions::ABORT, body.encode_to_vec())
                    .await
                {
                    Ok(reply) => serde_json::from_slice::<serde_json::Value>(&reply)
                        .ok()
                        .and_then(|v| v["dropped"].as_u64())
                        .unwrap_or(0),
                    Err(status) if status.code() == tonic::Code::NotFound => 0,
                    Err(status) => return Err(status),
                }
            };
            dropped = dropped.saturating_add(count);
        }
        json_result(&serde_json::json!({"dropped": dropped}))
    }

    /// A rank's read over every replica, planned at replica 0 once every part is sealed: one
    /// endpoint per replica the rank reads from, whose ticket lists that replica's ranges in
    /// plan order, and in `app_metadata` the plan, `{"batches": [[endpoint, rows, ...], ...]}`:
    /// for each batch of the rank, its pieces in order. A reader takes each batch's pieces off
    /// the endpoints' streams, in plan order.
    pub(super) async fn shard_info_over_replicas(
        &self,
        replicas: &Arc<ReplicaConfig>,
        shard: proto::ReadShard,
        descriptor: FlightDescriptor,
    ) -> Result<FlightInfo, Status> {
        if !replicas.is_planner() {
            return Err(replicas.planner_only("planning a read"));
        }
        let (spec, mode) = super::get::shard_spec(&shard);
        spec.validate().map_err(status_of)?;
        if mode == ReadMode::Streaming {
            return self
                .streaming_info_over_replicas(replicas, shard, descriptor)
                .await;
        }
        if spec.batch_rows == 0 {
            return Err(invalid(
                "a read over several replicas needs batch_rows > 0: its batches come from different replicas",
            ));
        }
        let stats = self.stats_over_replicas(replicas, &shard.link).await?;
        let stats: serde_json::Value = serde_json::from_slice(&stats.body)
            .map_err(|e| Status::internal(format!("stats over replicas: {e}")))?;
        if stats["state"] != "sealed" {
            return Err(Status::unavailable(format!(
                "link '{}' is not sealed on every replica yet; a read over replicas is planned once it is: retry after the seal",
                echo(&shard.link)
            )));
        }
        crate::replicas::refuse_lost(&stats, &shard.link)?;
        let mut rows: Vec<u64> = stats["replicas"]
            .as_array()
            .map(|parts| {
                parts
                    .iter()
                    .map(|p| p["rows"].as_u64().unwrap_or(0))
                    .collect()
            })
            .unwrap_or_default();
        // The plan takes 16 bytes a batch: reserved first (for every row; a filter only
        // lowers it), refused past the budget.
        let mut held = self.store.memory().reservation(None);
        held.try_grow(handoff_store::ReplicaLayout::bytes_for(
            rows.iter().fold(0u64, |a, r| a.saturating_add(*r)),
            spec.batch_rows,
        ))
        .map_err(status_of)?;
        let local = self.link(&shard.link)?;
        let schema = match local.schema() {
            Some(schema) => schema.schema,
            // This replica got no rows; one that did knows the schema.
            None => match rows.iter().position(|r| *r > 0) {
                Some(replica) => replicas
                    .client(replica as u32)
                    .await?
                    .schema(&shard.link)
                    .await
                    .map_err(|e| {
                        Status::unavailable(format!("schema from replica {replica}: {e}"))
                    })?,
                None => Arc::new(arrow_schema::Schema::empty()),
            },
        };
        let join = super::get::batches_per_message(&shard, &spec, mode)?;
        let filtered = !shard.filter.trim().is_empty();
        // Checked here once, so a bad filter or column is refused before any replica is asked.
        let projection = if filtered || !shard.columns.is_empty() {
            handoff_query::plan_read(&schema, &shard.columns, &shard.filter)
                .map_err(|e| invalid(e.to_string()))?
                .projection
        } else {
            None
        };
        if filtered {
            // Each replica counts what passes of its part (all at once).
            rows = self.count_over_replicas(replicas, &shard, &rows).await?;
        }
        // Counts from other replicas: summed without overflow.
        let total = rows.iter().fold(0u64, |a, r| a.saturating_add(*r));
        let schema = match projection {
            Some(columns) => Arc::new(
                schema
                    .project(&columns)
                    .map_err(|e| invalid(e.to_string()))?,
            ),
            None => schema,
        };
        let layout = handoff_store::ReplicaLayout::new(&rows, &spec).map_err(status_of)?;
        let mut ranges: Vec<Vec<proto::RowRange>> = vec![Vec::new(); rows.len()];
        let mut plan = Vec::new();
        for segments in layout.rank_batches(&spec) {
            let mut pieces = Vec::with_capacity(segments.len() * 2);
            for seg in segments {
                let list = &mut ranges[seg.replica as usize];
                match list.last_mut() {
                    Some(last) if last.start + last.rows == seg.start => last.rows += seg.rows,
                    _ => list.push(proto::RowRange {
                        start: seg.start,
                        rows: seg.rows,
                    }),
                }
                pieces.push(u64::from(seg.replica));
                pieces.push(seg.rows);
            }
            plan.push(pieces);
        }
        // Endpoint numbers in the plan: replicas the rank reads from, in replica order.
        let mut endpoint_of = vec![u64::MAX; rows.len()];
        let mut info = FlightInfo::new()
            .try_with_schema(&schema)
            .map_err(|e| Status::internal(e.to_string()))?
            .with_descriptor(descriptor)
            .with_total_records(i64::try_from(spec.rows_for_rank(total)).unwrap_or(-1))
            .with_ordered(true);
        let mut next = 0u64;
        let mut read_from = Vec::new();
        for (replica, list) in ranges.into_iter().enumerate() {
            if list.is_empty() {
                continue;
            }
            endpoint_of[replica] = next;
            next += 1;
            read_from.push(replica as u32);
            let ticket = proto::ReadRanges {
                link: shard.link.clone(),
                ranges: list,
                batch_rows: spec.batch_rows,
                shuffle: spec.shuffle,
                seed: spec.seed,
                epoch: spec.epoch,
                columns: shard.columns.clone(),
                filter: shard.filter.clone(),
                world_size: spec.world_size,
                rank: spec.rank,
                batches_per_message: join as u32,
            };
            let ticket = proto::Ticket {
                kind: Some(proto::ticket::Kind::Ranges(ticket)),
            };
            info = info.with_endpoint(
                FlightEndpoint::new()
                    .with_ticket(Ticket::new(ticket.encode_to_vec()))
                    .with_location(replicas.url(replica as u32)),
            );
        }
        for pieces in &mut plan {
            for piece in pieces.iter_mut().step_by(2) {
                *piece = endpoint_of[*piece as usize];
            }
        }
        // The read TTL starts once every rank has read every part it was planned.
        local.expect_read(spec.world_size, spec.epoch, spec.rank, read_from);
        let about = serde_json::json!({ "batches": plan });
        Ok(info.with_app_metadata(about.to_string()))
    }

    /// A streaming read over replicas, at the planner: one endpoint per replica, each the
    /// replica's own rows sharded among the ranks as one server shards them (`shard_part`),
    /// read at once. Batches come as each replica's rows commit, in no fixed order across
    /// replicas; each replica pads its own tail at the seal, so a rank gets up to
    /// `world_size * batch_rows - 1` padded rows per replica (one server: once in all). Every
    /// row is read once (padding apart), and every rank gets as many batches as the others.
    async fn streaming_info_over_replicas(
        &self,
        replicas: &Arc<ReplicaConfig>,
        shard: proto::ReadShard,
        descriptor: FlightDescriptor,
    ) -> Result<FlightInfo, Status> {
        // The rules of a streaming read, checked once here rather than by every replica.
        let (spec, mode) = super::get::shard_spec(&shard);
        if spec.batch_rows == 0 || spec.shuffle {
            return Err(invalid(
                "a streaming read needs batch_rows > 0 and no shuffle",
            ));
        }
        if spec.start_batch > 0 {
            // Each replica numbers its own batches: a global position has no part to start at.
            return Err(invalid(
                "a streaming read over replicas starts at the beginning (start_batch 0); resume \
                 a read once the link is sealed",
            ));
        }
        super::get::batches_per_message(&shard, &spec, mode)?;
        // Every replica holds the link, so each part's stream can start before its first rows.
        if let Err(StoreError::UnknownLink(_)) = self.store.link(&shard.link) {
            return Err(status_of(StoreError::UnknownLink(echo(&shard.link))));
        }
        self.create_on_others(replicas, &proto::CreateLink::keeping(&shard.link))
            .await?;
        let local = self.link(&shard.link)?;
        let (_, projected) = super::get::shard_query(&shard, &local)?;
        let schema = match projected {
            Some(schema) => schema,
            None => Arc::clone(&Self::schema_of(&local)?.schema),
        };
        let mut info = FlightInfo::new()
            .try_with_schema(&schema)
            .map_err(|e| Status::internal(e.to_string()))?
            .with_descriptor(descriptor)
            .with_total_records(-1)
            .with_total_bytes(-1)
            .with_ordered(false);
        for replica in 0..replicas.count() {
            let ticket = proto::Ticket {
                kind: Some(proto::ticket::Kind::ShardPart(shard.clone())),
            };
            info = info.with_endpoint(
                FlightEndpoint::new()
                    .with_ticket(Ticket::new(ticket.encode_to_vec()))
                    .with_location(replicas.url(replica)),
            );
        }
        let about = serde_json::json!({ "streaming": true });
        Ok(info.with_app_metadata(about.to_string()))
    }

    /// Replica to replica: this replica's FlightInfo of one link, or of every link under a
    /// prefix (links are in no particular order). Links this replica does not hold are left
    /// out.
    pub(super) fn parts_action(
        &self,
        md: &MetadataMap,
        body: &Bytes,
    ) -> Result<arrow_flight::Result, Status> {
        let req = body_of::<proto::ListParts>(&body, "parts", "ListParts")?;
        // Only replicas call it (with the admin token); clients ask the planner, which checks
        // what each caller may see.
        let one = (!req.link.is_empty()).then_some(req.link.as_str());
        self.authorize(md, Access::Admin, one)?;
        let mut held = self.store.memory().reservation(None);
        let infos = self.local_parts(one, &req.prefix, &mut held)?;
        // Their encoding is held too, until the reply is built.
        held.try_grow(infos.iter().map(|i| i.encoded_len() as u64).sum())
            .map_err(status_of)?;
        let infos = infos
            .iter()
            .map(|info| info.encode_to_vec().into())
            .collect();
        Ok(arrow_flight::Result {
            body: proto::Parts { infos }.encode_to_vec().into(),
        })
    }

    /// This replica's FlightInfo of `one` link, or of every link under `prefix`; none for a
    /// link it does not hold.
    fn local_parts(
        &self,
        one: Option<&str>,
        prefix: &str,
        held: &mut handoff_store::Reservation,
    ) -> Result<Vec<FlightInfo>, Status> {
        let links = match one {
            Some(name) => match self.store.link(name) {
                Ok(link) => vec![link],
                Err(StoreError::UnknownLink(_)) => Vec::new(),
                Err(e) => return Err(status_of(e)),
            },
            None => self
                .store
                .list()
                .into_iter()
                .filter(|link| link.name().starts_with(prefix))
                .collect(),
        };
        links
            .iter()
            .map(|link| self.link_info(link, held))
            .collect()
    }

    /// Every replica's FlightInfo of `one` link, or of every link under `prefix`, by link:
    /// `parts[r]` is replica r's, if it holds the link.
    async fn parts_over_replicas(
        &self,
        replicas: &Arc<ReplicaConfig>,
        one: Option<&str>,
        prefix: &str,
        held: &mut handoff_store::Reservation,
    ) -> Result<std::collections::BTreeMap<String, Vec<Option<FlightInfo>>>, Status> {
        let request = proto::ListParts {
            link: one.unwrap_or_default().to_string(),
            prefix: prefix.to_string(),
        }
        .encode_to_vec();
        // Each reply is reserved as it arrives: its bytes, and as much again decoded.
        let memory = self.store.memory();
        let replies = futures::future::join_all((0..replicas.count()).map(|replica| {
            let request = request.clone();
            async move {
                let mut held = memory.reservation(None);
                if replica == replicas.index() {
                    // The planner's own part, without a call.
                    self.local_parts(one, prefix, &mut held)
                        .map(|infos| (infos, held))
                } else {
                    let body = replicas
                        .call(replica, proto::actions::PARTS, request)
                        .await?;
                    held.try_grow((body.len() as u64).saturating_mul(2))
                        .map_err(status_of)?;
                    let parts = proto::Parts::decode(body.as_ref()).map_err(|e| {
                        Status::internal(format!(
                            "replica {} answered 'parts' with something else: {e}",
                            replicas.url(replica)
                        ))
                    })?;
                    parts
                        .infos
                        .iter()
                        .map(|bytes| {
                            FlightInfo::decode(bytes.as_ref()).map_err(|e| {
                                Status::internal(format!(
                                    "replica {} answered 'parts' with a bad FlightInfo: {e}",
                                    replicas.url(replica)
                                ))
                            })
                        })
                        .collect::<Result<Vec<_>, Status>>()
                        .map(|infos| (infos, held))
                }
            }
        }))
        .await;
        let count = replicas.count() as usize;
        let mut by_link: std::collections::BTreeMap<String, Vec<Option<FlightInfo>>> =
            Default::default();
        for (replica, reply) in replies.into_iter().enumerate() {
            let (infos, mut part_held) = reply?;
            let bytes = part_held.bytes();
            held.take_from(&mut part_held, bytes).map_err(status_of)?;
            for info in infos {
                let Some(name) = info
                    .flight_descriptor
                    .as_ref()
                    .and_then(|d| d.path.first())
                    .cloned()
                else {
                    continue;
                };
                by_link.entry(name).or_insert_with(|| vec![None; count])[replica] = Some(info);
            }
        }
        Ok(by_link)
    }

    /// A whole link's FlightInfo over replicas, at the planner: every replica's partitions, each
    /// endpoint located at its replica (the replica is in its `app_metadata` too). A link with
    /// partitions lost on a restarted replica is refused with DATA_LOSS rather than listed
    /// without them.
    pub(super) async fn link_info_over_replicas(
        &self,
        replicas: &Arc<ReplicaConfig>,
        link: &str,
        held: &mut handoff_store::Reservation,
    ) -> Result<FlightInfo, Status> {
        if !replicas.is_planner() {
            return Err(replicas.planner_only("GetFlightInfo of a whole link"));
        }
        let stats = self.whole(replicas).stats(link).await?;
        crate::replicas::refuse_lost(&stats, link)?;
        let mut parts = self
            .parts_over_replicas(replicas, Some(link), "", held)
            .await?;
        let parts = parts
            .remove(link)
            .ok_or_else(|| status_of(StoreError::UnknownLink(echo(link))))?;
        merge_infos(link, replicas, parts)
    }

    /// ListFlights over replicas, at the planner: each link `principal` may see, whole.
    pub(super) async fn list_over_replicas(
        &self,
        replicas: &Arc<ReplicaConfig>,
        principal: &Principal,
        prefix: &str,
        held: &mut handoff_store::Reservation,
    ) -> Result<Vec<FlightInfo>, Status> {
        if !replicas.is_planner() {
            return Err(replicas.planner_only("ListFlights"));
        }
        self.parts_over_replicas(replicas, None, prefix, held)
            .await?
            .into_iter()
            .filter(|(name, _)| principal.sees(name))
            .map(|(name, parts)| merge_infos(&name, replicas, parts))
            .collect()
    }

    /// Each replica's rows of a sealed link that pass the shard's filter, asked at once;
    /// replicas that hold no rows are not asked.
    async fn count_over_replicas(
        &self,
        replicas: &Arc<ReplicaConfig>,
        shard: &proto::ReadShard,
        rows: &[u64],
    ) -> Result<Vec<u64>, Status> {
        let body = proto::CountRows {
            link: shard.link.clone(),
            filter: shard.filter.clone(),
        }
        .encode_to_vec();
        let counts = futures::future::join_all(rows.iter().enumerate().map(|(replica, &held)| {
            let body = body.clone();
            async move {
                let replica = replica as u32;
                if held == 0 {
                    return Ok(0);
                }
                if replica == replicas.index() {
                    return self.count_local(&shard.link, &shard.filter).await;
                }
                let reply = replicas.call(replica, proto::actions::COUNT, body).await?;
                serde_json::from_slice::<serde_json::Value>(&reply)
                    .ok()
                    .and_then(|v| v["rows"].as_u64())
                    .filter(|&n| n <= held)
                    .ok_or_else(|| {
                        Status::internal(format!(
                            "replica {} answered 'count' without a count of at most its {held} rows",
                            replicas.url(replica)
                        ))
                    })
            }
        }))
        .await;
        counts.into_iter().collect()
    }

    /// Rows of this replica's part of a sealed link that pass `filter`.
    async fn count_local(&self, link: &str, filter: &str) -> Result<u64, Status> {
        let link = self.link(link)?;
        let shard = proto::ReadShard {
            link: link.name().to_string(),
            filter: filter.to_string(),
            ..Default::default()
        };
        let (planner, _) = super::get::shard_query(&shard, &link)?;
        handoff_store::selected_rows(&link, planner)
            .await
            .map_err(status_of)
    }

    /// Replica to replica: rows of this replica's part that pass a filter.
    pub(super) async fn count_action(
        &self,
        md: &MetadataMap,
        body: &Bytes,
    ) -> Result<arrow_flight::Result, Status> {
        let req = body_of::<proto::CountRows>(&body, "count", "CountRows")?;
        // The planner calls it with the admin token, for a read it has authorized.
        self.authorize(md, Access::Admin, Some(&req.link))?;
        let rows = self.count_local(&req.link, &req.filter).await?;
        json_result(&serde_json::json!({ "rows": rows }))
    }

    /// What serving a rank's whole part of a read ends with, over replicas, when the link has
    /// a read TTL: the planner hears of it (itself directly, the others by `read-done`).
    pub(super) fn read_done_hook(
        &self,
        link: &Arc<handoff_store::Link>,
        ranges: &proto::ReadRanges,
    ) -> Option<Box<dyn FnOnce() + Send>> {
        let replicas = self.several()?;
        if ranges.world_size == 0 || !link.counts_reads() {
            return None;
        }
        let done = proto::ReadDone {
            link: ranges.link.clone(),
            world_size: ranges.world_size,
            epoch: ranges.epoch,
            rank: ranges.rank,
            replica: replicas.index(),
        };
        if replicas.is_planner() {
            let link = Arc::clone(link);
            return Some(Box::new(move || {
                link.finish_part_read(done.world_size, done.epoch, done.rank, done.replica)
            }));
        }
        Some(Box::new(move || {
            tokio::spawn(async move {
                let body = done.encode_to_vec();
                if let Err(status) = replicas.call(0, proto::actions::READ_DONE, body).await {
                    // The link then stays until it is deleted (or its TTL after seal).
                    tracing::warn!(link = %done.link, rank = done.rank, error = %status.message(),
                        "could not tell the planner that a rank's part was read; the read TTL will not start from this read");
                }
            });
        }))
    }

    /// Replica to planner: a replica served its whole part of a rank's read.
    pub(super) fn read_done_action(
        &self,
        md: &MetadataMap,
        body: &Bytes,
    ) -> Result<arrow_flight::Result, Status> {
        let req = body_of::<proto::ReadDone>(&body, "read-done", "ReadDone")?;
        self.authorize(md, Access::Admin, Some(&req.link))?;
        let Some(replicas) = self.several().filter(|r| r.is_planner()) else {
            return Err(Status::failed_precondition(
                "'read-done' is sent to the planner (replica 0) of a link over replicas",
            ));
        };
        if req.world_size == 0
            || req.world_size > handoff_store::MAX_WORLD_SIZE
            || req.rank >= req.world_size
            || req.replica >= replicas.count()
        {
            return Err(invalid(format!(
                "read-done of rank {} of world {} from replica {}: out of range (world 1 to {}, \
                 rank below it, replica below {})",
                req.rank,
                req.world_size,
                req.replica,
                handoff_store::MAX_WORLD_SIZE,
                replicas.count()
            )));
        }
        let link = self.link(&req.link)?;
        link.finish_part_read(req.world_size, req.epoch, req.rank, req.replica);
        json_result(&serde_json::json!({}))
    }

    /// Replica to replica: check or publish this replica's part of a commit.
    pub(super) fn apply_action(
        &self,
        md: &MetadataMap,
        body: &Bytes,
    ) -> Result<arrow_flight::Result, Status> {
        let req = body_of::<proto::Commit>(&body, "apply", "Commit")?;
        // Only replicas call it (with the admin token): a writer commits at the planner, which
        // records the commit first.
        self.authorize(md, Access::Admin, Some(&req.link))?;
        let attempts = self.owned_here(&req)?;
        let applied = self.apply_local(&req.link, &attempts, req.replace, req.check_only)?;
        json_result(&applied)
    }

    /// Replica to replica: seal this replica's part.
    pub(super) async fn seal_replica_action(
        &self,
        md: &MetadataMap,
        body: &Bytes,
    ) -> Result<arrow_flight::Result, Status> {
        let link = utf8_link(body, "seal-replica")?;
        self.authorize(md, Access::Admin, Some(&link))?;
        self.seal_local(&link).await?;
        self.stats_json(&link)
    }

    /// At the planner's start: finish every commit that is recorded and not marked applied,
    /// or abandon it if an attempt it names died with a restart (the planner's own staged
    /// attempts do, when it is killed between the record and the applies). Replicas may come
    /// up later, so an unreachable one is tried again for a while. Returns what could not be
    /// finished and what was abandoned, one sentence each.
    pub async fn finish_recorded_commits(&self) -> Vec<String> {
        let (Some(replicas), Some(storage)) = (self.several(), self.store.storage()) else {
            return Vec::new();
        };
        if !replicas.is_planner() {
            return Vec::new();
        }
        let pending = match storage.pending_commits().await {
            Ok(pending) => pending,
            Err(e) => return vec![format!("the commit records could not be read: {e}")],
        };
        let mut unfinished = Vec::new();
        for record in pending {
            let local =
                |a: &[(u64, u64)], r: bool, c: bool| self.apply_local(&record.link, a, r, c);
            let mut tries = 0;
            loop {
                let applied = match self.abandon_if_lost(&replicas, storage, &record).await {
                    Ok(Some(what)) => {
                        tracing::warn!("{what}");
                        unfinished.push(what);
                        break;
                    }
                    Ok(None) => replicas.apply(storage, &record, &local).await,
                    Err(status) => Err(status),
                };
                match applied {
                    Ok(applied) => {
                        tracing::info!(link = %record.link, seq = record.seq, published = applied.committed, already = applied.already, "finished a recorded commit");
                        break;
                    }
                    Err(status)
                        if status.code() == tonic::Code::Unavailable && tries < FINISH_TRIES =>
                    {
                        tries += 1;
                        tokio::time::sleep(FINISH_PAUSE).await;
                    }
                    Err(status) => {
                        let what = format!(
                            "not finished: commit {} of link '{}' ({} attempts) is recorded but \
                             could not be applied: {}",
                            record.seq,
                            record.link,
                            record.attempts.len(),
                            status.message()
                        );
                        tracing::error!("{what}");
                        unfinished.push(what);
                        break;
                    }
                }
            }
        }
        unfinished
    }
}

/// One link's FlightInfo from its replicas' parts: the schema of a part that has one, every
/// part's endpoints located at its replica, and the counts summed. Commit order holds within a
/// replica only, so the whole is not `ordered`.
fn merge_infos(
    link: &str,
    replicas: &ReplicaConfig,
    parts: Vec<Option<FlightInfo>>,
) -> Result<FlightInfo, Status> {
    let has_columns = |info: &FlightInfo| {
        info.clone()
            .try_decode_schema()
            .is_ok_and(|schema| !schema.fields().is_empty())
    };
    let schema = parts
        .iter()
        .flatten()
        .find(|info| has_columns(info))
        .or_else(|| parts.iter().flatten().next())
        .map(|info| info.schema.clone())
        .ok_or_else(|| status_of(StoreError::UnknownLink(echo(link))))?;
    let mut whole = FlightInfo {
        schema,
        flight_descriptor: Some(FlightDescriptor::new_path(vec![link.to_string()])),
        endpoint: Vec::new(),
        total_records: 0,
        total_bytes: 0,
        ordered: false,
        app_metadata: Bytes::new(),
    };
    for (replica, info) in parts.into_iter().enumerate() {
        let Some(info) = info else { continue };
        whole.total_records = whole
            .total_records
            .saturating_add(info.total_records.max(0));
        whole.total_bytes = whole.total_bytes.saturating_add(info.total_bytes.max(0));
        for endpoint in info.endpoint {
            let mut about: serde_json::Value =
                serde_json::from_slice(&endpoint.app_metadata).unwrap_or_default();
            if let Some(map) = about.as_object_mut() {
                map.insert("replica".into(), replica.into());
            }
            whole.endpoint.push(
                endpoint
                    .with_location(replicas.url(replica as u32))
                    .with_app_metadata(about.to_string()),
            );
        }
    }
    Ok(whole)
}
