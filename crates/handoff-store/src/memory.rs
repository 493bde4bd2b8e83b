//! Byte accounting for everything the store holds, staged or committed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Result, StoreError};

/// Counts the bytes the store holds against an optional limit.
#[derive(Debug)]
pub struct MemoryPool {
    limit: Option<u64>,
    used: AtomicU64,
    peak: AtomicU64,
}

impl MemoryPool {
    pub fn new(limit: Option<u64>) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicU64::new(0),
            peak: AtomicU64::new(0),
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

    /// An empty reservation that grows as frames arrive and releases everything when dropped.
    pub fn reservation(self: &Arc<Self>) -> Reservation {
        Reservation {
            pool: Arc::clone(self),
            bytes: 0,
        }
    }

    fn try_add(&self, bytes: u64) -> Result<()> {
        let mut current = self.used.load(Ordering::Relaxed);
        loop {
            let next = current.saturating_add(bytes);
            if let Some(limit) = self.limit {
                if next > limit {
                    return Err(StoreError::MemoryExhausted {
                        scope: "server".into(),
                        requested: bytes,
                        would_use: next,
                        limit,
                    });
                }
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
    }
}

/// RAII share of a [`MemoryPool`]: whatever it holds is released on drop, so a failed or
/// abandoned write can never leak accounting.
#[derive(Debug)]
pub struct Reservation {
    pool: Arc<MemoryPool>,
    bytes: u64,
}

impl Reservation {
    pub fn try_grow(&mut self, bytes: u64) -> Result<()> {
        self.pool.try_add(bytes)?;
        self.bytes += bytes;
        Ok(())
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.pool.release(self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservation_releases_on_drop_and_enforces_limit() {
        let pool = MemoryPool::new(Some(100));
        let mut a = pool.reservation();
        a.try_grow(60).expect("fits");
        let mut b = pool.reservation();
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
}
