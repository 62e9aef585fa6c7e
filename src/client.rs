//! Connecting to the scheduler: an endpoint with a connect timeout and, when a credential
//! file is configured, `authorization: Bearer <token>` on every call. Shared by the build
//! hook and the operator CLI.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::proto::admin_service_client::AdminServiceClient;
use crate::proto::lease_service_client::LeaseServiceClient;

/// How to reach the scheduler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// `http://host:port` or `https://host:port`.
    pub endpoint: String,
    /// A file whose content (trimmed) is the bearer token. `None`: no credential is sent.
    pub credential_file: Option<PathBuf>,
    /// Bound on establishing the connection.
    pub connect_timeout: Duration,
    /// Bound on each call, when set (callers may also bound calls themselves).
    pub request_timeout: Option<Duration>,
}

impl ClientConfig {
    /// A configuration for `endpoint` with no credential, a 1 s connect timeout and no call
    /// timeout.
    pub fn new(endpoint: impl Into<String>) -> Self {
        ClientConfig {
            endpoint: endpoint.into(),
            credential_file: None,
            connect_timeout: Duration::from_secs(1),
            request_timeout: None,
        }
    }
}

/// Why no connection was made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint is not a valid URI.
    #[error("invalid scheduler endpoint {endpoint:?}")]
    InvalidEndpoint {
        /// The endpoint as configured.
        endpoint: String,
        /// The parser's error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The credential file cannot be read.
    #[error("cannot read the credential file {path}")]
    Credential {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The token cannot be an HTTP header value.
    #[error("the credential in {path} is not a valid token (printable ASCII, one line)")]
    BadToken {
        /// The file.
        path: PathBuf,
    },
    /// Connecting failed or timed out.
    #[error("cannot connect to the scheduler at {endpoint}")]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// The transport's error.
        #[source]
        source: tonic::transport::Error,
    },
}

/// Adds the bearer token, if any, to every request.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    header: Option<MetadataValue<Ascii>>,
}

impl Auth {
    /// Reads the token from `path` (surrounding whitespace trimmed).
    pub fn from_file(path: &Path) -> Result<Self, ClientError> {
        let token = std::fs::read_to_string(path).map_err(|source| ClientError::Credential {
            path: path.to_owned(),
            source,
        })?;
        let token = token.trim();
        if token.is_empty() || !token.chars().all(|c| c.is_ascii_graphic()) {
            return Err(ClientError::BadToken {
                path: path.to_owned(),
            });
        }
        let header = format!("Bearer {token}")
            .parse()
            .map_err(|_| ClientError::BadToken {
                path: path.to_owned(),
            })?;
        Ok(Auth {
            header: Some(header),
        })
    }
}

impl Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(h) = &self.header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    }
}

/// A channel to the scheduler that carries the credential.
pub type AuthChannel = InterceptedService<Channel, Auth>;

/// Connects to the scheduler (eagerly, so that an unreachable scheduler is known now).
pub async fn connect(config: &ClientConfig) -> Result<AuthChannel, ClientError> {
    let auth = match &config.credential_file {
        Some(path) => Auth::from_file(path)?,
        None => Auth::default(),
    };
    let mut endpoint = Endpoint::from_shared(config.endpoint.clone())
        .map_err(|source| ClientError::InvalidEndpoint {
            endpoint: config.endpoint.clone(),
            source,
        })?
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(true);
    if let Some(t) = config.request_timeout {
        endpoint = endpoint.timeout(t);
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|source| ClientError::Connect {
            endpoint: config.endpoint.clone(),
            source,
        })?;
    Ok(InterceptedService::new(channel, auth))
}

/// A lease client over `channel`.
pub fn lease_client(channel: AuthChannel) -> LeaseServiceClient<AuthChannel> {
    LeaseServiceClient::new(channel)
}

/// An admin client over `channel`.
pub fn admin_client(channel: AuthChannel) -> AdminServiceClient<AuthChannel> {
    AdminServiceClient::new(channel)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The token is trimmed and sent as a bearer header; bad tokens are refused.
    #[test]
    fn bearer_from_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        std::fs::write(&p, "s3cret\n").unwrap();
        let mut auth = Auth::from_file(&p).unwrap();
        let req = auth.call(tonic::Request::new(())).unwrap();
        assert_eq!(
            req.metadata().get("authorization").unwrap(),
            "Bearer s3cret"
        );
        std::fs::write(&p, "two words").unwrap();
        assert!(matches!(
            Auth::from_file(&p),
            Err(ClientError::BadToken { .. })
        ));
        assert!(matches!(
            Auth::from_file(&dir.path().join("none")),
            Err(ClientError::Credential { .. })
        ));
    }

    /// Without a credential no header is added.
    #[test]
    fn no_credential_no_header() {
        let req = Auth::default().call(tonic::Request::new(())).unwrap();
        assert!(req.metadata().get("authorization").is_none());
    }

    /// Connecting to a closed port fails quickly with a connect error.
    #[tokio::test]
    async fn closed_port_fails() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let e = connect(&ClientConfig::new(format!("http://{addr}")))
            .await
            .unwrap_err();
        assert!(matches!(e, ClientError::Connect { .. }), "{e:?}");
    }
}
