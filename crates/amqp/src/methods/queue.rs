//! `queue.declare`, `bind`, `unbind`, `purge` and `delete`.

use amq_protocol::protocol::{AMQPClass, queue};
use sluice_broker::ResourceKind;
use sluice_broker::declare::{QueueDeclare, generated_name};
use sluice_broker::exchange::{BindingRecord, Destination};
use sluice_broker::message::FieldValue;
use sluice_broker::message::value::lookup;
use sluice_broker::users::Access;

use super::raise;
use crate::connection::Connection;
use crate::convert::{short, table_from_wire};
use crate::errors::{self, Exception};
use crate::reply_to;

impl Connection {
    pub(crate) async fn queue_method(
        &mut self,
        channel: u16,
        method: queue::AMQPMethod,
    ) -> Result<(), Exception> {
        let vhost = self.vhost_name().to_owned();
        match method {
            queue::AMQPMethod::Declare(declare) => {
                let mut name = declare.queue.as_str().replace(['\r', '\n'], "");
                if name.starts_with(reply_to::PSEUDO_QUEUE) {
                    // The pseudo-queue exists for whoever consumes from it.
                    let exists = name == reply_to::PSEUDO_QUEUE || self.ctx.reply_to.exists(&name);
                    if !exists {
                        return Err(Exception::new(
                            errors::NOT_FOUND,
                            format!("no queue '{name}' in vhost '{vhost}'"),
                        ));
                    }
                    self.send(
                        channel,
                        AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                            queue: short(&name),
                            message_count: 0,
                            consumer_count: 1,
                        })),
                    );
                    return Ok(());
                }
                let arguments = table_from_wire(&declare.arguments);
                let server_named = name.is_empty() && !declare.passive;
                if !declare.passive {
                    if name.is_empty() {
                        name = generated_name("amq.gen");
                    }
                    self.check_access(Access::Configure, ResourceKind::Queue, &name)?;
                    if let Some(dlx) =
                        lookup(&arguments, "x-dead-letter-exchange").and_then(FieldValue::as_str)
                    {
                        self.check_access(Access::Read, ResourceKind::Queue, &name)?;
                        self.check_access(Access::Write, ResourceKind::Exchange, dlx)?;
                    }
                }
                let request = QueueDeclare {
                    name,
                    server_named,
                    passive: declare.passive,
                    durable: declare.durable,
                    exclusive: declare.exclusive,
                    auto_delete: declare.auto_delete,
                    arguments,
                    connection: self.id,
                };
                let (declared, stat) = self
                    .ctx
                    .broker
                    .declare_queue(&vhost, request)
                    .await
                    .map_err(raise)?;
                let name = declared.name().to_owned();
                if let Some(state) = self.channels.get_mut(&channel) {
                    state.last_queue = name.clone();
                }
                if !declare.nowait {
                    self.send(
                        channel,
                        AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                            queue: short(&name),
                            message_count: stat.message_count.min(u64::from(u32::MAX)) as u32,
                            consumer_count: stat.consumer_count,
                        })),
                    );
                }
            }
            queue::AMQPMethod::Bind(bind) => {
                let name = self.queue_name(channel, bind.queue.as_str())?;
                let routing_key =
                    if bind.queue.as_str().is_empty() && bind.routing_key.as_str().is_empty() {
                        name.clone()
                    } else {
                        bind.routing_key.as_str().to_owned()
                    };
                let binding = BindingRecord {
                    vhost,
                    source: bind.exchange.as_str().to_owned(),
                    destination: Destination::Queue(name),
                    routing_key,
                    arguments: table_from_wire(&bind.arguments),
                };
                self.check_binding_access(&binding)?;
                self.ctx
                    .broker
                    .bind(binding, self.id)
                    .await
                    .map_err(raise)?;
                if !bind.nowait {
                    self.send(
                        channel,
                        AMQPClass::Queue(queue::AMQPMethod::BindOk(queue::BindOk {})),
                    );
                }
            }
            queue::AMQPMethod::Unbind(unbind) => {
                let name = self.queue_name(channel, unbind.queue.as_str())?;
                let routing_key =
                    if unbind.queue.as_str().is_empty() && unbind.routing_key.as_str().is_empty() {
                        name.clone()
                    } else {
                        unbind.routing_key.as_str().to_owned()
                    };
                let binding = BindingRecord {
                    vhost,
                    source: unbind.exchange.as_str().to_owned(),
                    destination: Destination::Queue(name),
                    routing_key,
                    arguments: table_from_wire(&unbind.arguments),
                };
                self.check_binding_access(&binding)?;
                self.ctx
                    .broker
                    .unbind(binding, self.id)
                    .await
                    .map_err(raise)?;
                self.send(
                    channel,
                    AMQPClass::Queue(queue::AMQPMethod::UnbindOk(queue::UnbindOk {})),
                );
            }
            queue::AMQPMethod::Purge(purge) => {
                let name = self.queue_name(channel, purge.queue.as_str())?;
                self.check_access(Access::Read, ResourceKind::Queue, &name)?;
                let target = self.usable_queue(&name)?;
                let count = target.purge().await.map_err(raise)?;
                if !purge.nowait {
                    self.send(
                        channel,
                        AMQPClass::Queue(queue::AMQPMethod::PurgeOk(queue::PurgeOk {
                            message_count: count.min(u64::from(u32::MAX)) as u32,
                        })),
                    );
                }
            }
            queue::AMQPMethod::Delete(delete) => {
                let name = self.queue_name(channel, delete.queue.as_str())?;
                self.check_access(Access::Configure, ResourceKind::Queue, &name)?;
                let count = self
                    .ctx
                    .broker
                    .delete_queue(&vhost, &name, delete.if_unused, delete.if_empty, self.id)
                    .await
                    .map_err(raise)?;
                if !delete.nowait {
                    self.send(
                        channel,
                        AMQPClass::Queue(queue::AMQPMethod::DeleteOk(queue::DeleteOk {
                            message_count: count.min(u64::from(u32::MAX)) as u32,
                        })),
                    );
                }
            }
            other => {
                return Err(Exception::new(
                    errors::COMMAND_INVALID,
                    format!("unexpected method {other:?}"),
                ));
            }
        }
        Ok(())
    }
}
