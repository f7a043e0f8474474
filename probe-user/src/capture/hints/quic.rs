//! QUIC Initial packets (v1, RFC 9000/9001; v2, RFC 9369): their keys come
//! from the client's destination connection id, so a passive observer can
//! remove header protection, decrypt them and read the ClientHello from the
//! CRYPTO frames — also when it spans several Initials or arrives out of
//! order. Only the SNI is kept.
use std::collections::{BTreeMap, HashMap};

use ring::{
    aead::{self, quic::HeaderProtectionKey},
    hkdf,
};

use super::{
    parse::{Parse, contiguous},
    tls,
};

/// QUIC versions 1 (RFC 9000) and 2 (RFC 9369), and their Initial salts
/// (RFC 9001 §5.2, RFC 9369 §3.3.1); public for the fuzz target that seals
/// Initials.
pub const VERSION_1: u32 = 0x0000_0001;
pub const VERSION_2: u32 = 0x6b33_43cf;
pub const SALT_V1: [u8; 20] = [
    0x38, 0x76, 0x2c, 0xf7, 0xf5, 0x59, 0x34, 0xb3, 0x4d, 0x17, 0x9a, 0xe6, 0xa4, 0xc8, 0x0c, 0xad, 0xcc, 0xbb, 0x7f,
    0x0a,
];
pub const SALT_V2: [u8; 20] = [
    0x0d, 0xed, 0xe3, 0xde, 0xf7, 0x00, 0xa6, 0xdb, 0x81, 0x93, 0x81, 0xbe, 0x6e, 0x26, 0x9d, 0xcb, 0xf9, 0xbd, 0x2e,
    0xd9,
];
/// CRYPTO bytes buffered per flow before giving up.
const MAX_CRYPTO: usize = 16 * 1024;
const MAX_CID_LEN: usize = 20;

/// The client's Initial keys for one destination connection id.
pub struct InitialKeys {
    key: aead::LessSafeKey,
    iv: [u8; 12],
    header: HeaderProtectionKey,
}

impl InitialKeys {
    pub fn derive(version: u32, dcid: &[u8]) -> Option<Self> {
        let (salt, prefix) = match version {
            VERSION_1 => (&SALT_V1, "quic"),
            VERSION_2 => (&SALT_V2, "quicv2"),
            _ => return None,
        };
        let initial = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(dcid);
        let client: [u8; 32] = expand_label(&initial, "client in")?;
        let client = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, &client);
        let key: [u8; 16] = expand_label(&client, &format!("{prefix} key"))?;
        let iv: [u8; 12] = expand_label(&client, &format!("{prefix} iv"))?;
        let hp: [u8; 16] = expand_label(&client, &format!("{prefix} hp"))?;
        Some(Self {
            key: aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_128_GCM, &key).ok()?),
            iv,
            header: HeaderProtectionKey::new(&aead::quic::AES_128, &hp).ok()?,
        })
    }
}

/// HKDF-Expand-Label (RFC 8446 7.1) with an empty context.
fn expand_label<const N: usize>(prk: &hkdf::Prk, label: &str) -> Option<[u8; N]> {
    struct Len(usize);
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    let full = format!("tls13 {label}");
    let length = (N as u16).to_be_bytes();
    let label_len = [full.len() as u8];
    let context_len = [0u8];
    let info = [&length[..], &label_len[..], full.as_bytes(), &context_len[..]];
    let mut out = [0u8; N];
    prk.expand(&info, Len(N)).ok()?.fill(&mut out).ok()?;
    Some(out)
}

/// The CRYPTO stream of a flow's client Initials, reassembled by offset.
#[derive(Default)]
pub struct InitialCrypto {
    chunks: BTreeMap<u64, Vec<u8>>,
    bytes: usize,
    keys: HashMap<Vec<u8>, Option<InitialKeys>>,
    /// The DCID of the client's first Initial: its keys stay in use when the
    /// client switches to the server's connection id (RFC 9001 5.2).
    first_dcid: Option<Vec<u8>>,
    done: bool,
}

impl InitialCrypto {
    /// Takes one UDP payload; returns the ClientHello once it is complete.
    pub fn add_packet(&mut self, datagram: &[u8]) -> Option<tls::ClientHello> {
        if self.done {
            return None;
        }
        let mut rest = datagram;
        // A datagram may carry several coalesced packets.
        while let Some(packet) = LongHeader::parse(rest) {
            if packet.is_initial() {
                match self.decrypt(&packet) {
                    Some(plain) => self.crypto_frames(&plain),
                    None => log::debug!("quic: an Initial did not decrypt"),
                }
            }
            rest = &rest[packet.total_len..];
        }
        let stream = self.contiguous();
        log::debug!("quic: {} contiguous CRYPTO bytes of {} buffered", stream.len(), self.bytes);
        match tls::client_hello_message(&stream) {
            Parse::Done(hello) => {
                self.done = true;
                self.chunks.clear();
                Some(hello)
            }
            _ => None,
        }
    }

