//! Standalone authentication and authorization: a password file and an ACL file.
//!
//! **Password file**: one `username:PHC` line per user, where PHC is an argon2 hash string such as
//! `$argon2id$v=19$m=19456,t=2,p=1$...` (what `argon2::PasswordHasher` produces). Blank lines and
//! lines starting with `#` are ignored. Verification runs in `spawn_blocking` because argon2 is
//! deliberately slow.
//!
//! **ACL file**: one rule per line, first match wins:
//!
//! ```text
//! # action   what       filter                  optional principal
//! allow      publish    sensors/+/temperature   user alice
//! deny       subscribe  secret/#
//! allow      all        devices/${client_id}/#
//! allow      subscribe  #                       client monitor-1
//! ```
//!
//! `what` is `publish`, `subscribe` or `all`. The filter uses MQTT wildcards; `${client_id}` and
//! `${username}` are replaced by the client's values. A subscription is allowed when the rule's
//! filter covers the whole requested filter (a rule `a/+` does not allow subscribing to `a/#`).
//! Shared subscriptions are checked on their inner filter. Once an ACL file is configured, anything
//! no rule allows is denied; without one, everything is allowed.

use std::collections::HashMap;
use std::path::Path;

use argon2::{Argon2, PasswordHash, PasswordVerifier};

use crate::router::{filter_covers, topic_matches};

/// A file that failed to load; the message names the line.
#[derive(Debug, thiserror::Error)]
pub enum AuthFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Syntax {
        path: String,
        line: usize,
        message: String,
    },
}

/// Usernames and their argon2 PHC hashes.
#[derive(Debug, Clone, Default)]
pub struct PasswordFile {
    users: HashMap<String, String>,
}

impl PasswordFile {
    pub fn load(path: &Path) -> Result<PasswordFile, AuthFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthFileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        PasswordFile::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, origin: &str) -> Result<PasswordFile, AuthFileError> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let syntax = |message: &str| AuthFileError::Syntax {
                path: origin.to_string(),
                line: i + 1,
                message: message.to_string(),
            };
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| syntax("expected username:hash"))?;
            PasswordHash::new(hash).map_err(|e| syntax(&format!("invalid PHC hash: {e}")))?;
            users.insert(user.to_string(), hash.to_string());
        }
        Ok(PasswordFile { users })
    }

    /// Check a password; runs argon2 on the blocking pool.
    pub async fn verify(&self, username: &str, password: &[u8]) -> bool {
        let Some(hash) = self.users.get(username).cloned() else {
            return false;
        };
        verify_phc(hash, password.to_vec()).await
    }
}

/// Checks a password against an argon2 PHC string on the blocking pool (argon2 is deliberately
/// slow). Shared by the password file and the snapshot's inline credentials.
pub(crate) async fn verify_phc(hash: String, password: Vec<u8>) -> bool {
    tokio::task::spawn_blocking(move || {
        PasswordHash::new(&hash)
            .map(|h| Argon2::default().verify_password(&password, &h).is_ok())
            .unwrap_or(false)
    })
    .await
    .unwrap_or(false)
}

/// What a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AclAction {
    Publish,
    Subscribe,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Principal {
    Any,
    User(String),
    Client(String),
}

#[derive(Debug, Clone)]
struct Rule {
    allow: bool,
    publish: bool,
    subscribe: bool,
    filter: String,
    principal: Principal,
}

/// An ordered rule list; first match wins, no match = deny.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    rules: Vec<Rule>,
}

