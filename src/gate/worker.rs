//! The worker protocol (`nix-daemon --stdio`, ssh-ng stores), versions 1.25 to 1.38 with the
//! 1.38 feature exchange: where each message ends, which operations start a build, and, on
//! the daemon's side, where the handshake's and a build's log loops end.
//!
//! Every version test uses `v = min(client, server)`, as Nix 2.23 and later do; Nix 2.22 and
//! older, and Lix (exactly 1.35), branch on the peer's number, which gives the same answer
//! on every field the gate reads. Nix 2.23's doubled client version is read the way the
//! daemon reads it: as a non-zero CPU-affinity flag followed by the real flag.

use super::drv;
use super::session::{BuildOp, Grammar, Msg, ServerEvent, ServerMsg, Stop, status_ok};
use super::wire::{self, Bulk, Reader, Short};

/// `WORKER_MAGIC_1`, the client's first word.
pub const MAGIC_1: u64 = 0x6e69_7863;
/// `WORKER_MAGIC_2`, the daemon's first word.
pub const MAGIC_2: u64 = 0x6478_696f;
/// The oldest negotiated version the gate follows (1.25): below it uploads are not framed
/// and a relay cannot find their end without a NAR parser; no Nix since 2.0 speaks it.
pub const MIN_VERSION: u64 = 0x119;
/// The newest version the gate knows (1.38). A newer one is passed through ungated.
pub const MAX_VERSION: u64 = 0x126;

/// BuildPaths.
pub const OP_BUILD_PATHS: u64 = 9;
/// BuildDerivation.
pub const OP_BUILD_DERIVATION: u64 = 36;
/// BuildPathsWithResults.
pub const OP_BUILD_PATHS_WITH_RESULTS: u64 = 46;

/// `STDERR_NEXT`: a log line.
pub const STDERR_NEXT: u64 = 0x6f6c_6d67;
/// `STDERR_READ` (old uploads; never at 1.25+ in a session the gate follows).
pub const STDERR_READ: u64 = 0x6461_7461;
/// `STDERR_WRITE` (old exports).
pub const STDERR_WRITE: u64 = 0x6461_7416;
/// `STDERR_LAST`: the operation's result follows.
pub const STDERR_LAST: u64 = 0x616c_7473;
/// `STDERR_ERROR`: the operation failed; no result follows.
pub const STDERR_ERROR: u64 = 0x6378_7470;
/// `STDERR_START_ACTIVITY`.
pub const STDERR_START_ACTIVITY: u64 = 0x5354_5254;
/// `STDERR_STOP_ACTIVITY`.
pub const STDERR_STOP_ACTIVITY: u64 = 0x5354_4f50;
/// `STDERR_RESULT`.
pub const STDERR_RESULT: u64 = 0x5253_4c54;

/// How an operation's fields end.
enum OpEnd {
    /// A query or other operation: forwarded as it comes.
    Plain,
    /// A build: held until a slot is granted.
    Build(BuildOp),
    /// An upload: its bulk data follows, forwarded without buffering.
    Bulk(Bulk),
}

fn minor(v: u64) -> u64 {
    v & 0xff
}

/// Where the client's stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientPhase {
    Magic,
    Version,
    HelloRest,
    Ops,
}

/// Where the daemon's stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerPhase {
    /// Magic and version.
    Hello,
    /// Features, Nix version, trust.
    HelloRest,
    /// The startup log loop, up to `STDERR_LAST`.
    StartupLog,
    /// Between operations: not followed (results of queries and NARs pass untouched).
    Idle,
    /// A forwarded build's log loop, up to `STDERR_LAST` or `STDERR_ERROR`; `status`: a
    /// BuildResult with its status word follows `STDERR_LAST` (BuildDerivation).
    BuildLog {
        /// Whether the result starts with a status word.
        status: bool,
    },
    /// The status word of a BuildDerivation's result.
    BuildStatus,
}

/// Both directions of one worker-protocol session.
#[derive(Debug)]
pub struct Worker {
    client: ClientPhase,
    server: ServerPhase,
    client_version: Option<u64>,
    server_version: Option<u64>,
    client_features: Vec<String>,
    /// Whether the two sides share a feature (only Nix 2.35+ on both ends): some bodies then
    /// change shape, so the few operations concerned are not followed.
    shared_features: bool,
}

