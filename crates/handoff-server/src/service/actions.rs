//! DoAction: create, commit, abort, seal, delete, snapshot, import, spill, stats, topology;
//! on a link over several replicas, `replicated` does the work.

use super::*;

/// How long a `wait` link's writes wait for memory when neither the link nor the server says.
const DEFAULT_WAIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// The longest TTL a link may ask for: ten years. Far longer would overflow the clock's
/// arithmetic, which once read as "already expired" and deleted the link at once.
const MAX_TTL_SECONDS: u64 = 10 * 365 * 24 * 3600;
/// The longest a `wait` link's writer may wait for memory: a day.
const MAX_WAIT_TIMEOUT_MS: u64 = 24 * 3600 * 1000;

/// A TTL from a request, checked against its range.
fn ttl(field: &str, seconds: u64) -> Result<Option<std::time::Duration>, Status> {
    match seconds {
        0 => Ok(None),
        s if s <= MAX_TTL_SECONDS => Ok(Some(std::time::Duration::from_secs(s))),
        s => Err(invalid(format!(
            "{field} {s} is out of range: use 0 (none) to {MAX_TTL_SECONDS} seconds (ten years)"
        ))),
    }
}

impl HandoffService {
    pub(super) fn create(
        &self,
        md: &MetadataMap,
        body: &Bytes,
    ) -> Result<arrow_flight::Result, Status> {
        let req = body_of::<proto::CreateLink>(&body, "create", "CreateLink")?;
        let with_tokens = !req.writer_token.is_empty() || !req.reader_token.is_empty();
        let principal = self.authorize(
            md,
            if with_tokens {
                Access::Admin
            } else {
                Access::Write
            },
            Some(&req.link),
        )?;
        if !principal.may_create() {
            return Err(Status::permission_denied(
                "this token may not create links; use a server-wide writer or admin token",
            ));
        }
        let schema = if req.schema.is_empty() {
            None
        } else {
            Some(SchemaFrame::parse(strip_encapsulation(req.schema.clone())).map_err(status_of)?)
        };
        let tokens = LinkTokens::from_clear(&req.writer_token, &req.reader_token);
        let policy = match req.memory_policy() {
            proto::MemoryPolicy::Unspecified => None,
            proto::MemoryPolicy::Reject => Some(MemoryPolicy::Reject),
            proto::MemoryPolicy::Wait => Some(MemoryPolicy::Wait {
                timeout: match (req.wait_timeout_ms, self.store.default_policy()) {
                    (0, MemoryPolicy::Wait { timeout }) => timeout,
                    (0, _) => DEFAULT_WAIT_TIMEOUT,
                    (ms, _) if ms <= MAX_WAIT_TIMEOUT_MS => std::time::Duration::from_millis(ms),
                    (ms, _) => {
                        return Err(invalid(format!(
                            "wait_timeout_ms {ms} is out of range: use 0 (the server's) to {MAX_WAIT_TIMEOUT_MS} (a day)"
                        )));
                    }
                },
            }),
            proto::MemoryPolicy::Spill => {
                if self.store.storage().is_none() {
                    return Err(Status::failed_precondition(
                        "the spill policy needs object storage; start the server with --spill-url",
                    ));
                }
                Some(MemoryPolicy::Spill)
            }
        };
        let options = LinkOptions {
            tokens,
            memory_limit: (req.memory_limit > 0).then_some(req.memory_limit),
            policy,
            ttl_after_seal: ttl("ttl_seconds_after_seal", req.ttl_seconds_after_seal)?,
            ttl_after_read: ttl("ttl_seconds_after_read", req.ttl_seconds_after_read)?,
        };
        let link = self
            .store
            .create_link(&req.link, schema, options, req.exist_ok)
            .map_err(status_of)?;
        json_result(&link.stats())
    }

    pub(super) fn stats_json(&self, link: &str) -> Result<arrow_flight::Result, Status> {
        json_result(&crate::replicas::local_stats(&self.store, link)?)
    }

