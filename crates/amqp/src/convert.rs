//! Conversions between AMQP 0-9-1 wire types (`amq-protocol`) and the broker's message model.
//!
//! Field values map one to one. Short strings must stay within 255 bytes on the wire;
//! [`short`] truncates (at a character boundary) the few texts the broker builds itself, such
//! as error messages, so encoding never fails.

use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::{
    AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable as WireTable, LongString,
    ShortString,
};
use sluice_broker::message::{FieldTable, FieldValue, Properties};

/// A short string of at most 255 bytes.
pub fn short(text: &str) -> ShortString {
    let mut end = text.len().min(255);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    ShortString::from(&text[..end])
}

pub fn value_from_wire(value: &AMQPValue) -> FieldValue {
    match value {
        AMQPValue::Boolean(v) => FieldValue::Bool(*v),
        AMQPValue::ShortShortInt(v) => FieldValue::I8(*v),
        AMQPValue::ShortShortUInt(v) => FieldValue::U8(*v),
        AMQPValue::ShortInt(v) => FieldValue::I16(*v),
        AMQPValue::ShortUInt(v) => FieldValue::U16(*v),
        AMQPValue::LongInt(v) => FieldValue::I32(*v),
        AMQPValue::LongUInt(v) => FieldValue::U32(*v),
        AMQPValue::LongLongInt(v) => FieldValue::I64(*v),
        AMQPValue::Float(v) => FieldValue::F32(*v),
        AMQPValue::Double(v) => FieldValue::F64(*v),
        AMQPValue::DecimalValue(d) => FieldValue::Decimal {
            scale: d.scale,
            value: d.value,
        },
        AMQPValue::ShortString(s) => FieldValue::LongString(s.as_str().as_bytes().to_vec()),
        AMQPValue::LongString(s) => FieldValue::LongString(s.as_bytes().to_vec()),
        AMQPValue::FieldArray(values) => {
            FieldValue::Array(values.as_slice().iter().map(value_from_wire).collect())
        }
        AMQPValue::Timestamp(v) => FieldValue::Timestamp(*v),
        AMQPValue::FieldTable(table) => FieldValue::Table(table_from_wire(table)),
        AMQPValue::ByteArray(bytes) => FieldValue::Bytes(bytes.as_slice().to_vec()),
        AMQPValue::Void => FieldValue::Void,
    }
}

pub fn table_from_wire(table: &WireTable) -> FieldTable {
    table
        .into_iter()
        .map(|(key, value)| (key.as_str().to_owned(), value_from_wire(value)))
        .collect()
}

pub fn value_to_wire(value: &FieldValue) -> AMQPValue {
    match value {
        FieldValue::Bool(v) => AMQPValue::Boolean(*v),
        FieldValue::I8(v) => AMQPValue::ShortShortInt(*v),
        FieldValue::U8(v) => AMQPValue::ShortShortUInt(*v),
        FieldValue::I16(v) => AMQPValue::ShortInt(*v),
        FieldValue::U16(v) => AMQPValue::ShortUInt(*v),
        FieldValue::I32(v) => AMQPValue::LongInt(*v),
        FieldValue::U32(v) => AMQPValue::LongUInt(*v),
        FieldValue::I64(v) => AMQPValue::LongLongInt(*v),
        FieldValue::F32(v) => AMQPValue::Float(*v),
        FieldValue::F64(v) => AMQPValue::Double(*v),
        FieldValue::Decimal { scale, value } => AMQPValue::DecimalValue(DecimalValue {
            scale: *scale,
            value: *value,
        }),
        FieldValue::LongString(bytes) => AMQPValue::LongString(LongString::from(bytes.clone())),
        FieldValue::Array(values) => AMQPValue::FieldArray(FieldArray::from(
            values.iter().map(value_to_wire).collect::<Vec<_>>(),
        )),
        FieldValue::Timestamp(v) => AMQPValue::Timestamp(*v),
        FieldValue::Table(table) => AMQPValue::FieldTable(table_to_wire(table)),
        FieldValue::Bytes(bytes) => AMQPValue::ByteArray(ByteArray::from(bytes.clone())),
        FieldValue::Void => AMQPValue::Void,
    }
}

pub fn table_to_wire(table: &FieldTable) -> WireTable {
    let mut out = WireTable::default();
    for (key, value) in table {
        out.insert(short(key), value_to_wire(value));
    }
    out
}

fn text(value: &Option<ShortString>) -> Option<String> {
    value.as_ref().map(|s| s.as_str().to_owned())
}

pub fn properties_from_wire(wire: &BasicProperties) -> Properties {
    Properties {
        content_type: text(wire.content_type()),
        content_encoding: text(wire.content_encoding()),
        headers: wire.headers().as_ref().map(table_from_wire),
        delivery_mode: *wire.delivery_mode(),
        priority: *wire.priority(),
        correlation_id: text(wire.correlation_id()),
        reply_to: text(wire.reply_to()),
        expiration: text(wire.expiration()),
        message_id: text(wire.message_id()),
        timestamp: *wire.timestamp(),
        kind: text(wire.kind()),
        user_id: text(wire.user_id()),
        app_id: text(wire.app_id()),
        cluster_id: text(wire.cluster_id()),
    }
}

pub fn properties_to_wire(p: &Properties) -> BasicProperties {
    let mut wire = BasicProperties::default();
    if let Some(v) = &p.content_type {
        wire = wire.with_content_type(short(v));
    }
    if let Some(v) = &p.content_encoding {
        wire = wire.with_content_encoding(short(v));
    }
    if let Some(v) = &p.headers {
        wire = wire.with_headers(table_to_wire(v));
    }
    if let Some(v) = p.delivery_mode {
        wire = wire.with_delivery_mode(v);
    }
    if let Some(v) = p.priority {
        wire = wire.with_priority(v);
    }
    if let Some(v) = &p.correlation_id {
        wire = wire.with_correlation_id(short(v));
    }
    if let Some(v) = &p.reply_to {
        wire = wire.with_reply_to(short(v));
    }
    if let Some(v) = &p.expiration {
        wire = wire.with_expiration(short(v));
    }
    if let Some(v) = &p.message_id {
        wire = wire.with_message_id(short(v));
    }
    if let Some(v) = p.timestamp {
        wire = wire.with_timestamp(v);
    }
    if let Some(v) = &p.kind {
        wire = wire.with_type(short(v));
    }
    if let Some(v) = &p.user_id {
        wire = wire.with_user_id(short(v));
    }
    if let Some(v) = &p.app_id {
        wire = wire.with_app_id(short(v));
    }
    if let Some(v) = &p.cluster_id {
        wire = wire.with_cluster_id(short(v));
    }
    wire
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_round_trip() {
        let properties = Properties {
            content_type: Some("text/plain".into()),
            headers: Some(vec![
                ("a".into(), FieldValue::I64(1)),
                (
                    "b".into(),
                    FieldValue::Array(vec![FieldValue::string("x"), FieldValue::Bool(true)]),
                ),
            ]),
            delivery_mode: Some(2),
            priority: Some(3),
            reply_to: Some("amq.rabbitmq.reply-to".into()),
            timestamp: Some(5),
            kind: Some("t".into()),
            ..Properties::default()
        };
        assert_eq!(
            properties_from_wire(&properties_to_wire(&properties)),
            properties
        );
    }

    #[test]
    fn short_strings_are_truncated_on_a_char_boundary() {
        let long = "é".repeat(200);
        let s = short(&long);
        assert!(s.as_str().len() <= 255);
        assert!(s.as_str().chars().all(|c| c == 'é'));
    }
}
