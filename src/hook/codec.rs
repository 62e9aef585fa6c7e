//! The build-hook wire protocol of Nix (2.8 to 2.35), as pure encoders and decoders.
//!
//! The daemon talks to its hook over the hook's fd 0 with Nix's serialisation format
//! (`src/libutil/serialise.cc`): a `u64` is 8 little-endian bytes; a string is its length as a
//! `u64`, the bytes, then zero padding to a multiple of 8; a string set is a `u64` count
//! followed by the strings. The hook answers with text lines on fd 2: `# accept` and the
//! machine's name, `# decline`, `# decline-permanently` or `# postpone`, and logger messages
//! of the form `@nix {json}`.
//!
//! Everything here works on `std::io::Read` and byte buffers: no file descriptors, no
//! processes. The decoder bounds every length it reads so that a corrupt or hostile stream
//! can make it fail but never allocate without limit (it is fuzzed: `fuzz/`).

use std::io::{self, Read};

/// Largest string the decoder accepts. Settings such as `builders` can legitimately hold a
/// long machines list; anything beyond this is a corrupt stream, not a setting.
pub const MAX_STRING_BYTES: u64 = 16 * 1024 * 1024;

/// Largest string set the decoder accepts (the input closure of a big derivation has tens of
/// thousands of paths; a million is far beyond any real one).
pub const MAX_SET_LEN: u64 = 1 << 20;

/// Largest number of settings in the handshake (Nix 2.8 sends 91).
pub const MAX_SETTINGS: usize = 64 * 1024;

/// What went wrong while decoding.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The stream ended in the middle of a value.
    #[error("the stream ended inside a value")]
    Truncated,
    /// A length field is larger than the decoder accepts.
    #[error("{what} of {len} is larger than the limit of {limit}")]
    TooLarge {
        /// Which value: a string, a string set, the settings.
        what: &'static str,
        /// The length found.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// A string's padding bytes are not zero.
    #[error("a string's padding is not zero")]
    BadPadding,
    /// A string is not UTF-8 (Nix's names, paths and settings always are).
    #[error("a string is not valid UTF-8")]
    NotUtf8,
    /// The handshake has a tag other than 0 (end) or 1 (a setting).
    #[error("unexpected tag {0} in the settings handshake")]
    BadSettingTag(u64),
    /// Reading failed.
    #[error("reading the hook's input failed")]
    Io(#[source] io::Error),
}

impl From<io::Error> for DecodeError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            DecodeError::Truncated
        } else {
            DecodeError::Io(e)
        }
    }
}

/// Reads one `u64`.
pub fn read_u64(r: &mut impl Read) -> Result<u64, DecodeError> {
    let mut buf = [0u8; 8];
    r.read_exact(&mut buf)?;
    Ok(u64::from_le_bytes(buf))
}

/// Reads one string as raw bytes (length, bytes, zero padding).
pub fn read_bytes(r: &mut impl Read) -> Result<Vec<u8>, DecodeError> {
    let len = read_u64(r)?;
    if len > MAX_STRING_BYTES {
        return Err(DecodeError::TooLarge {
            what: "a string",
            len,
            limit: MAX_STRING_BYTES,
        });
    }
    // Read through `take` rather than allocating `len` up front: a truncated stream that
    // claims 16 MiB then costs only what it really sent.
    let mut bytes = Vec::new();
    r.by_ref().take(len).read_to_end(&mut bytes)?;
    if bytes.len() as u64 != len {
        return Err(DecodeError::Truncated);
    }
    let pad = ((8 - len % 8) % 8) as usize;
    let mut padding = [0u8; 8];
    r.read_exact(&mut padding[..pad])?;
    if padding[..pad].iter().any(|&b| b != 0) {
        return Err(DecodeError::BadPadding);
    }
    Ok(bytes)
}

/// Reads one UTF-8 string.
pub fn read_string(r: &mut impl Read) -> Result<String, DecodeError> {
    String::from_utf8(read_bytes(r)?).map_err(|_| DecodeError::NotUtf8)
}

/// Reads a string set (a count, then the strings), in the order sent.
pub fn read_strings(r: &mut impl Read) -> Result<Vec<String>, DecodeError> {
    let n = read_u64(r)?;
    if n > MAX_SET_LEN {
        return Err(DecodeError::TooLarge {
            what: "a string set",
            len: n,
            limit: MAX_SET_LEN,
        });
    }
    (0..n).map(|_| read_string(r)).collect()
}

/// The settings handshake: every setting the daemon sends, in order.
///
/// The order is kept so that re-encoding an unchanged handshake gives the same bytes, which
/// the stock build-remote that the hook delegates to then reads exactly as the daemon meant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    /// `(name, value)` pairs in the order received.
    pub entries: Vec<(String, String)>,
}

