//! What `quic_initial` rarely reaches, mutated bytes failing the AEAD tag:
//! the frames inside Initials. The fuzzer writes the plaintext; the target
//! protects it as a client would (RFC 9001 5), so that every packet
//! decrypts and the CRYPTO frame parsing and reassembly see the fuzzer's
//! bytes.
//!
//! Input: packets of
//!   flags: u8   bit 0 QUIC v2 (else v1), bit 1 sent to the server's
//!               connection id (still under the first DCID's keys), bit 2
//!               a new DCID with keys of its own (as after a Retry),
//!               bits 3-7 the packet number
//!   len:   u16  big-endian length of the frames (the last may be cut)
//!   frames
#![no_main]
use icr::capture::hints::quic::{InitialCrypto, SALT_V1, SALT_V2, VERSION_1, VERSION_2};
use libfuzzer_sys::fuzz_target;
use ring::{
    aead::{self, quic::HeaderProtectionKey},
    hkdf,
};

const DCID: [u8; 8] = [0x83, 0x94, 0xc8, 0xf0, 0x3e, 0x51, 0x57, 0x08];
const SERVER_CID: [u8; 5] = [0x5e, 0x4e, 0xe5, 0x0c, 0x1d];
const RETRY_DCID: [u8; 12] = [0x7e; 12];

fn expand_label<const N: usize>(prk: &hkdf::Prk, label: &str) -> [u8; N] {
    struct Len(usize);
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    let full = format!("tls13 {label}");
    let info = [&(N as u16).to_be_bytes()[..], &[full.len() as u8][..], full.as_bytes(), &[0u8][..]];
    let mut out = [0u8; N];
    prk.expand(&info, Len(N)).unwrap().fill(&mut out).unwrap();
    out
}

/// A client Initial to `dcid` carrying `frames`, protected with the keys of `key_dcid`.
fn seal(version: u32, key_dcid: &[u8], dcid: &[u8], packet_number: u32, frames: &[u8]) -> Vec<u8> {
    let (salt, prefix, type_bits) =
        if version == VERSION_1 { (&SALT_V1, "quic", 0x00) } else { (&SALT_V2, "quicv2", 0x10) };
    let initial = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(key_dcid);
    let client = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, &expand_label::<32>(&initial, "client in"));
    let key: [u8; 16] = expand_label(&client, &format!("{prefix} key"));
    let iv: [u8; 12] = expand_label(&client, &format!("{prefix} iv"));
    let hp: [u8; 16] = expand_label(&client, &format!("{prefix} hp"));
    let mut header = vec![0xc0 | type_bits | 0x03];
    header.extend_from_slice(&version.to_be_bytes());
    header.push(dcid.len() as u8);
    header.extend_from_slice(dcid);
    header.extend_from_slice(&[0, 0]); // no SCID, no token
    header.extend_from_slice(&(0x8000_0000 | (4 + frames.len() + 16) as u32).to_be_bytes());
    let pn_offset = header.len();
    header.extend_from_slice(&packet_number.to_be_bytes());
    let mut nonce = iv;
    for (i, byte) in u64::from(packet_number).to_be_bytes().iter().enumerate() {
        nonce[4 + i] ^= byte;
    }
    let mut payload = frames.to_vec();
    aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_128_GCM, &key).unwrap())
        .seal_in_place_append_tag(aead::Nonce::assume_unique_for_key(nonce), aead::Aad::from(&header), &mut payload)
        .unwrap();
    let mut packet = header;
    packet.extend_from_slice(&payload);
    let mask = HeaderProtectionKey::new(&aead::quic::AES_128, &hp)
        .unwrap()
        .new_mask(&packet[pn_offset + 4..pn_offset + 20])
        .unwrap();
    packet[0] ^= mask[0] & 0x0f;
    for i in 0..4 {
        packet[pn_offset + i] ^= mask[1 + i];
    }
    packet
}

fuzz_target!(|data: &[u8]| {
    let mut crypto = InitialCrypto::default();
    let mut rest = data;
    while let [flags, l0, l1, tail @ ..] = rest {
        let length = usize::from(u16::from_be_bytes([*l0, *l1])).min(tail.len());
        let (frames, next) = tail.split_at(length);
        rest = next;
        let version = if flags & 1 != 0 { VERSION_2 } else { VERSION_1 };
        let (key_dcid, dcid): (&[u8], &[u8]) = match flags >> 1 & 3 {
            1 => (&DCID, &SERVER_CID),
            2 | 3 => (&RETRY_DCID, &RETRY_DCID),
            _ => (&DCID, &DCID),
        };
        if let Some(hello) = crypto.add_packet(&seal(version, key_dcid, dcid, u32::from(flags >> 3), frames)) {
            if let Some(name) = hello.sni {
                assert_eq!(icr::capture::hints::normalise_name(name.as_bytes()).as_deref(), Some(name.as_str()));
            }
        }
    }
});
