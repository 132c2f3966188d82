//! The daemon's one lock-poisoning policy. Every lock in `userspace/`
//! guards plain data that is valid after any partial update (tables, sets,
//! the latest inventory), so a panic while a lock was held must not take the
//! rest of the daemon down with it: a poisoned lock is used as it is.
//! Locks are never held across an `.await`.

use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locks `m` (a poisoned mutex is used as it is).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Read-locks `l` (a poisoned lock is used as it is).
pub fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

/// Write-locks `l` (a poisoned lock is used as it is).
pub fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}