impl Settings {
    /// The value of a setting, if the daemon sent it.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.entries
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Sets `name` to `value`: replaces every existing entry of that name, or appends one.
    pub fn set(&mut self, name: &str, value: &str) {
        let mut found = false;
        for (k, v) in &mut self.entries {
            if k == name {
                *v = value.to_owned();
                found = true;
            }
        }
        if !found {
            self.entries.push((name.to_owned(), value.to_owned()));
        }
    }
}

/// Reads the handshake: `1, name, value` repeated, then `0`.
pub fn read_settings(r: &mut impl Read) -> Result<Settings, DecodeError> {
    let mut entries = Vec::new();
    loop {
        match read_u64(r)? {
            0 => return Ok(Settings { entries }),
            1 => {
                if entries.len() >= MAX_SETTINGS {
                    return Err(DecodeError::TooLarge {
                        what: "the settings handshake",
                        len: entries.len() as u64 + 1,
                        limit: MAX_SETTINGS as u64,
                    });
                }
                let name = read_string(r)?;
                let value = read_string(r)?;
                entries.push((name, value));
            }
            tag => return Err(DecodeError::BadSettingTag(tag)),
        }
    }
}

/// One `try`: the daemon asks whether the hook will build a derivation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TryRequest {
    /// Nix's `amWilling`: a local build slot is free now.
    pub am_willing: bool,
    /// The system the derivation needs, e.g. `x86_64-linux`, or `builtin`.
    pub needed_system: String,
    /// The derivation's store path.
    pub drv_path: String,
    /// Its `requiredSystemFeatures`.
    pub required_features: Vec<String>,
}

/// What the daemon sends when it next speaks to a hook that has not accepted yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// A derivation to consider.
    Try(TryRequest),
    /// Anything but `try`, or the end of the stream: the hook must exit 0.
    Exit,
}

/// Reads the next request. End of stream before a request starts is [`Request::Exit`], as
/// is any word other than `try` (that is what stock build-remote does).
pub fn read_request(r: &mut impl Read) -> Result<Request, DecodeError> {
    let word = match read_bytes(r) {
        Ok(w) => w,
        Err(DecodeError::Truncated) => return Ok(Request::Exit),
        Err(e) => return Err(e),
    };
    if word != b"try" {
        return Ok(Request::Exit);
    }
    let am_willing = read_u64(r)? != 0;
    let needed_system = read_string(r)?;
    let drv_path = read_string(r)?;
    let required_features = read_strings(r)?;
    Ok(Request::Try(TryRequest {
        am_willing,
        needed_system,
        drv_path,
        required_features,
    }))
}

/// What the daemon sends after `# accept`: the input closure and the wanted outputs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildInputs {
    /// Every store path of the derivation's input closure.
    pub inputs: Vec<String>,
    /// The names of the outputs the daemon wants.
    pub wanted_outputs: Vec<String>,
}

/// Reads the inputs and the wanted outputs that follow an accept.
pub fn read_build_inputs(r: &mut impl Read) -> Result<BuildInputs, DecodeError> {
    let inputs = read_strings(r)?;
    let wanted_outputs = read_strings(r)?;
    Ok(BuildInputs {
        inputs,
        wanted_outputs,
    })
}

/// Appends a `u64`.
pub fn write_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(&n.to_le_bytes());
}

/// Appends a string with its length and padding.
pub fn write_string(out: &mut Vec<u8>, s: &str) {
    write_u64(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
    out.resize(out.len() + (8 - s.len() % 8) % 8, 0);
}

/// Appends a string set.
pub fn write_strings<S: AsRef<str>>(out: &mut Vec<u8>, items: &[S]) {
    write_u64(out, items.len() as u64);
    for s in items {
        write_string(out, s.as_ref());
    }
}

/// Appends the settings handshake.
pub fn write_settings(out: &mut Vec<u8>, settings: &Settings) {
    for (k, v) in &settings.entries {
        write_u64(out, 1);
        write_string(out, k);
        write_string(out, v);
    }
    write_u64(out, 0);
}

/// Appends a `try`.
pub fn write_try(out: &mut Vec<u8>, t: &TryRequest) {
    write_string(out, "try");
    write_u64(out, u64::from(t.am_willing));
    write_string(out, &t.needed_system);
    write_string(out, &t.drv_path);
    write_strings(out, &t.required_features);
}

/// Appends the inputs and wanted outputs.
pub fn write_build_inputs(out: &mut Vec<u8>, b: &BuildInputs) {
    write_strings(out, &b.inputs);
    write_strings(out, &b.wanted_outputs);
}

/// The hook's answer to a `try`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The hook builds it; the name is shown as "building X on 'NAME'".
    Accept {
        /// The machine's name, normally its store URI.
        machine: String,
    },
    /// Build it locally now.
    Decline,
    /// Stop asking this hook for the rest of this Nix command.
    DeclinePermanently,
    /// Ask again after `build-poll-interval`.
    Postpone,
}

