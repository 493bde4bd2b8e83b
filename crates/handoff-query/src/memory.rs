//! DataFusion's memory, counted in the server's one pool. Without this, SQL and import ran on
//! DataFusion's default unbounded pool: an `array_agg` over a large `range()` took 1.1 GiB
//! under a 256 MiB limit. Operators that buffer (aggregates, sorts, joins) reserve through
//! DataFusion's `MemoryReservation`s, which are RAII; this pool passes each request on to the
//! store's, so they fail with the numbers when the budget is spent, and the server answers
//! RESOURCE_EXHAUSTED.

use std::fmt;
use std::sync::Arc;

use datafusion::error::{DataFusionError, Result};
use datafusion::execution::memory_pool::{MemoryLimit, MemoryPool, MemoryReservation};

/// The store's pool, as DataFusion sees it.
pub struct SharedPool {
    store: Arc<handoff_store::MemoryPool>,
}

impl SharedPool {
    pub fn new(store: Arc<handoff_store::MemoryPool>) -> Self {
        Self { store }
    }
}

impl fmt::Debug for SharedPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedPool")
            .field("used", &self.store.used())
            .field("limit", &self.store.limit())
            .finish()
    }
}

impl fmt::Display for SharedPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the server's memory pool")
    }
}

impl MemoryPool for SharedPool {
    fn name(&self) -> &str {
        "handoff"
    }

    fn grow(&self, _reservation: &MemoryReservation, additional: usize) {
        self.store.acquire_unchecked(additional as u64);
    }

    fn shrink(&self, _reservation: &MemoryReservation, shrink: usize) {
        self.store.release_acquired(shrink as u64);
    }

    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> Result<()> {
        self.store.try_acquire(additional as u64).map_err(|e| {
            DataFusionError::ResourcesExhausted(format!(
                "{} (for {}): {e}. Aggregate over fewer rows, or start the server with a larger --memory-limit",
                reservation.consumer().name(),
                "this query"
            ))
        })
    }

    fn reserved(&self) -> usize {
        usize::try_from(self.store.used()).unwrap_or(usize::MAX)
    }

    fn memory_limit(&self) -> MemoryLimit {
        match self.store.limit() {
            Some(limit) => MemoryLimit::Finite(usize::try_from(limit).unwrap_or(usize::MAX)),
            None => MemoryLimit::Infinite,
        }
    }
}

/// Whether `e` (at its root) is DataFusion running out of the pool's memory.
pub fn is_out_of_memory(e: &DataFusionError) -> bool {
    matches!(e.find_root(), DataFusionError::ResourcesExhausted(_))
}

#[cfg(test)]
mod tests {
    use datafusion::execution::memory_pool::MemoryConsumer;

    use super::*;

    #[test]
    fn reservations_count_in_the_store_pool_and_fail_at_its_limit() {
        let store = handoff_store::MemoryPool::new(Some(1000));
        let pool: Arc<dyn MemoryPool> = Arc::new(SharedPool::new(Arc::clone(&store)));
        let a = MemoryConsumer::new("agg").register(&pool);
        a.try_grow(600).expect("fits");
        assert_eq!(store.used(), 600);
        let b = MemoryConsumer::new("sort").register(&pool);
        let err = b.try_grow(500).expect_err("over the limit");
        assert!(is_out_of_memory(&err), "{err}");
        assert!(err.to_string().contains("--memory-limit"), "{err}");
        assert_eq!(store.used(), 600, "a refused grow takes nothing");
        drop(a);
        assert_eq!(store.used(), 0, "dropped reservations give back");
        b.try_grow(500).expect("fits now");
        assert_eq!(pool.reserved(), 500);
    }
}
