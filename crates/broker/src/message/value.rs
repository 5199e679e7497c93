//! Typed values for message headers and for queue, exchange, binding and consumer arguments.
//!
//! This is the data model that messaging protocols share (AMQP 0-9-1 field tables map onto it
//! one to one); it is not a wire encoding. Tables keep their entries in order, because clients
//! see headers in the order they were written, and lookups are linear: tables are small.

use serde::{Deserialize, Serialize};

/// One typed value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FieldValue {
    Bool(bool),
    I8(i8),
    U8(u8),
    I16(i16),
    U16(u16),
    I32(i32),
    U32(u32),
    I64(i64),
    F32(f32),
    F64(f64),
    Decimal {
        scale: u8,
        value: u32,
    },
    /// A string of bytes, usually UTF-8.
    LongString(Vec<u8>),
    Array(Vec<FieldValue>),
    /// Seconds since the Unix epoch.
    Timestamp(u64),
    Table(FieldTable),
    Bytes(Vec<u8>),
    Void,
}

/// An ordered table of named values.
pub type FieldTable = Vec<(String, FieldValue)>;

impl FieldValue {
    pub fn string(text: impl AsRef<str>) -> Self {
        Self::LongString(text.as_ref().as_bytes().to_vec())
    }

    /// The value as an integer, whatever its width.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Self::I8(v) => Some(v.into()),
            Self::U8(v) => Some(v.into()),
            Self::I16(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::I32(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::I64(v) => Some(v),
            _ => None,
        }
    }

    /// The value as text, if it is a string of valid UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::LongString(bytes) => std::str::from_utf8(bytes).ok(),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Self::Bool(v) => Some(*v),
            _ => None,
        }
    }

    /// The name RabbitMQ gives this value's type in error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Bool(_) => "bool",
            Self::I8(_) => "byte",
            Self::U8(_) => "unsignedbyte",
            Self::I16(_) => "short",
            Self::U16(_) => "unsignedshort",
            Self::I32(_) => "signedint",
            Self::U32(_) => "unsignedint",
            Self::I64(_) => "long",
            Self::F32(_) => "float",
            Self::F64(_) => "double",
            Self::Decimal { .. } => "decimal",
            Self::LongString(_) => "longstr",
            Self::Array(_) => "array",
            Self::Timestamp(_) => "timestamp",
            Self::Table(_) => "table",
            Self::Bytes(_) => "binary",
            Self::Void => "void",
        }
    }

    /// Equality of meaning rather than of encoding: integers of any width compare by value,
    /// as do floats. Used where a client's `1` must match a stored `1` (binding and queue
    /// arguments, header matching).
    pub fn same_value(&self, other: &Self) -> bool {
        if let (Some(a), Some(b)) = (self.as_i64(), other.as_i64()) {
            return a == b;
        }
        match (self, other) {
            (Self::F32(a), Self::F64(b)) | (Self::F64(b), Self::F32(a)) => f64::from(*a) == *b,
            (Self::Array(a), Self::Array(b)) => {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.same_value(y))
            }
            (Self::Table(a), Self::Table(b)) => {
                a.len() == b.len()
                    && a.iter()
                        .zip(b)
                        .all(|((ka, va), (kb, vb))| ka == kb && va.same_value(vb))
            }
            _ => self == other,
        }
    }

    /// The value as RabbitMQ prints it inside an error message.
    pub fn display(&self) -> String {
        match self {
            Self::Bool(v) => v.to_string(),
            Self::LongString(bytes) | Self::Bytes(bytes) => {
                String::from_utf8_lossy(bytes).into_owned()
            }
            Self::F32(v) => v.to_string(),
            Self::F64(v) => v.to_string(),
            Self::Decimal { scale, value } => format!("{{{scale},{value}}}"),
            Self::Timestamp(v) => v.to_string(),
            Self::Array(values) => {
                let inner: Vec<String> = values.iter().map(Self::display).collect();
                format!("[{}]", inner.join(","))
            }
            Self::Table(_) => "table".into(),
            Self::Void => "undefined".into(),
            other => other.as_i64().map(|v| v.to_string()).unwrap_or_default(),
        }
    }
}

/// The first value named `key` in `table`.
pub fn lookup<'a>(table: &'a [(String, FieldValue)], key: &str) -> Option<&'a FieldValue> {
    table
        .iter()
        .find(|(name, _)| name == key)
        .map(|(_, value)| value)
}

/// Sets `key` to `value`, replacing an existing entry in place or appending a new one.
pub fn set(table: &mut FieldTable, key: &str, value: FieldValue) {
    match table.iter_mut().find(|(name, _)| name == key) {
        Some(entry) => entry.1 = value,
        None => table.push((key.to_owned(), value)),
    }
}

/// Removes every entry named `key`.
pub fn remove(table: &mut FieldTable, key: &str) {
    table.retain(|(name, _)| name != key);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_compare_by_value_across_widths() {
        assert!(FieldValue::I16(5).same_value(&FieldValue::I64(5)));
        assert!(!FieldValue::I16(5).same_value(&FieldValue::I64(6)));
        assert!(FieldValue::string("a").same_value(&FieldValue::string("a")));
        assert!(!FieldValue::string("1").same_value(&FieldValue::I8(1)));
    }

    #[test]
    fn set_replaces_in_place() {
        let mut table = vec![
            ("a".to_owned(), FieldValue::I8(1)),
            ("b".to_owned(), FieldValue::I8(2)),
        ];
        set(&mut table, "a", FieldValue::I8(3));
        set(&mut table, "c", FieldValue::I8(4));
        assert_eq!(table[0], ("a".to_owned(), FieldValue::I8(3)));
        assert_eq!(table.len(), 3);
        remove(&mut table, "b");
        assert_eq!(lookup(&table, "b"), None);
    }
}
