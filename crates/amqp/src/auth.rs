//! SASL responses of the two mechanisms offered: PLAIN (`authzid NUL user NUL password`) and
//! RabbitMQ's AMQPLAIN (a field table, without its length prefix, holding `LOGIN` and
//! `PASSWORD`).

use amq_protocol::types::AMQPValue;
use amq_protocol::types::parsing::parse_field_table;

/// The mechanisms offered in `connection.start`.
pub const MECHANISMS: &str = "PLAIN AMQPLAIN";

/// Credentials from a client's response, or why they could not be read.
pub fn credentials(mechanism: &str, response: &[u8]) -> Result<(String, String), String> {
    match mechanism {
        "PLAIN" => {
            let mut parts = response.split(|b| *b == 0);
            let (Some(_authzid), Some(user), Some(password), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err("response invalid".into());
            };
            Ok((
                String::from_utf8_lossy(user).into_owned(),
                String::from_utf8_lossy(password).into_owned(),
            ))
        }
        "AMQPLAIN" => {
            let mut framed = (response.len() as u32).to_be_bytes().to_vec();
            framed.extend_from_slice(response);
            let table = parse_field_table(framed.as_slice())
                .map(|(_, table)| table)
                .map_err(|_| "AMQPLAIN auth info is not a table".to_owned())?;
            let field = |name: &str| {
                table.inner().get(name).and_then(|value| match value {
                    AMQPValue::LongString(s) => {
                        Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                    }
                    AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
                    _ => None,
                })
            };
            match (field("LOGIN"), field("PASSWORD")) {
                (Some(user), Some(password)) => Ok((user, password)),
                _ => Err("AMQPLAIN auth info is missing LOGIN or PASSWORD field".into()),
            }
        }
        other => Err(format!("unknown authentication mechanism '{other}'")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_amqplain_are_understood() {
        assert_eq!(
            credentials("PLAIN", b"\0guest\0secret").unwrap(),
            ("guest".into(), "secret".into())
        );
        assert!(credentials("PLAIN", b"guest").is_err());
        // LOGIN (longstr "u") and PASSWORD (longstr "p"), without the table's length prefix.
        let mut response = vec![5];
        response.extend_from_slice(b"LOGIN");
        response.push(b'S');
        response.extend_from_slice(&1u32.to_be_bytes());
        response.push(b'u');
        response.push(8);
        response.extend_from_slice(b"PASSWORD");
        response.push(b'S');
        response.extend_from_slice(&1u32.to_be_bytes());
        response.push(b'p');
        assert_eq!(
            credentials("AMQPLAIN", &response).unwrap(),
            ("u".into(), "p".into())
        );
        assert!(credentials("AMQPLAIN", b"\x05LOGIN").is_err());
        assert!(credentials("EXTERNAL", b"").is_err());
    }
}
