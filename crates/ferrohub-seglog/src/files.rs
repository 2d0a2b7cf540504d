//! The log's small side files: the partition count and the retention start marks, each
//! written whole and atomically (temp file, fsync, rename, fsync of the directory) with a
//! CRC32C so a damaged one is noticed rather than misread; and the consumer-group
//! checkpoints in two fixed slots ([`CheckpointFile`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;

use crate::error::{SegError, SegResult};

/// fsyncs a directory, so a file created, renamed or removed in it survives a crash.
pub fn sync_dir(dir: &Path) -> SegResult<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| SegError::io(dir, e))
}

/// Replaces `path` with `body` (plus its checksum) so a crash leaves the old or the new file,
/// never a mix; durable when this returns.
pub fn write_atomic(path: &Path, body: &[u8]) -> SegResult<()> {
    let tmp = path.with_extension("tmp");
    let mut data = crc32c::crc32c(body).to_le_bytes().to_vec();
    data.extend_from_slice(body);
    (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(&data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })()
    .map_err(|e| SegError::io(path, e))?;
    match path.parent() {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

/// The body of a file written by [`write_atomic`]; `None` if there is none.
pub fn read_atomic(path: &Path) -> SegResult<Option<Vec<u8>>> {
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(SegError::io(path, e)),
    };
    let corrupt = |why: &str| SegError::Corrupt(path.display().to_string(), why.into());
    if data.len() < 4 {
        return Err(corrupt("shorter than its checksum"));
    }
    let (crc, body) = data.split_at(4);
    let mut b = [0u8; 4];
    b.copy_from_slice(crc);
    if crc32c::crc32c(body) != u32::from_le_bytes(b) {
        return Err(corrupt("checksum mismatch"));
    }
    Ok(Some(body.to_vec()))
}

/// Checkpoints: `count u32 | (group str | partition u32 | next u64)*`.
pub fn encode_checkpoints(map: &BTreeMap<String, BTreeMap<u32, u64>>) -> Vec<u8> {
    let mut out = Vec::new();
    let n: usize = map.values().map(BTreeMap::len).sum();
    out.extend_from_slice(&(n as u32).to_le_bytes());
    for (group, parts) in map {
        for (p, next) in parts {
            out.extend_from_slice(&(group.len() as u32).to_le_bytes());
            out.extend_from_slice(group.as_bytes());
            out.extend_from_slice(&p.to_le_bytes());
            out.extend_from_slice(&next.to_le_bytes());
        }
    }
    out
}

pub fn decode_checkpoints(buf: &[u8]) -> Option<BTreeMap<String, BTreeMap<u32, u64>>> {
    let mut r = buf;
    let mut take = |n: usize| -> Option<&[u8]> {
        if r.len() < n {
            return None;
        }
        let (h, t) = r.split_at(n);
        r = t;
        Some(h)
    };
    let u32_of = |b: &[u8]| {
        let mut a = [0u8; 4];
        a.copy_from_slice(b);
        u32::from_le_bytes(a)
    };
    let n = u32_of(take(4)?);
    let mut map: BTreeMap<String, BTreeMap<u32, u64>> = BTreeMap::new();
    for _ in 0..n {
        let len = u32_of(take(4)?) as usize;
        let group = String::from_utf8(take(len)?.to_vec()).ok()?;
        let p = u32_of(take(4)?);
        let mut a = [0u8; 8];
        a.copy_from_slice(take(8)?);
        map.entry(group)
            .or_default()
            .insert(p, u64::from_le_bytes(a));
    }
    Some(map)
}

/// A `u64` per partition (the retention start marks) or the one-value meta file.
pub fn encode_u64s(values: &[u64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

pub fn decode_u64s(buf: &[u8]) -> Option<Vec<u64>> {
    if !buf.len().is_multiple_of(8) {
        return None;
    }
    Some(
        buf.chunks_exact(8)
            .map(|c| {
                let mut a = [0u8; 8];
                a.copy_from_slice(c);
                u64::from_le_bytes(a)
            })
            .collect(),
    )
}

/// Bytes of one checkpoint slot: IoT Hub allows 20 consumer groups and Ferrohub 32 partitions,
/// 640 entries of well under 100 bytes each.
const SLOT: usize = 128 << 10;
const SLOT_HEAD: usize = 16;

/// The consumer-group checkpoints: a file of two fixed-size slots written in turn, each
/// `crc u32 | generation u64 | len u32 | body`. A save overwrites the older slot in place and
/// `fdatasync`s: the file's size never changes, so the sync flushes data only, with no
/// journal commit or directory sync, which under a busy disk made renames take seconds. A
/// torn slot fails its CRC and the other one, the previous save, is used.
pub struct CheckpointFile {
    file: File,
    path: std::path::PathBuf,
    generation: u64,
}

impl CheckpointFile {
    /// Opens (creating if needed) the file and returns it with the newest saved body.
    pub fn open(path: &Path) -> SegResult<(Self, Option<Vec<u8>>)> {
        let io = |e| SegError::io(path, e);
        let created = !path.exists();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        if created || file.metadata().map_err(io)?.len() != 2 * SLOT as u64 {
            // Real zeros, not a hole, so later saves overwrite allocated blocks.
            use std::os::unix::fs::FileExt;
            file.write_all_at(&vec![0u8; 2 * SLOT], 0).map_err(io)?;
            file.sync_all().map_err(io)?;
            if let Some(dir) = path.parent() {
                sync_dir(dir)?;
            }
            return Ok((
                Self {
                    file,
                    path: path.to_path_buf(),
                    generation: 0,
                },
                None,
            ));
        }
        let mut best: Option<(u64, Vec<u8>)> = None;
        for slot in 0..2 {
            use std::os::unix::fs::FileExt;
            let mut buf = vec![0u8; SLOT];
            file.read_exact_at(&mut buf, (slot * SLOT) as u64)
                .map_err(io)?;
            if let Some((generation, body)) = decode_slot(&buf) {
                if best.as_ref().is_none_or(|(g, _)| generation > *g) {
                    best = Some((generation, body.to_vec()));
                }
            }
        }
        let generation = best.as_ref().map_or(0, |(g, _)| *g);
        Ok((
            Self {
                file,
                path: path.to_path_buf(),
                generation,
            },
            best.map(|(_, b)| b),
        ))
    }

    /// Saves `body`; durable when this returns.
    pub fn save(&mut self, body: &[u8]) -> SegResult<()> {
        use std::os::unix::fs::FileExt;
        if body.len() > SLOT - SLOT_HEAD {
            return Err(SegError::Corrupt(
                self.path.display().to_string(),
                format!("{} bytes of checkpoints do not fit a slot", body.len()),
            ));
        }
        let generation = self.generation + 1;
        let mut slot = Vec::with_capacity(SLOT_HEAD + body.len());
        slot.extend_from_slice(&[0u8; 4]);
        slot.extend_from_slice(&generation.to_le_bytes());
        slot.extend_from_slice(&(body.len() as u32).to_le_bytes());
        slot.extend_from_slice(body);
        let crc = crc32c::crc32c(&slot[4..]);
        slot[..4].copy_from_slice(&crc.to_le_bytes());
        let at = (generation % 2) * SLOT as u64;
        self.file
            .write_all_at(&slot, at)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| SegError::io(&self.path, e))?;
        self.generation = generation;
        Ok(())
    }
}

fn decode_slot(buf: &[u8]) -> Option<(u64, &[u8])> {
    let crc = u32::from_le_bytes(buf.get(..4)?.try_into().ok()?);
    let generation = u64::from_le_bytes(buf.get(4..12)?.try_into().ok()?);
    let len = u32::from_le_bytes(buf.get(12..16)?.try_into().ok()?) as usize;
    let body = buf.get(SLOT_HEAD..SLOT_HEAD.checked_add(len)?)?;
    if generation == 0 || crc32c::crc32c(&buf[4..SLOT_HEAD + len]) != crc {
        return None;
    }
    Some((generation, body))
}
