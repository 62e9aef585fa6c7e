//! What the member asked sshd to run (`SSH_ORIGINAL_COMMAND`), and what the gate runs for it.

/// The kind of session a command starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `nix-daemon --stdio …` (ssh-ng stores): the words, program first.
    Daemon(Vec<String>),
    /// `nix-store --serve [--write] …` (ssh stores): the words, program first.
    Serve(Vec<String>),
    /// Anything else: handed to the member's shell as it is.
    Shell(String),
    /// No command: an interactive login.
    Login,
}

/// Splits a command line into words the way a POSIX shell would for the simple forms Nix
/// sends (plain words, `'…'`, `"…"` without expansions, backslash escapes). `None` when it
/// uses anything else (expansions, operators, redirections): the shell then runs it.
pub fn split_words(line: &str) -> Option<Vec<String>> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\n' => words.extend(word.take()),
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next()? {
                        '\'' => break,
                        c => w.push(c),
                    }
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next()? {
                        '"' => break,
                        '\\' => match chars.next()? {
                            c @ ('"' | '\\') => w.push(c),
                            c => {
                                w.push('\\');
                                w.push(c);
                            }
                        },
                        '$' | '`' => return None,
                        c => w.push(c),
                    }
                }
            }
            '\\' => word.get_or_insert_with(String::new).push(chars.next()?),
            '$' | '`' | ';' | '&' | '|' | '<' | '>' | '(' | ')' | '*' | '?' | '[' | '~' | '#'
            | '{' | '}' => return None,
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    Some(words)
}

/// Classifies `SSH_ORIGINAL_COMMAND` (`None`: not set).
pub fn classify(original: Option<&str>) -> Command {
    let Some(line) = original.filter(|l| !l.trim().is_empty()) else {
        return Command::Login;
    };
    let Some(words) = split_words(line) else {
        return Command::Shell(line.to_owned());
    };
    let program = words
        .first()
        .map(|w| w.rsplit('/').next().unwrap_or(w))
        .unwrap_or("");
    let has = |flag: &str| words.iter().skip(1).any(|w| w == flag);
    match program {
        "nix-daemon" if has("--stdio") => Command::Daemon(words),
        "nix-store" if has("--serve") => Command::Serve(words),
        _ => Command::Shell(line.to_owned()),
    }
}

/// The program and arguments to run for a Nix command: the configured program (if any) in
/// place of the member's, the member's arguments unchanged.
pub fn program_and_args(words: &[String], configured: Option<&str>) -> (String, Vec<String>) {
    let program = configured.map_or_else(|| words[0].clone(), str::to_owned);
    (program, words[1..].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The forms Nix sends are recognised, with and without `--store` and paths.
    #[test]
    fn nix_commands_are_recognised() {
        assert_eq!(
            classify(Some("nix-daemon --stdio")),
            Command::Daemon(vec!["nix-daemon".into(), "--stdio".into()])
        );
        assert_eq!(
            classify(Some("nix-store --serve --write")),
            Command::Serve(vec!["nix-store".into(), "--serve".into(), "--write".into()])
        );
        assert_eq!(
            classify(Some(
                "/nix/var/nix/profiles/default/bin/nix-store --serve --write --store 'local?root=/x'"
            )),
            Command::Serve(vec![
                "/nix/var/nix/profiles/default/bin/nix-store".into(),
                "--serve".into(),
                "--write".into(),
                "--store".into(),
                "local?root=/x".into()
            ])
        );
    }

    /// Everything else goes to the shell unchanged, including Nix words inside shell syntax.
    #[test]
    fn other_commands_go_to_the_shell() {
        for c in [
            "echo hi",
            "nix-store --query x",
            "nix-daemon --stdio; rm -rf /tmp/x",
            "rsync --server -e.LsfxC . /tmp",
            "bash",
            "echo $HOME",
            "nix-daemon 'unterminated",
        ] {
            assert_eq!(classify(Some(c)), Command::Shell(c.to_owned()), "{c}");
        }
        assert_eq!(classify(None), Command::Login);
        assert_eq!(classify(Some("  ")), Command::Login);
    }

    /// Quoting is undone as a shell would.
    #[test]
    fn words_are_split_like_a_shell() {
        assert_eq!(
            split_words(r#"a 'b c' "d \"e\"" f\ g"#).unwrap(),
            vec!["a", "b c", "d \"e\"", "f g"]
        );
        assert_eq!(split_words("a ''").unwrap(), vec!["a", ""]);
    }
}
