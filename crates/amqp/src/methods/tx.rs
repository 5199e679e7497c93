//! `tx.select`, `commit` and `rollback`: transactions hold a channel's publishes and
//! settlements until commit. A commit answers once every message is in its queues, and on disk
//! for persistent messages in durable queues.

use std::collections::HashMap;
use std::sync::Arc;

use amq_protocol::protocol::{AMQPClass, tx};
use sluice_broker::message::Message;
use sluice_broker::queue::Queue;

use super::raise;
use crate::channel::Tx;
use crate::connection::Connection;
use crate::errors::{self, Exception};

impl Connection {
    pub(crate) async fn tx_method(
        &mut self,
        channel: u16,
        method: tx::AMQPMethod,
    ) -> Result<(), Exception> {
        let not_transactional =
            || Exception::new(errors::PRECONDITION_FAILED, "channel is not transactional");
        match method {
            tx::AMQPMethod::Select(_) => {
                let Some(state) = self.channels.get_mut(&channel) else {
                    return Ok(());
                };
                if state.confirms.is_some() {
                    return Err(Exception::new(
                        errors::PRECONDITION_FAILED,
                        "cannot switch from confirm to tx mode",
                    ));
                }
                if state.tx.is_none() {
                    state.tx = Some(Tx::default());
                }
                self.send(
                    channel,
                    AMQPClass::Tx(tx::AMQPMethod::SelectOk(tx::SelectOk {})),
                );
                Ok(())
            }
            tx::AMQPMethod::Commit(_) => {
                let Some(state) = self.channels.get_mut(&channel) else {
                    return Ok(());
                };
                let Some(work) = state.tx.replace(Tx::default()) else {
                    return Err(not_transactional());
                };
                self.commit(channel, work).await?;
                self.send(
                    channel,
                    AMQPClass::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {})),
                );
                Ok(())
            }
            tx::AMQPMethod::Rollback(_) => {
                let Some(state) = self.channels.get_mut(&channel) else {
                    return Ok(());
                };
                let Some(work) = state.tx.replace(Tx::default()) else {
                    return Err(not_transactional());
                };
                // Settled deliveries become unacknowledged again; publishes are dropped.
                for (_, deliveries) in work.settles {
                    for (tag, delivery) in deliveries {
                        state.unacked.insert(tag, delivery);
                    }
                }
                self.send(
                    channel,
                    AMQPClass::Tx(tx::AMQPMethod::RollbackOk(tx::RollbackOk {})),
                );
                Ok(())
            }
            _ => Err(Exception::new(
                errors::COMMAND_INVALID,
                "unexpected tx method",
            )),
        }
    }

    async fn commit(&mut self, channel: u16, work: Tx) -> Result<(), Exception> {
        let mut per_queue: HashMap<usize, (Arc<Queue>, Vec<Arc<Message>>)> = HashMap::new();
        let mut order: Vec<usize> = Vec::new();
        for publish in work.publishes {
            let routed = match &publish.reply_address {
                Some(address) => self
                    .ctx
                    .reply_to
                    .deliver(address, Arc::clone(&publish.message)),
                None => !publish.queues.is_empty(),
            };
            if !routed && publish.mandatory {
                self.send_return(channel, &publish.message);
            }
            for queue in publish.queues {
                let key = Arc::as_ptr(&queue) as usize;
                let entry = per_queue.entry(key).or_insert_with(|| {
                    order.push(key);
                    (Arc::clone(&queue), Vec::new())
                });
                entry.1.push(Arc::clone(&publish.message));
            }
        }
        for key in order {
            let Some((queue, messages)) = per_queue.remove(&key) else {
                continue;
            };
            let persistent = messages.iter().any(|m| m.properties.is_persistent());
            let outcome = queue.publish(messages).await.map_err(raise)?;
            if persistent && queue.is_durable() {
                queue
                    .wait_durable(outcome.end_offset)
                    .await
                    .map_err(raise)?;
            }
        }
        for (op, deliveries) in work.settles {
            self.apply_settles(channel, op, deliveries);
        }
        self.flush_settles().await;
        Ok(())
    }
}
