//! The scheduler's own SSH probe of one builder (russh, `ring` backend): connect to the
//! address in the host's store URI, accept only the host key its agent registered (the key
//! members pin), and, with a probe key, log in and run a command (`nix-store --version`).
//!
//! A probe never returns an error: whatever happens becomes a
//! [`ProbeVerdict`] for the core's breaker. The task that decides
//! when to probe is `crate::service::probe`.

use std::borrow::Cow;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nixdispatch::validate;
use russh::keys::ssh_key::PublicKey;
use russh::keys::{Algorithm, HashAlg, PrivateKey, PrivateKeyWithHashAlg};
use russh::{ChannelMsg, client};

use crate::Error;
use crate::config::ProbeConfig;
use crate::core::{ProbeFailure, ProbeTarget, ProbeVerdict};

/// Where to reach a builder's sshd, from its store URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Endpoint {
    /// The login user the URI names, if any.
    pub(crate) user: Option<String>,
    /// Host name or address (IPv6 without brackets).
    pub(crate) host: String,
    /// TCP port.
    pub(crate) port: u16,
}

impl Endpoint {
    /// Where `uri` sends ssh ([`validate::ssh_address`]), on `default_port` when it names
    /// none.
    pub(crate) fn parse(uri: &str, default_port: u16) -> Result<Self, String> {
        let a = validate::ssh_address(uri).map_err(|e| e.0)?;
        Ok(Self {
            user: a.user,
            host: a.host,
            port: a.port.unwrap_or(default_port),
        })
    }
}

/// Runs probes with one configuration. Cheap to share.
#[derive(Debug)]
pub struct Prober {
    key: Option<Arc<PrivateKey>>,
    user: Option<String>,
    command: String,
    default_port: u16,
    timeout: Duration,
}

impl Prober {
    /// A prober for `[probe]`, reading the probe key now: an unreadable or encrypted key is
    /// a configuration error at start, not a failure of every probe later.
    pub fn new(config: &ProbeConfig) -> Result<Self, Error> {
        let key = config
            .key_file
            .as_deref()
            .map(load_key)
            .transpose()?
            .map(Arc::new);
        Ok(Self {
            key,
            user: config.user.clone(),
            command: config.command.clone(),
            default_port: config.default_port,
            timeout: Duration::from_millis(config.timeout_millis),
        })
    }

    /// Probes `target`, within the configured time.
    pub async fn probe(&self, target: &ProbeTarget) -> ProbeVerdict {
        match tokio::time::timeout(self.timeout, self.attempt(target)).await {
            Ok(Ok(())) => ProbeVerdict::Ok,
            Ok(Err((kind, detail))) => ProbeVerdict::Failed { kind, detail },
            Err(_) => ProbeVerdict::Failed {
                kind: ProbeFailure::Timeout,
                detail: format!("no answer within {} ms", self.timeout.as_millis()),
            },
        }
    }