impl Reply {
    /// The reply as it is written on fd 2, newline-terminated. A line break in the machine
    /// name would end the reply early, so it is replaced with a space.
    pub fn render(&self) -> String {
        match self {
            Reply::Accept { machine } => {
                let machine: String = machine
                    .chars()
                    .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
                    .collect();
                format!("# accept\n{machine}\n")
            }
            Reply::Decline => "# decline\n".to_owned(),
            Reply::DeclinePermanently => "# decline-permanently\n".to_owned(),
            Reply::Postpone => "# postpone\n".to_owned(),
        }
    }
}

/// Nix's log levels (`src/libutil/logging.hh`). A message is shown when its level is at most
/// the client's verbosity, which is `Info` by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Level {
    /// Errors.
    Error = 0,
    /// Warnings.
    Warn = 1,
    /// Notices.
    Notice = 2,
    /// Information, shown by default.
    Info = 3,
    /// Shown with `-v`.
    Talkative = 4,
    /// Shown with `-vv`.
    Chatty = 5,
    /// Shown with `-vvv`.
    Debug = 6,
    /// Shown with `-vvvv`.
    Vomit = 7,
}

/// Renders a logger message line, `@nix {"action":"msg","level":N,"msg":"..."}`, which the
/// daemon passes to the user's client. JSON escaping keeps the message on one line.
pub fn nix_msg(level: Level, msg: &str) -> String {
    let json = serde_json::json!({ "action": "msg", "level": level as u8, "msg": msg });
    format!("@nix {json}\n")
}

/// One line a child build-remote wrote on its fd 2, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChildLine {
    /// `# accept`: the next line names the machine.
    Accept,
    /// `# decline`.
    Decline,
    /// `# decline-permanently`.
    DeclinePermanently,
    /// `# postpone`.
    Postpone,
    /// Another `# ` control line (none exists today).
    OtherControl(String),
    /// An `@nix {json}` logger line, kept verbatim (without its line break) to be passed on.
    Log(String),
    /// Anything else: not meant for the daemon.
    Plain(String),
}

/// Classifies one line (without its line break).
pub fn classify_child_line(line: &str) -> ChildLine {
    let line = line.strip_suffix('\r').unwrap_or(line);
    if let Some(control) = line.strip_prefix("# ") {
        match control {
            "accept" => ChildLine::Accept,
            "decline" => ChildLine::Decline,
            "decline-permanently" => ChildLine::DeclinePermanently,
            "postpone" => ChildLine::Postpone,
            other => ChildLine::OtherControl(other.to_owned()),
        }
    } else if line.starts_with("@nix ") {
        ChildLine::Log(line.to_owned())
    } else {
        ChildLine::Plain(line.to_owned())
    }
}

/// Extracts the text of an `@nix` line that carries a message (`"action":"msg"`) or an
/// error's text, for summaries such as "why the child could not reach the host".
pub fn log_line_text(line: &str) -> Option<String> {
    log_line_msg(line).map(|(_, text)| text)
}

