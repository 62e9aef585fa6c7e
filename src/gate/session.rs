//! One relayed session, sans I/O: the bytes each way go in, and out come what to forward,
//! which build operation to hold, and when its result went back. The relay does the I/O.
//!
//! The client's stream is cut into messages (handshake parts and operations). A message is
//! parsed once it is whole; bytes are forwarded as soon as the message is known not to be a
//! build, and an upload's bulk data is followed through its length headers only, never
//! copied. The first bytes of an operation (before its opcode is complete) and a whole build
//! operation are held. The daemon's stream is only observed: through the handshake, and from
//! a forwarded build to the end of its log loop, then no more until the next build.
//!
//! Whenever the stream stops making sense (an unknown operation or version, a malformed
//! field, an oversized message), the session degrades to plain pass-through for good, and
//! says so once through [`ClientEvent::Desync`] or [`ServerEvent::Desync`]: the daemon
//! then sees exactly what the client sent and answers as it would without the gate.

use super::drv::DrvInfo;
use super::wire::{Bulk, Short};

/// The most bytes of one message the session buffers (the largest string the gate parses,
/// plus room for the fields around it). A longer message makes the session pass through.
pub const MAX_MESSAGE: usize = super::wire::MAX_STR_LEN as usize + (1 << 20);

/// An operation that starts a build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOp {
    /// The operation's name, for logs and accounting.
    pub op: &'static str,
    /// The derivation's store path (the first derivation of a BuildPaths).
    pub drv_path: String,
    /// System and features, when the operation carries them (BuildDerivation). For
    /// BuildPaths they are in the `.drv` file, already in the builder's store.
    pub info: Option<DrvInfo>,
}

/// Why a parse stopped short of a whole message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The bytes so far are incomplete or malformed.
    Short(Short),
    /// The message depends on the other side's version, not seen yet.
    NeedPeer,
    /// Something the gate does not follow (named, for the log).
    Unsupported(String),
}

/// Whether a BuildResult status means success: Built (0), Substituted (1), AlreadyValid
/// (2) or ResolvesToAlreadyValid (13).
pub fn status_ok(status: u64) -> bool {
    matches!(status, 0..=2 | 13)
}

impl From<Short> for Stop {
    fn from(s: Short) -> Self {
        Stop::Short(s)
    }
}

/// One whole client message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    /// Its length in bytes (the bulk data of an upload not included).
    pub len: usize,
    /// Set when it starts a build.
    pub build: Option<BuildOp>,
    /// Set when bulk data follows (an upload).
    pub bulk: Option<Bulk>,
}

/// One whole daemon message, as far as the gate follows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerMsg {
    /// Its length in bytes.
    pub len: usize,
    /// What it means for the gate.
    pub event: Option<ServerEvent>,
}

/// What the daemon's stream told the gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEvent {
    /// The daemon gave its protocol version (the client's stream may need it).
    Version,
    /// The handshake is over.
    HandshakeDone,
    /// The forwarded build's result is being sent: its slot can be released.
    BuildDone {
        /// Whether the build succeeded: a BuildResult status of built, substituted or
        /// already valid, or (for operations whose result carries no status) an answer
        /// rather than an error.
        ok: bool,
    },
    /// The gate no longer follows the daemon's stream (the reason, for the log).
    Desync(String),
}

/// A protocol, both directions.
pub trait Grammar: std::fmt::Debug {
    /// Parses the client message at the start of `buf`, advancing the grammar's state only
    /// when it is whole.
    fn client_message(&mut self, buf: &[u8]) -> Result<Msg, Stop>;
    /// Whether the client message starting `buf` is to be held (a build), once known.
    fn client_holds(&self, buf: &[u8]) -> Option<bool>;
    /// Parses the daemon message at the start of `buf`, likewise.
    fn server_message(&mut self, buf: &[u8]) -> Result<ServerMsg, Stop>;
    /// Whether the daemon's bytes need parsing now.
    fn server_tracking(&self) -> bool;
    /// The held build `op` was forwarded: follow the daemon until its result.
    fn build_forwarded(&mut self, op: &BuildOp);
    /// Bytes that show `text` to the member inside the protocol, if the protocol can.
    fn progress(&self, text: &str) -> Option<Vec<u8>>;
    /// Bytes that refuse the held build with `text` and keep the stream in sync, if the
    /// protocol can.
    fn refusal(&self, text: &str) -> Option<Vec<u8>>;
}

/// What to do with the bytes given to [`Session::client_step`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forward {
    /// Nothing to send now.
    Nothing,
    /// Send the consumed input bytes as they are.
    Input,
    /// Send these bytes (held earlier, now known not to be a build; input included).
    Bytes(Vec<u8>),
}

