//! The protocol's validation rules, in one place: names, host ids, store URIs and SSH host
//! keys. The scheduler checks what agents register and operators provision with these, the
//! agent checks its own settings with them before it connects, and the hook checks every
//! grant with them before it writes a machines line, so that whatever the scheduler accepts,
//! the hook can use, and a value the hook would refuse never becomes a grant.
//!
//! Each function returns the reason a value is refused; the caller names the field.

use base64::Engine as _;

/// Why a value is refused (the caller adds which field).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

fn invalid(reason: impl Into<String>) -> Invalid {
    Invalid(reason.into())
}

/// Checks that `v` is 1 to `max` bytes, all characters accepted by `ok` (`allowed` says
/// which, for the message).
pub fn word(v: &str, max: usize, ok: fn(char) -> bool, allowed: &str) -> Result<(), Invalid> {
    if v.is_empty() {
        return Err(invalid("must not be empty"));
    }
    if v.len() > max {
        return Err(invalid(format!(
            "is {} bytes long, at most {max} allowed",
            v.len()
        )));
    }
    if let Some(c) = v.chars().find(|c| !ok(*c)) {
        return Err(invalid(format!(
            "contains {c:?}; only {allowed} are allowed"
        )));
    }
    Ok(())
}

/// A host id: 1 to 128 of letters, digits and `._-`.
pub fn host_id(v: &str) -> Result<(), Invalid> {
    word(
        v,
        128,
        |c| c.is_ascii_alphanumeric() || "._-".contains(c),
        "letters, digits and ._-",
    )
}

/// A member's or operator's name: 1 to 64 of letters, digits and `._-`, not starting with
/// `-` or `.`. The scheduler keys fairness, caps and lease ownership on it.
pub fn principal_name(v: &str) -> Result<(), Invalid> {
    word(
        v,
        64,
        |c| c.is_ascii_alphanumeric() || "._-".contains(c),
        "letters, digits and ._-",
    )?;
    if v.starts_with(['-', '.']) {
        return Err(invalid("must not start with `-` or `.`"));
    }
    Ok(())
}