/// The level and text of an `@nix` line that carries a message.
pub fn log_line_msg(line: &str) -> Option<(u64, String)> {
    let json = line.strip_prefix("@nix ")?;
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    if v.get("action")?.as_str()? != "msg" {
        return None;
    }
    Some((
        v.get("level")?.as_u64()?,
        v.get("msg")?.as_str()?.to_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn try_req() -> impl Strategy<Value = TryRequest> {
        (
            any::<bool>(),
            ".{0,20}",
            ".{0,80}",
            proptest::collection::vec(".{0,12}", 0..5),
        )
            .prop_map(|(am_willing, needed_system, drv_path, required_features)| {
                TryRequest {
                    am_willing,
                    needed_system,
                    drv_path,
                    required_features,
                }
            })
    }

    proptest! {
        /// Any string survives encode then decode, and its encoding is 8-byte aligned.
        #[test]
        fn string_roundtrip(s in ".{0,100}") {
            let mut buf = Vec::new();
            write_string(&mut buf, &s);
            prop_assert_eq!(buf.len() % 8, 0);
            let mut r = buf.as_slice();
            prop_assert_eq!(read_string(&mut r).unwrap(), s);
            prop_assert!(r.is_empty());
        }

        /// A whole conversation (settings, try, inputs) survives encode then decode.
        #[test]
        fn conversation_roundtrip(
            entries in proptest::collection::vec(("[a-z-]{1,20}", ".{0,40}"), 0..20),
            t in try_req(),
            inputs in proptest::collection::vec(".{0,60}", 0..10),
            wanted in proptest::collection::vec("[a-z]{1,8}", 0..4),
        ) {
            let settings = Settings { entries };
            let b = BuildInputs { inputs, wanted_outputs: wanted };
            let mut buf = Vec::new();
            write_settings(&mut buf, &settings);
            write_try(&mut buf, &t);
            write_build_inputs(&mut buf, &b);
            let mut r = buf.as_slice();
            prop_assert_eq!(read_settings(&mut r).unwrap(), settings);
            prop_assert_eq!(read_request(&mut r).unwrap(), Request::Try(t));
            prop_assert_eq!(read_build_inputs(&mut r).unwrap(), b);
            prop_assert_eq!(read_request(&mut r).unwrap(), Request::Exit);
        }

        /// Every strict prefix of a valid `try` fails to decode (or is an exit when empty);
        /// none panics.
        #[test]
        fn truncated_try_is_an_error(t in try_req(), cut in any::<prop::sample::Index>()) {
            let mut buf = Vec::new();
            write_try(&mut buf, &t);
            let cut = cut.index(buf.len());
            let mut r = &buf[..cut];
            match read_request(&mut r) {
                Ok(Request::Exit) => prop_assert!(cut < 8 + 8, "exit only before the word ends"),
                Ok(Request::Try(_)) => prop_assert!(false, "a truncated try decoded"),
                Err(_) => {}
            }
        }

        /// Arbitrary bytes never panic the decoder.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut r = bytes.as_slice();
            if read_settings(&mut r).is_ok() {
                while let Ok(Request::Try(_)) = read_request(&mut r) {}
            }
        }

        /// A rendered `@nix` message is one line whose JSON carries the text back.
        #[test]
        fn nix_msg_is_one_line(msg in ".{0,80}") {
            let line = nix_msg(Level::Info, &msg);
            prop_assert!(line.ends_with('\n'));
            prop_assert_eq!(line.matches('\n').count(), 1);
            prop_assert_eq!(log_line_text(line.trim_end()), Some(msg));
        }

        /// An accept reply is exactly two lines whatever the machine name holds.
        #[test]
        fn accept_is_two_lines(machine in ".{0,40}") {
            let r = Reply::Accept { machine }.render();
            prop_assert_eq!(r.matches('\n').count(), 2);
            prop_assert!(r.starts_with("# accept\n"));
        }
    }

    /// Lengths beyond the limits are refused before anything is allocated.
    #[test]
    fn huge_lengths_are_refused() {
        let mut buf = Vec::new();
        write_u64(&mut buf, u64::MAX);
        assert!(matches!(
            read_bytes(&mut buf.as_slice()),
            Err(DecodeError::TooLarge { .. })
        ));
        assert!(matches!(
            read_strings(&mut buf.as_slice()),
            Err(DecodeError::TooLarge { .. })
        ));
    }

    /// Non-zero padding is a corrupt stream.
    #[test]
    fn bad_padding_is_refused() {
        let mut buf = Vec::new();
        write_string(&mut buf, "try");
        *buf.last_mut().unwrap() = 1;
        assert!(matches!(
            read_bytes(&mut buf.as_slice()),
            Err(DecodeError::BadPadding)
        ));
    }

    /// A word other than `try` ends the conversation, as in stock build-remote.
    #[test]
    fn other_word_is_exit() {
        let mut buf = Vec::new();
        write_string(&mut buf, "bye");
        assert_eq!(read_request(&mut buf.as_slice()).unwrap(), Request::Exit);
    }

    /// The child's control and log lines are told apart.
    #[test]
    fn classifies_child_lines() {
        assert_eq!(classify_child_line("# accept"), ChildLine::Accept);
        assert_eq!(classify_child_line("# decline"), ChildLine::Decline);
        assert_eq!(
            classify_child_line("# decline-permanently"),
            ChildLine::DeclinePermanently
        );
        assert_eq!(classify_child_line("# postpone"), ChildLine::Postpone);
        assert_eq!(
            classify_child_line("@nix {}"),
            ChildLine::Log("@nix {}".into())
        );
        assert_eq!(
            classify_child_line("ssh-ng://b1"),
            ChildLine::Plain("ssh-ng://b1".into())
        );
    }

    /// `Settings::set` replaces in place (keeping the order) or appends.
    #[test]
    fn settings_set_replaces_or_appends() {
        let mut s = Settings {
            entries: vec![("a".into(), "1".into()), ("builders".into(), "x".into())],
        };
        s.set("builders", "y");
        s.set("c", "3");
        assert_eq!(
            s.entries,
            vec![
                ("a".into(), "1".into()),
                ("builders".into(), "y".into()),
                ("c".into(), "3".into())
            ]
        );
        assert_eq!(s.get("builders"), Some("y"));
    }
}
