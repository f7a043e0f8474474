//! A DNS message as a UDP payload, and the same bytes as a DNS-over-TCP stream.
#![no_main]
use icr::capture::hints::{Parse, dns};
use libfuzzer_sys::fuzz_target;

fn check(message: &dns::Message) {
    let plain = |name: &str| icr::capture::hints::normalise_name(name.as_bytes()).as_deref() == Some(name);
    assert!(plain(&message.qname));
    assert!(message.answers.iter().all(|a| plain(&a.name)));
}

fuzz_target!(|data: &[u8]| {
    if let Some(message) = dns::message(data) {
        check(&message);
    }
    if let Parse::Done(messages) = dns::tcp_messages(data) {
        assert!(!messages.is_empty());
        messages.iter().for_each(check);
    }
});
