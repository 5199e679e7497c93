//! `confirm.select`: publisher confirms.

use amq_protocol::protocol::{AMQPClass, confirm};

use crate::channel::Confirms;
use crate::connection::Connection;
use crate::errors::{self, Exception};

impl Connection {
    pub(crate) fn confirm_method(
        &mut self,
        channel: u16,
        method: confirm::AMQPMethod,
    ) -> Result<(), Exception> {
        let confirm::AMQPMethod::Select(select) = method else {
            return Err(Exception::new(
                errors::COMMAND_INVALID,
                "unexpected method confirm.select-ok",
            ));
        };
        let Some(state) = self.channels.get_mut(&channel) else {
            return Ok(());
        };
        if state.tx.is_some() {
            return Err(Exception::new(
                errors::PRECONDITION_FAILED,
                "cannot switch from tx to confirm mode",
            ));
        }
        if state.confirms.is_none() {
            state.confirms = Some(Confirms::default());
        }
        if !select.nowait {
            self.send(
                channel,
                AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})),
            );
        }
        Ok(())
    }
}