    /// Decrypts with the keys of the first DCID, or, after a Retry (when
    /// the client starts over with a new DCID), with the packet's own.
    fn decrypt(&mut self, packet: &LongHeader) -> Option<Vec<u8>> {
        let first = self.first_dcid.get_or_insert_with(|| packet.dcid.to_vec()).clone();
        let mut candidates = vec![first];
        if candidates[0] != packet.dcid {
            candidates.push(packet.dcid.to_vec());
        }
        candidates.into_iter().find_map(|dcid| {
            let keys = self.keys.entry(dcid).or_insert_with_key(|dcid| InitialKeys::derive(packet.version, dcid));
            open(keys.as_ref()?, packet)
        })
    }

    /// Collects the CRYPTO frames of a decrypted Initial payload.
    fn crypto_frames(&mut self, mut payload: &[u8]) {
        while let Some((&kind, rest)) = payload.split_first() {
            payload = rest;
            match kind {
                0x00 | 0x01 => {} // PADDING, PING
                0x02 | 0x03 => {
                    // ACK: largest, delay, range count, first range, ranges (, ECN counts).
                    let Some(rest) = skip_ack(payload, kind == 0x03) else { return };
                    payload = rest;
                }
                0x06 => {
                    let Some((offset, rest)) = varint(payload) else { return };
                    let Some((length, rest)) = varint(rest) else { return };
                    let Some(data) = rest.get(..usize::try_from(length).unwrap_or(usize::MAX)) else { return };
                    if self.bytes + data.len() <= MAX_CRYPTO && !self.chunks.contains_key(&offset) {
                        self.bytes += data.len();
                        self.chunks.insert(offset, data.to_vec());
                    }
                    payload = &rest[data.len()..];
                }
                // CONNECTION_CLOSE or anything else: nothing more for us here.
                _ => return,
            }
        }
    }

    fn contiguous(&self) -> Vec<u8> {
        contiguous(self.chunks.iter().map(|(&offset, data)| (offset, data.as_slice())))
    }
}

/// Removes header protection and decrypts one Initial with `keys`.
fn open(keys: &InitialKeys, packet: &LongHeader) -> Option<Vec<u8>> {
    let bytes = packet.bytes;
    let pn_offset = packet.pn_offset;
    let sample = bytes.get(pn_offset + 4..pn_offset + 20)?;
    let mask = keys.header.new_mask(sample).ok()?;
    let first = bytes[0] ^ (mask[0] & 0x0f);
    let pn_len = usize::from(first & 0x03) + 1;
    let mut header = bytes.get(..pn_offset + pn_len)?.to_vec();
    header[0] = first;
    let mut packet_number = 0u64;
    for i in 0..pn_len {
        header[pn_offset + i] ^= mask[1 + i];
        packet_number = packet_number << 8 | u64::from(header[pn_offset + i]);
    }
    let mut nonce = keys.iv;
    for (i, byte) in packet_number.to_be_bytes().iter().enumerate() {
        nonce[4 + i] ^= byte;
    }
    let mut payload = bytes.get(pn_offset + pn_len..packet.total_len)?.to_vec();
    let plain_len = keys
        .key
        .open_in_place(aead::Nonce::assume_unique_for_key(nonce), aead::Aad::from(&header), &mut payload)
        .ok()?
        .len();
    payload.truncate(plain_len);
    Some(payload)
}

/// A long-header packet, as far as finding its Initial payload needs.
struct LongHeader<'a> {
    bytes: &'a [u8],
    version: u32,
    dcid: &'a [u8],
    initial_type: bool,
    pn_offset: usize,
    /// Header + packet number + payload: where the next coalesced packet starts.
    total_len: usize,
}

