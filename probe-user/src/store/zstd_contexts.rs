//! zstd with one compression and one decompression context per thread.
//! `zstd::bulk::{compress, decompress}` make a context a call, and making
//! one (~100 KiB, initialised) cost more than decompressing a block's small
//! column: a question reading thousands of blocks spent 15% of its time
//! there.
use std::cell::RefCell;

use zstd::bulk::{Compressor, Decompressor};

thread_local! {
    static COMPRESSOR: RefCell<Option<(i32, Compressor<'static>)>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<Decompressor<'static>>> = const { RefCell::new(None) };
}

/// `data` compressed at `level`, as `zstd::bulk::compress` would.
pub fn compress(data: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with_borrow_mut(|slot| {
        let compressor = match slot {
            Some((made_at, compressor)) if *made_at == level => compressor,
            _ => &mut slot.insert((level, Compressor::new(level)?)).1,
        };
        compressor.compress(data)
    })
}

/// `data` decompressed, at most `capacity` bytes, as
/// `zstd::bulk::decompress` would.
pub fn decompress(data: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with_borrow_mut(|slot| {
        let decompressor = match slot {
            Some(decompressor) => decompressor,
            None => slot.insert(Decompressor::new()?),
        };
        decompressor.decompress(data, capacity)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn what_one_context_compresses_another_decompresses_and_a_damaged_frame_fails_cleanly() {
        let text: Vec<u8> = (0..50_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        for level in [1, 3, 1] {
            let packed = super::compress(&text, level).unwrap();
            assert_eq!(packed, zstd::bulk::compress(&text, level).unwrap(), "the same frame as a fresh context's");
            assert_eq!(super::decompress(&packed, text.len()).unwrap(), text);
            assert!(super::decompress(&packed[..packed.len() / 2], text.len()).is_err());
            // The context survives a failure: the next frame decodes.
            assert_eq!(super::decompress(&packed, text.len()).unwrap(), text);
            assert!(super::decompress(&packed, text.len() - 1).is_err(), "too small a capacity fails");
        }
    }
}
