//! Users, their passwords and their permissions in each virtual host.
//!
//! Passwords are stored as RabbitMQ stores them (`rabbit_password_hashing_sha256`): base64 of a
//! 4-byte random salt followed by SHA-256(salt ‖ password), so definitions can move between
//! the two brokers. Permissions are three regular expressions per virtual host (configure,
//! write, read) matched against resource names anywhere in the name, as RabbitMQ does; an
//! empty expression grants nothing.

use std::collections::{BTreeMap, HashMap};

use base64::Engine;
use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::limits::UserLimits;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::{MessagingError, ResourceKind};

/// Permissions of a user in one virtual host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permission {
    pub configure: String,
    pub write: String,
    pub read: String,
}

impl Permission {
    pub fn all() -> Self {
        Self {
            configure: ".*".into(),
            write: ".*".into(),
            read: ".*".into(),
        }
    }
}

/// A user's definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    pub name: String,
    pub password_hash: String,
    pub tags: Vec<String>,
    /// Virtual host → permissions there.
    pub permissions: BTreeMap<String, Permission>,
    /// `max-connections` and `max-channels`.
    #[serde(default, skip_serializing_if = "UserLimits::is_empty")]
    pub limits: UserLimits,
}

/// Hashes a password with a fresh salt.
pub fn hash_password(password: &str) -> String {
    let salt = uuid::Uuid::new_v4().into_bytes();
    hash_with_salt(&salt[..4], password)
}

fn hash_with_salt(salt: &[u8], password: &str) -> String {
    let mut bytes = salt.to_vec();
    bytes.extend_from_slice(&salted_digest(salt, password));
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn salted_digest(salt: &[u8], password: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(salt);
    hasher.update(password.as_bytes());
    hasher.finalize().into()
}

/// Whether `password` matches a stored hash.
///
/// The digests are compared in constant time: how many leading bytes of a guess's digest
/// match must not show in how long the answer takes.
pub fn verify_password(hash: &str, password: &str) -> bool {
    let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(hash) else {
        return false;
    };
    if bytes.len() != 4 + 32 {
        return false;
    }
    let (salt, stored) = bytes.split_at(4);
    bool::from(salted_digest(salt, password).as_slice().ct_eq(stored))
}

/// The three kinds of access RabbitMQ distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Configure,
    Write,
    Read,
}

impl Access {
    fn name(self) -> &'static str {
        match self {
            Self::Configure => "configure",
            Self::Write => "write",
            Self::Read => "read",
        }
    }
}

#[derive(Debug, Clone)]
struct Compiled {
    configure: Option<Regex>,
    write: Option<Regex>,
    read: Option<Regex>,
}

/// Checks that a permission pattern is a valid regular expression.
pub fn validate_pattern(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Ok(());
    }
    Regex::new(pattern)
        .map(|_| ())
        .map_err(|error| error.to_string())
}

fn compile(pattern: &str) -> Option<Regex> {
    if pattern.is_empty() {
        return None;
    }
    match Regex::new(pattern) {
        Ok(regex) => Some(regex),
        Err(error) => {
            tracing::warn!(pattern, %error, "invalid permission pattern grants nothing");
            None
        }
    }
}

/// A user who has logged in, with permissions compiled for checking.
#[derive(Debug, Clone)]
pub struct AuthenticatedUser {
    pub name: String,
    pub tags: Vec<String>,
    permissions: HashMap<String, Compiled>,
}

impl AuthenticatedUser {
    pub fn new(record: &UserRecord) -> Self {
        let permissions = record
            .permissions
            .iter()
            .map(|(vhost, p)| {
                (
                    vhost.clone(),
                    Compiled {
                        configure: compile(&p.configure),
                        write: compile(&p.write),
                        read: compile(&p.read),
                    },
                )
            })
            .collect();
        Self {
            name: record.name.clone(),
            tags: record.tags.clone(),
            permissions,
        }
    }

    /// Whether the user may open connections to `vhost` (it has any permissions there).
    pub fn can_access_vhost(&self, vhost: &str) -> bool {
        self.permissions.contains_key(vhost)
    }

    pub fn check(
        &self,
        vhost: &str,
        access: Access,
        kind: ResourceKind,
        name: &str,
    ) -> Result<(), MessagingError> {
        let allowed = self.permissions.get(vhost).is_some_and(|p| {
            let regex = match access {
                Access::Configure => &p.configure,
                Access::Write => &p.write,
                Access::Read => &p.read,
            };
            regex.as_ref().is_some_and(|r| r.is_match(name))
        });
        if allowed {
            Ok(())
        } else {
            Err(MessagingError::AccessRefused(format!(
                "{} access to {kind} '{name}' in vhost '{vhost}' refused for user '{}'",
                access.name(),
                self.name
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_verify_against_their_hash_only() {
        let hash = hash_password("secret");
        assert!(verify_password(&hash, "secret"));
        assert!(!verify_password(&hash, "Secret"));
        assert!(!verify_password("not base64!", "secret"));
        // A hash made by RabbitMQ for "guest" with salt 0x908DC60A.
        let rabbit = hash_with_salt(&[0x90, 0x8d, 0xc6, 0x0a], "guest");
        assert!(verify_password(&rabbit, "guest"));
    }

    #[test]
    fn permissions_match_anywhere_and_empty_means_none() {
        let record = UserRecord {
            name: "app".into(),
            password_hash: hash_password("x"),
            tags: vec![],
            permissions: [(
                "/".to_owned(),
                Permission {
                    configure: "^app-".into(),
                    write: "".into(),
                    read: ".*".into(),
                },
            )]
            .into(),
            limits: UserLimits::default(),
        };
        let user = AuthenticatedUser::new(&record);
        assert!(user.can_access_vhost("/"));
        assert!(!user.can_access_vhost("other"));
        assert!(
            user.check("/", Access::Configure, ResourceKind::Queue, "app-1")
                .is_ok()
        );
        let refused = user
            .check("/", Access::Configure, ResourceKind::Queue, "x")
            .unwrap_err();
        assert_eq!(
            refused.to_string(),
            "configure access to queue 'x' in vhost '/' refused for user 'app'"
        );
        assert!(
            user.check("/", Access::Write, ResourceKind::Exchange, "amq.direct")
                .is_err()
        );
        assert!(
            user.check("/", Access::Read, ResourceKind::Queue, "anything")
                .is_ok()
        );
    }
}
