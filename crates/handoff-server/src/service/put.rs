//! DoPut: one partition per stream, each message reserved before it is buffered.

use super::*;

impl HandoffService {
    pub(super) async fn put(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> Result<PutResult, Status> {
        let md = request.metadata().clone();
        // The token is checked before any payload is read: the link it may write is named only
        // in the first message, but a caller without a valid token gets nothing read at all.
        self.auth.identify(&md, &self.store)?;
        let credit = request
            .extensions()
            .get::<crate::inflight::IncomingCredit>()
            .cloned();
        let mut input = request.into_inner();
        let first = input.message().await?.ok_or_else(|| {
            invalid("empty DoPut stream: send a schema message with a FlightDescriptor first")
        })?;
        let descriptor = first.flight_descriptor.clone().ok_or_else(|| {
            invalid("the first DoPut message carries no FlightDescriptor: use PATH [link] or CMD handoff.v1.PutPartition")
        })?;
        let (link, target) = match descriptor.r#type() {
            DescriptorType::Path => match descriptor.path.as_slice() {
                [link] => (link.clone(), PutTarget::Append),
                _ => return Err(invalid("DoPut takes a PATH descriptor of exactly [link]")),
            },
            DescriptorType::Cmd => {
                let put = proto::PutPartition::decode(descriptor.cmd.as_ref()).map_err(|e| {
                    invalid(format!(
                        "DoPut CMD descriptor is not a handoff.v1.PutPartition: {e}"
                    ))
                })?;
                (
                    put.link,
                    PutTarget::Staged {
                        partition: put.partition,
                        attempt: put.attempt,
                    },
                )
            }
            DescriptorType::Unknown => {
                return Err(invalid("descriptor type is unknown; use PATH or CMD"));
            }
        };
        let principal = self.authorize(&md, Access::Write, Some(&link))?;
        // Over replicas an append is staged under an id this replica owns and committed by the
        // planner, so it is in a commit record like every other write.
        let several = self.several();
        let target = match (target, &several) {
            (PutTarget::Append, Some(replicas)) => PutTarget::StagedAppend {
                partition: handoff_store::random_append_id(|id| {
                    replicas.owner(&link, id) == replicas.index()
                })
                .map_err(status_of)?,
            },
            (target, _) => target,
        };
        if let (Some(replicas), PutTarget::Staged { partition, .. }) = (&self.replicas, &target)
            && replicas.owner(&link, *partition) != replicas.index()
        {
            // Refused before any data is read: a retry at the owner loses nothing.
            return Err(replicas.not_here(&link, *partition));
        }
        let mut writer = self
            .store
            .begin_put(&link, target, principal.may_create())
            .map_err(status_of)?;
        let mut next = Some(first);
        while let Some(data) = next {
            // The message's bytes were reserved on arrival; the frame the store keeps takes that
            // reservation over, so they are neither counted twice nor uncounted while it waits.
            let arrived = credit.as_ref().and_then(|c| c.take_next());
            if data.data_header.is_empty() && data.app_metadata.as_ref() == proto::ABORT_PUT {
                // Some clients (pyarrow) cannot cancel a DoPut: ending it would publish a
                // partial partition, so they send this marker instead.
                self.metrics.broken_puts.inc();
                return Err(Status::cancelled(
                    "the writer aborted this DoPut; nothing of it was kept",
                ));
            }
            if !(data.data_header.is_empty() && data.data_body.is_empty()) {
                writer
                    .push_arrived(data.data_header, data.data_body, arrived)
                    .await
                    .map_err(status_of)?;
            }
            next = match input.message().await {
                Ok(next) => next,
                Err(status) => {
                    self.metrics.broken_puts.inc();
                    tracing::warn!(link, code = ?status.code(), "DoPut stream broke; nothing was kept");
                    return Err(status);
                }
            };
        }
        let mut outcome = writer.finish().await.map_err(status_of)?;
        if let (Some(replicas), PutTarget::StagedAppend { partition }) = (&several, target) {
            self.commit_append(replicas, &link, partition).await?;
            outcome.committed = true;
        }
        self.metrics.ingested_bytes.inc_by(outcome.bytes);
        self.metrics.ingested_rows.inc_by(outcome.rows);
        let metadata = serde_json::json!({
            "link": link,
            "partition": outcome.partition,
            "attempt": outcome.attempt,
            "rows": outcome.rows,
            "bytes": outcome.bytes,
            "committed": outcome.committed,
        });
        Ok(PutResult {
            app_metadata: serde_json::to_vec(&metadata).unwrap_or_default().into(),
        })
    }
}
