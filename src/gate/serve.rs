//! The serve protocol (`nix-store --serve [--write]`, ssh stores), versions 2.x from 2.5
//! on (Nix 2.8 to 2.34 and Lix speak 2.7, Nix 2.35 speaks 2.8).
//!
//! The daemon's side has no log loop: it answers on stdout only, and writes nothing there
//! while it builds, so a build's result is being sent from the first byte after the
//! forwarded build command (the gate reads that first word: the status). `ImportPaths` (4) needs a NAR parser to find its end; it is only
//! used by Hydra and by peers older than 2.5, so the gate passes such sessions through.

use super::drv;
use super::session::{BuildOp, Grammar, Msg, ServerEvent, ServerMsg, Stop, status_ok};
use super::wire::{Bulk, Reader};

/// `SERVE_MAGIC_1`, the client's first word.
pub const MAGIC_1: u64 = 0x390c_9deb;
/// `SERVE_MAGIC_2`, the server's first word.
pub const MAGIC_2: u64 = 0x5452_eecb;
/// The oldest negotiated version the gate follows (2.5: sized `AddToStoreNar`).
pub const MIN_VERSION: u64 = 0x205;
/// The newest version the gate knows (2.8).
pub const MAX_VERSION: u64 = 0x208;

/// BuildPaths.
pub const CMD_BUILD_PATHS: u64 = 6;
/// BuildDerivation.
pub const CMD_BUILD_DERIVATION: u64 = 8;

