//! The journal: a preallocated file of framed records, written in place and made durable with
//! one `fdatasync` each. Its blocks are allocated (written with zeros) when it is created, so
//! overwriting them changes no file metadata and the flush is a single data write: a change
//! is on disk in a fraction of a millisecond instead of the milliseconds an atomic rename
//! costs.
//!
//! A record: magic, payload length, sequence number, CRC32 of (sequence, payload), payload,
//! padding to 8 bytes. Reading stops at the first record that is torn (bad magic or CRC) or
//! out of sequence, so a crash mid-write loses at most the record being written, which was
//! never acknowledged.

use std::{
    fs::{File, OpenOptions},
    io::{self, Read as _, Seek as _, SeekFrom, Write as _},
    os::unix::fs::{FileExt as _, OpenOptionsExt as _},
    path::Path,
};

const MAGIC: u32 = 0x314a_4c4d; // "MLJ1"
const HEADER: usize = 4 + 4 + 8 + 4;
/// Size of the journal file.
pub const SIZE: u64 = 16 << 20;

pub struct Journal {
    file: File,
    /// Where the next record goes.
    pos: u64,
}

fn frame(seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&seq.to_le_bytes());
    crc.update(payload);
    let mut out = Vec::with_capacity(HEADER + payload.len() + 8);
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(payload);
    out.resize(out.len().next_multiple_of(8), 0);
    out
}

/// The records of `bytes` from the start, in order, with sequence numbers from `first` on;
/// and the offset after the last one.
fn records(bytes: &[u8], first: u64) -> (Vec<Vec<u8>>, u64) {
    let mut out = Vec::new();
    let mut pos = 0usize;
    let mut seq = first;
    while pos + HEADER <= bytes.len() {
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
        if u32_at(pos) != MAGIC {
            break;
        }
        let len = u32_at(pos + 4) as usize;
        let got = u64::from_le_bytes(bytes[pos + 8..pos + 16].try_into().expect("8 bytes"));
        let crc = u32_at(pos + 16);
        let start = pos + HEADER;
        if got != seq || start + len > bytes.len() {
            break;
        }
        let payload = &bytes[start..start + len];
        let mut h = crc32fast::Hasher::new();
        h.update(&got.to_le_bytes());
        h.update(payload);
        if h.finalize() != crc {
            break;
        }
        out.push(payload.to_vec());
        pos = (start + len).next_multiple_of(8);
        seq += 1;
    }
    (out, pos as u64)
}

impl Journal {
    /// Opens (or creates and preallocates) the journal at `path`, and returns it with the
    /// payloads of its records numbered from `first` on.
    pub fn open(path: &Path, first: u64) -> io::Result<(Self, Vec<Vec<u8>>)> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        if file.metadata()?.len() < SIZE {
            preallocate(&mut file)?;
        }
        let mut bytes = Vec::with_capacity(SIZE as usize);
        file.seek(SeekFrom::Start(0))?;
        file.read_to_end(&mut bytes)?;
        let (payloads, pos) = records(&bytes, first);
        Ok((Self { file, pos }, payloads))
    }

    /// The payloads of the records of the journal at `path`, numbered from `first` on,
    /// read without writing anything (none when there is no journal).
    pub fn read(path: &Path, first: u64) -> io::Result<Vec<Vec<u8>>> {
        match std::fs::read(path) {
            Ok(bytes) => Ok(records(&bytes, first).0),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Whether a record of `len` payload bytes fits after the current one.
    pub fn fits(&self, len: usize) -> bool {
        self.pos + (HEADER + len + 8) as u64 <= SIZE
    }

    /// Writes a record and makes it durable. On failure the record is not there: a write
    /// that reached the page cache before the flush failed is taken back (its magic
    /// cleared), so that no reader takes a refused change for a committed one.
    pub fn append(&mut self, seq: u64, payload: &[u8]) -> io::Result<()> {
        let f = frame(seq, payload);
        let r = self
            .file
            .write_all_at(&f, self.pos)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = r {
            let _ = self.file.write_all_at(&[0; 4], self.pos);
            return Err(e);
        }
        self.pos += f.len() as u64;
        Ok(())
    }

    /// Starts again at the beginning (the state so far is in a snapshot). Older records left
    /// behind have lower sequence numbers, so reading stops before them.
    pub fn restart(&mut self) {
        self.pos = 0;
    }
}

fn preallocate(file: &mut File) -> io::Result<()> {
    file.seek(SeekFrom::Start(0))?;
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..SIZE / zeros.len() as u64 {
        file.write_all(&zeros)?;
    }
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back_until_a_torn_or_stale_one() {
        let mut bytes = Vec::new();
        for (seq, p) in [(5u64, &b"one"[..]), (6, b"two"), (7, b"three")] {
            bytes.extend(frame(seq, p));
        }
        let (got, end) = records(&bytes, 5);
        assert_eq!(got, [b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]);
        assert_eq!(end, bytes.len() as u64);
        // A different first sequence number: nothing (records of an older journal).
        assert!(records(&bytes, 9).0.is_empty());
        // A torn last record: the ones before it.
        let n = bytes.len();
        bytes[n - 10] ^= 0xff; // inside the last payload
        assert_eq!(records(&bytes, 5).0.len(), 2);
        // Zeros (a fresh journal): nothing.
        assert!(records(&[0u8; 64], 1).0.is_empty());
    }
}
