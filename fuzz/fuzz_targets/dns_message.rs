//! A DNS message as a UDP payload, and the same bytes as a DNS-over-TCP stream.
#![no_main]
use icr::capture::hints::{Parse, dns};
use libfuzzer_sys::fuzz_target;

fn check(message: &dns::Message) {
    // Every name comes out in the one presentation form, whatever octets it held.
    assert!(dns::is_presentation(&message.qname), "{:?}", message.qname);
    assert!(message.answers.iter().all(|a| dns::is_presentation(&a.name)));
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
