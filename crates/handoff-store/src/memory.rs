//! Byte accounting for everything the store holds, staged or committed, against a server-wide
//! limit and optional per-link quotas, with the policy a link chose for when a write would not fit.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use crate::error::{Result, StoreError};

/// What a write does when its bytes would go over a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryPolicy {
    /// Fail at once with RESOURCE_EXHAUSTED and the numbers.
    #[default]
    Reject,
    /// Stall the writer (gRPC flow control holds the sender) until memory is freed, up to the timeout.
    Wait { timeout: Duration },
    /// Move finished partitions, least recently used first, to object storage to make room.
    Spill,
}

impl MemoryPolicy {
    pub fn label(self) -> &'static str {
        match self {
            MemoryPolicy::Reject => "reject",
            MemoryPolicy::Wait { .. } => "wait",
            MemoryPolicy::Spill => "spill",
        }
    }
}

/// Counts bytes against an optional limit; wakes waiters when bytes are released.
#[derive(Debug)]
pub struct MemoryPool {
    scope: String,
    limit: Option<u64>,
    used: AtomicU64,
    peak: AtomicU64,
    released: Notify,
}

impl MemoryPool {
    pub fn new(limit: Option<u64>) -> Arc<Self> {
        Self::named("server", limit)
    }

    pub fn named(scope: impl Into<String>, limit: Option<u64>) -> Arc<Self> {
        Arc::new(Self {
            scope: scope.into(),
            limit,
            used: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            released: Notify::new(),
        })
    }

    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    /// An empty reservation against the server pool and, if given, a link's quota. It grows as
    /// frames arrive and releases everything when dropped.
    pub fn reservation(self: &Arc<Self>, link: Option<Arc<MemoryPool>>) -> Reservation {
        Reservation {
            server: Arc::clone(self),
            link,
            bytes: 0,
        }
    }

    /// Count `bytes` against the limit, or fail with the numbers. For pools of other libraries
    /// built over this one (DataFusion's); everything else holds a [`Reservation`].
    pub fn try_acquire(&self, bytes: u64) -> Result<()> {
        self.try_add(bytes)
    }

    /// Count `bytes` even past the limit: for allocations that already happened and can only
    /// be accounted for (DataFusion's infallible `grow`).
    pub fn acquire_unchecked(&self, bytes: u64) {
        let now = self
            .used
            .fetch_add(bytes, Ordering::AcqRel)
            .saturating_add(bytes);
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    /// Give back bytes taken by [`Self::try_acquire`] or [`Self::acquire_unchecked`].
    pub fn release_acquired(&self, bytes: u64) {
        self.release(bytes);
    }

    fn try_add(&self, bytes: u64) -> Result<()> {
        let mut current = self.used.load(Ordering::Relaxed);
        loop {
            let next = current.saturating_add(bytes);
            if let Some(limit) = self.limit
                && next > limit
            {
                return Err(StoreError::MemoryExhausted {
                    scope: self.scope.clone(),
                    requested: bytes,
                    would_use: next,
                    limit,
                });
            }
            match self.used.compare_exchange_weak(
                current,
                next,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    self.peak.fetch_max(next, Ordering::Relaxed);
                    return Ok(());
                }
                Err(actual) => current = actual,
            }
        }
    }

    fn release(&self, bytes: u64) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
        self.released.notify_waiters();
    }
}

/// RAII share of the server pool (and a link quota): whatever it holds is released on drop, so a
/// failed or abandoned write can never leak accounting.
#[derive(Debug)]
pub struct Reservation {
    server: Arc<MemoryPool>,
    link: Option<Arc<MemoryPool>>,
    bytes: u64,
}

impl Reservation {
    /// Grow now or fail with the numbers.
    pub fn try_grow(&mut self, bytes: u64) -> Result<()> {
        if let Some(link) = &self.link {
            link.try_add(bytes)?;
        }
        if let Err(e) = self.server.try_add(bytes) {
            if let Some(link) = &self.link {
                link.release(bytes);
            }
            return Err(e);
        }
        self.bytes += bytes;
        Ok(())
    }

    /// Would `bytes` more go over the link's own quota (rather than the server's limit)?
    pub fn link_quota_is_short(&self, bytes: u64) -> bool {
        self.link
            .as_ref()
            .and_then(|l| l.limit.map(|limit| l.used().saturating_add(bytes) > limit))
            .unwrap_or(false)
    }

