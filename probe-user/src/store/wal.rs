//! The append log of a day's open block: the records acknowledged but not
//! yet sealed into a compressed block. Each append is one checksummed frame,
//! synced before the store says the records are stored; reading stops at
//! the first torn or damaged frame (a crash mid-write) and cuts it off.
//!
//! The header names the block number the log's records will be sealed into:
//! after a crash between sealing blocks and rewriting the log, recovery skips
//! the records those blocks already hold (see `Store::open`).
use std::{
    fs::{File, OpenOptions},
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

use crate::{icr::Icr, store::codec};

const MAGIC: &[u8; 8] = b"ICRWAL1\n";
const HEADER: usize = MAGIC.len() + 4;
/// A frame may not claim more than this: a damaged length is a torn tail.
const MAX_FRAME: usize = 256 << 20;

pub struct Wal {
    file: File,
    path: PathBuf,
}

/// What a log held when it was read back.
pub struct Recovered {
    /// The block its records will be sealed into.
    pub base_block: u32,
    pub records: Vec<Icr>,
    /// Bytes cut from a torn or damaged tail.
    pub cut: u64,
}

impl Wal {
    /// Writes a new log (atomically replacing any old one) holding `records`.
    pub fn create(path: &Path, base_block: u32, records: &[Icr]) -> Result<Self> {
        let temporary = path.with_extension("tmp");
        let mut file = File::create(&temporary).with_context(|| format!("creating {}", temporary.display()))?;
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&base_block.to_le_bytes());
        if !records.is_empty() {
            frame(&mut bytes, records)?;
        }
        file.write_all(&bytes).and_then(|()| file.sync_all()).with_context(|| format!("writing {}", temporary.display()))?;
        std::fs::rename(&temporary, path).with_context(|| format!("renaming {} into place", temporary.display()))?;
        sync_dir(path)?;
        let file = OpenOptions::new().append(true).open(path).with_context(|| format!("opening {}", path.display()))?;
        Ok(Self { file, path: path.to_owned() })
    }

    /// Reopens a log that [`Wal::read`] has checked (and cut) for appending.
    pub fn reopen(path: &Path) -> Result<Self> {
        let file = OpenOptions::new().append(true).open(path).with_context(|| format!("opening {}", path.display()))?;
        Ok(Self { file, path: path.to_owned() })
    }

    /// Appends one frame and syncs it: when this returns, the records are durable.
    pub fn append(&mut self, records: &[Icr]) -> Result<()> {
        let mut bytes = Vec::new();
        frame(&mut bytes, records)?;
        self.file
            .write_all(&bytes)
            .and_then(|()| self.file.sync_data())
            .with_context(|| format!("appending to {}", self.path.display()))
    }

    /// Reads a log back, cutting off a torn or damaged tail.
    pub fn read(path: &Path) -> Result<Recovered> {
        let mut bytes = Vec::new();
        File::open(path)
            .and_then(|mut file| file.read_to_end(&mut bytes))
            .with_context(|| format!("reading {}", path.display()))?;
        if bytes.len() < HEADER || &bytes[..MAGIC.len()] != MAGIC {
            bail!("{} is not an icr append log", path.display());
        }
        let base_block = u32::from_le_bytes(bytes[MAGIC.len()..HEADER].try_into()?);
        let mut records = Vec::new();
        let mut offset = HEADER;
        while let Some((payload, next)) = next_frame(&bytes, offset) {
            match codec::decode(payload) {
                Ok(mut frame) => records.append(&mut frame),
                Err(_) => break,
            }
            offset = next;
        }
        let cut = (bytes.len() - offset) as u64;
        if cut > 0 {
            let file = OpenOptions::new().write(true).open(path).with_context(|| format!("opening {}", path.display()))?;
            file.set_len(offset as u64)
                .and_then(|()| file.sync_all())
                .with_context(|| format!("cutting the torn tail of {}", path.display()))?;
        }
        Ok(Recovered { base_block, records, cut })
    }
}

fn frame(out: &mut Vec<u8>, records: &[Icr]) -> Result<()> {
    let payload = codec::encode(records, false)?;
    out.extend_from_slice(&u32::try_from(payload.len())?.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(())
}

/// The payload of the frame at `offset` and where the next one starts, if
/// the frame is whole and its checksum right.
fn next_frame(bytes: &[u8], offset: usize) -> Option<(&[u8], usize)> {
    let header = bytes.get(offset..offset + 8)?;
    let length = u32::from_le_bytes(header[..4].try_into().ok()?) as usize;
    let checksum = u32::from_le_bytes(header[4..].try_into().ok()?);
    if length > MAX_FRAME {
        return None;
    }
    let payload = bytes.get(offset + 8..offset + 8 + length)?;
    (crc32fast::hash(payload) == checksum).then_some((payload, offset + 8 + length))
}

/// Makes a rename in `path`'s directory durable.
fn sync_dir(path: &Path) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("syncing {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_records::samples;

    #[test]
    fn appended_frames_read_back_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("day.log");
        let records = samples(30);
        let mut wal = Wal::create(&path, 7, &records[..10]).unwrap();
        wal.append(&records[10..20]).unwrap();
        wal.append(&records[20..]).unwrap();
        drop(wal);
        let whole = std::fs::metadata(&path).unwrap().len();
        let back = Wal::read(&path).unwrap();
        assert_eq!((back.base_block, back.cut), (7, 0));
        assert_eq!(back.records, records);

        // A crash mid-append leaves part of a frame: it is cut, the rest kept.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(whole - 5).unwrap();
        let back = Wal::read(&path).unwrap();
        assert_eq!(back.records, records[..20]);
        assert!(back.cut > 0);
        Wal::reopen(&path).unwrap().append(&records[20..]).unwrap();
        assert_eq!(Wal::read(&path).unwrap().records, records);

        // A damaged frame ends the log where it starts.
        let mut bytes = std::fs::read(&path).unwrap();
        let middle = bytes.len() - 20;
        bytes[middle] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(Wal::read(&path).unwrap().records, records[..20]);
        std::fs::write(&path, b"not a log").unwrap();
        assert!(Wal::read(&path).is_err());
    }
}
