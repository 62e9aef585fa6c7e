//! `[tls]`: the server's certificate and key, and whether plaintext is allowed off loopback.
//!
//! TLS is rustls (with ring) through tonic. Members' and agents' clients pin the CA that
//! signed this certificate (`ca_file` in their configurations, see `nixdispatch::client`).
//! Paths are read at start; under systemd give them with `LoadCredential=` and point here at
//! `/run/credentials/nixdispatch-scheduler.service/…` so the key never sits in the Nix store.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use tonic::transport::{Identity, ServerTlsConfig};

use crate::Error;

/// `[tls]`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain of the server. Default: none (plaintext).
    pub certificate: Option<PathBuf>,
    /// PEM private key of the server. Default: none; required with `certificate`.
    pub private_key: Option<PathBuf>,
    /// Serve plaintext on an address that is not loopback. Default `false`: tokens would
    /// cross the network in the clear; set it only behind a TLS-terminating proxy or on a
    /// private link you trust (the scheduler logs a warning at start).
    pub allow_plaintext: bool,
}

impl TlsConfig {
    /// Checks that certificate and key come together.
    pub fn validate(&self) -> Result<(), Error> {
        if self.certificate.is_some() != self.private_key.is_some() {
            return Err(Error::Config {
                key: "tls.private_key".into(),
                reason: "tls.certificate and tls.private_key must be set together".into(),
            });
        }
        Ok(())
    }

    /// Whether TLS is on.
    pub fn enabled(&self) -> bool {
        self.certificate.is_some()
    }

    /// The server's TLS settings, reading the files; `None` without TLS. Refuses plaintext
    /// on a non-loopback `local` address unless `allow_plaintext`.
    pub fn server_config(&self, local: SocketAddr) -> Result<Option<ServerTlsConfig>, Error> {
        let (Some(cert), Some(key)) = (&self.certificate, &self.private_key) else {
            if !local.ip().is_loopback() {
                if !self.allow_plaintext {
                    return Err(Error::Config {
                        key: "tls".into(),
                        reason: format!(
                            "listening on {local}, which is not loopback, needs TLS \
                             (tls.certificate and tls.private_key), or tls.allow_plaintext = \
                             true behind a proxy that terminates TLS"
                        ),
                    });
                }
                tracing::warn!(%local, "serving PLAINTEXT on a network address (tls.allow_plaintext): credentials cross the network in the clear unless a proxy terminates TLS");
            }
            return Ok(None);
        };
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|source| Error::Io {
                what: format!("reading {}", p.display()),
                source,
            })
        };
        let identity = Identity::from_pem(read(cert)?, read(key)?);
        Ok(Some(ServerTlsConfig::new().identity(identity)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plaintext is served on loopback, refused on a network address, and allowed there only
    /// with `allow_plaintext`; a certificate without its key is refused.
    #[test]
    fn plaintext_only_on_loopback_unless_allowed() {
        let loopback: SocketAddr = "127.0.0.1:50051".parse().unwrap();
        let network: SocketAddr = "0.0.0.0:50051".parse().unwrap();
        let mut c = TlsConfig::default();
        assert!(c.server_config(loopback).unwrap().is_none());
        let e = c.server_config(network).unwrap_err().to_string();
        assert!(e.contains("tls"), "{e}");
        c.allow_plaintext = true;
        assert!(c.server_config(network).unwrap().is_none());
        c.certificate = Some("/c.pem".into());
        assert!(c.validate().is_err());
    }
}
