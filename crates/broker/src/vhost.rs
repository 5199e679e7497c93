//! Virtual hosts as the broker serves them: the current routing table and the live queues.
//!
//! Front-ends read the routing table ([`Vhost::routing`]) for every publish and re-read it
//! only when [`Vhost::version`] changes. The controller alone changes a virtual host (its
//! effects start and stop queues and publish new tables); the operations front-ends call to
//! declare, delete and bind are in [`crate::declare`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use foldhash::{HashMap, HashMapExt};
use parking_lot::{Mutex, RwLock};
use tokio_util::sync::CancellationToken;

use crate::definitions::VhostDefinitions;
use crate::exchange::ExchangeRecord;
use crate::exchange::routing::RoutingTable;
use crate::queue::Queue;

/// A live virtual host.
#[derive(Debug)]
pub struct Vhost {
    name: Arc<str>,
    routing: RwLock<Arc<RoutingTable>>,
    version: AtomicU64,
    /// Live queues by name. Changed by the controller only.
    pub(crate) queues: Mutex<HashMap<String, Arc<Queue>>>,
    deleted: CancellationToken,
}

impl Vhost {
    pub(crate) fn new(name: &str) -> Self {
        Self {
            name: Arc::from(name),
            routing: RwLock::new(Arc::new(RoutingTable::default())),
            version: AtomicU64::new(0),
            queues: Mutex::new(HashMap::new()),
            deleted: CancellationToken::new(),
        }
    }

    /// Cancelled once the virtual host is deleted: connections to it close.
    pub fn deleted(&self) -> &CancellationToken {
        &self.deleted
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current routing table. Hold on to it and compare [`Self::version`] to refresh.
    pub fn routing(&self) -> Arc<RoutingTable> {
        Arc::clone(&self.routing.read())
    }

    /// Bumped whenever the routing table changes.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    pub fn queue(&self, name: &str) -> Option<Arc<Queue>> {
        self.routing().queue(name).cloned()
    }

    pub fn exchange(&self, name: &str) -> Option<Arc<ExchangeRecord>> {
        self.routing().exchange(name).cloned()
    }

    /// Rebuilds the routing table from the definitions and the live queues that they define
    /// (a queue being stopped is no longer routed to).
    pub(crate) fn rebuild(&self, definitions: &VhostDefinitions) {
        let mut queues = self.queues.lock().clone();
        queues.retain(|name, queue| {
            definitions
                .queues
                .get(name)
                .is_some_and(|record| record.id == queue.record().id)
        });
        let table = RoutingTable::build(
            definitions.exchanges.values(),
            definitions.bindings.values(),
            queues,
        );
        *self.routing.write() = Arc::new(table);
        self.version.fetch_add(1, Ordering::AcqRel);
    }
}
