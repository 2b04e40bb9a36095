//! Fuzzes the WebSocket client-frame parser: any bytes a client can send must parse to a
//! frame or a documented error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = apex_server::ws::frames::parse(text);
    }
});
