//! Whole sessions through the sans-I/O framing: real byte sequences of Nix clients and
//! daemons (built from the protocol's documented layout), any split of the stream, and
//! arbitrary garbage.

use proptest::prelude::*;

use super::serve::{self, Serve};
use super::session::{ClientEvent, Forward, Grammar, ServerEvent, Session};
use super::wire::{put_bytes, put_strings, put_u64};
use super::worker::{self, Worker};

/// One side's bytes in a recorded conversation.
#[derive(Debug, Clone)]
enum Seg {
    Client(Vec<u8>),
    Server(Vec<u8>),
}

fn u(n: u64) -> Vec<u8> {
    n.to_le_bytes().to_vec()
}

fn basic_derivation(out: &mut Vec<u8>, system: &str, features: &str) {
    put_u64(out, 1);
    for s in ["out", "/nix/store/aaaa-x", "", ""] {
        put_bytes(out, s.as_bytes());
    }
    put_strings(out, &["/nix/store/bbbb-src"]);
    put_bytes(out, system.as_bytes());
    put_bytes(out, b"/nix/store/cccc-busybox/busybox");
    put_strings(out, &["sh", "-c", "echo hi > $out"]);
    let env: Vec<(&str, &str)> = if features.is_empty() {
        vec![("out", "/nix/store/aaaa-x")]
    } else {
        vec![
            ("out", "/nix/store/aaaa-x"),
            ("requiredSystemFeatures", features),
        ]
    };
    put_u64(out, env.len() as u64);
    for (k, v) in env {
        put_bytes(out, k.as_bytes());
        put_bytes(out, v.as_bytes());
    }
}

/// A worker session of a client at `cv` and a daemon at `sv`: handshake, a query, an
/// upload of `upload` bytes in framed chunks, a BuildDerivation, its log and result, then a
/// NarFromPath whose raw NAR the gate must not try to parse.
fn worker_conversation(cv: u64, sv: u64, doubled: bool, upload: usize) -> Vec<Seg> {
    worker_conversation_status(cv, sv, doubled, upload, 0)
}

/// [`worker_conversation`] with the BuildResult status `status`.
fn worker_conversation_status(
    cv: u64,
    sv: u64,
    doubled: bool,
    upload: usize,
    status: u64,
) -> Vec<Seg> {
    let v = cv.min(sv);
    let mut segs = vec![Seg::Client(u(worker::MAGIC_1))];
    let mut s = u(worker::MAGIC_2);
    s.extend(u(sv));
    segs.push(Seg::Server(s));
    let mut c = u(cv);
    if doubled {
        c.extend(u(cv)); // Nix 2.23: read by the daemon as a non-zero affinity flag
    }
    if v & 0xff >= 38 {
        put_strings(&mut c, &["disable-set-options"]);
    }
    c.extend(u(0)); // affinity (its value, for a doubled version)
    c.extend(u(0)); // reserveSpace
    segs.push(Seg::Client(c));
    let mut s = Vec::new();
    if v & 0xff >= 38 {
        put_strings(&mut s, &["realisation-with-path-not-hash"]);
    }
    put_bytes(&mut s, b"2.99.0");
    if v & 0xff >= 35 {
        s.extend(u(1));
    }
    s.extend(u(worker::STDERR_LAST));
    segs.push(Seg::Server(s));
    // QueryValidPaths.
    let mut c = u(31);
    put_strings(&mut c, &["/nix/store/bbbb-src"]);
    c.extend(u(0));
    segs.push(Seg::Client(c));
    let mut s = u(worker::STDERR_LAST);
    put_strings(&mut s, &[] as &[&str]);
    segs.push(Seg::Server(s));
    // AddMultipleToStore with framed data.
    let mut c = u(44);
    c.extend(u(0));
    c.extend(u(0));
    let payload: Vec<u8> = (0..upload).map(|i| (i % 251) as u8).collect();
    for chunk in payload.chunks(32 * 1024 + 7) {
        c.extend(u(chunk.len() as u64));
        c.extend_from_slice(chunk);
    }
    c.extend(u(0));
    segs.push(Seg::Client(c));
    let mut s = u(worker::STDERR_NEXT);
    put_bytes(&mut s, b"copying");
    s.extend(u(worker::STDERR_LAST));
    segs.push(Seg::Server(s));
    // BuildDerivation.
    let mut c = u(worker::OP_BUILD_DERIVATION);
    put_bytes(&mut c, b"/nix/store/dddd-x.drv");
    basic_derivation(&mut c, "x86_64-linux", "kvm big-parallel");
    c.extend(u(0));
    segs.push(Seg::Client(c));
    let mut s = u(worker::STDERR_START_ACTIVITY);
    s.extend(u(7));
    s.extend(u(3));
    s.extend(u(105));
    put_bytes(&mut s, b"building");
    s.extend(u(2));
    s.extend(u(1));
    put_bytes(&mut s, b"/nix/store/dddd-x.drv");
    s.extend(u(0));
    s.extend(u(1));
    s.extend(u(0));
    s.extend(u(worker::STDERR_RESULT));
    s.extend(u(7));
    s.extend(u(101));
    s.extend(u(1));
    s.extend(u(1));
    put_bytes(&mut s, b"hi");
    s.extend(u(worker::STDERR_STOP_ACTIVITY));
    s.extend(u(7));
    s.extend(u(worker::STDERR_LAST));
    s.extend(u(status)); // BuildResult status
    put_bytes(&mut s, b"");
    segs.push(Seg::Server(s));
    // NarFromPath: the answer is a raw NAR, which passes unparsed.
    let mut c = u(38);
    put_bytes(&mut c, b"/nix/store/aaaa-x");
    segs.push(Seg::Client(c));
    let mut s = u(worker::STDERR_LAST);
    put_bytes(&mut s, b"nix-archive-1");
    s.extend(u(0xdead_beef)); // anything: not followed
    segs.push(Seg::Server(s));
    segs
}

