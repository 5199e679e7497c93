//! The broker's definitions on the controller group: what this node proposes goes into the
//! group's log ([`ControllerLog`]), and what the log commits comes back into the broker, in
//! log order, on every node ([`BrokerObserver`]).
//!
//! The broker keeps its own `meta.redb` with the index of the last command it applied, in the
//! same transaction. A command the controller's state refused is applied to the broker too: it
//! fails there in the same way (apply is deterministic), which gives its proposer the typed
//! error. A snapshot installed, and the cluster's first command (which carries the forming
//! node's definitions), replace the broker's definitions whole; what changed is then carried
//! out. Replays after a restart skip what the broker already has.

use std::sync::Arc;

use sluice_broker::error::BrokerError;
use sluice_broker::replication::{DefinitionLog, LogFuture};
use sluice_broker::{Broker, MetadataCommand};

use crate::controller::{ControllerCommand, ControllerState};
use crate::node::ControllerNode;
use crate::state_machine::{Observer, ObserverFuture};

/// Carries committed controller entries into the broker.
#[derive(Debug)]
pub struct BrokerObserver {
    broker: Broker,
}

impl BrokerObserver {
    pub fn new(broker: Broker) -> Self {
        Self { broker }
    }

    async fn install(&self, index: u64, state: &sluice_broker::MetadataState) {
        if index <= self.broker.replicated_index() {
            return;
        }
        if let Err(error) = self.broker.install_replicated(index, state.clone()).await {
            tracing::error!(index, %error, "serving the cluster's definitions failed on this node");
        }
    }
}

impl Observer<ControllerState> for BrokerObserver {
    fn applied<'a>(
        &'a self,
        index: u64,
        command: Option<&'a ControllerCommand>,
    ) -> ObserverFuture<'a> {
        Box::pin(async move {
            match command {
                Some(ControllerCommand::Metadata(command)) => {
                    self.broker
                        .apply_replicated(index, Some(command.clone()))
                        .await;
                }
                Some(ControllerCommand::Form { definitions, .. }) => {
                    self.install(index, definitions).await;
                }
                _ => self.broker.apply_replicated(index, None).await,
            }
        })
    }

    fn installed<'a>(&'a self, index: u64, machine: &'a ControllerState) -> ObserverFuture<'a> {
        Box::pin(self.install(index, &machine.metadata))
    }
}

/// The controller group as the broker's definition log.
#[derive(Debug)]
pub struct ControllerLog {
    node: Arc<ControllerNode>,
}

impl ControllerLog {
    pub fn new(node: Arc<ControllerNode>) -> Self {
        Self { node }
    }
}

impl DefinitionLog for ControllerLog {
    fn commit(&self, command: MetadataCommand) -> LogFuture<'_, u64> {
        Box::pin(async move {
            self.node
                .propose_at(ControllerCommand::Metadata(command))
                .await
                .map(|(index, _reply)| index)
                .map_err(|e| BrokerError::Metadata {
                    op: "commit through the cluster's controller",
                    reason: e.to_string(),
                })
        })
    }
}