/// What happened in the client's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// A build operation is held: ask for a slot, then [`Session::release_held`].
    Build(BuildOp),
    /// The client's stream needs the daemon's version first: feed the daemon's bytes, then
    /// give the unconsumed input again.
    NeedServer,
    /// The session passes through from now on (the reason, for the log).
    Desync(String),
}

/// The result of one [`Session::client_step`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advance {
    /// How many input bytes were consumed (the rest is to be given again).
    pub consumed: usize,
    /// What to send to the daemon.
    pub forward: Forward,
    /// What happened, if anything.
    pub event: Option<ClientEvent>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ClientState {
    /// Between or inside messages.
    Message,
    /// Inside an upload's bulk data.
    Bulk(Bulk),
    /// A build operation is held.
    Holding,
    /// Not followed any more.
    PassThrough,
}

/// One session's state, for one protocol.
#[derive(Debug)]
pub struct Session<G> {
    grammar: G,
    client: ClientState,
    /// The bytes of the client message being parsed.
    pending: Vec<u8>,
    /// How many of `pending` were already forwarded.
    forwarded: usize,
    /// The held build operation.
    held: Option<BuildOp>,
    /// The bytes of the daemon message being parsed.
    server_pending: Vec<u8>,
    server_lost: bool,
}

impl<G: Grammar> Session<G> {
    /// A session at its first byte.
    pub fn new(grammar: G) -> Self {
        Session {
            grammar,
            client: ClientState::Message,
            pending: Vec::new(),
            forwarded: 0,
            held: None,
            server_pending: Vec::new(),
            server_lost: false,
        }
    }

    /// The protocol's state.
    pub fn grammar(&self) -> &G {
        &self.grammar
    }

    /// Whether the session passes everything through now.
    pub fn passing_through(&self) -> bool {
        self.client == ClientState::PassThrough
    }

    fn desync(&mut self, before: usize, data: &[u8], reason: String) -> Advance {
        let mut bytes = self.pending[self.forwarded..before.max(self.forwarded)].to_vec();
        bytes.extend_from_slice(data);
        self.pending = Vec::new();
        self.forwarded = 0;
        self.client = ClientState::PassThrough;
        Advance {
            consumed: data.len(),
            forward: if bytes.is_empty() {
                Forward::Nothing
            } else {
                Forward::Bytes(bytes)
            },
            event: Some(ClientEvent::Desync(reason)),
        }
    }

    /// Takes client bytes. Call again with `data[consumed..]` until all is consumed (an
    /// empty `data` re-examines held bytes, e.g. after [`ClientEvent::NeedServer`]).
    pub fn client_step(&mut self, data: &[u8]) -> Advance {
        match &mut self.client {
            ClientState::PassThrough => {
                return Advance {
                    consumed: data.len(),
                    forward: Forward::Input,
                    event: None,
                };
            }
            ClientState::Holding => {
                return Advance {
                    consumed: 0,
                    forward: Forward::Nothing,
                    event: None,
                };
            }
            ClientState::Bulk(b) => {
                let (n, end) = b.advance(data);
                if end {
                    self.client = ClientState::Message;
                }
                return Advance {
                    consumed: n,
                    forward: Forward::Input,
                    event: None,
                };
            }
            ClientState::Message => {}
        }
        let before = self.pending.len();
        if before + data.len() > MAX_MESSAGE {
            return self.desync(before, data, "a message longer than the gate parses".into());
        }
        self.pending.extend_from_slice(data);
        match self.grammar.client_message(&self.pending) {
            Ok(msg) if msg.len > before || (msg.len == before && data.is_empty()) => {
                let consumed = msg.len - before;
                self.pending.truncate(msg.len);
                if let Some(build) = msg.build {
                    self.client = ClientState::Holding;
                    self.held = Some(build.clone());
                    return Advance {
                        consumed,
                        forward: Forward::Nothing,
                        event: Some(ClientEvent::Build(build)),
                    };
                }
                let forward = if self.forwarded == self.pending.len() {
                    Forward::Nothing
                } else if self.forwarded == before {
                    Forward::Input
                } else {
                    Forward::Bytes(self.pending[self.forwarded..].to_vec())
                };
                self.pending.clear();
                self.forwarded = 0;
                self.client = msg.bulk.map_or(ClientState::Message, ClientState::Bulk);
                Advance {
                    consumed,
                    forward,
                    event: None,
                }
            }
            Ok(_) => {
                let reason = "a message shorter than its own beginning".to_owned();
                self.pending.truncate(before);
                self.desync(before, data, reason)
            }
            Err(Stop::Short(Short::Incomplete)) => {
                let forward = match self.grammar.client_holds(&self.pending) {
                    Some(false) if self.forwarded == before => Forward::Input,
                    Some(false) => Forward::Bytes(self.pending[self.forwarded..].to_vec()),
                    _ => Forward::Nothing,
                };
                if forward != Forward::Nothing {
                    self.forwarded = self.pending.len();
                }
                Advance {
                    consumed: data.len(),
                    forward,
                    event: None,
                }
            }
            Err(Stop::NeedPeer) if self.server_lost => {
                // The daemon's stream is no longer followed, so its version will never be
                // known: waiting for it would stall the client.
                self.pending.truncate(before);
                let reason = "the daemon's version is unknown (its stream is not followed)";
                self.desync(before, data, reason.into())
            }
            Err(Stop::NeedPeer) => {
                self.pending.truncate(before);
                Advance {
                    consumed: 0,
                    forward: Forward::Nothing,
                    event: Some(ClientEvent::NeedServer),
                }
            }
            Err(Stop::Short(Short::Malformed(why))) => {
                self.pending.truncate(before);
                self.desync(before, data, format!("malformed client message: {why}"))
            }
            Err(Stop::Unsupported(why)) => {
                self.pending.truncate(before);
                self.desync(before, data, why)
            }
        }
    }