impl<'a> LongHeader<'a> {
    fn parse(bytes: &'a [u8]) -> Option<Self> {
        let first = *bytes.first()?;
        if first & 0x80 == 0 {
            return None; // short header: 1-RTT, nothing for us
        }
        let version = u32::from_be_bytes(bytes.get(1..5)?.try_into().ok()?);
        let dcid_len = usize::from(*bytes.get(5)?);
        if dcid_len > MAX_CID_LEN {
            return None;
        }
        let dcid = bytes.get(6..6 + dcid_len)?;
        let mut at = 6 + dcid_len;
        let scid_len = usize::from(*bytes.get(at)?);
        at += 1 + scid_len;
        let packet_type = (first & 0x30) >> 4;
        let initial_type = match version {
            VERSION_1 => packet_type == 0,
            VERSION_2 => packet_type == 1,
            _ => return None,
        };
        let retry_type = match version {
            VERSION_2 => 0,
            _ => 3,
        };
        if packet_type == retry_type {
            return None; // Retry: no Length field, nothing of the client's
        }
        if initial_type {
            let (token_len, rest) = varint(bytes.get(at..)?)?;
            at = bytes.len() - rest.len() + usize::try_from(token_len).ok()?;
        }
        let (length, rest) = varint(bytes.get(at..)?)?;
        let pn_offset = bytes.len() - rest.len();
        let total_len = pn_offset.checked_add(usize::try_from(length).ok()?)?;
        if total_len > bytes.len() {
            return None;
        }
        Some(Self { bytes, version, dcid, initial_type, pn_offset, total_len })
    }

    fn is_initial(&self) -> bool {
        self.initial_type
    }
}

/// A QUIC variable-length integer (RFC 9000 16).
fn varint(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let first = *bytes.first()?;
    let len = 1usize << (first >> 6);
    let raw = bytes.get(..len)?;
    let mut value = u64::from(first & 0x3f);
    for byte in &raw[1..] {
        value = value << 8 | u64::from(*byte);
    }
    Some((value, &bytes[len..]))
}