/// A serve session: handshake, QueryValidPaths, AddToStoreNar of `upload` raw bytes,
/// BuildDerivation, its result.
fn serve_conversation(cv: u64, sv: u64, upload: usize) -> Vec<Seg> {
    serve_conversation_status(cv, sv, upload, 0)
}

/// [`serve_conversation`] with the BuildResult status `status`.
fn serve_conversation_status(cv: u64, sv: u64, upload: usize, status: u64) -> Vec<Seg> {
    let v = cv.min(sv);
    let mut c = u(serve::MAGIC_1);
    c.extend(u(cv));
    let mut segs = vec![Seg::Client(c)];
    let mut s = u(serve::MAGIC_2);
    s.extend(u(sv));
    segs.push(Seg::Server(s));
    let mut c = u(1);
    c.extend(u(0));
    c.extend(u(0));
    put_strings(&mut c, &["/nix/store/bbbb-src"]);
    segs.push(Seg::Client(c));
    let mut s = Vec::new();
    put_strings(&mut s, &[] as &[&str]);
    segs.push(Seg::Server(s));
    let mut c = u(9);
    put_bytes(&mut c, b"/nix/store/bbbb-src");
    put_bytes(&mut c, b"");
    put_bytes(&mut c, b"0000");
    put_strings(&mut c, &[] as &[&str]);
    c.extend(u(0));
    c.extend(u(upload as u64));
    c.extend(u(0));
    put_strings(&mut c, &[] as &[&str]);
    put_bytes(&mut c, b"");
    c.extend((0..upload).map(|i| (i % 13) as u8));
    segs.push(Seg::Client(c));
    segs.push(Seg::Server(u(1)));
    let mut c = u(serve::CMD_BUILD_DERIVATION);
    put_bytes(&mut c, b"/nix/store/dddd-x.drv");
    basic_derivation(&mut c, "aarch64-linux", "");
    c.extend(u(0));
    c.extend(u(0));
    if v & 0xff >= 2 {
        c.extend(u(0));
    }
    if v & 0xff >= 3 {
        c.extend(u(0));
        c.extend(u(0));
    }
    if v & 0xff >= 7 {
        c.extend(u(0));
    }
    segs.push(Seg::Client(c));
    let mut s = u(status);
    put_bytes(&mut s, b"");
    segs.push(Seg::Server(s));
    segs
}

/// What a relay would have done with a conversation.
#[derive(Debug, Default)]
struct Outcome {
    forwarded: Vec<u8>,
    builds: Vec<super::session::BuildOp>,
    build_done: usize,
    build_ok: Vec<bool>,
    desync: Vec<String>,
}

