//! Pure parsers of the macOS directory-service output used to find the Nix build users.
//!
//! macOS keeps users and groups in Directory Services, not in `/etc/group`, so the agent asks
//! `dscl . -read /Groups/<group> GroupMembership PrimaryGroupID` and
//! `dscl . -list /Users UniqueID` / `dscl . -list /Users PrimaryGroupID` once at start. The
//! parsers are compiled on every platform so the fixtures are tested everywhere.

use std::collections::{BTreeMap, BTreeSet};

use super::builds::BuildUsers;
use crate::error::{Error, Result};

/// The parts of `dscl . -read /Groups/<g> GroupMembership PrimaryGroupID` that matter.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DsclGroup {
    /// `PrimaryGroupID`.
    pub gid: Option<u32>,
    /// `GroupMembership` names.
    pub members: BTreeSet<String>,
}

/// Parses `dscl . -read /Groups/nixbld GroupMembership PrimaryGroupID`:
///
/// ```text
/// GroupMembership: _nixbld1 _nixbld2
/// PrimaryGroupID: 30000
/// ```
pub fn parse_dscl_group(text: &str) -> Result<DsclGroup> {
    let mut out = DsclGroup::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("GroupMembership:") {
            out.members
                .extend(rest.split_ascii_whitespace().map(str::to_owned));
        } else if let Some(rest) = line.strip_prefix("PrimaryGroupID:") {
            out.gid = Some(rest.trim().parse().map_err(|_| Error::BadSample {
                source_name: "dscl group",
                reason: format!("bad PrimaryGroupID {rest:?}"),
            })?);
        }
    }
    if out.gid.is_none() && out.members.is_empty() {
        return Err(Error::BadSample {
            source_name: "dscl group",
            reason: "group not found".into(),
        });
    }
    Ok(out)
}

/// Parses `dscl . -list /Users <Attribute>`: `name   value` lines, skipping malformed ones.
pub fn parse_dscl_list(text: &str) -> BTreeMap<String, u32> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_ascii_whitespace();
            let name = f.next()?;
            let value = f.next()?.parse().ok()?;
            Some((name.to_owned(), value))
        })
        .collect()
}

/// Combines the three outputs into the set of build-user uids: members of the group and users
/// whose primary group it is (root excluded).
pub fn build_users(
    group: &DsclGroup,
    uids: &BTreeMap<String, u32>,
    gids: &BTreeMap<String, u32>,
) -> BuildUsers {
    let uids = uids
        .iter()
        .filter(|(name, _)| {
            group.members.contains(*name)
                || (group.gid.is_some() && gids.get(*name) == group.gid.as_ref())
        })
        .map(|(_, &uid)| uid)
        .filter(|&uid| uid != 0)
        .collect();
    BuildUsers { uids }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GROUP: &str = include_str!("../../tests/fixtures/macos/dscl-group-nixbld");
    const UIDS: &str = include_str!("../../tests/fixtures/macos/dscl-users-uniqueid");
    const GIDS: &str = include_str!("../../tests/fixtures/macos/dscl-users-primarygroupid");

    /// macOS-format `dscl` samples give the `_nixbld` users' uids and nobody else's.
    #[test]
    fn dscl_fixtures() {
        let group = parse_dscl_group(GROUP).unwrap();
        assert_eq!(group.gid, Some(350));
        let found = build_users(&group, &parse_dscl_list(UIDS), &parse_dscl_list(GIDS));
        assert_eq!(found.uids, (351..=354).collect());
    }

    /// An unknown group, a garbage id and garbage list lines do not crash.
    #[test]
    fn dscl_garbage() {
        assert!(parse_dscl_group("").is_err());
        assert!(parse_dscl_group("PrimaryGroupID: x\n").is_err());
        assert!(parse_dscl_list("\u{0}\nonlyname\nname notnumber\n").is_empty());
    }
}
