//! HTTP/1.x: the Host header of the first request, host only (lower-cased,
//! no port). The request line — and so the path and query — is never kept.
use super::parse::{Parse, normalise_name};

const MAX_HEADERS: usize = 64;

pub fn host(stream: &[u8]) -> Parse<Option<String>> {
    if !starts_like_a_request(stream) {
        return Parse::NotThis;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(stream) {
        Ok(httparse::Status::Complete(_)) => {
            let host = request
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("host"))
                .and_then(|h| normalise_name(strip_port(h.value)));
            Parse::Done(host)
        }
        Ok(httparse::Status::Partial) => Parse::NeedMore,
        Err(_) => Parse::NotThis,
    }
}

/// `example.com:8080` → `example.com`; `[2001:db8::1]:80` → `2001:db8::1`.
fn strip_port(value: &[u8]) -> &[u8] {
    if value.first() == Some(&b'[') {
        return match value.iter().position(|&b| b == b']') {
            Some(end) => &value[1..end],
            None => value,
        };
    }
    match value.iter().rposition(|&b| b == b':') {
        Some(colon) if value[colon + 1..].iter().all(u8::is_ascii_digit) => &value[..colon],
        _ => value,
    }
}

/// A method token (upper-case letters) and a space, as far as we have it.
fn starts_like_a_request(stream: &[u8]) -> bool {
    let token_len = stream.iter().take_while(|b| b.is_ascii_uppercase()).count();
    match stream.get(token_len) {
        Some(b' ') => (3..=10).contains(&token_len),
        Some(_) => false,
        None => token_len <= 10,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_without_port_and_lower_cased() {
        let request = b"GET /secret/path?q=private HTTP/1.1\r\nHost: WWW.Example.test:8080\r\nUser-Agent: x\r\n\r\n";
        assert_eq!(host(request), Parse::Done(Some("www.example.test".into())));
        assert_eq!(host(b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n"), Parse::Done(Some("2001:db8::1".into())));
        assert_eq!(host(b"GET / HTTP/1.0\r\n\r\n"), Parse::Done(None));
    }

    #[test]
    fn partial_requests_wait_and_other_bytes_are_not_http() {
        assert_eq!(host(b"GET /index.html HTTP/1.1\r\nHo"), Parse::NeedMore);
        assert_eq!(host(b"PO"), Parse::NeedMore);
        assert_eq!(host(&[0x16, 3, 1]), Parse::NotThis);
        assert_eq!(host(b"SSH-2.0-OpenSSH_9.2\r\n"), Parse::NotThis);
        assert_eq!(host(b"GET / HTTP/1.1\r\n\x00bad\r\n\r\n"), Parse::NotThis);
    }
}
