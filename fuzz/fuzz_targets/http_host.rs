//! The Host header of the first HTTP/1.x request of a stream.
#![no_main]
use icr::capture::hints::{Parse, http};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Parse::Done(Some(name)) = http::host(data) {
        assert_eq!(icr::capture::hints::normalise_name(name.as_bytes()).as_deref(), Some(name.as_str()));
    }
});
