//! What the hint parsers share: their verdict on the bytes so far, host
//! names as records spell them, and joining stream chunks.

/// What a parser makes of the bytes it has so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parse<T> {
    Done(T),
    /// Could still be this protocol: wait for more bytes.
    NeedMore,
    /// Not this protocol (or malformed): stop trying.
    NotThis,
}

/// A host name as records spell it: lower-case, no trailing dot; `None` if
/// it is not a plausible DNS name (so junk never becomes a service name).
pub fn normalise_name(raw: &[u8]) -> Option<String> {
    let name = std::str::from_utf8(raw).ok()?.trim_end_matches('.');
    let plausible = !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':' | b'*'));
    plausible.then(|| name.to_ascii_lowercase())
}

/// Chunks given in offset order, joined from offset 0 up to the first gap
/// (overlaps are taken once): TCP segments, QUIC CRYPTO frames.
pub(super) fn contiguous<'a>(chunks: impl Iterator<Item = (u64, &'a [u8])>) -> Vec<u8> {
    let mut out: Vec<u8> = Vec::new();
    for (offset, data) in chunks {
        let Ok(offset) = usize::try_from(offset) else { break };
        if offset > out.len() {
            break;
        }
        let overlap = out.len() - offset;
        if overlap < data.len() {
            out.extend_from_slice(&data[overlap..]);
        }
    }
    out
}
