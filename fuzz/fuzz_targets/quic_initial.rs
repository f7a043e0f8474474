//! UDP datagrams of one flow into the Initial decryptor and CRYPTO
//! reassembly. Input: datagrams, each after a 2-byte big-endian length (the
//! last one may be cut short).
#![no_main]
use icr::capture::hints::quic::InitialCrypto;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut crypto = InitialCrypto::default();
    let mut rest = data;
    while let [l0, l1, tail @ ..] = rest {
        let length = usize::from(u16::from_be_bytes([*l0, *l1])).min(tail.len());
        let (datagram, next) = tail.split_at(length);
        let _ = crypto.add_packet(datagram);
        rest = next;
    }
    // The whole input as one datagram too (coalesced packets).
    let _ = InitialCrypto::default().add_packet(data);
});