    pub(super) async fn action(
        &self,
        md: &MetadataMap,
        action: Action,
    ) -> Result<arrow_flight::Result, Status> {
        let body = action.body;
        let several = self.several();
        match action.r#type.as_str() {
            // A create at another replica is local: the planner's reaches every replica.
            proto::actions::CREATE => match several.as_ref().filter(|r| r.is_planner()) {
                Some(replicas) => self.create_over_replicas(replicas, md, &body).await,
                None => self.create(md, &body),
            },
            proto::actions::TOPOLOGY => {
                self.auth.identify(md, &self.store)?;
                let (replicas, index) = match &self.replicas {
                    Some(r) => (r.peers().to_vec(), r.index()),
                    None => (Vec::new(), 0),
                };
                json_result(&serde_json::json!({"replicas": replicas, "index": index}))
            }
            proto::actions::APPLY => self.apply_action(md, &body),
            proto::actions::SEAL_REPLICA => self.seal_replica_action(md, &body).await,
            proto::actions::PARTS => self.parts_action(md, &body),
            proto::actions::COUNT => self.count_action(md, &body).await,
            proto::actions::READ_DONE => self.read_done_action(md, &body),
            proto::actions::UNAPPLY => self.unapply_action(md, &body),
            proto::actions::IMPORT_PART => self.import_part_action(md, &body).await,
            proto::actions::COMMIT => {
                let req = body_of::<proto::Commit>(&body, "commit", "Commit")?;
                self.authorize(md, Access::Write, Some(&req.link))?;
                if req.attempts.is_empty() && !req.replace {
                    return Err(invalid(
                        "commit names no partitions; list the winning (partition, attempt) pairs",
                    ));
                }
                let attempts: Vec<(u64, u64)> = proto::PartitionAttempt::pairs(&req.attempts);
                if let Some(replicas) = &several {
                    return self
                        .commit_over_replicas(replicas, &req.link, &attempts, req.replace)
                        .await;
                }
                let outcomes = self
                    .store
                    .commit(&req.link, &attempts, req.replace)
                    .map_err(status_of)?;
                let rows: u64 = outcomes.iter().map(|o| o.rows).sum();
                json_result(&serde_json::json!({"committed": outcomes.len(), "rows": rows}))
            }
            proto::actions::ABORT => {
                let req = body_of::<proto::Abort>(&body, "abort", "Abort")?;
                let principal = self.authorize(md, Access::Write, Some(&req.link))?;
                // An empty list drops every job's staged attempts, not just the caller's: that
                // is cleanup for an admin, never a writer's.
                if req.attempts.is_empty() && principal != Principal::Admin && !self.auth.disabled {
                    return Err(invalid(
                        "abort names no attempts; list the (partition, attempt) pairs your job staged (an empty list, dropping every job's, needs an admin token)",
                    ));
                }
                let attempts: Vec<(u64, u64)> = proto::PartitionAttempt::pairs(&req.attempts);
                if let Some(replicas) = several.as_ref().filter(|r| r.is_planner()) {
                    return self.abort_over_replicas(replicas, &req, &attempts).await;
                }
                let dropped = self.store.abort(&req.link, &attempts).map_err(status_of)?;
                json_result(&serde_json::json!({"dropped": dropped}))
            }
            proto::actions::SEAL => {
                let link = utf8_link(&body, "seal")?;
                self.authorize(md, Access::Write, Some(&link))?;
                if let Some(replicas) = &several {
                    return self.seal_over_replicas(replicas, &link).await;
                }
                self.store.seal(&link).map_err(status_of)?;
                if self.store.snapshot_on_seal() {
                    self.store.snapshot(&link).await.map_err(status_of)?;
                }
                self.stats_json(&link)
            }
            proto::actions::IMPORT => {
                let request = body_of::<proto::Import>(&body, "import", "Import")?;
                // Import reads what the server can reach, under the server's credentials.
                let principal = self.authorize(md, Access::Admin, Some(&request.link))?;
                self.imports.check(&request.url)?;
                if let Some(replicas) = &several {
                    return self
                        .import_over_replicas(replicas, &request, principal.may_create())
                        .await;
                }
                let outcome = handoff_query::import_parquet(
                    &self.store,
                    &request.link,
                    &request.url,
                    principal.may_create(),
                    import_parallelism(),
                    self.max_flight_data_size,
                )
                .await
                .map_err(import_status)?;
                self.metrics.ingested_bytes.inc_by(outcome.bytes);
                self.metrics.ingested_rows.inc_by(outcome.rows);
                let sealed = if request.seal {
                    self.store.seal(&request.link).map_err(status_of)?;
                    true
                } else {
                    false
                };
                json_result(&serde_json::json!({
                    "link": outcome.link, "files": outcome.files, "partitions": outcome.partitions,
                    "rows": outcome.rows, "bytes": outcome.bytes, "sealed": sealed,
                }))
            }
            proto::actions::SNAPSHOT => {
                let link = utf8_link(&body, "snapshot")?;
                self.authorize(md, Access::Admin, Some(&link))?;
                let manifest = self.store.snapshot(&link).await.map_err(status_of)?;
                let url = self
                    .store
                    .storage()
                    .map(|s| s.url().to_string())
                    .unwrap_or_default();
                json_result(&serde_json::json!({
                    "link": manifest.link, "rows": manifest.rows, "bytes": manifest.bytes,
                    "partitions": manifest.partitions.len(), "url": url,
                }))
            }
            proto::actions::DELETE => {
                // Not a writer's: a Spark job's token must not delete the link it feeds.
                let link = utf8_link(&body, "delete")?;
                self.authorize(md, Access::Admin, Some(&link))?;
                // A peer's delete (from the planner) is local; a user's at the planner reaches
                // every replica.
                if let Some(replicas) = several.as_ref().filter(|r| r.is_planner()) {
                    return self.delete_over_replicas(replicas, &link).await;
                }
                let stats = self.store.delete(&link).map_err(status_of)?;
                if let Err(e) = self.store.forget_snapshot(&link).await {
                    return Err(Status::unavailable(format!(
                        "link '{link}' was deleted from memory, but its snapshot remains and \
                         would be restored when the server restarts: {e}; fix the storage and \
                         delete its links/ directory"
                    )));
                }
                json_result(&stats)
            }
            proto::actions::STATS => {
                let link = utf8_link(&body, "stats")?;
                self.authorize(md, Access::Inspect, Some(&link))?;
                match several.as_ref().filter(|r| r.is_planner()) {
                    Some(replicas) => self.stats_over_replicas(replicas, &link).await,
                    None => self.stats_json(&link),
                }
            }
            other => Err(invalid(format!(
                "unknown action '{other}'; ListActions names the supported ones"
            ))),
        }
    }
}
