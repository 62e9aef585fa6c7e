//! Fuzzes the gate's framing with arbitrary client and daemon streams, for both protocols.
//! It must never panic, never stall (every step consumes input or asks for something the
//! relay can give), and every client byte must come out exactly once, in order: forwarded
//! at once, or held and then released.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nixdispatch::gate::session::{ClientEvent, Forward, Grammar, Session};
use nixdispatch::gate::{drv, serve::Serve, worker::Worker};

/// Feeds `client` in reads of `split` bytes and `server` between them; returns what the
/// daemon would have received.
fn drive<G: Grammar>(s: &mut Session<G>, client: &[u8], server: &[u8], split: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut server_parts = server.chunks(split);
    for part in client.chunks(split) {
        if let Some(sp) = server_parts.next() {
            let _ = s.server_observe(sp);
        }
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
                Some(ClientEvent::Build(_)) => {
                    let _ = s.progress("waiting");
                    out.extend(s.release_held());
                }
                Some(ClientEvent::NeedServer) => match server_parts.next() {
                    Some(sp) => {
                        let _ = s.server_observe(sp);
                    }
                    None => out.extend(s.pass_through()),
                },
                _ => {}
            }
            idle = if a.consumed == 0 { idle + 1 } else { 0 };
            assert!(idle < 1000, "stalled");
        }
    }
    for sp in server_parts {
        let _ = s.server_observe(sp);
    }
    if s.holding() {
        out.extend(s.release_held());
    } else {
        out.extend(s.pass_through());
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let split = usize::from(ctl % 64) + 1;
    let cut = rest.len() * usize::from(ctl >> 6) / 4;
    let (client, server) = rest.split_at(cut.max(rest.len() / 2));
    let mut w = Session::new(Worker::new());
    assert_eq!(drive(&mut w, client, server, split), client);
    let mut v = Session::new(Serve::new());
    assert_eq!(drive(&mut v, client, server, split), client);
    let _ = drv::parse_aterm(data);
});
