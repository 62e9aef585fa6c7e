//! Token digests: the scheduler keeps and compares only SHA-256 of tokens, so that its
//! configuration (and a backup of its database) may be world-readable, e.g. in the Nix store.

use std::fmt;

/// The SHA-256 of a token.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest([u8; 32]);

impl Digest {
    /// Parses 64 hex digits (as `sha256sum` prints them), either case.
    pub fn from_hex(s: &str) -> Option<Digest> {
        let s = s.trim();
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Digest(out))
    }

    /// Lowercase hex.
    pub fn to_hex(self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for Digest {
    // A digest is not a secret, but a short form is enough to tell two apart in a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({}…)", &self.to_hex()[..8])
    }
}

/// The digest of `token` as clients send it (surrounding whitespace already trimmed): the
/// same as `printf %s "$token" | sha256sum`.
pub fn digest_of(token: &str) -> Digest {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    Digest(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The digest is SHA-256 as `sha256sum` prints it, and parses back.
    #[test]
    fn sha256_hex_round_trip() {
        let d = digest_of("s3cret");
        assert_eq!(
            d.to_hex(),
            "1ec1c26b50d5d3c58d9583181af8076655fe00756bf7285940ba3670f99fcba0"
        );
        assert_eq!(Digest::from_hex(&d.to_hex().to_uppercase()), Some(d));
        assert_eq!(Digest::from_hex("abc"), None);
        assert_eq!(Digest::from_hex(&"g".repeat(64)), None);
    }
}
