//! Fuzzes the agent's parsers of what the local Nix and SSH installation say: the JSON of
//! `nix config show --json` (and `nix show-config --json`) and the host key file.
//!
//! They must never panic; settings they accept name a system, and a host key they accept
//! is one line `<type> <base64> [comment]`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nixdispatch_agent::discover;

// The input is a selector byte and then the text, so that real outputs seed the corpus
// (`fuzz/run.sh` does): an even selector is Nix's JSON (the selector also gives the CPU
// count that replaces `max-jobs = auto`), an odd one a host key file.
fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    if kind % 2 == 0 {
        if let Ok(s) = discover::parse_nix_config(text, u32::from(kind)) {
            assert!(!s.system.is_empty());
            let systems = s.systems();
            assert_eq!(systems.first(), Some(&s.system));
            let mut unique = systems.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), systems.len());
        }
    } else if let Ok(line) = discover::parse_host_key(text) {
        assert!(!line.contains('\n'));
        assert!(line.split_ascii_whitespace().count() >= 2);
        assert_eq!(line.trim(), line);
        assert!(!line.starts_with('#'));
    }
});