impl Default for Worker {
    fn default() -> Self {
        Self::new()
    }
}

impl Worker {
    /// A session at its first byte.
    pub fn new() -> Self {
        Worker {
            client: ClientPhase::Magic,
            server: ServerPhase::Hello,
            client_version: None,
            server_version: None,
            client_features: Vec::new(),
            shared_features: false,
        }
    }

    /// The negotiated version, once both sides gave theirs.
    pub fn version(&self) -> Option<u64> {
        Some(self.client_version?.min(self.server_version?))
    }

    /// Reads one operation's fields after its opcode: a build, an upload whose bulk
    /// follows, or anything else.
    fn op(&self, r: &mut Reader<'_>, v: u64, op: u64) -> Result<OpEnd, Stop> {
        let str1 = |r: &mut Reader<'_>| r.bytes().map(|_| ());
        match op {
            // One store path or name.
            1 | 3 | 4 | 5 | 6 | 10 | 11 | 12 | 18 | 21 | 22 | 26 | 28 | 29 | 33 | 38 | 41 => {
                str1(r)?
            }
            // No argument.
            13 | 14 | 23 | 34 => {}
            7 => {
                r.skip_strings(2)?;
                r.skip_string_list()?;
                r.u64()?;
                return Ok(OpEnd::Bulk(Bulk::framed()));
            }
            8 => {
                r.skip_strings(2)?;
                r.skip_string_list()?;
            }
            OP_BUILD_PATHS | OP_BUILD_PATHS_WITH_RESULTS => {
                let paths = r.strings()?;
                r.u64()?;
                return Ok(build_paths_op(op, &paths).map_or(OpEnd::Plain, OpEnd::Build));
            }
            16 => {
                str1(r)?;
                r.u64()?;
            }
            19 => {
                r.skip_u64s(12)?;
                let n = r.count()?;
                r.skip_strings(n.saturating_mul(2))?;
            }
            20 => {
                r.u64()?;
                r.skip_string_list()?;
                r.skip_u64s(5)?;
            }
            30 => {
                let n = r.count()?;
                r.skip_strings(n.saturating_mul(2))?;
            }
            31 => {
                r.skip_string_list()?;
                if minor(v) >= 27 {
                    r.u64()?;
                }
            }
            32 | 40 => r.skip_string_list()?,
            35 => r.skip_u64s(2)?,
            OP_BUILD_DERIVATION => {
                let drv_path = r.string()?;
                let info = drv::read_basic_derivation(r)?;
                r.u64()?;
                return Ok(OpEnd::Build(BuildOp {
                    op: "BuildDerivation",
                    drv_path,
                    info: Some(info),
                }));
            }
            37 => {
                str1(r)?;
                r.skip_string_list()?;
            }
            39 => {
                r.skip_strings(3)?;
                r.skip_string_list()?;
                r.skip_u64s(3)?;
                r.skip_string_list()?;
                str1(r)?;
                r.skip_u64s(2)?;
                return Ok(OpEnd::Bulk(Bulk::framed()));
            }
            42 | 43 if self.shared_features => {
                return Err(Stop::Unsupported(format!(
                    "operation {op} with negotiated protocol features"
                )));
            }
            42 => r.skip_strings(if minor(v) >= 31 { 1 } else { 2 })?,
            43 => str1(r)?,
            44 => {
                r.skip_u64s(2)?;
                return Ok(OpEnd::Bulk(Bulk::framed()));
            }
            45 => {
                str1(r)?;
                return Ok(OpEnd::Bulk(Bulk::framed()));
            }
            47 => r.skip_strings(2)?,
            other => {
                return Err(Stop::Unsupported(format!(
                    "unknown or unsupported worker operation {other}"
                )));
            }
        }
        Ok(OpEnd::Plain)
    }

