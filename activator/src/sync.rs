//! Mutexes held for a few instructions. A panic while one is held leaves the data consistent (no
//! critical section spans more than one update), so a poisoned lock is used as it is rather than
//! spreading the panic to every later request.

use std::sync::{Mutex, MutexGuard};

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