/// Key types OpenSSH writes into host key files.
pub const KEY_TYPES: [&str; 7] = [
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// Validates an OpenSSH public key line `<type> <base64> [comment]` and returns it as
/// `<type> <base64>`, without the comment (the comment is the host's business and would end
/// up in clients' known_hosts).
pub fn host_key(v: &str) -> Result<String, Invalid> {
    if v.len() > 16 * 1024 {
        return Err(invalid("is longer than 16 KiB"));
    }
    let mut parts = v.split_whitespace();
    let (Some(kind), Some(blob)) = (parts.next(), parts.next()) else {
        return Err(invalid(
            "must be an OpenSSH public key line `<type> <base64> [comment]`",
        ));
    };
    if !KEY_TYPES.contains(&kind) {
        return Err(invalid(format!(
            "key type `{kind}` is not one of {}",
            KEY_TYPES.join(", ")
        )));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(blob)
        .map_err(|e| invalid(format!("key data is not base64: {e}")))?;
    // The blob starts with the key type as an SSH string: u32 big-endian length, bytes.
    let inner = bytes
        .get(..4)
        .map(|n| u32::from_be_bytes([n[0], n[1], n[2], n[3]]) as usize)
        .and_then(|n| bytes.get(4..4 + n));
    if inner != Some(kind.as_bytes()) {
        return Err(invalid(format!("key data does not hold a `{kind}` key")));
    }
    Ok(format!("{kind} {blob}"))
}

/// Store URI parameters a builder may set. Anything else is refused: `remote-program`
/// (and `remote-store`) would make the member's Nix run a command the builder chose, and
/// unknown ones may mean something to a later Nix.
const STORE_PARAMS: [&str; 4] = [
    "compress",
    "max-connections",
    "ssh-key",
    "base64-ssh-public-host-key",
];

/// A builder's store URI: `ssh://` or `ssh-ng://`, an optional `user@`, a host that does not
/// start with `-` (it would reach ssh as an option), an optional port, and no whitespace,
/// control characters, `;` or `,` (the separators of Nix's machines lists), no `#` (a
/// machines line's comment, which would cut off the pinned host key), no path, and
/// only harmless query parameters (never `remote-program`).
pub fn store_uri(v: &str) -> Result<(), Invalid> {
    if v.len() > 1024 {
        return Err(invalid("is longer than 1024 bytes"));
    }
    if v.chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, ';' | ',' | '#'))
    {
        return Err(invalid(
            "must not contain whitespace, control characters, `;`, `,` or `#`",
        ));
    }
    let rest = v
        .strip_prefix("ssh://")
        .or_else(|| v.strip_prefix("ssh-ng://"))
        .ok_or_else(|| invalid(format!("`{v}` must start with ssh:// or ssh-ng://")))?;
    let (authority, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    if authority.contains('/') {
        return Err(invalid(format!("`{v}` has a path; only a host is allowed")));
    }
    let host =
        authority.rsplit_once('@').map_or(
            authority,
            |(user, host)| {
                if user.is_empty() { "" } else { host }
            },
        );
    if host.is_empty() || authority.ends_with('@') {
        return Err(invalid(format!("`{v}` names no host")));
    }
    if host.starts_with('-') || authority.starts_with('-') {
        return Err(invalid(format!(
            "`{v}`: a user or host must not start with `-` (ssh would read it as an option)"
        )));
    }
    if let Some(q) = query {
        for param in q.split('&') {
            let name = param.split_once('=').map_or(param, |(n, _)| n);
            if !STORE_PARAMS.contains(&name) {
                return Err(invalid(format!(
                    "`{v}`: parameter `{name}` is not allowed (only {})",
                    STORE_PARAMS.join(", ")
                )));
            }
        }
    }
    Ok(())
}

/// Where an ssh store URI sends ssh: its scheme, user, host and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshAddress {
    /// `ssh-ng://` (the worker protocol) rather than `ssh://` (the serve protocol).
    pub ng: bool,
    /// The login user the URI names.
    pub user: Option<String>,
    /// Host name, ssh_config alias or address (IPv6 without brackets).
    pub host: String,
    /// The port the URI names.
    pub port: Option<u16>,
}