    /// One log message of the daemon's log loop: `Some(ended_ok)` for the loop's last
    /// message (`LAST` true, `ERROR` false).
    fn log_message(r: &mut Reader<'_>, v: u64) -> Result<Option<bool>, Stop> {
        match r.u64()? {
            STDERR_NEXT => {
                r.bytes()?;
            }
            STDERR_START_ACTIVITY => {
                r.skip_u64s(3)?;
                r.bytes()?;
                skip_fields(r)?;
                r.u64()?;
            }
            STDERR_STOP_ACTIVITY => {
                r.u64()?;
            }
            STDERR_RESULT => {
                r.skip_u64s(2)?;
                skip_fields(r)?;
            }
            STDERR_LAST => return Ok(Some(true)),
            STDERR_ERROR => {
                if minor(v) >= 26 {
                    r.bytes()?;
                    r.u64()?;
                    r.skip_strings(2)?;
                    // No position: `u64 0` (a position would need a different shape).
                    if r.u64()? != 0 {
                        return Err(Stop::Unsupported("an error with a position".into()));
                    }
                    let n = r.count()?;
                    for _ in 0..n {
                        if r.u64()? != 0 {
                            return Err(Stop::Unsupported("a trace with a position".into()));
                        }
                        r.bytes()?;
                    }
                } else {
                    r.bytes()?;
                    r.u64()?;
                }
                return Ok(Some(false));
            }
            STDERR_READ | STDERR_WRITE => {
                return Err(Stop::Unsupported("old-style STDERR_READ/WRITE".into()));
            }
            other => {
                return Err(Stop::Unsupported(format!(
                    "unknown log message tag {other:#x}"
                )));
            }
        }
        Ok(None)
    }
}

/// Activity and result fields: `u64 n`, then n × (`u64 0, u64` or `u64 1, str`).
fn skip_fields(r: &mut Reader<'_>) -> Result<(), Short> {
    let n = r.count()?;
    for _ in 0..n {
        match r.u64()? {
            0 => {
                r.u64()?;
            }
            1 => {
                r.bytes()?;
            }
            _ => return Err(Short::Malformed("unknown log field type")),
        }
    }
    Ok(())
}

/// The build operation of a BuildPaths(WithResults), if one of its paths is a derivation
/// (`/nix/store/…drv`, `…drv!out` or `…drv!*`). Paths that are not derivations are
/// substitutions, not builds.
pub fn build_paths_op(op: u64, paths: &[String]) -> Option<BuildOp> {
    let drv = paths.iter().find_map(|p| {
        let path = p.split_once('!').map_or(p.as_str(), |(d, _)| d);
        path.ends_with(".drv").then(|| path.to_owned())
    })?;
    Some(BuildOp {
        op: if op == OP_BUILD_PATHS {
            "BuildPaths"
        } else {
            "BuildPathsWithResults"
        },
        drv_path: drv,
        info: None,
    })
}

impl Grammar for Worker {
    fn client_message(&mut self, buf: &[u8]) -> Result<Msg, Stop> {
        let mut r = Reader::new(buf);
        let (build, bulk) = match self.client {
            ClientPhase::Magic => {
                if r.u64()? != MAGIC_1 {
                    return Err(Stop::Unsupported("not the worker protocol".into()));
                }
                self.client = ClientPhase::Version;
                (None, None)
            }
            ClientPhase::Version => {
                let v = r.u64()?;
                if v >> 8 != 1 || minor(v) < minor(MIN_VERSION) {
                    return Err(Stop::Unsupported(format!(
                        "client protocol version {}.{}",
                        v >> 8,
                        minor(v)
                    )));
                }
                self.client_version = Some(v);
                self.client = ClientPhase::HelloRest;
                (None, None)
            }
            ClientPhase::HelloRest => {
                let v = self.version().ok_or(Stop::NeedPeer)?;
                let features = if minor(v) >= 38 {
                    r.strings()?
                } else {
                    Vec::new()
                };
                if minor(v) >= 14 && r.u64()? != 0 {
                    r.u64()?;
                }
                if minor(v) >= 11 {
                    r.u64()?;
                }
                self.client_features = features;
                self.client = ClientPhase::Ops;
                (None, None)
            }
            ClientPhase::Ops => {
                let v = self.version().ok_or(Stop::NeedPeer)?;
                let op = r.u64()?;
                match self.op(&mut r, v, op)? {
                    OpEnd::Plain => (None, None),
                    OpEnd::Build(b) => (Some(b), None),
                    OpEnd::Bulk(b) => (None, Some(b)),
                }
            }
        };
        Ok(Msg {
            len: r.position(),
            build,
            bulk,
        })
    }

