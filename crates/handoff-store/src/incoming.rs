//! Memory for messages still arriving. A gRPC message is buffered whole before it is decoded,
//! so without this a client could make the server hold a message of the maximum size (per
//! stream, on every connection) before any of it was counted.

use std::sync::Arc;

use crate::error::{Result, StoreError};
use crate::link::Overflow;
use crate::memory::{MemoryPolicy, MemoryPool, Reservation};

/// Reserves a message's declared length before its bytes are read, under the server's policy.
#[derive(Debug, Clone)]
pub struct IncomingMemory {
    pub(crate) pool: Arc<MemoryPool>,
    pub(crate) spiller: Option<Arc<dyn Overflow>>,
    pub(crate) policy: MemoryPolicy,
}

impl IncomingMemory {
    /// `bytes` for one message about to arrive; fails at once if the message could never fit.
    pub async fn reserve(&self, bytes: u64) -> Result<Reservation> {
        let mut reservation = self.pool.reservation(None);
        if let Some(limit) = self.pool.limit()
            && bytes > limit
        {
            return Err(StoreError::MessageTooLarge { bytes, limit });
        }
        match self.policy {
            MemoryPolicy::Spill => {
                if reservation.try_grow(bytes).is_err()
                    && let Some(spiller) = &self.spiller
                {
                    spiller.make_room(None, bytes).await?;
                }
                // Best effort under `spill`: what is left in memory may be partitions still being
                // written, which cannot spill yet (issue 13), and refusing here would refuse
                // writes that the store itself can still take. The store reserves each frame
                // before keeping it, and refuses there if nothing can make room.
                let _ = reservation.try_grow(bytes);
            }
            policy => reservation.grow(bytes, policy).await?,
        }
        Ok(reservation)
    }
}
