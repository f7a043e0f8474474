//! A client's TCP stream as TLS records, a bare handshake message, and a
//! ClientHello after a cleartext prelude: never a panic, whatever the bytes.
#![no_main]
use icr::capture::hints::{Parse, tls};
use libfuzzer_sys::fuzz_target;

fn check(parse: Parse<tls::ClientHello>) {
    if let Parse::Done(tls::ClientHello { sni: Some(name), .. }) = parse {
        // What leaves the parser is a normalised name, never raw bytes.
        assert_eq!(icr::capture::hints::normalise_name(name.as_bytes()).as_deref(), Some(name.as_str()));
    }
}

fuzz_target!(|data: &[u8]| {
    check(tls::client_hello(data));
    check(tls::client_hello_message(data));
    check(tls::client_hello_after_prelude(data));
});
