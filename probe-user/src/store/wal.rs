//! The append log of a day's open block: the records acknowledged but not
//! yet sealed into a compressed block. Each append is written as checksummed
//! frames of bounded size (however large the batch, one damaged frame costs
//! at most a thousand records), synced before the store says the records
//! are stored.
//!
//! Reading never changes the file. It reads every whole, checked frame; past
//! a damaged one it looks for the next frame that checks, so one bad frame
//! costs only its own records, and it reports each damaged range as it was,
//! byte for byte: an unfinished last frame (a write a crash interrupted,
//! never acknowledged) apart from damage to acknowledged ones. What to do
//! with them (keep them aside, rewrite the log, report a gap) is the
//! store's decision (`Store::open`).
//!
//! The header names the block number the log's records will be sealed into:
//! after a crash between sealing blocks and rewriting the log, recovery skips
//! the records those blocks already hold (see `Store::open`).
use std::{
    fs::{File, OpenOptions},
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

use crate::{record::Icr, store::codec};

const MAGIC: &[u8; 8] = b"ICRWAL1\n";
const HEADER: usize = MAGIC.len() + 4;
/// A frame may not claim more than this: a damaged length is a torn tail.
/// (What older versions wrote, one frame per append, must stay readable.)
const MAX_FRAME: usize = 256 << 20;
/// The most records one written frame holds, and the most payload bytes (a
/// single larger record excepted): a flipped byte makes one frame
/// unreadable, so it costs at most this much, whatever the batch.
const FRAME_RECORDS: usize = 1000;
const FRAME_BYTES: usize = 64 << 10;

pub struct Wal {
    file: File,
    path: PathBuf,
}

/// What a log held when it was read back.
pub struct Recovered {
    /// The block its records will be sealed into.
    pub base_block: u32,
    pub records: Vec<Icr>,
    /// What could not be read, in file order.
    pub damage: Vec<Damage>,
}

/// A range of a log that is not a whole, checked frame.
#[derive(Debug, PartialEq, Eq)]
pub struct Damage {
    /// Where it starts in the file.
    pub offset: u64,
    /// The range as it was.
    pub bytes: Vec<u8>,
    pub kind: DamageKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DamageKind {
    /// A last frame shorter than its header says, with nothing after it: an
    /// append a crash interrupted before it was synced, so never acknowledged.
    TornTail,
    /// A frame whose length, checksum or contents are wrong: records that
    /// were acknowledged are lost.
    Corrupt,
    /// The file is not an append log at all (its header is damaged): the
    /// whole file.
    NotALog,
}

impl Recovered {
    /// Whether acknowledged records were lost (more than a torn tail).
    pub fn lost_records(&self) -> bool {
        self.damage.iter().any(|damage| damage.kind != DamageKind::TornTail)
    }
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
        file.write_all(&bytes)
            .and_then(|()| file.sync_all())
            .with_context(|| format!("writing {}", temporary.display()))?;
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

    /// Reads a log back, without changing it.
    pub fn read(path: &Path) -> Result<Recovered> {
        let mut bytes = Vec::new();
        File::open(path)
            .and_then(|mut file| file.read_to_end(&mut bytes))
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(parse(bytes))
    }
}

/// The frames of a log's bytes, and the ranges between them that are not.
fn parse(bytes: Vec<u8>) -> Recovered {
    if bytes.len() < HEADER || &bytes[..MAGIC.len()] != MAGIC {
        return Recovered {
            base_block: 0,
            records: Vec::new(),
            damage: vec![Damage { offset: 0, bytes, kind: DamageKind::NotALog }],
        };
    }
    let base_block = u32::from_le_bytes(bytes[MAGIC.len()..HEADER].try_into().expect("four bytes"));
    let mut records = Vec::new();
    let mut damage = Vec::new();
    let mut offset = HEADER;
    while offset < bytes.len() {
        if let Some((mut frame, next)) = checked_frame(&bytes, offset) {
            records.append(&mut frame);
            offset = next;
            continue;
        }
        // The next frame that checks, if any: one bad frame costs only itself.
        let resync = (offset + 1..bytes.len()).find(|&at| checked_frame(&bytes, at).is_some());
        let end = resync.unwrap_or(bytes.len());
        let kind = if resync.is_none() && runs_past_the_end(&bytes, offset) {
            DamageKind::TornTail
        } else {
            DamageKind::Corrupt
        };
        damage.push(Damage { offset: offset as u64, bytes: bytes[offset..end].to_vec(), kind });
        offset = end;
    }
    Recovered { base_block, records, damage }
}

/// The records of the frame at `offset` and where the next frame starts,
/// if the frame is whole, its checksum right and its contents decode.
fn checked_frame(bytes: &[u8], offset: usize) -> Option<(Vec<Icr>, usize)> {
    let (payload, next) = next_frame(bytes, offset)?;
    codec::decode(payload).ok().map(|records| (records, next))
}

/// Whether the frame at `offset` is cut short by the end of the file: its
/// header incomplete, or its payload longer than what follows.
fn runs_past_the_end(bytes: &[u8], offset: usize) -> bool {
    match bytes.get(offset..offset + 8) {
        None => true,
        Some(header) => {
            let length = u32::from_le_bytes(header[..4].try_into().expect("four bytes")) as usize;
            length <= MAX_FRAME && offset + 8 + length > bytes.len()
        }
    }
}

/// Writes `records` as frames of at most [`FRAME_RECORDS`] records and
/// [`FRAME_BYTES`] bytes each.
fn frame(out: &mut Vec<u8>, records: &[Icr]) -> Result<()> {
    for chunk in records.chunks(FRAME_RECORDS) {
        bounded_frames(out, chunk)?;
    }
    Ok(())
}

/// One frame of `records`, or, if that would be larger than
/// [`FRAME_BYTES`], the frames of each half (records are encoded by
/// column, so a frame's size is known once it is encoded).
fn bounded_frames(out: &mut Vec<u8>, records: &[Icr]) -> Result<()> {
    let payload = codec::encode(records, false)?;
    if payload.len() > FRAME_BYTES && records.len() > 1 {
        let (first, second) = records.split_at(records.len() / 2);
        bounded_frames(out, first)?;
        return bounded_frames(out, second);
    }
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
        let whole = std::fs::read(&path).unwrap();
        let back = Wal::read(&path).unwrap();
        assert_eq!(back.base_block, 7);
        assert!(back.damage.is_empty());
        assert_eq!(back.records, records);

        // A crash mid-append leaves part of a frame: a torn tail, the rest kept.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(whole.len() as u64 - 5).unwrap();
        let back = Wal::read(&path).unwrap();
        assert_eq!(back.records, records[..20]);
        assert_eq!(back.damage.len(), 1);
        assert_eq!(back.damage[0].kind, DamageKind::TornTail);
        assert!(!back.lost_records());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), whole.len() as u64 - 5, "reading changes nothing");
    }

    #[test]
    fn a_large_append_is_bounded_frames_and_a_one_frame_log_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("day.log");
        let records = samples(2500);
        Wal::create(&path, 0, &records[..1]).unwrap().append(&records[1..]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let mut frames = Vec::new();
        let mut offset = HEADER;
        while let Some((frame, next)) = checked_frame(&bytes, offset) {
            frames.push((frame.len(), next - offset));
            offset = next;
        }
        assert_eq!(offset, bytes.len(), "whole frames only");
        assert!(frames.len() >= 4, "{frames:?}");
        assert!(frames.iter().all(|&(count, size)| count <= FRAME_RECORDS && size <= 8 + FRAME_BYTES), "{frames:?}");
        assert_eq!(parse(bytes).records, records);

        // A log written before frames were bounded: the batch in one frame.
        let mut old = MAGIC.to_vec();
        old.extend_from_slice(&0u32.to_le_bytes());
        let payload = codec::encode(&records, false).unwrap();
        old.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        old.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        old.extend_from_slice(&payload);
        let back = parse(old);
        assert!(back.damage.is_empty());
        assert_eq!(back.records, records);
    }

    /// Offsets of the frames in a log of three frames of 10 records.
    fn three_frames(path: &Path) -> (Vec<Icr>, Vec<u8>, [usize; 3]) {
        let records = samples(30);
        let mut wal = Wal::create(path, 0, &records[..10]).unwrap();
        let first_end = std::fs::metadata(path).unwrap().len() as usize;
        wal.append(&records[10..20]).unwrap();
        let second_end = std::fs::metadata(path).unwrap().len() as usize;
        wal.append(&records[20..]).unwrap();
        (records, std::fs::read(path).unwrap(), [HEADER, first_end, second_end])
    }

    #[test]
    fn a_damaged_frame_costs_only_its_own_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("day.log");
        let (records, bytes, [first, second, third]) = three_frames(&path);

        // One byte flipped inside the first frame's payload.
        let mut flipped = bytes.clone();
        flipped[first + 20] ^= 0x01;
        let back = parse(flipped.clone());
        assert_eq!(back.records, records[10..], "the frames after the damage are read");
        assert_eq!(
            back.damage,
            vec![Damage { offset: first as u64, bytes: flipped[first..second].to_vec(), kind: DamageKind::Corrupt }]
        );
        assert!(back.lost_records());

        // The second frame's length field claims 2 GiB.
        let mut long = bytes.clone();
        long[second..second + 4].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        let back = parse(long);
        assert_eq!(back.records, [&records[..10], &records[20..]].concat());
        assert_eq!(back.damage.len(), 1);
        assert_eq!((back.damage[0].offset, back.damage[0].kind), (second as u64, DamageKind::Corrupt));
        assert_eq!(back.damage[0].bytes.len(), third - second);

        // A whole last frame with a bad checksum is damage, not a torn write.
        let mut last = bytes.clone();
        *last.last_mut().unwrap() ^= 0x80;
        let back = parse(last);
        assert_eq!(back.records, records[..20]);
        assert_eq!(back.damage[0].kind, DamageKind::Corrupt);

        // Not a log at all: the whole file, kept as it was.
        let back = parse(b"not a log".to_vec());
        assert!(back.records.is_empty());
        assert_eq!(back.damage, vec![Damage { offset: 0, bytes: b"not a log".to_vec(), kind: DamageKind::NotALog }]);
        assert_eq!(parse(Vec::new()).damage[0].kind, DamageKind::NotALog);
    }
}
