//! `exchange.declare`, `delete`, `bind` and `unbind`.

use amq_protocol::protocol::{AMQPClass, exchange};
use sluice_broker::ResourceKind;
use sluice_broker::declare::ExchangeDeclare;
use sluice_broker::exchange::{BindingRecord, Destination};
use sluice_broker::message::FieldValue;
use sluice_broker::message::value::lookup;
use sluice_broker::users::Access;

use super::raise;
use crate::connection::Connection;
use crate::convert::table_from_wire;
use crate::errors::Exception;

impl Connection {
    pub(crate) async fn exchange_method(
        &mut self,
        channel: u16,
        method: exchange::AMQPMethod,
    ) -> Result<(), Exception> {
        let vhost = self.vhost_name().to_owned();
        match method {
            exchange::AMQPMethod::Declare(declare) => {
                let name = declare.exchange.as_str().to_owned();
                let arguments = table_from_wire(&declare.arguments);
                if !declare.passive {
                    self.check_access(Access::Configure, ResourceKind::Exchange, &name)?;
                    if let Some(alternate) =
                        lookup(&arguments, "alternate-exchange").and_then(FieldValue::as_str)
                    {
                        self.check_access(Access::Read, ResourceKind::Exchange, &name)?;
                        self.check_access(Access::Write, ResourceKind::Exchange, alternate)?;
                    }
                }
                let request = ExchangeDeclare {
                    name,
                    kind: declare.kind.as_str().to_owned(),
                    passive: declare.passive,
                    durable: declare.durable,
                    auto_delete: declare.auto_delete,
                    internal: declare.internal,
                    arguments,
                };
                self.ctx
                    .broker
                    .declare_exchange(&vhost, request)
                    .await
                    .map_err(raise)?;
                if !declare.nowait {
                    self.send(
                        channel,
                        AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(
                            exchange::DeclareOk {},
                        )),
                    );
                }
            }
            exchange::AMQPMethod::Delete(delete) => {
                let name = delete.exchange.as_str();
                if !name.is_empty() && !name.starts_with("amq.") {
                    self.check_access(Access::Configure, ResourceKind::Exchange, name)?;
                }
                self.ctx
                    .broker
                    .delete_exchange(&vhost, name, delete.if_unused)
                    .await
                    .map_err(raise)?;
                if !delete.nowait {
                    self.send(
                        channel,
                        AMQPClass::Exchange(exchange::AMQPMethod::DeleteOk(exchange::DeleteOk {})),
                    );
                }
            }
            exchange::AMQPMethod::Bind(bind) => {
                let binding = BindingRecord {
                    vhost,
                    source: bind.source.as_str().to_owned(),
                    destination: Destination::Exchange(bind.destination.as_str().to_owned()),
                    routing_key: bind.routing_key.as_str().to_owned(),
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
                        AMQPClass::Exchange(exchange::AMQPMethod::BindOk(exchange::BindOk {})),
                    );
                }
            }
            exchange::AMQPMethod::Unbind(unbind) => {
                let binding = BindingRecord {
                    vhost,
                    source: unbind.source.as_str().to_owned(),
                    destination: Destination::Exchange(unbind.destination.as_str().to_owned()),
                    routing_key: unbind.routing_key.as_str().to_owned(),
                    arguments: table_from_wire(&unbind.arguments),
                };
                self.check_binding_access(&binding)?;
                self.ctx
                    .broker
                    .unbind(binding, self.id)
                    .await
                    .map_err(raise)?;
                if !unbind.nowait {
                    self.send(
                        channel,
                        AMQPClass::Exchange(exchange::AMQPMethod::UnbindOk(exchange::UnbindOk {})),
                    );
                }
            }
            other => {
                return Err(Exception::new(
                    crate::errors::COMMAND_INVALID,
                    format!("unexpected method {other:?}"),
                ));
            }
        }
        Ok(())
    }

    /// Write on the destination, read on the source, as RabbitMQ checks bindings.
    pub(crate) fn check_binding_access(&self, binding: &BindingRecord) -> Result<(), Exception> {
        let (kind, name) = match &binding.destination {
            Destination::Queue(name) => (ResourceKind::Queue, name),
            Destination::Exchange(name) => (ResourceKind::Exchange, name),
        };
        if !name.is_empty() {
            self.check_access(Access::Write, kind, name)?;
        }
        if !binding.source.is_empty() {
            self.check_access(Access::Read, ResourceKind::Exchange, &binding.source)?;
        }
        Ok(())
    }
}
