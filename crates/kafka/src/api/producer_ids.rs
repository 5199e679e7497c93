//! InitProducerId: hands idempotent producers a producer id that no other producer has had.
//!
//! Without a transactional id, Kafka always answers with a fresh id at epoch 0, and so does
//! Sluice. Transactions are not offered: a transactional id gets UNSUPPORTED_VERSION (the
//! transaction APIs are absent from ApiVersions, which is how clients learn it up front).

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::{InitProducerIdRequest, InitProducerIdResponse, ProducerId};

use crate::Context;
use crate::errors::kafka_error;

pub(crate) async fn init(ctx: &Context, request: InitProducerIdRequest) -> InitProducerIdResponse {
    let response = InitProducerIdResponse::default()
        .with_producer_id(ProducerId(-1))
        .with_producer_epoch(-1);
    if request
        .transactional_id
        .as_ref()
        .is_some_and(|id| !id.is_empty())
    {
        return response.with_error_code(ResponseError::UnsupportedVersion.code());
    }
    match ctx.broker.next_producer_id().await {
        Ok(id) => response
            .with_producer_id(ProducerId(id))
            .with_producer_epoch(0),
        Err(error) => response.with_error_code(kafka_error(&error).code),
    }
}
