//! A small blocking HTTP client for the admin API.

use std::time::Duration;

use anyhow::anyhow;
use serde_json::Value;

/// Why a command failed, deciding its exit status.
#[derive(Debug)]
pub enum Failure {
    /// The broker answered with an error (its problem detail).
    Refused(String),
    /// The broker could not be reached.
    Unreachable(String),
    /// The command line itself is wrong.
    Usage(String),
}

impl Failure {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Refused(_) => 1,
            Self::Usage(_) => 2,
            Self::Unreachable(_) => 3,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Self::Refused(m) | Self::Unreachable(m) | Self::Usage(m) => m,
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Self::Refused(format!("{error:#}"))
    }
}

#[derive(Debug)]
pub struct Client {
    base: String,
    authorization: String,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(url: &str, user: &str, password: &str) -> Self {
        use base64::Engine;
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(60)))
            .http_status_as_error(false)
            .build()
            .into();
        Self {
            base: url.trim_end_matches('/').to_owned(),
            authorization: format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            ),
            agent,
        }
    }

    /// Sends a request; returns the JSON body (Null for an empty one) or the failure.
    pub fn send(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, Failure> {
        let url = format!("{}{path}", self.base);
        let result = match (method, body) {
            ("GET", _) => self
                .agent
                .get(&url)
                .header("Authorization", &self.authorization)
                .call(),
            ("DELETE", None) => self
                .agent
                .delete(&url)
                .header("Authorization", &self.authorization)
                .call(),
            ("DELETE", Some(body)) => self
                .agent
                .delete(&url)
                .header("Authorization", &self.authorization)
                .force_send_body()
                .send_json(body),
            (method, body) => {
                let builder = match method {
                    "POST" => self.agent.post(&url),
                    "PUT" => self.agent.put(&url),
                    "PATCH" => self.agent.patch(&url),
                    other => return Err(Failure::Usage(format!("unsupported method {other}"))),
                };
                builder
                    .header("Authorization", &self.authorization)
                    .send_json(body.cloned().unwrap_or(Value::Null))
            }
        };
        let mut response = result.map_err(|error| {
            Failure::Unreachable(format!("cannot reach the broker at {}: {error}", self.base))
        })?;
        let status = response.status();
        let text = response.body_mut().read_to_string().map_err(|error| {
            Failure::Unreachable(format!("reading the broker's answer: {error}"))
        })?;
        let value: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).map_err(|e| {
                Failure::from(anyhow!(
                    "the broker answered something that is not JSON: {e}"
                ))
            })?
        };
        if status.is_success() {
            Ok(value)
        } else {
            let detail = value["detail"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| format!("HTTP {status}"));
            Err(Failure::Refused(detail))
        }
    }

    pub fn get(&self, path: &str) -> Result<Value, Failure> {
        self.send("GET", path, None)
    }
}

/// Percent-encodes one path segment.
pub fn segment(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(byte as char)
            }
            other => out.push_str(&format!("%{other:02X}")),
        }
    }
    out
}
