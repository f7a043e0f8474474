//! TLS: the server name (SNI) of a ClientHello, reassembled from however
//! many TLS records and TCP segments it spans. With Encrypted Client Hello
//! the SNI seen is the outer, public name; `ech` says so.
use tls_parser::{TlsMessage, TlsMessageHandshake, parse_tls_message_handshake};

use super::parse::{Parse, normalise_name};

const CONTENT_HANDSHAKE: u8 = 22;
const EXTENSION_SERVER_NAME: u16 = 0;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// encrypted_client_hello (draft-ietf-tls-esni), and the older ESNI.
const EXTENSION_ECH: u16 = 0xfe0d;
const EXTENSION_ESNI: u16 = 0xffce;
/// No ClientHello is this large; a stream claiming more is not one.
const MAX_CLIENT_HELLO: usize = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientHello {
    pub sni: Option<String>,
    pub ech: bool,
}

/// Reads a ClientHello from the start of a client's TCP stream (TLS records).
pub fn client_hello(stream: &[u8]) -> Parse<ClientHello> {
    let mut handshake = Vec::new();
    let mut rest = stream;
    loop {
        if let Some(needed) = handshake_len(&handshake) {
            if needed > MAX_CLIENT_HELLO {
                return Parse::NotThis;
            }
            if handshake.len() >= needed {
                return client_hello_message(&handshake[..needed]);
            }
        }
        if rest.len() < 5 {
            return if looks_like_handshake_record(rest) { Parse::NeedMore } else { Parse::NotThis };
        }
        if !looks_like_handshake_record(rest) {
            return Parse::NotThis;
        }
        let length = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        let available = rest.len() - 5;
        handshake.extend_from_slice(&rest[5..5 + length.min(available)]);
        if available < length {
            // The record itself is cut: is what we have already enough?
            return match handshake_len(&handshake) {
                Some(needed) if handshake.len() >= needed => client_hello_message(&handshake[..needed]),
                _ => Parse::NeedMore,
            };
        }
        rest = &rest[5 + length..];
    }
}

/// A ClientHello after a cleartext prelude (STARTTLS in SMTP/IMAP/XMPP/LDAP,
/// a SOCKS handshake): the first handshake record that starts one.
pub fn client_hello_after_prelude(stream: &[u8]) -> Parse<ClientHello> {
    let starts = stream
        .windows(6)
        .enumerate()
        .filter(|(_, w)| w[0] == CONTENT_HANDSHAKE && w[1] == 3 && w[2] <= 4 && w[5] == HANDSHAKE_CLIENT_HELLO);
    for (at, _) in starts {
        match client_hello(&stream[at..]) {
            Parse::NotThis => continue,
            found => return found,
        }
    }
    Parse::NeedMore
}

/// A ClientHello handshake message (from a TLS stream or QUIC CRYPTO frames).
pub fn client_hello_message(message: &[u8]) -> Parse<ClientHello> {
    if message.first() != Some(&HANDSHAKE_CLIENT_HELLO) {
        return Parse::NotThis;
    }
    let Ok((_, TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)))) = parse_tls_message_handshake(message)
    else {
        return Parse::NotThis;
    };
    // Extensions are walked one by one (type, length, data), so that one
    // extension tls-parser does not know how to read cannot hide the SNI.
    let mut result = ClientHello { sni: None, ech: false };
    let mut rest = hello.ext.unwrap_or_default();
    while let [t0, t1, l0, l1, tail @ ..] = rest {
        let kind = u16::from_be_bytes([*t0, *t1]);
        let length = usize::from(u16::from_be_bytes([*l0, *l1]));
        let Some(data) = tail.get(..length) else { break };
        match kind {
            EXTENSION_SERVER_NAME => result.sni = host_name(data),
            EXTENSION_ECH | EXTENSION_ESNI => result.ech = true,
            _ => {}
        }
        rest = &tail[length..];
    }
    Parse::Done(result)
}

/// The host_name entry of a server_name extension (RFC 6066 3).
fn host_name(data: &[u8]) -> Option<String> {
    let [l0, l1, list @ ..] = data else { return None };
    let mut list = list.get(..usize::from(u16::from_be_bytes([*l0, *l1])))?;
    while let [kind, n0, n1, tail @ ..] = list {
        let length = usize::from(u16::from_be_bytes([*n0, *n1]));
        let name = tail.get(..length)?;
        if *kind == 0 {
            return normalise_name(name);
        }
        list = &tail[length..];
    }
    None
}

fn looks_like_handshake_record(bytes: &[u8]) -> bool {
    match bytes {
        [] => true,
        [content] => *content == CONTENT_HANDSHAKE,
        [content, major, ..] => *content == CONTENT_HANDSHAKE && *major == 3,
    }
}