/// Splits `ssh://[user@]host[:port][/…][?…]` (or `ssh-ng://…`; `[v6]` for IPv6 with a port,
/// a bare IPv6 address without one) into where
/// ssh connects. It only splits: it refuses what cannot be split (another scheme, an
/// unclosed `[`, no host, a port that is not a number), and leaves what a grant may hold to
/// [`store_uri`].
pub fn ssh_address(uri: &str) -> Result<SshAddress, Invalid> {
    let (ng, rest) = if let Some(r) = uri.strip_prefix("ssh-ng://") {
        (true, r)
    } else if let Some(r) = uri.strip_prefix("ssh://") {
        (false, r)
    } else {
        return Err(invalid(format!(
            "store URI `{uri}` is not ssh:// or ssh-ng://"
        )));
    };
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let (user, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u.to_owned()), h),
        None => (None, authority),
    };
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| invalid(format!("store URI `{uri}`: unclosed `[`")))?;
        (host, after.strip_prefix(':'))
    } else {
        match hostport.rsplit_once(':') {
            // More than one `:` without brackets: an IPv6 address, and no port.
            Some((h, _)) if h.contains(':') => (hostport, None),
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if host.is_empty() {
        return Err(invalid(format!("store URI `{uri}` names no host")));
    }
    let port = port
        .map(|p| {
            p.parse()
                .map_err(|_| invalid(format!("store URI `{uri}`: bad port `{p}`")))
        })
        .transpose()?;
    Ok(SshAddress {
        ng,
        user,
        host: host.to_owned(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHdzrOYYsx97jgJC4raQrLvbWQfJI3Wj8wIeg0F7/qlv root@b";

    /// The store URIs builders really use are accepted.
    #[test]
    fn good_store_uris() {
        for uri in [
            "ssh://b",
            "ssh-ng://nix@build01.nix-community.org",
            "ssh-ng://root@127.0.0.1:2222",
            "ssh://[::1]:22",
            "ssh-ng://b?compress=true",
        ] {
            store_uri(uri).unwrap_or_else(|e| panic!("{uri}: {e}"));
        }
    }

    /// What would inject an ssh option, a command or a second machine is refused: `;`, `,`,
    /// a leading `-`, `remote-program`, whitespace, a path, other schemes.
    #[test]
    fn hostile_store_uris_are_refused() {
        for uri in [
            "ssh-ng://b;rm -rf /",
            "ssh-ng://b;x",
            "ssh-ng://a,ssh://b",
            "ssh://-oProxyCommand=touch%20x",
            "ssh://-oProxyCommand=x@b",
            "ssh-ng://b?remote-program=/tmp/evil",
            "ssh-ng://b?compress=1&remote-program=x",
            "ssh-ng://b?remote-store=x",
            "ssh-ng://b c",
            "ssh-ng://b/path",
            "ssh-ng://",
            "ssh-ng://u@",
            "http://b",
            "",
        ] {
            assert!(store_uri(uri).is_err(), "{uri} was accepted");
        }
    }

    /// Store URIs of both schemes split into user, host (IPv6 without its brackets) and
    /// port, whatever path or query follows; what cannot be split is refused, saying why.
    #[test]
    fn ssh_addresses() {
        let a = |u: &str| ssh_address(u).unwrap();
        let parts = |a: SshAddress| (a.ng, a.user, a.host, a.port);
        assert_eq!(
            parts(a("ssh-ng://nix@build01.example.org")),
            (true, Some("nix".into()), "build01.example.org".into(), None)
        );
        assert_eq!(
            parts(a("ssh://10.0.0.1:2222?compress=true")),
            (false, None, "10.0.0.1".into(), Some(2222))
        );
        assert_eq!(
            parts(a("ssh://root@[::1]:2200/")),
            (false, Some("root".into()), "::1".into(), Some(2200))
        );
        assert_eq!(parts(a("ssh://[fe80::1]")).3, None);
        assert_eq!(
            parts(a("ssh-ng://2001:db8::1")),
            (true, None, "2001:db8::1".into(), None)
        );
        // The last `@` ends the user, the last `:` starts the port.
        assert_eq!(
            parts(a("ssh://a@b@host:22")),
            (false, Some("a@b".into()), "host".into(), Some(22))
        );
        // Splitting is not validating: `store_uri` refuses this one, the split does not.
        assert_eq!(a("ssh://-oProxyCommand=x").host, "-oProxyCommand=x");
        for (uri, why) in [
            ("http://host", "is not ssh:// or ssh-ng://"),
            ("ssh://[::1:22", "unclosed `[`"),
            ("ssh://user@", "names no host"),
            ("ssh-ng://", "names no host"),
            ("ssh://[]:22", "names no host"),
            ("ssh://host:x", "bad port `x`"),
            ("ssh://host:70000", "bad port `70000`"),
        ] {
            let e = ssh_address(uri).unwrap_err();
            assert!(e.0.contains(why), "{uri}: {e}");
        }
    }

    /// A key line loses its comment; a key whose blob holds another type is refused.
    #[test]
    fn host_keys() {
        assert_eq!(host_key(KEY).unwrap(), KEY.rsplit_once(' ').unwrap().0);
        let blob = KEY.split(' ').nth(1).unwrap();
        assert!(host_key(&format!("ssh-rsa {blob}")).is_err());
        assert!(host_key("ssh-dss AAAA").is_err());
        assert!(host_key("ssh-ed25519").is_err());
    }

    /// Names refuse what a command line or a path could misread.
    #[test]
    fn names() {
        principal_name("alice").unwrap();
        principal_name("ci.hydra-1").unwrap();
        for bad in ["", "-x", ".x", "a b", "a/b", &"x".repeat(65)] {
            assert!(principal_name(bad).is_err(), "{bad:?}");
        }
        host_id("build01.nix-community.org").unwrap();
        assert!(host_id("a;b").is_err());
    }
}