fn minor(v: u64) -> u64 {
    v & 0xff
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerPhase {
    Hello,
    Idle,
    /// The forwarded build's reply: its first word is a status (`status_ok` for
    /// BuildDerivation's BuildResult; 0 for BuildPaths' success).
    AwaitResult {
        /// Whether the statuses are BuildResult's (BuildDerivation).
        build_result: bool,
    },
}

/// Both directions of one serve-protocol session.
#[derive(Debug)]
pub struct Serve {
    client_hello_done: bool,
    server: ServerPhase,
    client_version: Option<u64>,
    server_version: Option<u64>,
}

impl Default for Serve {
    fn default() -> Self {
        Self::new()
    }
}

impl Serve {
    /// A session at its first byte.
    pub fn new() -> Self {
        Serve {
            client_hello_done: false,
            server: ServerPhase::Hello,
            client_version: None,
            server_version: None,
        }
    }

    /// The negotiated version, once both sides gave theirs.
    pub fn version(&self) -> Option<u64> {
        Some(self.client_version?.min(self.server_version?))
    }
}

/// BuildOptions: `maxSilentTime, buildTimeout`, then `maxLogSize` (2.2+), `nrRepeats,
/// enforceDeterminism` (2.3+), `keepFailed` (2.7+).
fn skip_build_options(r: &mut Reader<'_>, v: u64) -> Result<(), Stop> {
    r.skip_u64s(2)?;
    if minor(v) >= 2 {
        r.u64()?;
    }
    if minor(v) >= 3 {
        r.skip_u64s(2)?;
    }
    if minor(v) >= 7 {
        r.u64()?;
    }
    Ok(())
}

impl Grammar for Serve {
    fn client_message(&mut self, buf: &[u8]) -> Result<Msg, Stop> {
        let mut r = Reader::new(buf);
        if !self.client_hello_done {
            if r.u64()? != MAGIC_1 {
                return Err(Stop::Unsupported("not the serve protocol".into()));
            }
            let v = r.u64()?;
            if v >> 8 != 2 || v < MIN_VERSION {
                return Err(Stop::Unsupported(format!(
                    "client serve protocol version {}.{}",
                    v >> 8,
                    minor(v)
                )));
            }
            self.client_version = Some(v);
            self.client_hello_done = true;
            return Ok(Msg {
                len: r.position(),
                build: None,
                bulk: None,
            });
        }
        let v = self.version().ok_or(Stop::NeedPeer)?;
        let (build, bulk) = match r.u64()? {
            1 => {
                r.skip_u64s(2)?;
                r.skip_string_list()?;
                (None, None)
            }
            2 => {
                r.skip_string_list()?;
                (None, None)
            }
            3 => {
                r.bytes()?;
                (None, None)
            }
            5 => {
                r.u64()?;
                r.skip_string_list()?;
                (None, None)
            }
            CMD_BUILD_PATHS => {
                let paths = r.strings()?;
                skip_build_options(&mut r, v)?;
                let build = super::worker::build_paths_op(0, &paths).map(|b| BuildOp {
                    op: "BuildPaths",
                    ..b
                });
                (build, None)
            }
            7 => {
                r.u64()?;
                r.skip_string_list()?;
                (None, None)
            }
            CMD_BUILD_DERIVATION => {
                let drv_path = r.string()?;
                let info = drv::read_basic_derivation(&mut r)?;
                skip_build_options(&mut r, v)?;
                let build = BuildOp {
                    op: "BuildDerivation",
                    drv_path,
                    info: Some(info),
                };
                (Some(build), None)
            }
            9 => {
                r.skip_strings(3)?;
                r.skip_string_list()?;
                r.u64()?;
                let nar_size = r.u64()?;
                r.u64()?;
                r.skip_string_list()?;
                r.bytes()?;
                (None, (nar_size > 0).then_some(Bulk::Raw(nar_size)))
            }
            other => {
                return Err(Stop::Unsupported(format!(
                    "unknown or unsupported serve command {other}"
                )));
            }
        };
        Ok(Msg {
            len: r.position(),
            build,
            bulk,
        })
    }

    fn client_holds(&self, buf: &[u8]) -> Option<bool> {
        if !self.client_hello_done {
            return Some(false);
        }
        let cmd = u64::from_le_bytes(buf.get(..8)?.try_into().ok()?);
        Some(matches!(cmd, CMD_BUILD_PATHS | CMD_BUILD_DERIVATION))
    }

    fn server_message(&mut self, buf: &[u8]) -> Result<ServerMsg, Stop> {
        match self.server {
            ServerPhase::Hello => {
                let mut r = Reader::new(buf);
                if r.u64()? != MAGIC_2 {
                    return Err(Stop::Unsupported(
                        "the server does not speak the serve protocol".into(),
                    ));
                }
                let v = r.u64()?;
                if !(MIN_VERSION..=MAX_VERSION).contains(&v) {
                    return Err(Stop::Unsupported(format!(
                        "server serve protocol version {}.{}",
                        v >> 8,
                        minor(v)
                    )));
                }
                self.server_version = Some(v);
                self.server = ServerPhase::Idle;
                Ok(ServerMsg {
                    len: r.position(),
                    event: Some(ServerEvent::Version),
                })
            }
            // Nothing is written to stdout while the build runs: the reply starts with its
            // status word.
            ServerPhase::AwaitResult { build_result } => {
                let status = Reader::new(buf).u64()?;
                self.server = ServerPhase::Idle;
                let ok = if build_result {
                    status_ok(status)
                } else {
                    status == 0
                };
                Ok(ServerMsg {
                    len: 8,
                    event: Some(ServerEvent::BuildDone { ok }),
                })
            }
            ServerPhase::Idle => Ok(ServerMsg {
                len: buf.len(),
                event: None,
            }),
        }
    }

    fn server_tracking(&self) -> bool {
        self.server != ServerPhase::Idle
    }

    fn build_forwarded(&mut self, op: &BuildOp) {
        self.server = ServerPhase::AwaitResult {
            build_result: op.info.is_some(),
        };
    }

    fn progress(&self, _text: &str) -> Option<Vec<u8>> {
        // stdout carries only protocol bytes and the serve protocol has no log messages:
        // the relay writes to stderr instead.
        None
    }

    fn refusal(&self, _text: &str) -> Option<Vec<u8>> {
        // No in-stream error either: the relay ends the session after saying why on stderr.
        None
    }
}