/// The length of the first handshake message, header included, once known.
fn handshake_len(handshake: &[u8]) -> Option<usize> {
    match handshake {
        [_, a, b, c, ..] => Some(4 + (usize::from(*a) << 16 | usize::from(*b) << 8 | usize::from(*c))),
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ClientHello handshake message with the given extensions.
    pub fn client_hello_bytes(sni: Option<&str>, extra_extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut extensions = Vec::new();
        if let Some(name) = sni {
            let mut list = vec![0u8];
            list.extend_from_slice(&(name.len() as u16).to_be_bytes());
            list.extend_from_slice(name.as_bytes());
            let mut data = (list.len() as u16).to_be_bytes().to_vec();
            data.extend_from_slice(&list);
            extensions.extend_from_slice(&0u16.to_be_bytes());
            extensions.extend_from_slice(&(data.len() as u16).to_be_bytes());
            extensions.extend_from_slice(&data);
        }
        for (kind, data) in extra_extensions {
            extensions.extend_from_slice(&kind.to_be_bytes());
            extensions.extend_from_slice(&(data.len() as u16).to_be_bytes());
            extensions.extend_from_slice(data);
        }
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0x11; 32]); // random
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[1, 0]); // null compression
        body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
        body.extend_from_slice(&extensions);
        let mut message = vec![HANDSHAKE_CLIENT_HELLO];
        message.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        message.extend_from_slice(&body);
        message
    }

    /// The message in TLS records of at most `record_size` bytes each.
    pub fn in_records(message: &[u8], record_size: usize) -> Vec<u8> {
        let mut stream = Vec::new();
        for chunk in message.chunks(record_size) {
            stream.extend_from_slice(&[CONTENT_HANDSHAKE, 3, 1]);
            stream.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            stream.extend_from_slice(chunk);
        }
        stream
    }

    #[test]
    fn sni_from_one_record_and_lower_cased() {
        let stream = in_records(&client_hello_bytes(Some("Mail.Example.COM"), &[]), 16384);
        assert_eq!(
            client_hello(&stream),
            Parse::Done(ClientHello { sni: Some("mail.example.com".into()), ech: false })
        );
    }

    #[test]
    fn a_client_hello_padded_past_two_segments_needs_all_of_them() {
        let padding = (21u16, vec![0u8; 3000]);
        let stream = in_records(&client_hello_bytes(Some("big.example.net"), &[padding]), 16384);
        for cut in [1, 5, 100, 1448, 2896, stream.len() - 1] {
            assert_eq!(client_hello(&stream[..cut]), Parse::NeedMore, "cut at {cut}");
        }
        assert!(
            matches!(client_hello(&stream), Parse::Done(ClientHello { sni: Some(ref n), .. }) if n == "big.example.net")
        );
    }

    #[test]
    fn a_handshake_split_over_several_records() {
        let stream = in_records(&client_hello_bytes(Some("split.example.org"), &[]), 30);
        assert!(
            matches!(client_hello(&stream), Parse::Done(ClientHello { sni: Some(ref n), .. }) if n == "split.example.org")
        );
    }

    #[test]
    fn ech_and_no_sni() {
        let stream =
            in_records(&client_hello_bytes(Some("public.example.com"), &[(EXTENSION_ECH, vec![0; 40])]), 16384);
        assert_eq!(
            client_hello(&stream),
            Parse::Done(ClientHello { sni: Some("public.example.com".into()), ech: true })
        );
        let stream = in_records(&client_hello_bytes(None, &[]), 16384);
        assert_eq!(client_hello(&stream), Parse::Done(ClientHello { sni: None, ech: false }));
    }

    #[test]
    fn after_a_starttls_prelude() {
        let mut stream = b"EHLO client.example\r\nSTARTTLS\r\n".to_vec();
        assert_eq!(client_hello_after_prelude(&stream), Parse::NeedMore);
        stream.extend(in_records(&client_hello_bytes(Some("smtp.example.net"), &[]), 16384));
        assert!(
            matches!(client_hello_after_prelude(&stream), Parse::Done(ClientHello { sni: Some(ref n), .. }) if n == "smtp.example.net")
        );
    }

    #[test]
    fn other_protocols_and_garbage_are_not_tls() {
        assert_eq!(client_hello(b"GET / HTTP/1.1\r\n"), Parse::NotThis);
        assert_eq!(client_hello(&[0x16, 3, 1, 0, 4, 2, 0, 0, 0]), Parse::NotThis, "a ServerHello");
        assert_eq!(client_hello(&[0x16, 3, 1, 0, 4, 1, 0xff, 0xff, 0xff]), Parse::NotThis, "absurd length");
        assert_eq!(client_hello(&[0x16, 3, 1, 0, 8, 1, 0, 0, 4, 9, 9, 9, 9]), Parse::NotThis, "bad body");
        assert_eq!(client_hello(&[0x16]), Parse::NeedMore);
        assert_eq!(client_hello(&[]), Parse::NeedMore);
    }
}
