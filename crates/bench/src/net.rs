//! Reachability checks done before a workload starts, so "nothing listens there" is a clear,
//! immediate error instead of a client library retrying forever in the background.

use std::time::Duration;

use crate::error::BenchError;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Succeeds if any of the comma-separated `host:port` addresses accepts a TCP connection.
pub async fn probe(addresses: &str) -> Result<(), BenchError> {
    let mut last_error = None;
    for address in addresses
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
    {
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(address)).await {
            Ok(Ok(_stream)) => return Ok(()),
            Ok(Err(error)) => last_error = Some(error),
            Err(_) => {
                last_error = Some(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {CONNECT_TIMEOUT:?}"),
                ));
            }
        }
    }
    Err(BenchError::Unreachable {
        address: addresses.to_owned(),
        source: last_error.unwrap_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address given")
        }),
    })
}

/// The `host:port` part of an `amqp://user:password@host:port/vhost` URI.
pub fn amqp_host_port(uri: &str) -> String {
    let rest = uri.split_once("://").map_or(uri, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:5672")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amqp_uris_give_their_address() {
        assert_eq!(
            amqp_host_port("amqp://guest:guest@127.0.0.1:5673/%2f"),
            "127.0.0.1:5673"
        );
        assert_eq!(amqp_host_port("amqp://localhost"), "localhost:5672");
        assert_eq!(amqp_host_port("127.0.0.1:1"), "127.0.0.1:1");
    }

    #[tokio::test]
    async fn a_closed_port_is_unreachable() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        probe(&address).await.unwrap();
        drop(listener);
        let error = probe(&address).await.unwrap_err();
        assert!(matches!(error, BenchError::Unreachable { .. }), "{error}");
    }
}
