//! Locking that survives a panic elsewhere.
//!
//! A `std::sync::Mutex` is poisoned when a thread panics while holding it. Every mutex in this
//! project guards state that stays consistent between statements (maps, queues, counters), so a
//! poisoned lock is still safe to use, and refusing it would turn one panicked task into a stuck
//! worker or broker. [`lock`] is the one place that decision is made.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locks `m`, taking the guard even if another thread panicked while holding it.
///
/// ```
/// use std::sync::Mutex;
/// let m = Mutex::new(vec![1]);
/// celery_core::sync::lock(&m).push(2);
/// assert_eq!(*celery_core::sync::lock(&m), vec![1, 2]);
/// ```
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Read-locks `l`, as [`lock`] does for a mutex.
///
/// ```
/// let l = std::sync::RwLock::new(3);
/// assert_eq!(*celery_core::sync::read(&l), 3);
/// ```
pub fn read<T: ?Sized>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Write-locks `l`, as [`lock`] does for a mutex.
///
/// ```
/// let l = std::sync::RwLock::new(3);
/// *celery_core::sync::write(&l) += 1;
/// assert_eq!(*celery_core::sync::read(&l), 4);
/// ```
pub fn write<T: ?Sized>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_poisoned_lock_is_still_usable() {
        let m = Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        *lock(&m) += 1;
        assert_eq!(*lock(&m), 2);
    }
}