    /// Stops following the client's stream (the daemon's side is gone or lost) and returns
    /// the bytes held so far, to be forwarded; everything after passes through.
    pub fn pass_through(&mut self) -> Vec<u8> {
        let mut held = std::mem::take(&mut self.pending);
        held.drain(..std::mem::take(&mut self.forwarded).min(held.len()));
        self.client = ClientState::PassThrough;
        self.held = None;
        held
    }

    /// Whether a build operation is held.
    pub fn holding(&self) -> bool {
        self.client == ClientState::Holding
    }

    /// Hands back the held build operation's bytes, to be forwarded now; the daemon's reply
    /// is then followed up to the build's result.
    pub fn release_held(&mut self) -> Vec<u8> {
        if self.client != ClientState::Holding {
            return Vec::new();
        }
        self.client = ClientState::Message;
        if let Some(op) = self.held.take()
            && !self.server_lost
        {
            self.grammar.build_forwarded(&op);
        }
        let mut held = std::mem::take(&mut self.pending);
        held.drain(..std::mem::take(&mut self.forwarded));
        held
    }

    /// Drops the held build operation and returns the bytes that tell the client it was
    /// refused with `text`, if the protocol can say so in-stream (the session then goes on).
    pub fn refuse_held(&mut self, text: &str) -> Option<Vec<u8>> {
        let bytes = self.grammar.refusal(text)?;
        if self.client == ClientState::Holding {
            self.client = ClientState::Message;
            self.held = None;
            self.pending.clear();
            self.forwarded = 0;
        }
        Some(bytes)
    }

    /// The bytes that show `text` to the member in-stream, if the protocol can. Only valid
    /// while a build is held: the daemon is then idle, waiting for that operation, and the
    /// client is reading log messages.
    pub fn progress(&self, text: &str) -> Option<Vec<u8>> {
        if self.client != ClientState::Holding {
            return None;
        }
        self.grammar.progress(text)
    }

    /// Observes daemon bytes (all of them are forwarded to the client, whatever this says).
    pub fn server_observe(&mut self, data: &[u8]) -> Vec<ServerEvent> {
        let mut events = Vec::new();
        if self.server_lost || (!self.grammar.server_tracking() && self.server_pending.is_empty()) {
            return events;
        }
        if self.server_pending.len() + data.len() > MAX_MESSAGE {
            return self.lose_server("a daemon message longer than the gate parses".into());
        }
        self.server_pending.extend_from_slice(data);
        let mut start = 0;
        while self.grammar.server_tracking() && start < self.server_pending.len() {
            match self.grammar.server_message(&self.server_pending[start..]) {
                Ok(m) => {
                    start += m.len;
                    events.extend(m.event);
                }
                Err(Stop::Short(Short::Incomplete) | Stop::NeedPeer) => break,
                Err(Stop::Short(Short::Malformed(why))) => {
                    events.extend(self.lose_server(format!("malformed daemon message: {why}")));
                    return events;
                }
                Err(Stop::Unsupported(why)) => {
                    events.extend(self.lose_server(why));
                    return events;
                }
            }
        }
        if self.grammar.server_tracking() {
            self.server_pending.drain(..start);
        } else {
            // Between operations nothing is followed: the rest passes untouched.
            self.server_pending.clear();
        }
        events
    }

    fn lose_server(&mut self, why: String) -> Vec<ServerEvent> {
        self.server_lost = true;
        self.server_pending = Vec::new();
        vec![ServerEvent::Desync(why)]
    }
}