impl Acl {
    pub fn load(path: &Path) -> Result<Acl, AuthFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthFileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Acl::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, origin: &str) -> Result<Acl, AuthFileError> {
        let mut rules = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let syntax = |message: String| AuthFileError::Syntax {
                path: origin.to_string(),
                line: i + 1,
                message,
            };
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.len() != 3 && words.len() != 5 {
                return Err(syntax(
                    "expected `allow|deny publish|subscribe|all <filter> [user <name>|client <id>]`"
                        .into(),
                ));
            }
            let allow = match words[0] {
                "allow" => true,
                "deny" => false,
                other => return Err(syntax(format!("expected allow or deny, got {other:?}"))),
            };
            let (publish, subscribe) = match words[1] {
                "publish" => (true, false),
                "subscribe" => (false, true),
                "all" => (true, true),
                other => {
                    return Err(syntax(format!(
                        "expected publish, subscribe or all, got {other:?}"
                    )));
                }
            };
            let principal = if words.len() == 5 {
                match words[3] {
                    "user" => Principal::User(words[4].to_string()),
                    "client" => Principal::Client(words[4].to_string()),
                    other => return Err(syntax(format!("expected user or client, got {other:?}"))),
                }
            } else {
                Principal::Any
            };
            rules.push(Rule {
                allow,
                publish,
                subscribe,
                filter: words[2].to_string(),
                principal,
            });
        }
        Ok(Acl { rules })
    }

    /// May this client publish to `topic` / subscribe to `filter` (shared prefix removed)?
    pub fn check(
        &self,
        action: AclAction,
        client_id: &str,
        username: Option<&str>,
        topic_or_filter: &str,
    ) -> bool {
        for rule in &self.rules {
            let applies = match action {
                AclAction::Publish => rule.publish,
                AclAction::Subscribe => rule.subscribe,
            };
            if !applies {
                continue;
            }
            let who = match &rule.principal {
                Principal::Any => true,
                Principal::User(u) => username == Some(u.as_str()),
                Principal::Client(c) => c == client_id,
            };
            if !who {
                continue;
            }
            let filter = if rule.filter.contains("${") {
                rule.filter
                    .replace("${client_id}", client_id)
                    .replace("${username}", username.unwrap_or(""))
            } else {
                rule.filter.clone()
            };
            let hit = match action {
                AclAction::Publish => topic_matches(&filter, topic_or_filter),
                AclAction::Subscribe => filter_covers(&filter, topic_or_filter),
            };
            if hit {
                return rule.allow;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::PasswordHasher;
    use argon2::password_hash::SaltString;

    #[test]
    fn acl_first_match_wins_and_default_denies() {
        let acl = Acl::parse(
            "# comment\n\
             deny publish secret/#\n\
             allow publish # user alice\n\
             allow subscribe a/+ \n\
             allow all devices/${client_id}/#\n",
            "test",
        )
        .unwrap();
        assert!(!acl.check(AclAction::Publish, "c", Some("alice"), "secret/x"));
        assert!(acl.check(AclAction::Publish, "c", Some("alice"), "x/y"));
        assert!(!acl.check(AclAction::Publish, "c", Some("bob"), "x/y"));
        assert!(acl.check(AclAction::Subscribe, "c", None, "a/b"));
        assert!(acl.check(AclAction::Subscribe, "c", None, "a/+"));
        assert!(!acl.check(AclAction::Subscribe, "c", None, "a/#"));
        assert!(acl.check(AclAction::Publish, "dev1", None, "devices/dev1/t"));
        assert!(!acl.check(AclAction::Publish, "dev1", None, "devices/dev2/t"));
    }

    #[test]
    fn acl_syntax_errors_name_the_line() {
        let err = Acl::parse("allow publish a\npermit publish b\n", "f").unwrap_err();
        assert!(err.to_string().starts_with("f:2:"), "{err}");
    }

    #[tokio::test]
    async fn password_file_verifies_argon2_hashes() {
        let salt = SaltString::from_b64("c2FsdHNhbHRzYWx0c2FsdA").unwrap();
        let hash = Argon2::default()
            .hash_password(b"s3cret", &salt)
            .unwrap()
            .to_string();
        let file = PasswordFile::parse(&format!("# users\nalice:{hash}\n"), "p").unwrap();
        assert!(file.verify("alice", b"s3cret").await);
        assert!(!file.verify("alice", b"wrong").await);
        assert!(!file.verify("bob", b"s3cret").await);
        assert!(PasswordFile::parse("alice:nothash\n", "p").is_err());
    }
}
