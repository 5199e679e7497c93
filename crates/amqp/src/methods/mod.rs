//! One module per method class: each turns AMQP methods into broker calls and answers.
//!
//! Permission checks follow RabbitMQ: configure to declare or delete, write to publish to an
//! exchange or bind into a queue, read to consume, get, purge or bind from an exchange.

pub mod basic;
pub mod confirm;
pub mod exchange;
pub mod queue;
pub mod tx;

use sluice_broker::ResourceKind;
use sluice_broker::users::Access;

use crate::connection::Connection;
use crate::errors::{self, Exception};

impl Connection {
    /// Checks the user's permission on a resource of the connection's virtual host.
    pub(crate) fn check_access(
        &self,
        access: Access,
        kind: ResourceKind,
        name: &str,
    ) -> Result<(), Exception> {
        let Some(user) = &self.user else {
            return Err(Exception::new(errors::ACCESS_REFUSED, "not authenticated"));
        };
        user.check(self.vhost_name(), access, kind, name)
            .map_err(|error| errors::exception(&error.into()))
    }

    /// The queue a method names, with RabbitMQ's shortcut: an empty name means the queue most
    /// recently declared on the channel.
    pub(crate) fn queue_name(&self, channel: u16, name: &str) -> Result<String, Exception> {
        if !name.is_empty() {
            return Ok(name.to_owned());
        }
        match self.channels.get(&channel) {
            Some(state) if !state.last_queue.is_empty() => Ok(state.last_queue.clone()),
            _ => Err(Exception::new(
                errors::NOT_FOUND,
                "no previously declared queue",
            )),
        }
    }

    /// Looks up a queue the connection may use (not another connection's exclusive queue).
    pub(crate) fn usable_queue(
        &mut self,
        name: &str,
    ) -> Result<std::sync::Arc<sluice_broker::queue::Queue>, Exception> {
        let table = self.routing();
        let queue = table.queue(name).cloned().ok_or_else(|| {
            Exception::new(
                errors::NOT_FOUND,
                format!("no queue '{name}' in vhost '{}'", self.vhost_name()),
            )
        })?;
        sluice_broker::declare::check_exclusive(&queue, self.id)
            .map_err(|error| errors::exception(&error))?;
        Ok(queue)
    }
}

/// Converts a broker error into the exception to raise.
pub(crate) fn raise(error: sluice_broker::BrokerError) -> Exception {
    errors::exception(&error)
}
