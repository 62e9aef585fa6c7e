//! Provisioned builders: by host id, and by the digest of their agents' tokens.

use std::collections::HashMap;

use super::{Digest, HostEntry};
use crate::Error;
use crate::core::HostId;

/// The builders operators provisioned (configuration and admin API alike).
#[derive(Debug, Default)]
pub struct Provisioned {
    by_id: HashMap<HostId, HostEntry>,
    by_token: HashMap<Digest, HostId>,
}

impl Provisioned {
    /// Adds or replaces the entry of its host id (the old token stops working at once).
    pub(super) fn insert(&mut self, entry: HostEntry) -> Result<(), Error> {
        entry.validate()?;
        let digest = entry.digest()?;
        if let Some(other) = self.by_token.get(&digest)
            && other.as_str() != entry.id
        {
            return Err(Error::Config {
                key: format!("auth.hosts.{}.token_sha256", entry.id),
                reason: format!("the same token is already host `{other}`'s"),
            });
        }
        let id = entry.host_id();
        self.remove(&id);
        self.by_token.insert(digest, id.clone());
        self.by_id.insert(id, entry);
        Ok(())
    }

    /// Removes host `id`; `false` when it was not provisioned.
    pub(super) fn remove(&mut self, id: &HostId) -> bool {
        match self.by_id.remove(id) {
            Some(old) => {
                if let Ok(d) = old.digest() {
                    self.by_token.remove(&d);
                }
                true
            }
            None => false,
        }
    }

    /// The entry of host `id`.
    pub(super) fn get(&self, id: &HostId) -> Option<&HostEntry> {
        self.by_id.get(id)
    }

    /// The host whose agent's token has this digest.
    pub(super) fn by_token(&self, digest: &Digest) -> Option<HostId> {
        self.by_token.get(digest).cloned()
    }
}
