//! JSON ⇄ the broker's typed field tables (queue, exchange and binding arguments; headers).
//!
//! JSON has fewer types than AMQP field tables, so the mapping is the one RabbitMQ's management
//! API uses: booleans, integers (signed 64-bit), floats, strings, arrays and objects; `null` is
//! void. Byte strings that are not UTF-8 come out in base64 as `{"base64": "..."}`.

use base64::Engine;
use serde_json::{Map, Number, Value};
use sluice_broker::message::{FieldTable, FieldValue};

use crate::error::{ApiError, ApiResult};

/// Nesting allowed in arguments and headers.
const MAX_DEPTH: usize = 16;

pub fn table_from_json(object: &Map<String, Value>, what: &str) -> ApiResult<FieldTable> {
    table(object, what, 0)
}

fn table(object: &Map<String, Value>, what: &str, depth: usize) -> ApiResult<FieldTable> {
    object
        .iter()
        .map(|(key, value)| Ok((key.clone(), field(value, what, depth)?)))
        .collect()
}

fn field(value: &Value, what: &str, depth: usize) -> ApiResult<FieldValue> {
    if depth > MAX_DEPTH {
        return Err(ApiError::bad_request(format!(
            "{what} nest deeper than {MAX_DEPTH} levels"
        )));
    }
    Ok(match value {
        Value::Null => FieldValue::Void,
        Value::Bool(b) => FieldValue::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => FieldValue::I64(i),
            None => match n.as_f64() {
                Some(f) => FieldValue::F64(f),
                None => {
                    return Err(ApiError::bad_request(format!(
                        "{what}: {n} does not fit a signed 64-bit integer"
                    )));
                }
            },
        },
        Value::String(s) => FieldValue::LongString(s.as_bytes().to_vec()),
        Value::Array(values) => FieldValue::Array(
            values
                .iter()
                .map(|v| field(v, what, depth + 1))
                .collect::<ApiResult<_>>()?,
        ),
        Value::Object(object) => FieldValue::Table(table(object, what, depth + 1)?),
    })
}

pub fn table_to_json(table: &FieldTable) -> Map<String, Value> {
    table
        .iter()
        .map(|(key, value)| (key.clone(), to_json(value)))
        .collect()
}

fn bytes_to_json(bytes: &[u8]) -> Value {
    match std::str::from_utf8(bytes) {
        Ok(text) => Value::String(text.to_owned()),
        Err(_) => {
            let mut object = Map::new();
            object.insert(
                "base64".into(),
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)),
            );
            Value::Object(object)
        }
    }
}

pub fn to_json(value: &FieldValue) -> Value {
    match value {
        FieldValue::Bool(b) => Value::Bool(*b),
        FieldValue::F32(f) => Number::from_f64(f64::from(*f)).map_or(Value::Null, Value::Number),
        FieldValue::F64(f) => Number::from_f64(*f).map_or(Value::Null, Value::Number),
        FieldValue::Decimal { scale, value } => {
            let f = f64::from(*value) / 10f64.powi(i32::from(*scale));
            Number::from_f64(f).map_or(Value::Null, Value::Number)
        }
        FieldValue::LongString(bytes) | FieldValue::Bytes(bytes) => bytes_to_json(bytes),
        FieldValue::Array(values) => Value::Array(values.iter().map(to_json).collect()),
        FieldValue::Timestamp(t) => Value::Number((*t).into()),
        FieldValue::Table(table) => Value::Object(table_to_json(table)),
        FieldValue::Void => Value::Null,
        other => other
            .as_i64()
            .map_or(Value::Null, |i| Value::Number(i.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trips_through_field_tables() {
        let json: Value = serde_json::json!({
            "x-max-length": 10, "x-message-ttl": 1.5, "x-queue-type": "classic",
            "flag": true, "nested": {"list": [1, "a", null]}
        });
        let table = table_from_json(json.as_object().unwrap(), "arguments").unwrap();
        assert_eq!(Value::Object(table_to_json(&table)), json);
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut json = serde_json::json!(1);
        for _ in 0..40 {
            json = serde_json::json!({ "a": json });
        }
        assert!(table_from_json(json.as_object().unwrap(), "arguments").is_err());
    }
}