/// Plays a conversation through a session, cutting every segment into `split`-byte reads,
/// the way the relay does: client bytes are stepped, a held build is released at once.
fn play<G: Grammar>(session: &mut Session<G>, segs: &[Seg], split: usize) -> Outcome {
    let mut o = Outcome::default();
    for seg in segs {
        match seg {
            Seg::Server(bytes) => {
                for part in bytes.chunks(split) {
                    for e in session.server_observe(part) {
                        match e {
                            ServerEvent::BuildDone { ok } => {
                                o.build_done += 1;
                                o.build_ok.push(ok);
                            }
                            ServerEvent::Desync(r) => o.desync.push(r),
                            _ => {}
                        }
                    }
                }
            }
            Seg::Client(bytes) => {
                for part in bytes.chunks(split) {
                    let mut off = 0;
                    let mut stalls = 0;
                    while off < part.len() {
                        let a = session.client_step(&part[off..]);
                        match a.forward {
                            Forward::Nothing => {}
                            Forward::Input => {
                                o.forwarded.extend_from_slice(&part[off..off + a.consumed])
                            }
                            Forward::Bytes(b) => o.forwarded.extend(b),
                        }
                        off += a.consumed;
                        match a.event {
                            Some(ClientEvent::Build(b)) => {
                                o.builds.push(b);
                                o.forwarded.extend(session.release_held());
                            }
                            Some(ClientEvent::NeedServer) => {
                                stalls += 1;
                                assert!(
                                    stalls < 2,
                                    "needs the server but the conversation says it spoke"
                                );
                            }
                            Some(ClientEvent::Desync(r)) => o.desync.push(r),
                            None => {}
                        }
                    }
                }
            }
        }
    }
    o
}

fn client_bytes(segs: &[Seg]) -> Vec<u8> {
    segs.iter()
        .filter_map(|s| match s {
            Seg::Client(b) => Some(b.clone()),
            Seg::Server(_) => None,
        })
        .flatten()
        .collect()
}

fn check_worker(cv: u64, sv: u64, doubled: bool, split: usize) {
    let segs = worker_conversation(cv, sv, doubled, 100_000);
    let mut s = Session::new(Worker::new());
    let o = play(&mut s, &segs, split);
    assert!(
        o.desync.is_empty(),
        "{:?} (cv {cv:#x} sv {sv:#x})",
        o.desync
    );
    assert_eq!(
        o.forwarded,
        client_bytes(&segs),
        "every byte forwarded, in order"
    );
    assert_eq!(o.builds.len(), 1);
    let b = &o.builds[0];
    assert_eq!(b.drv_path, "/nix/store/dddd-x.drv");
    let info = b.info.as_ref().unwrap();
    assert_eq!(info.system, "x86_64-linux");
    assert_eq!(info.required_features, vec!["big-parallel", "kvm"]);
    assert_eq!(o.build_done, 1, "the result was seen once");
}

/// Every worker version pairing the gate supports, Nix 2.23's doubled version and Lix's
/// 1.35 included, is followed to the build and its result, whatever the read size.
#[test]
fn worker_sessions_of_every_version_pairing() {
    let versions = [0x122u64, 0x123, 0x125, 0x126];
    for &cv in &versions {
        for &sv in &versions {
            for split in [1, 3, 8, 13, 4096, 1 << 20] {
                check_worker(cv, sv, false, split);
            }
        }
    }
    for split in [1, 8, 100] {
        check_worker(0x125, 0x125, true, split);
    }
}

/// Serve sessions at 2.5 to 2.8 are followed through the sized upload to the build.
#[test]
fn serve_sessions_of_every_version() {
    for cv in [0x205u64, 0x206, 0x207, 0x208] {
        for sv in [0x207u64, 0x208] {
            for split in [1, 5, 8, 4096, 1 << 20] {
                let segs = serve_conversation(cv, sv, 70_000);
                let mut s = Session::new(Serve::new());
                let o = play(&mut s, &segs, split);
                assert!(o.desync.is_empty(), "{:?}", o.desync);
                assert_eq!(o.forwarded, client_bytes(&segs));
                assert_eq!(o.builds.len(), 1);
                assert_eq!(o.builds[0].info.as_ref().unwrap().system, "aarch64-linux");
                assert_eq!(o.build_done, 1);
            }
        }
    }
}

/// The build's outcome comes from the result's status word, on both protocols.
#[test]
fn build_outcome_is_read_from_the_status() {
    for (status, ok) in [(0, true), (2, true), (3, false), (9, false)] {
        for split in [1, 4096] {
            let mut s = Session::new(Worker::new());
            let o = play(
                &mut s,
                &worker_conversation_status(0x122, 0x122, false, 10, status),
                split,
            );
            assert_eq!(o.build_ok, vec![ok], "worker status {status}");
            let mut s = Session::new(Serve::new());
            let o = play(
                &mut s,
                &serve_conversation_status(0x207, 0x207, 10, status),
                split,
            );
            assert_eq!(o.build_ok, vec![ok], "serve status {status}");
        }
    }
}

