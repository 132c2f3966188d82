//! Stream accounting shared by both client pools: how many streams a pooled
//! connection carries and since when it has carried none.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Locks a std mutex, recovering from poisoning (nothing here panics while
/// holding a lock, and the protected data stays consistent regardless).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Usage of one pooled connection.
#[derive(Debug)]
pub(crate) struct Usage {
    pub(crate) id: u64,
    active: AtomicUsize,
    idle_since: Mutex<Instant>,
    broken: AtomicBool,
}

impl Usage {
    /// A connection being opened for one stream (active = 1).
    pub(crate) fn new_claimed(id: u64) -> Arc<Self> {
        Arc::new(Self {
            id,
            active: AtomicUsize::new(1),
            idle_since: Mutex::new(Instant::now()),
            broken: AtomicBool::new(false),
        })
    }

    pub(crate) fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Claims a stream if the connection is usable and below `max` streams.
    /// Callers hold the pool lock, which also guards idle eviction.
    pub(crate) fn try_claim(self: &Arc<Self>, max: usize) -> Option<Slot> {
        if self.is_broken() || self.active() >= max {
            return None;
        }
        self.active.fetch_add(1, Ordering::AcqRel);
        Some(Slot { usage: self.clone() })
    }

    /// The first stream's slot of a connection made by [`Usage::new_claimed`].
    pub(crate) fn first_slot(self: &Arc<Self>) -> Slot {
        Slot { usage: self.clone() }
    }

    /// True when no stream used the connection for `timeout`. Callers hold
    /// the pool lock so no claim races with the eviction that follows.
    pub(crate) fn idle_for(&self, timeout: Duration) -> bool {
        self.active() == 0 && lock(&self.idle_since).elapsed() >= timeout
    }

    pub(crate) fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    pub(crate) fn mark_broken(&self) {
        self.broken.store(true, Ordering::Release);
    }
}

/// One stream's claim on a pooled connection; released on drop.
#[derive(Debug)]
pub(crate) struct Slot {
    usage: Arc<Usage>,
}

impl Slot {
    pub(crate) fn conn_id(&self) -> u64 {
        self.usage.id
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // Stamp before decrementing, so an idle check never sees zero streams
        // with a stale stamp.
        *lock(&self.usage.idle_since) = Instant::now();
        self.usage.active.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_bounded_and_released() {
        let u = Usage::new_claimed(7);
        let first = u.first_slot();
        let second = u.try_claim(2).expect("room for a second stream");
        assert!(u.try_claim(2).is_none(), "max 2 streams");
        assert_eq!(first.conn_id(), 7);
        drop(first);
        assert_eq!(u.active(), 1);
        assert!(!u.idle_for(Duration::ZERO));
        drop(second);
        assert!(u.idle_for(Duration::ZERO));
        assert!(!u.idle_for(Duration::from_secs(3600)));
        u.mark_broken();
        assert!(u.try_claim(2).is_none(), "broken connections take no streams");
    }
}
