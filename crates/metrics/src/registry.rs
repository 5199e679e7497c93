//! A registry of live things operators list and close, such as client connections.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Something a [`Registry`] holds: it has an id and can be asked to close.
pub trait Registered: Send + Sync {
    fn id(&self) -> u64;
    /// Asks the owner of this entry to close it; it removes itself when it has.
    fn close(&self);
}

/// Entries by id. Each entry is shared with the task that owns it, which updates it in place
/// and removes it when done; operators take snapshots and close entries by id.
#[derive(Debug)]
pub struct Registry<E> {
    entries: Mutex<BTreeMap<u64, Arc<E>>>,
}

impl<E> Default for Registry<E> {
    fn default() -> Self {
        Self {
            entries: Mutex::new(BTreeMap::new()),
        }
    }
}

impl<E: Registered> Registry<E> {
    fn entries(&self) -> MutexGuard<'_, BTreeMap<u64, Arc<E>>> {
        // Every critical section is a single map operation: a panic cannot leave it half done.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn insert(&self, entry: E) -> Arc<E> {
        let entry = Arc::new(entry);
        self.entries().insert(entry.id(), Arc::clone(&entry));
        entry
    }

    pub fn remove(&self, id: u64) {
        self.entries().remove(&id);
    }

    /// `view` of every entry, in id order.
    pub fn snapshot<T>(&self, view: impl Fn(&E) -> T) -> Vec<T> {
        let entries: Vec<Arc<E>> = self.entries().values().cloned().collect();
        entries.iter().map(|entry| view(entry)).collect()
    }

    /// Closes the entry with this id. False if there is none.
    pub fn close(&self, id: u64) -> bool {
        let entry = self.entries().get(&id).cloned();
        entry.is_some_and(|entry| {
            entry.close();
            true
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    struct Entry(u64, AtomicBool);

    impl Registered for Entry {
        fn id(&self) -> u64 {
            self.0
        }
        fn close(&self) {
            self.1.store(true, Ordering::Relaxed);
        }
    }

    #[test]
    fn lists_in_id_order_closes_and_removes() {
        let registry = Registry::default();
        let nine = registry.insert(Entry(9, AtomicBool::new(false)));
        registry.insert(Entry(2, AtomicBool::new(false)));
        assert_eq!(registry.snapshot(|e| e.0), vec![2, 9]);
        assert!(registry.close(9));
        assert!(nine.1.load(Ordering::Relaxed));
        assert!(!registry.close(5));
        registry.remove(9);
        assert_eq!(registry.snapshot(|e| e.0), vec![2]);
    }
}