    async fn attempt(&self, target: &ProbeTarget) -> Result<(), (ProbeFailure, String)> {
        let connect = |d: String| (ProbeFailure::Connect, d);
        let endpoint = Endpoint::parse(&target.store_uri, self.default_port).map_err(connect)?;
        let pinned = pinned_key(&target.public_key).map_err(|d| (ProbeFailure::HostKey, d))?;
        let config = Arc::new(client::Config {
            preferred: russh::Preferred {
                // Ask for the pinned key's algorithm only: a server with several host keys
                // must present the one that was pinned, not the one we would like best.
                key: Cow::Owned(host_key_algorithms(&pinned)),
                ..russh::Preferred::DEFAULT
            },
            nodelay: true,
            ..client::Config::default()
        });
        let presented = Arc::new(Mutex::new(None));
        let handler = Pinned {
            pinned: pinned.clone(),
            presented: presented.clone(),
        };
        let mut session =
            match client::connect(config, (endpoint.host.as_str(), endpoint.port), handler).await {
                Ok(s) => s,
                Err(e) => {
                    let seen = presented.lock().unwrap_or_else(|p| p.into_inner()).take();
                    return Err(match seen {
                        Some(other) => (
                            ProbeFailure::HostKey,
                            format!(
                                "presented {}, pinned {}",
                                fingerprint(&other),
                                fingerprint(&pinned)
                            ),
                        ),
                        None => connect(format!("{}:{}: {e}", endpoint.host, endpoint.port)),
                    });
                }
            };
        let Some(key) = &self.key else {
            let _ = session
                .disconnect(russh::Disconnect::ByApplication, "", "")
                .await;
            return Ok(());
        };
        let login = |d: String| (ProbeFailure::Login, d);
        let user = self
            .user
            .clone()
            .or(endpoint.user)
            .unwrap_or_else(|| "root".into());
        let hash = session
            .best_supported_rsa_hash()
            .await
            .map_err(|e| login(e.to_string()))?
            .flatten();
        let auth = session
            .authenticate_publickey(&user, PrivateKeyWithHashAlg::new(key.clone(), hash))
            .await
            .map_err(|e| login(e.to_string()))?;
        if !auth.success() {
            return Err(login(format!("the probe key is not accepted for `{user}`")));
        }
        let command = |d: String| (ProbeFailure::Command, d);
        let mut channel = session
            .channel_open_session()
            .await
            .map_err(|e| command(e.to_string()))?;
        channel
            .exec(true, self.command.as_bytes())
            .await
            .map_err(|e| command(e.to_string()))?;
        let mut status = None;
        let mut stderr = Vec::new();
        while let Some(msg) = channel.wait().await {
            match msg {
                ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                ChannelMsg::ExtendedData { data, .. } if stderr.len() < 4096 => {
                    stderr.extend_from_slice(&data)
                }
                _ => {}
            }
        }
        let _ = session
            .disconnect(russh::Disconnect::ByApplication, "", "")
            .await;
        match status {
            Some(0) => Ok(()),
            other => {
                let said = String::from_utf8_lossy(&stderr);
                let said = said.lines().next().unwrap_or_default().trim();
                let how = other.map_or_else(
                    || "ended without an exit status".to_owned(),
                    |s| format!("exited with {s}"),
                );
                Err(command(format!("`{}` {how}: {said}", self.command)))
            }
        }
    }
}

/// Reads an unencrypted OpenSSH private key.
fn load_key(path: &Path) -> Result<PrivateKey, Error> {
    russh::keys::load_secret_key(path, None).map_err(|e| Error::Config {
        key: "probe.key_file".into(),
        reason: format!("{}: {e}", path.display()),
    })
}

/// The pinned key from its `<type> <base64>` line.
fn pinned_key(line: &str) -> Result<PublicKey, String> {
    let blob = line.split_whitespace().nth(1).unwrap_or_default();
    russh::keys::parse_public_key_base64(blob).map_err(|e| format!("the pinned key: {e}"))
}

/// The host key algorithms that make a server present `key`.
fn host_key_algorithms(key: &PublicKey) -> Vec<Algorithm> {
    match key.algorithm() {
        Algorithm::Rsa { .. } => vec![
            Algorithm::Rsa {
                hash: Some(HashAlg::Sha512),
            },
            Algorithm::Rsa {
                hash: Some(HashAlg::Sha256),
            },
        ],
        other => vec![other],
    }
}

fn fingerprint(key: &PublicKey) -> String {
    format!("{} {}", key.algorithm(), key.fingerprint(HashAlg::Sha256))
}

/// Accepts exactly the pinned host key, and remembers another one it was shown.
struct Pinned {
    pinned: PublicKey,
    presented: Arc<Mutex<Option<PublicKey>>>,
}

impl client::Handler for Pinned {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } = server else {
            return Ok(false);
        };
        if key.key_data() == self.pinned.key_data() {
            return Ok(true);
        }
        *self.presented.lock().unwrap_or_else(|p| p.into_inner()) = Some(key.clone());
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Store URIs give the user, the host (IPv6 in brackets) and the port, 22 by default.
    #[test]
    fn endpoints_from_store_uris() {
        let e = |u: &str| Endpoint::parse(u, 22);
        assert_eq!(
            e("ssh-ng://nix@build01.example.org").unwrap(),
            Endpoint {
                user: Some("nix".into()),
                host: "build01.example.org".into(),
                port: 22
            }
        );
        assert_eq!(e("ssh://10.0.0.1:2222?compress=true").unwrap().port, 2222);
        let v6 = e("ssh://root@[::1]:2200/").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 2200));
        assert_eq!(e("ssh://[fe80::1]").unwrap().port, 22);
        assert!(e("ssh://host:x").is_err());
        assert!(e("ssh://user@").is_err());
        assert!(e("http://host").is_err());
    }
}