fn skip_ack(bytes: &[u8], ecn: bool) -> Option<&[u8]> {
    let (_largest, rest) = varint(bytes)?;
    let (_delay, rest) = varint(rest)?;
    let (ranges, rest) = varint(rest)?;
    let (_first, mut rest) = varint(rest)?;
    for _ in 0..ranges.min(256) {
        let (_gap, r) = varint(rest)?;
        let (_len, r) = varint(r)?;
        rest = r;
    }
    if ecn {
        for _ in 0..3 {
            rest = varint(rest)?.1;
        }
    }
    Some(rest)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const DCID: [u8; 8] = [0x83, 0x94, 0xc8, 0xf0, 0x3e, 0x51, 0x57, 0x08];

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap()).collect()
    }

    /// The keys of RFC 9001 A.1 and RFC 9369 A.1, through the same derivation.
    #[test]
    fn key_derivation_matches_the_rfc_vectors() {
        for (version, key, iv, hp) in [
            (
                VERSION_1,
                "1f369613dd76d5467730efcbe3b1a22d",
                "fa044b2f42a3fd3b46fb255c",
                "9f50449e04a0e810283a1e9933adedd2",
            ),
            (
                VERSION_2,
                "8b1a0bc121284290a29e0971b5cd045d",
                "91f73e2351d8fa91660e909f",
                "45b95e15235d6f45a6b19cbcb0294ba9",
            ),
        ] {
            let prefix = if version == VERSION_1 { "quic" } else { "quicv2" };
            let salt = if version == VERSION_1 { &SALT_V1 } else { &SALT_V2 };
            let initial = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(&DCID);
            let client: [u8; 32] = expand_label(&initial, "client in").unwrap();
            let client = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, &client);
            assert_eq!(expand_label::<16>(&client, &format!("{prefix} key")).unwrap().to_vec(), hex(key));
            assert_eq!(expand_label::<12>(&client, &format!("{prefix} iv")).unwrap().to_vec(), hex(iv));
            assert_eq!(expand_label::<16>(&client, &format!("{prefix} hp")).unwrap().to_vec(), hex(hp));
        }
    }

    /// Builds a protected client Initial carrying `frames`, as a client would.
    pub fn initial(version: u32, dcid: &[u8], packet_number: u32, frames: &[u8]) -> Vec<u8> {
        sealed_initial(version, dcid, dcid, packet_number, frames)
    }

    /// An Initial sent to `header_dcid`, sealed with the keys of `key_dcid`.
    pub fn sealed_initial(version: u32, key_dcid: &[u8], dcid: &[u8], packet_number: u32, frames: &[u8]) -> Vec<u8> {
        let prefix = if version == VERSION_1 { "quic" } else { "quicv2" };
        let salt = if version == VERSION_1 { &SALT_V1 } else { &SALT_V2 };
        let initial = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(key_dcid);
        let client: [u8; 32] = expand_label(&initial, "client in").unwrap();
        let client = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, &client);
        let key: [u8; 16] = expand_label(&client, &format!("{prefix} key")).unwrap();
        let iv: [u8; 12] = expand_label(&client, &format!("{prefix} iv")).unwrap();
        let hp: [u8; 16] = expand_label(&client, &format!("{prefix} hp")).unwrap();
        let type_bits = if version == VERSION_1 { 0x00 } else { 0x10 };
        let mut payload = frames.to_vec();
        payload.resize(payload.len().max(1162), 0); // PADDING, as clients pad to 1200
        let length = 4 + payload.len() + 16;
        let mut header = vec![0xc0 | type_bits | 0x03];
        header.extend_from_slice(&version.to_be_bytes());
        header.push(dcid.len() as u8);
        header.extend_from_slice(dcid);
        header.extend_from_slice(&[0, 0]); // no SCID, no token
        header.extend_from_slice(&(0x4000 | length as u16).to_be_bytes());
        let pn_offset = header.len();
        header.extend_from_slice(&packet_number.to_be_bytes());
        let mut nonce = iv;
        for (i, byte) in u64::from(packet_number).to_be_bytes().iter().enumerate() {
            nonce[4 + i] ^= byte;
        }
        let key = aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_128_GCM, &key).unwrap());
        key.seal_in_place_append_tag(aead::Nonce::assume_unique_for_key(nonce), aead::Aad::from(&header), &mut payload)
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

    pub fn crypto_frame(offset: u64, data: &[u8]) -> Vec<u8> {
        let mut frame =
            vec![0x06, 0x80 | (offset >> 24) as u8, (offset >> 16) as u8, (offset >> 8) as u8, offset as u8];
        frame.extend_from_slice(&(0x4000 | data.len() as u16).to_be_bytes());
        frame.extend_from_slice(data);
        frame
    }

    fn hello(name: &str, padding: usize) -> Vec<u8> {
        tls::tests::client_hello_bytes(Some(name), &[(21, vec![0; padding])])
    }

    #[test]
    fn sni_from_one_initial_v1_and_v2() {
        for version in [VERSION_1, VERSION_2] {
            let message = hello("quic.example.com", 0);
            let mut crypto = InitialCrypto::default();
            let hello = crypto.add_packet(&initial(version, &DCID, 0, &crypto_frame(0, &message))).expect("decrypted");
            assert_eq!(hello.sni.as_deref(), Some("quic.example.com"), "version {version:#x}");
        }
    }

    #[test]
    fn a_client_hello_over_two_initials_out_of_order_with_an_ack() {
        let message = hello("split.quic.example", 1800);
        let (a, b) = message.split_at(1000);
        let mut crypto = InitialCrypto::default();
        let mut second = vec![0x02, 0x00, 0x00, 0x00, 0x00]; // an ACK before the CRYPTO frame
        second.extend_from_slice(&crypto_frame(1000, b));
        assert!(crypto.add_packet(&initial(VERSION_1, &DCID, 1, &second)).is_none());
        let hello = crypto.add_packet(&initial(VERSION_1, &DCID, 0, &crypto_frame(0, a))).expect("complete");
        assert_eq!(hello.sni.as_deref(), Some("split.quic.example"));
        assert!(crypto.add_packet(&initial(VERSION_1, &DCID, 2, &crypto_frame(0, a))).is_none(), "once");
    }

    #[test]
    fn keys_stay_those_of_the_first_dcid_when_the_client_switches_ids() {
        let message = hello("switch.quic.example", 1500);
        let (a, b) = message.split_at(900);
        let mut crypto = InitialCrypto::default();
        assert!(crypto.add_packet(&initial(VERSION_1, &DCID, 0, &crypto_frame(0, a))).is_none());
        // The next Initial goes to the server's id, still under the first keys.
        let packet = sealed_initial(VERSION_1, &DCID, &[0xaa; 8], 1, &crypto_frame(900, b));
        let hello = crypto.add_packet(&packet).expect("decrypted with the first DCID's keys");
        assert_eq!(hello.sni.as_deref(), Some("switch.quic.example"));
    }

    #[test]
    fn garbage_short_headers_and_tampering_give_nothing() {
        let mut crypto = InitialCrypto::default();
        assert!(crypto.add_packet(&[]).is_none());
        assert!(crypto.add_packet(&[0x40, 1, 2, 3]).is_none());
        assert!(crypto.add_packet(&[0xc0, 0, 0, 0, 1, 255]).is_none());
        assert!(crypto.add_packet(&[0xc0, 0xfa, 0xce, 0xb0, 0x0c, 0, 0, 0, 0]).is_none(), "unknown version");
        let mut packet = initial(VERSION_1, &DCID, 0, &crypto_frame(0, &hello("x.example", 0)));
        let last = packet.len() - 1;
        packet[last] ^= 1;
        assert!(crypto.add_packet(&packet).is_none(), "the AEAD tag fails");
        for cut in [10, 30, 100] {
            assert!(InitialCrypto::default().add_packet(&packet[..cut]).is_none());
        }
    }
}