/// A build operation is held until its last byte, and nothing of it is forwarded before.
#[test]
fn build_operation_is_held_whole() {
    let segs = worker_conversation(0x122, 0x122, false, 10);
    let mut s = Session::new(Worker::new());
    let o = play(&mut s, &segs[..segs.len() - 3], 4096); // up to the build's upload reply
    let Seg::Client(build) = &segs[segs.len() - 4] else {
        unreachable!()
    };
    for (i, b) in build[..build.len() - 1].iter().enumerate() {
        let a = s.client_step(std::slice::from_ref(b));
        assert_eq!(
            a.forward,
            Forward::Nothing,
            "byte {i} of the build forwarded"
        );
        assert_eq!(a.event, None);
    }
    let a = s.client_step(&build[build.len() - 1..]);
    assert!(matches!(a.event, Some(ClientEvent::Build(_))));
    assert!(s.holding());
    assert!(
        s.progress("waiting").is_some(),
        "progress can be injected while held"
    );
    assert_eq!(s.release_held(), *build);
    assert!(o.desync.is_empty());
}

/// A BuildPathsWithResults of a derivation is a build without system (read from the
/// `.drv`); one of a plain store path (a substitution) is not.
#[test]
fn build_paths_of_derivations_only() {
    let segs = worker_conversation(0x126, 0x126, false, 0);
    let mut s = Session::new(Worker::new());
    play(&mut s, &segs[..4], 8);
    let mut c = u(worker::OP_BUILD_PATHS_WITH_RESULTS);
    put_strings(&mut c, &["/nix/store/eeee-y"]);
    c.extend(u(0));
    let a = s.client_step(&c);
    assert_eq!((a.consumed, a.event), (c.len(), None));
    let mut c = u(worker::OP_BUILD_PATHS_WITH_RESULTS);
    put_strings(&mut c, &["/nix/store/eeee-y.drv!*"]);
    c.extend(u(0));
    let a = s.client_step(&c);
    let Some(ClientEvent::Build(b)) = a.event else {
        panic!("{a:?}")
    };
    assert_eq!(
        (b.drv_path.as_str(), b.info),
        ("/nix/store/eeee-y.drv", None)
    );
}

/// Refusing a held build answers the client with a STDERR_ERROR and keeps the stream going.
#[test]
fn refusal_keeps_the_worker_stream_in_sync() {
    let segs = worker_conversation(0x122, 0x122, false, 0);
    let mut s = Session::new(Worker::new());
    let n = segs.len();
    play(&mut s, &segs[..n - 4], 64);
    let Seg::Client(build) = &segs[n - 4] else {
        unreachable!()
    };
    assert!(matches!(
        s.client_step(build).event,
        Some(ClientEvent::Build(_))
    ));
    let r = s.refuse_held("no").unwrap();
    assert_eq!(r[..8], u(worker::STDERR_ERROR)[..]);
    assert!(!s.holding());
    let Seg::Client(next) = &segs[n - 2] else {
        unreachable!()
    };
    let a = s.client_step(next);
    assert_eq!(
        (a.consumed, a.forward, a.event),
        (next.len(), Forward::Input, None)
    );
    // The serve protocol cannot refuse in-stream.
    assert!(Session::new(Serve::new()).refuse_held("no").is_none());
}

/// Unknown versions, unknown operations and other protocols pass through, said once.
#[test]
fn unknown_streams_pass_through() {
    // A 1.39 daemon: the client's stream cannot be followed past the version.
    let mut segs = worker_conversation(0x126, 0x126, false, 0);
    segs[1] = Seg::Server([u(worker::MAGIC_2), u(0x127)].concat());
    let mut s = Session::new(Worker::new());
    let mut o = Outcome::default();
    for seg in &segs[..2] {
        if let Seg::Server(b) = seg {
            for e in s.server_observe(b) {
                if let ServerEvent::Desync(r) = e {
                    o.desync.push(r);
                }
            }
        } else if let Seg::Client(b) = seg {
            assert_eq!(s.client_step(b).forward, Forward::Input);
        }
    }
    assert_eq!(o.desync.len(), 1, "{:?}", o.desync);
    // The relay then stops following the client: everything passes.
    let Seg::Client(rest) = &segs[2] else {
        unreachable!()
    };
    assert!(s.pass_through().is_empty());
    assert_eq!(s.client_step(rest).forward, Forward::Input);
    // An unknown operation.
    let segs = worker_conversation(0x122, 0x122, false, 0);
    let mut s = Session::new(Worker::new());
    play(&mut s, &segs[..4], 8);
    let a = s.client_step(&[u(999), u(1), u(2)].concat());
    assert!(matches!(a.event, Some(ClientEvent::Desync(_))), "{a:?}");
    assert_eq!(a.forward, Forward::Bytes([u(999), u(1), u(2)].concat()));
    assert!(s.passing_through());
    // Not Nix at all.
    let mut s = Session::new(Serve::new());
    let a = s.client_step(b"SSH-2.0-hello\r\n and more");
    assert!(matches!(a.event, Some(ClientEvent::Desync(_))));
    assert_eq!(
        a.forward,
        Forward::Bytes(b"SSH-2.0-hello\r\n and more".to_vec())
    );
}