    /// Grow under `policy`: with `Wait`, until another reservation releases enough or the timeout.
    /// `Spill` is the caller's business (the pool does not know partitions), so it fails at once.
    pub async fn grow(&mut self, bytes: u64, policy: MemoryPolicy) -> Result<()> {
        let MemoryPolicy::Wait { timeout } = policy else {
            return self.try_grow(bytes);
        };
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Register for wake-ups before trying, so a release in between is not missed.
            let (server, link) = (Arc::clone(&self.server), self.link.clone());
            let server_released = server.released.notified();
            let link_released = link.as_ref().map(|l| l.released.notified());
            tokio::pin!(server_released);
            server_released.as_mut().enable();
            let mut link_released = link_released.map(Box::pin);
            if let Some(n) = link_released.as_mut() {
                n.as_mut().enable();
            }
            let error = match self.try_grow(bytes) {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            let woken = async {
                match link_released {
                    Some(link) => tokio::select! { _ = server_released => {}, _ = link => {} },
                    None => server_released.await,
                }
            };
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                return Err(StoreError::MemoryWaitTimeout {
                    waited: timeout,
                    cause: Box::new(error),
                });
            }
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Move `bytes` that `arrived` holds of the server's pool into this reservation, charging
    /// only this reservation's link quota (the server already counts them). How a message
    /// reserved on arrival becomes the frame the store keeps, without counting it twice and
    /// without ever being uncounted in between. Fails, changing nothing, if `arrived` holds
    /// fewer bytes, is of another pool or link, or the link quota is short.
    pub fn take_from(&mut self, arrived: &mut Reservation, bytes: u64) -> Result<()> {
        if !Arc::ptr_eq(&self.server, &arrived.server) || arrived.link.is_some() {
            return Err(StoreError::InvalidArgument(
                "a reservation moves only between reservations of one pool".into(),
            ));
        }
        if arrived.bytes < bytes {
            return Err(StoreError::MemoryExhausted {
                scope: "the arriving message".into(),
                requested: bytes,
                would_use: bytes,
                limit: arrived.bytes,
            });
        }
        if let Some(link) = &self.link {
            link.try_add(bytes)?;
        }
        arrived.bytes -= bytes;
        self.bytes += bytes;
        Ok(())
    }

    /// Move `bytes` (at most what this holds) into a reservation of their own, against the same
    /// pools, so that they are released with whatever holds the new one.
    pub fn split(&mut self, bytes: u64) -> Reservation {
        let bytes = bytes.min(self.bytes);
        self.bytes -= bytes;
        Reservation {
            server: Arc::clone(&self.server),
            link: self.link.clone(),
            bytes,
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            if let Some(link) = &self.link {
                link.release(self.bytes);
            }
            self.server.release(self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_arrived_message_moves_into_a_frame_without_being_counted_twice() {
        let server = MemoryPool::new(Some(100));
        let quota = MemoryPool::named("link", Some(50));
        let mut arrived = server.reservation(None);
        arrived.try_grow(70).expect("fits");
        let mut frame = server.reservation(Some(Arc::clone(&quota)));
        // More than the link may hold: nothing moves.
        assert!(frame.take_from(&mut arrived, 60).is_err());
        assert_eq!(
            (arrived.bytes(), frame.bytes(), server.used(), quota.used()),
            (70, 0, 70, 0)
        );
        frame.take_from(&mut arrived, 40).expect("moves");
        assert_eq!(
            (arrived.bytes(), frame.bytes(), server.used(), quota.used()),
            (30, 40, 70, 40)
        );
        // More than arrived: nothing moves.
        assert!(frame.take_from(&mut arrived, 31).is_err());
        drop(arrived);
        assert_eq!((server.used(), quota.used()), (40, 40));
        drop(frame);
        assert_eq!((server.used(), quota.used()), (0, 0));
        // Another pool's reservation never moves in.
        let other = MemoryPool::new(Some(100));
        let mut foreign = other.reservation(None);
        foreign.try_grow(10).expect("fits");
        assert!(
            server
                .reservation(None)
                .take_from(&mut foreign, 10)
                .is_err()
        );
    }

    #[test]
    fn reservation_releases_on_drop_and_enforces_limit() {
        let pool = MemoryPool::new(Some(100));
        let mut a = pool.reservation(None);
        a.try_grow(60).expect("fits");
        let mut b = pool.reservation(None);
        let err = b.try_grow(50).expect_err("over the limit");
        assert!(matches!(
            err,
            StoreError::MemoryExhausted {
                limit: 100,
                would_use: 110,
                ..
            }
        ));
        assert_eq!(pool.used(), 60);
        drop(a);
        assert_eq!(pool.used(), 0);
        b.try_grow(100).expect("fits after release");
        assert_eq!(pool.peak(), 100);
    }

    #[test]
    fn link_quota_is_checked_and_rolled_back() {
        let server = MemoryPool::new(Some(1000));
        let link = MemoryPool::named("link 'q'", Some(10));
        let mut r = server.reservation(Some(Arc::clone(&link)));
        r.try_grow(8).expect("fits");
        let err = r.try_grow(5).expect_err("quota");
        assert!(err.to_string().contains("link 'q'"), "{err}");
        assert_eq!((server.used(), link.used()), (8, 8));
        drop(r);
        assert_eq!((server.used(), link.used()), (0, 0));
    }

    #[tokio::test]
    async fn wait_resumes_when_memory_is_released_and_times_out_otherwise() {
        let pool = MemoryPool::new(Some(100));
        let mut holder = pool.reservation(None);
        holder.try_grow(90).expect("fits");
        let mut waiter = pool.reservation(None);
        let wait = MemoryPolicy::Wait {
            timeout: Duration::from_secs(10),
        };
        let release = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(holder);
        };
        let (grown, ()) = tokio::join!(waiter.grow(50, wait), release);
        grown.expect("grew after the release");
        assert_eq!(pool.used(), 50);

        let short = MemoryPolicy::Wait {
            timeout: Duration::from_millis(50),
        };
        let err = pool
            .reservation(None)
            .grow(60, short)
            .await
            .expect_err("times out");
        assert!(matches!(err, StoreError::MemoryWaitTimeout { .. }), "{err}");
        assert!(err.to_string().contains("waited"), "{err}");
    }
}