    fn client_holds(&self, buf: &[u8]) -> Option<bool> {
        if self.client != ClientPhase::Ops {
            return Some(false);
        }
        let op = u64::from_le_bytes(buf.get(..8)?.try_into().ok()?);
        Some(matches!(
            op,
            OP_BUILD_PATHS | OP_BUILD_DERIVATION | OP_BUILD_PATHS_WITH_RESULTS
        ))
    }

    fn server_message(&mut self, buf: &[u8]) -> Result<ServerMsg, Stop> {
        let mut r = Reader::new(buf);
        let event = match self.server {
            ServerPhase::Hello => {
                if r.u64()? != MAGIC_2 {
                    return Err(Stop::Unsupported(
                        "the daemon does not speak the worker protocol".into(),
                    ));
                }
                let v = r.u64()?;
                if v >> 8 != 1 || minor(v) < minor(MIN_VERSION) || v > MAX_VERSION {
                    return Err(Stop::Unsupported(format!(
                        "daemon protocol version {}.{}",
                        v >> 8,
                        minor(v)
                    )));
                }
                self.server_version = Some(v);
                self.server = ServerPhase::HelloRest;
                Some(ServerEvent::Version)
            }
            ServerPhase::HelloRest => {
                let v = self.version().ok_or(Stop::NeedPeer)?;
                if minor(v) >= 38 {
                    let theirs = r.strings()?;
                    self.shared_features = theirs.iter().any(|f| self.client_features.contains(f));
                }
                if minor(v) >= 33 {
                    r.bytes()?;
                }
                if minor(v) >= 35 {
                    r.u64()?;
                }
                self.server = ServerPhase::StartupLog;
                None
            }
            ServerPhase::StartupLog | ServerPhase::BuildLog { .. } => {
                let v = self.version().ok_or(Stop::NeedPeer)?;
                match (Self::log_message(&mut r, v)?, self.server) {
                    (None, _) => None,
                    (Some(_), ServerPhase::StartupLog) => {
                        self.server = ServerPhase::Idle;
                        Some(ServerEvent::HandshakeDone)
                    }
                    (Some(true), ServerPhase::BuildLog { status: true }) => {
                        self.server = ServerPhase::BuildStatus;
                        None
                    }
                    (Some(ok), _) => {
                        self.server = ServerPhase::Idle;
                        Some(ServerEvent::BuildDone { ok })
                    }
                }
            }
            ServerPhase::BuildStatus => {
                let status = r.u64()?;
                self.server = ServerPhase::Idle;
                Some(ServerEvent::BuildDone {
                    ok: status_ok(status),
                })
            }
            ServerPhase::Idle => {
                return Ok(ServerMsg {
                    len: buf.len(),
                    event: None,
                });
            }
        };
        Ok(ServerMsg {
            len: r.position(),
            event,
        })
    }

    fn server_tracking(&self) -> bool {
        self.server != ServerPhase::Idle
    }

    fn build_forwarded(&mut self, op: &BuildOp) {
        self.server = ServerPhase::BuildLog {
            status: op.info.is_some(),
        };
    }

    fn progress(&self, text: &str) -> Option<Vec<u8>> {
        // STDERR_NEXT: the client prints it as an error-level message; in a build-hook
        // session build-remote turns it into an `@nix` message the member's Nix shows.
        let mut out = Vec::new();
        wire::put_u64(&mut out, STDERR_NEXT);
        wire::put_bytes(&mut out, format!("{text}\n").as_bytes());
        Some(out)
    }

    fn refusal(&self, text: &str) -> Option<Vec<u8>> {
        let v = self.version()?;
        let mut out = Vec::new();
        wire::put_u64(&mut out, STDERR_ERROR);
        if minor(v) >= 26 {
            wire::put_bytes(&mut out, b"Error");
            wire::put_u64(&mut out, 0); // lvlError
            wire::put_bytes(&mut out, b"Error");
            wire::put_bytes(&mut out, text.as_bytes());
            wire::put_u64(&mut out, 0); // no position
            wire::put_u64(&mut out, 0); // no traces
        } else {
            wire::put_bytes(&mut out, text.as_bytes());
            wire::put_u64(&mut out, 1);
        }
        Some(out)
    }
}
