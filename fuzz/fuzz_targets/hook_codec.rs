//! Fuzzes the build-hook decoder with arbitrary daemon input: the settings handshake, then
//! `try` requests, then inputs and wanted outputs. It must never panic nor allocate without
//! bound, and whatever it decodes must re-encode to a stream that decodes to the same values.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nixdispatch::hook::codec::{self, Request};

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    let Ok(settings) = codec::read_settings(&mut r) else {
        return;
    };
    let mut buf = Vec::new();
    codec::write_settings(&mut buf, &settings);
    assert_eq!(codec::read_settings(&mut buf.as_slice()).unwrap(), settings);
    while let Ok(Request::Try(t)) = codec::read_request(&mut r) {
        let mut buf = Vec::new();
        codec::write_try(&mut buf, &t);
        assert_eq!(
            codec::read_request(&mut buf.as_slice()).unwrap(),
            Request::Try(t)
        );
        if let Ok(inputs) = codec::read_build_inputs(&mut r) {
            let mut buf = Vec::new();
            codec::write_build_inputs(&mut buf, &inputs);
            assert_eq!(
                codec::read_build_inputs(&mut buf.as_slice()).unwrap(),
                inputs
            );
        }
    }
    // Child output lines too: classification must never panic.
    for line in String::from_utf8_lossy(data).lines() {
        let _ = codec::classify_child_line(line);
        let _ = codec::log_line_text(line);
    }
});