/// Found by fuzzing (`gate_session`): a daemon whose first words are not the serve
/// protocol's is no longer followed, so its version is never known; the client's next
/// message must then pass through, not wait for that version forever.
#[test]
fn a_lost_daemon_never_stalls_the_client() {
    let mut s = Session::new(Serve::new());
    let hello = [u(serve::MAGIC_1), u(0x205)].concat();
    assert_eq!(s.client_step(&hello).consumed, hello.len());
    let events = s.server_observe(&[u(0xdead_beef), u(0x205)].concat());
    assert!(
        matches!(events.as_slice(), [ServerEvent::Desync(_)]),
        "{events:?}"
    );
    let next = [u(1), u(0), u(0), u(0)].concat();
    let a = s.client_step(&next);
    assert!(matches!(a.event, Some(ClientEvent::Desync(_))), "{a:?}");
    assert_eq!((a.consumed, a.forward), (next.len(), Forward::Bytes(next)));
    assert!(s.passing_through());
}

/// Drives arbitrary client bytes the way the relay does and returns what was forwarded
/// plus what is still held; panics on a stall.
fn drive_garbage<G: Grammar>(s: &mut Session<G>, data: &[u8], split: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for part in data.chunks(split.max(1)) {
        let mut off = 0;
        let mut idle = 0;
        while off < part.len() {
            let a = s.client_step(&part[off..]);
            match a.forward {
                Forward::Nothing => {}
                Forward::Input => out.extend_from_slice(&part[off..off + a.consumed]),
                Forward::Bytes(b) => out.extend(b),
            }
            off += a.consumed;
            match a.event {
                Some(ClientEvent::Build(_)) => out.extend(s.release_held()),
                // No daemon in this test: the relay would pass through.
                Some(ClientEvent::NeedServer) => out.extend(s.pass_through()),
                _ => {}
            }
            idle = if a.consumed == 0 { idle + 1 } else { 0 };
            assert!(idle < 3, "stalled");
        }
    }
    if s.holding() {
        out.extend(s.release_held());
    } else {
        out.extend(s.pass_through());
    }
    out
}

proptest! {
    /// Arbitrary bytes after a valid worker handshake never panic, never stall, and come
    /// out exactly as they went in (forwarded, or held and then released).
    #[test]
    fn worker_garbage_is_forwarded_intact(tail in proptest::collection::vec(any::<u8>(), 0..600), split in 1usize..64, op in 0u64..50) {
        let segs = worker_conversation(0x122, 0x122, false, 0);
        let mut s = Session::new(Worker::new());
        let o = play(&mut s, &segs[..4], 8);
        let mut data = u(op);
        data.extend(tail);
        let out = drive_garbage(&mut s, &data, split);
        prop_assert_eq!(o.forwarded.len() + out.len(), client_bytes(&segs[..4]).len() + data.len());
        prop_assert_eq!(out, data);
    }

    /// The same from the first byte, for both protocols, and the daemon's side never
    /// panics on garbage either.
    #[test]
    fn any_stream_is_safe(data in proptest::collection::vec(any::<u8>(), 0..400), split in 1usize..32) {
        let mut w = Session::new(Worker::new());
        prop_assert_eq!(drive_garbage(&mut w, &data, split), data.clone());
        let mut v = Session::new(Serve::new());
        prop_assert_eq!(drive_garbage(&mut v, &data, split), data.clone());
        let mut w = Session::new(Worker::new());
        for part in data.chunks(split) {
            let _ = w.server_observe(part);
        }
    }

    /// Any read size gives the same forwarded bytes and the same build.
    #[test]
    fn any_split_of_a_real_session(split in 1usize..5000, upload in 0usize..20_000) {
        let segs = worker_conversation(0x123, 0x126, false, upload);
        let mut s = Session::new(Worker::new());
        let o = play(&mut s, &segs, split);
        prop_assert!(o.desync.is_empty());
        prop_assert_eq!(o.forwarded, client_bytes(&segs));
        prop_assert_eq!(o.builds.len(), 1);
        prop_assert_eq!(o.build_done, 1);
    }
}
