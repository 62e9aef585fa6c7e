//! What the fuzz targets share: a model of how Nix reads a machines line, so that the
//! targets can check that a line the hook writes is read back by Nix as the one host that
//! was granted, with its host key pinned.

/// One machine as Nix's `parseBuilderLine` sees it, with `-` and empty fields resolved to
/// what Nix takes for them (`None`, or an empty set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// Field 1: the store URI.
    pub store_uri: String,
    /// Field 2, split at commas; `None` when unset (Nix then assumes its own system).
    pub systems: Option<Vec<String>>,
    /// Field 3: the SSH identity file; `None` when unset.
    pub ssh_key: Option<String>,
    /// Field 4; `None` when unset (Nix: 1).
    pub max_jobs: Option<String>,
    /// Field 5; `None` when unset (Nix: 1).
    pub speed_factor: Option<String>,
    /// Field 6, split at commas.
    pub supported_features: std::collections::BTreeSet<String>,
    /// Field 7, split at commas.
    pub mandatory_features: std::collections::BTreeSet<String>,
    /// Field 8: base64 of the host's public key line; `None` when unset (not pinned).
    pub public_host_key: Option<String>,
}

/// Nix's `tokenizeString`: pieces between any of `separators`, empty pieces dropped.
fn tokenize<'a>(s: &'a str, separators: &'a [char]) -> impl Iterator<Item = &'a str> {
    s.split(separators).filter(|t| !t.is_empty())
}

/// Nix's whitespace for `trim` and the default `tokenizeString`.
const WHITESPACE: &[char] = &[' ', '\t', '\n', '\r'];

/// Reads a `builders` value the way Nix's `expandBuilderLines` and `parseBuilderLine` do
/// (`src/libstore/machines.cc`): lines split at newlines and `;`, each cut at `#` and
/// trimmed, empty ones skipped, whitespace-separated fields, `-` or empty meaning unset.
///
/// A line that starts with `@` names a file of more machines, which Nix would read: that is
/// returned as an error, as is a line with more than eight fields (Nix throws on it).
pub fn parse_builders(builders: &str) -> Result<Vec<Machine>, String> {
    let mut out = Vec::new();
    for line in tokenize(builders, &['\n', ';']) {
        let line = line.split('#').next().unwrap_or_default();
        let line = line.trim_matches(WHITESPACE);
        if line.is_empty() {
            continue;
        }
        if line.starts_with('@') {
            return Err(format!("line {line:?} makes Nix read a machines file"));
        }
        let tokens: Vec<&str> = tokenize(line, WHITESPACE).collect();
        if tokens.len() > 8 {
            return Err(format!("line {line:?} has {} fields", tokens.len()));
        }
        let set = |i: usize| {
            tokens
                .get(i)
                .copied()
                .filter(|t| !t.is_empty() && *t != "-")
        };
        let list = |i: usize| {
            set(i)
                .map(|t| tokenize(t, &[',']).map(str::to_owned).collect())
                .unwrap_or_default()
        };
        out.push(Machine {
            store_uri: tokens[0].to_owned(),
            systems: set(1).map(|t| tokenize(t, &[',']).map(str::to_owned).collect()),
            ssh_key: set(2).map(str::to_owned),
            max_jobs: set(3).map(str::to_owned),
            speed_factor: set(4).map(str::to_owned),
            supported_features: list(5),
            mandatory_features: list(6),
            public_host_key: set(7).map(str::to_owned),
        });
    }
    Ok(out)
}

/// The machine Nix must read from the line of `grant` written with `ssh_identity`.
pub fn expected_machine(
    grant: &nixdispatch::hook::machine::Grant,
    ssh_identity: Option<&str>,
) -> Machine {
    Machine {
        store_uri: grant.store_uri.clone(),
        systems: Some(grant.systems.clone()),
        ssh_key: ssh_identity.map(str::to_owned),
        max_jobs: Some(grant.max_jobs.to_string()),
        speed_factor: Some(
            nixdispatch::hook::machine::speed_factor_field(grant.speed_factor).to_string(),
        ),
        supported_features: grant.supported_features.iter().cloned().collect(),
        mandatory_features: grant.mandatory_features.iter().cloned().collect(),
        public_host_key: Some(grant.host_public_key_base64.clone()),
    }
}

/// Checks that Nix reads the machines line of `grant` as exactly that one host, pinned to
/// its key. `ssh_identity` is what the hook passes; the line may leave it out (`-`) only
/// when it cannot carry it.
pub fn check_machines_line(grant: &nixdispatch::hook::machine::Grant, ssh_identity: Option<&str>) {
    let line = grant.machines_line(ssh_identity);
    let machines = parse_builders(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    assert_eq!(
        machines.len(),
        1,
        "{line:?} is not one machine: {machines:?}"
    );
    let mut want = expected_machine(grant, ssh_identity);
    let got = &machines[0];
    if got.ssh_key.is_none() {
        // The hook leaves out an identity the line cannot carry; ssh then uses its default.
        want.ssh_key = None;
    }
    assert_eq!(got, &want, "{line:?}");
}
