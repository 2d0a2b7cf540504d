//! [`SegmentLog`]: the [`TelemetryLog`] on append-only segment files, its writer thread
//! (group commit), recovery on open, reads and retention.
//!
//! Layout of a log directory: `meta` (the partition count), `checkpoints`, `start` (the
//! retention start mark of each partition) and `pN/` per partition holding segment files
//! `FIRSTSEQ.seg` (20 digits) of records in the [`crate::record`] format. A segment's name is
//! the sequence of its first record, and the newest segment is never deleted (retention rolls
//! it first and keeps the empty successor), so the next sequence always follows from the files
//! and is never reused.
//!
//! Group commit: appends queue in a bounded channel; the writer takes everything queued (up to
//! `MAX_BATCH`), writes each partition's records with one positioned write, `fdatasync`s every
//! file it touched and only then answers the callers and bumps the commit watch. A failed
//! write or sync fails the whole batch and cuts the files back to their last committed length,
//! so nothing of it can reappear later.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot, watch};

use ferrohub_store::telemetry::{
    partition_for, Durable, EventRecord, NewEvent, Retention, StartPosition, TelemetryLog,
};
use ferrohub_store::{Result, StoreError, Timestamp};

use crate::error::{SegError, SegResult};
use crate::files::{
    decode_checkpoints, decode_u64s, encode_checkpoints, encode_u64s, read_atomic, sync_dir,
    write_atomic, CheckpointFile,
};
use crate::record::{self, DecodeError};

/// Most appends one commit takes, as the SQLite engine: bounds a batch's latency.
const MAX_BATCH: usize = 1024;
/// Appends waiting for the writer; when the disk falls behind, `enqueue` waits.
const QUEUE: usize = 1024;
const META_FILE: &str = "meta";
const CHECKPOINT_FILE: &str = "checkpoints";
const START_FILE: &str = "start";
const SEGMENT_EXT: &str = "seg";
/// Bytes a reader fetches per `pread`.
const READ_CHUNK: usize = 256 << 10;

/// Tunables, mainly so tests can roll segments after a few records.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// A segment at least this large is closed and a new one begun at the next batch.
    pub segment_bytes: u64,
    /// One sparse-index entry every this many records.
    pub index_every: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            segment_bytes: 64 << 20,
            index_every: 64,
        }
    }
}

/// One segment as readers and the writer know it; `len` and `count` cover only committed
/// (fdatasynced) records, so a reader never sees a record that could still be lost.
#[derive(Debug, Clone)]
struct Segment {
    base: u64,
    path: PathBuf,
    len: u64,
    count: u64,
    max_ms: i64,
    /// (sequence, file offset) of every `index_every`th record, from the first.
    index: Vec<(u64, u64)>,
}

impl Segment {
    /// A segment holding nothing yet, whose first record will be `base`.
    fn empty(base: u64, path: PathBuf) -> Self {
        Segment {
            base,
            path,
            len: 0,
            count: 0,
            max_ms: i64::MIN,
            index: Vec::new(),
        }
    }

    fn end(&self) -> u64 {
        self.base + self.count
    }

    /// The offset to scan from to find `seq`.
    fn offset_for(&self, seq: u64) -> u64 {
        match self.index.partition_point(|(s, _)| *s <= seq) {
            0 => 0,
            i => self.index[i - 1].1,
        }
    }
}

#[derive(Debug)]
struct Partition {
    dir: PathBuf,
    segments: Vec<Segment>,
    /// Retention start mark: records below it are gone even if their segment is not yet.
    start: u64,
}

impl Partition {
    fn next(&self) -> u64 {
        self.segments.last().map_or(self.start, Segment::end)
    }

    fn first(&self) -> u64 {
        let base = self.segments.first().map_or(0, |s| s.base);
        self.start.max(base).min(self.next())
    }
}

/// The consumer groups' checkpoints and the file they are saved in, under one lock so saves
/// are written in the order they were made.
struct Checkpoints {
    map: BTreeMap<String, BTreeMap<u32, u64>>,
    file: CheckpointFile,
}

struct Shared {
    dir: PathBuf,
    opts: Options,
    parts: Vec<RwLock<Partition>>,
    checkpoints: Mutex<Checkpoints>,
    /// Tests: how many coming batch syncs fail as if the disk had refused them.
    #[cfg(test)]
    fail_syncs: std::sync::atomic::AtomicU32,
}

impl Shared {
    fn part(&self, p: u32) -> Result<std::sync::RwLockReadGuard<'_, Partition>> {
        let lock = self
            .parts
            .get(p as usize)
            .ok_or_else(|| StoreError::Task(format!("no partition {p}")))?;
        Ok(lock.read().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Where an append hears its (partition, sequence).
type Reply = oneshot::Sender<Result<(u32, u64)>>;

enum Command {
    Append(u32, NewEvent, Reply),
    Retention(Retention, i64, oneshot::Sender<Result<u64>>),
}

struct Inner {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Command>,
    commits: watch::Receiver<u64>,
}

/// [`TelemetryLog`] on segment files.
#[derive(Clone)]
pub struct SegmentLog {
    inner: Arc<Inner>,
}

fn seg_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.{SEGMENT_EXT}"))
}

fn open_rw(path: &Path) -> SegResult<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| SegError::io(path, e))
}

/// Creates an empty segment at `base` and makes its directory entry durable.
fn create_segment(dir: &Path, base: u64) -> SegResult<(Segment, File)> {
    let path = seg_path(dir, base);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(|e| SegError::io(&path, e))?;
    sync_dir(dir)?;
    Ok((Segment::empty(base, path), file))
}

/// Calls `f(sequence, offset, bytes)` for each whole, valid record of `path` from `offset`
/// up to `end` until `f` returns false. Returns the offset after the last valid record and
/// why the scan stopped early, if it did because of bad bytes.
fn scan(
    path: &Path,
    mut offset: u64,
    end: u64,
    mut f: impl FnMut(u64, &[u8]) -> SegResult<bool>,
) -> SegResult<(u64, Option<DecodeError>)> {
    let file = File::open(path).map_err(|e| SegError::io(path, e))?;
    let mut buf: Vec<u8> = Vec::new();
    let mut buf_at = offset;
    while offset < end {
        let have = (buf_at + buf.len() as u64).saturating_sub(offset) as usize;
        let start = (offset - buf_at) as usize;
        let rec = &buf[start.min(buf.len())..];
        match record::peek(rec) {
            Ok((_, _, len)) => {
                if offset + len as u64 > end {
                    return Ok((offset, Some(DecodeError::Incomplete)));
                }
                if !f(offset, &rec[..len])? {
                    return Ok((offset, None));
                }
                offset += len as u64;
            }
            Err(DecodeError::Incomplete) => {
                let left = end - (buf_at + buf.len() as u64);
                if left == 0 {
                    return Ok((offset, Some(DecodeError::Incomplete)));
                }
                // Keep the partial record and read at least enough for it to complete.
                let need = match rec.get(..4) {
                    Some(b) => {
                        let mut a = [0u8; 4];
                        a.copy_from_slice(b);
                        u32::from_le_bytes(a) as usize + record::HEADER
                    }
                    None => record::HEADER,
                };
                let want = need.saturating_sub(have).max(READ_CHUNK).min(left as usize);
                buf.drain(..start.min(buf.len()));
                buf_at = offset;
                let old = buf.len();
                buf.resize(old + want, 0);
                let got = read_fully(&file, &mut buf[old..], buf_at + old as u64)
                    .map_err(|e| SegError::io(path, e))?;
                buf.truncate(old + got);
                if got == 0 {
                    return Ok((offset, Some(DecodeError::Incomplete)));
                }
            }
            Err(e) => return Ok((offset, Some(e))),
        }
    }
    Ok((offset, None))
}

fn read_fully(file: &File, buf: &mut [u8], at: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], at + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Rebuilds a segment's index from its file; a torn or corrupt tail ends the segment there.
fn load_segment(path: PathBuf, base: u64, opts: &Options) -> SegResult<(Segment, u64, u64)> {
    let file_len = std::fs::metadata(&path)
        .map_err(|e| SegError::io(&path, e))?
        .len();
    let mut seg = Segment::empty(base, path);
    let mut bad_seq = false;
    let (valid, _why) = scan(&seg.path.clone(), 0, file_len, |offset, bytes| {
        let (seq, ms, _) = record::peek(bytes).map_err(|_| {
            SegError::Corrupt("segment".into(), "record changed under the scan".into())
        })?;
        // Records of a segment are consecutive from its name: anything else is not ours.
        if seq != base + seg.count {
            bad_seq = true;
            return Ok(false);
        }
        if seg.count.is_multiple_of(opts.index_every) {
            seg.index.push((seq, offset));
        }
        seg.count += 1;
        seg.max_ms = seg.max_ms.max(ms);
        Ok(true)
    })?;
    if bad_seq {
        tracing::warn!(path = %seg.path.display(), "segment record out of sequence");
    }
    seg.len = valid;
    Ok((seg, valid, file_len))
}

/// Opens one partition's directory: every segment indexed, the newest one's bad tail cut off.
fn open_partition(dir: PathBuf, start: u64, opts: &Options) -> SegResult<(Partition, File)> {
    std::fs::create_dir_all(&dir).map_err(|e| SegError::io(&dir, e))?;
    let mut bases = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(|e| SegError::io(&dir, e))? {
        let entry = entry.map_err(|e| SegError::io(&dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(base) = name
            .strip_suffix(".seg")
            .and_then(|stem| stem.parse::<u64>().ok())
        {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    let mut segments = Vec::with_capacity(bases.len());
    let last = bases.len().saturating_sub(1);
    for (i, base) in bases.iter().enumerate() {
        let (seg, valid, file_len) = load_segment(seg_path(&dir, *base), *base, opts)?;
        if valid < file_len {
            if i == last {
                // A crash mid-batch leaves a torn tail: it was never acknowledged, so cutting
                // it is safe, and must happen before anything is appended after it.
                tracing::warn!(
                    path = %seg.path.display(),
                    bytes = file_len - valid,
                    "truncating the torn or corrupt tail of a telemetry segment"
                );
                let f = open_rw(&seg.path)?;
                f.set_len(valid)
                    .and_then(|()| f.sync_all())
                    .map_err(|e| SegError::io(&seg.path, e))?;
            } else {
                tracing::error!(
                    path = %seg.path.display(),
                    bytes = file_len - valid,
                    "corrupt bytes inside a closed telemetry segment; its records after them are unreadable"
                );
            }
        }
        segments.push(seg);
    }
    let next = segments
        .iter()
        .map(Segment::end)
        .max()
        .unwrap_or(0)
        .max(start);
    let active = match segments.last() {
        Some(s) if s.end() == next => open_rw(&s.path)?,
        _ => {
            // No segment, or the newest does not end at the highest sequence seen (only after
            // damage): begin a fresh one there, so no sequence is handed out twice.
            let (seg, file) = create_segment(&dir, next)?;
            segments.retain(|s| s.base != next);
            segments.push(seg);
            file
        }
    };
    Ok((
        Partition {
            dir,
            segments,
            start,
        },
        active,
    ))
}

impl SegmentLog {
    /// Opens (creating if needed) the log in directory `dir` with default options. The
    /// partition count is fixed at creation; a different `partitions` later is ignored (and
    /// logged) so devices keep their partition.
    pub fn open(dir: &Path, partitions: u32) -> Result<Self> {
        Self::open_with(dir, partitions, Options::default())
    }

    pub fn open_with(dir: &Path, partitions: u32, opts: Options) -> Result<Self> {
        Ok(Self::open_seg(dir, partitions, opts)?)
    }

    fn open_seg(dir: &Path, partitions: u32, opts: Options) -> SegResult<Self> {
        let opts = Options {
            segment_bytes: opts.segment_bytes.max(1),
            index_every: opts.index_every.max(1),
        };
        std::fs::create_dir_all(dir).map_err(|e| SegError::io(dir, e))?;
        let meta = dir.join(META_FILE);
        let partitions = match read_atomic(&meta)?.and_then(|b| decode_u64s(&b)) {
            Some(v) if v.len() == 1 && (1..=1024).contains(&v[0]) => {
                let stored = v[0] as u32;
                if stored != partitions {
                    tracing::warn!(
                        stored,
                        requested = partitions,
                        "telemetry partition count is fixed at creation; keeping the stored one"
                    );
                }
                stored
            }
            Some(_) => {
                return Err(SegError::Corrupt(
                    meta.display().to_string(),
                    "bad partition count".into(),
                ))
            }
            None => {
                let p = partitions.clamp(1, 1024);
                write_atomic(&meta, &encode_u64s(&[u64::from(p)]))?;
                p
            }
        };
        let start_path = dir.join(START_FILE);
        let starts = match read_atomic(&start_path)? {
            Some(b) => decode_u64s(&b).ok_or_else(|| {
                SegError::Corrupt(start_path.display().to_string(), "bad length".into())
            })?,
            None => Vec::new(),
        };
        let cp_path = dir.join(CHECKPOINT_FILE);
        let (cp_file, saved) = CheckpointFile::open(&cp_path)?;
        let checkpoints = match saved {
            Some(b) => decode_checkpoints(&b).ok_or_else(|| {
                SegError::Corrupt(cp_path.display().to_string(), "bad encoding".into())
            })?,
            None => BTreeMap::new(),
        };
        let mut parts = Vec::with_capacity(partitions as usize);
        let mut actives = Vec::with_capacity(partitions as usize);
        for p in 0..partitions {
            let start = starts.get(p as usize).copied().unwrap_or(0);
            let (part, file) = open_partition(dir.join(format!("p{p}")), start, &opts)?;
            parts.push(RwLock::new(part));
            actives.push(Active { file, dirty: false });
        }
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            opts,
            parts,
            checkpoints: Mutex::new(Checkpoints {
                map: checkpoints,
                file: cp_file,
            }),
            #[cfg(test)]
            fail_syncs: std::sync::atomic::AtomicU32::new(0),
        });
        let (tx, rx) = mpsc::channel(QUEUE);
        let (commit_tx, commit_rx) = watch::channel(0u64);
        let writer = Writer {
            shared: shared.clone(),
            actives,
            marks_unsaved: false,
            commits: commit_tx,
        };
        std::thread::Builder::new()
            .name("telemetry-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| SegError::io(dir, e))?;
        Ok(Self {
            inner: Arc::new(Inner {
                shared,
                tx,
                commits: commit_rx,
            }),
        })
    }

    /// Tests: the next `n` batches fail at their sync, after their bytes were written.
    #[cfg(test)]
    pub(crate) fn fail_next_syncs(&self, n: u32) {
        self.inner
            .shared
            .fail_syncs
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }

    async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Shared) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        let shared = self.inner.shared.clone();
        tokio::task::spawn_blocking(move || f(&shared))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

/// The writer's handle on a partition's newest segment.
struct Active {
    file: File,
    /// A failed batch could not be cut back: cut it before the next write.
    dirty: bool,
}

struct Writer {
    shared: Arc<Shared>,
    actives: Vec<Active>,
    /// The last retention marks could not be written: write them at the next pass.
    marks_unsaved: bool,
    commits: watch::Sender<u64>,
}

/// One partition's share of a batch, encoded.
struct PartBatch {
    buf: Vec<u8>,
    first: u64,
    /// Records already in the segment this batch appends to, for the index spacing.
    in_segment: u64,
    count: u64,
    max_ms: i64,
    index: Vec<(u64, u64)>,
    replies: Vec<(Reply, u64)>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while let Some(first) = rx.blocking_recv() {
            let mut retention = None;
            match first {
                Command::Append(p, e, r) => batch.push((p, e, r)),
                Command::Retention(r, now, reply) => retention = Some((r, now, reply)),
            }
            while retention.is_none() && batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(Command::Append(p, e, r)) => batch.push((p, e, r)),
                    // Retention runs alone, after this batch.
                    Ok(Command::Retention(r, now, reply)) => retention = Some((r, now, reply)),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                self.commit(&mut batch);
            }
            if let Some((r, now, reply)) = retention {
                let result = self.retention(r, now).map_err(|e| {
                    tracing::error!(error = %e, "telemetry retention failed");
                    StoreError::from(e)
                });
                let _ = reply.send(result);
            }
        }
    }

    fn commit(&mut self, batch: &mut Vec<(u32, NewEvent, Reply)>) {
        let mut parts: BTreeMap<u32, PartBatch> = BTreeMap::new();
        let mut failed = Vec::new();
        for (p, event, reply) in batch.drain(..) {
            let pb = match parts.entry(p) {
                std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::btree_map::Entry::Vacant(v) => match self.prepare(p) {
                    Ok((first, in_segment)) => v.insert(PartBatch {
                        buf: Vec::with_capacity(64 << 10),
                        first,
                        in_segment,
                        count: 0,
                        max_ms: i64::MIN,
                        index: Vec::new(),
                        replies: Vec::new(),
                    }),
                    Err(e) => {
                        failed.push((reply, e.to_string(), e.is_full()));
                        continue;
                    }
                },
            };
            let seq = pb.first + pb.count;
            if (pb.in_segment + pb.count).is_multiple_of(self.shared.opts.index_every) {
                pb.index.push((seq, pb.buf.len() as u64));
            }
            record::encode(&mut pb.buf, seq, &event);
            pb.count += 1;
            pb.max_ms = pb.max_ms.max(event.enqueued_ms);
            pb.replies.push((reply, seq));
        }
        for (reply, msg, full) in failed {
            let _ = reply.send(Err(batch_error(&msg, full)));
        }
        if parts.is_empty() {
            return;
        }
        match self.write_and_sync(&parts) {
            Ok(()) => {
                for (p, pb) in parts {
                    {
                        let mut part = self.part_mut(p);
                        if let Some(seg) = part.segments.last_mut() {
                            let at = seg.len;
                            seg.index
                                .extend(pb.index.iter().map(|(s, off)| (*s, off + at)));
                            seg.len += pb.buf.len() as u64;
                            seg.count += pb.count;
                            seg.max_ms = seg.max_ms.max(pb.max_ms);
                        }
                    }
                    for (reply, seq) in pb.replies {
                        let _ = reply.send(Ok((p, seq)));
                    }
                }
                self.commits.send_modify(|c| *c += 1);
            }
            Err(e) => {
                tracing::error!(error = %e, "telemetry commit failed");
                let (msg, full) = (e.to_string(), e.is_full());
                for (p, pb) in parts {
                    self.cut_back(p);
                    for (reply, _) in pb.replies {
                        let _ = reply.send(Err(batch_error(&msg, full)));
                    }
                }
            }
        }
    }

    fn part(&self, p: u32) -> std::sync::RwLockReadGuard<'_, Partition> {
        self.shared.parts[p as usize]
            .read()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn part_mut(&self, p: u32) -> std::sync::RwLockWriteGuard<'_, Partition> {
        self.shared.parts[p as usize]
            .write()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Readies partition `p` for this batch (a pending cut, a roll) and returns its next
    /// sequence and how many records its newest segment holds.
    fn prepare(&mut self, p: u32) -> SegResult<(u64, u64)> {
        let (len, count, next, dir) = {
            let part = self.part(p);
            let seg = part.segments.last();
            (
                seg.map_or(0, |s| s.len),
                seg.map_or(0, |s| s.count),
                part.next(),
                part.dir.clone(),
            )
        };
        let active = &mut self.actives[p as usize];
        if active.dirty {
            active
                .file
                .set_len(len)
                .map_err(|e| SegError::io(&dir, e))?;
            active.dirty = false;
        }
        if len >= self.shared.opts.segment_bytes && count > 0 {
            self.roll(p)?;
            return Ok((next, 0));
        }
        Ok((next, count))
    }

    /// Closes partition `p`'s newest segment and begins an empty one at its next sequence.
    /// The closed one is already durable: every batch is synced before it is answered.
    fn roll(&mut self, p: u32) -> SegResult<()> {
        let (dir, next) = {
            let part = self.part(p);
            (part.dir.clone(), part.next())
        };
        let (seg, file) = create_segment(&dir, next)?;
        self.actives[p as usize] = Active { file, dirty: false };
        self.part_mut(p).segments.push(seg);
        Ok(())
    }

    fn write_and_sync(&mut self, parts: &BTreeMap<u32, PartBatch>) -> SegResult<()> {
        for (p, pb) in parts {
            let (at, path) = {
                let part = self.part(*p);
                let seg = part.segments.last();
                (seg.map_or(0, |s| s.len), seg.map(|s| s.path.clone()))
            };
            let path = path.unwrap_or_default();
            self.actives[*p as usize]
                .file
                .write_all_at(&pb.buf, at)
                .map_err(|e| SegError::io(&path, e))?;
        }
        #[cfg(test)]
        {
            use std::sync::atomic::Ordering;
            let fail = self.shared.fail_syncs.load(Ordering::SeqCst);
            if fail > 0 {
                self.shared.fail_syncs.store(fail - 1, Ordering::SeqCst);
                return Err(SegError::io(
                    &self.shared.dir,
                    std::io::Error::from(std::io::ErrorKind::StorageFull),
                ));
            }
        }
        for p in parts.keys() {
            self.actives[*p as usize].file.sync_data().map_err(|e| {
                let part = self.part(*p);
                SegError::io(&part.dir, e)
            })?;
        }
        Ok(())
    }

    /// After a failed batch: the file back to its committed length, so no record of the
    /// batch (possibly written, never acknowledged) can surface after a restart.
    fn cut_back(&mut self, p: u32) {
        let len = self.part(p).segments.last().map_or(0, |s| s.len);
        let active = &mut self.actives[p as usize];
        if let Err(e) = active
            .file
            .set_len(len)
            .and_then(|()| active.file.sync_data())
        {
            tracing::warn!(error = %e, partition = p, "cannot cut a failed telemetry batch yet; retrying before the next write");
            active.dirty = true;
        }
    }

    /// Moves each partition's start mark past expired records (by age, then by size, oldest
    /// segment first) and deletes the segments wholly below it. Returns how many records went.
    fn retention(&mut self, r: Retention, now: i64) -> SegResult<u64> {
        let cutoff = now.saturating_sub(r.max_age_ms);
        let n = self.shared.parts.len();
        let mut marks = Vec::with_capacity(n);
        let mut removed = 0u64;
        for p in 0..n as u32 {
            let (first, next, segs) = {
                let part = self.part(p);
                (part.first(), part.next(), part.segments.clone())
            };
            let mark = first_at_or_after(&segs, first, next, cutoff)?;
            removed += mark - first;
            marks.push(mark);
        }
        // Size: whole segments, the one with the oldest newest record first.
        let mut total: u64 = (0..n as u32)
            .map(|p| {
                let part = self.part(p);
                part.segments
                    .iter()
                    .filter(|s| s.end() > marks[p as usize])
                    .map(|s| s.len)
                    .sum::<u64>()
            })
            .sum();
        while total > r.max_bytes {
            let mut oldest: Option<(i64, u32, u64, u64, u64)> = None;
            for p in 0..n as u32 {
                let part = self.part(p);
                if let Some(s) = part
                    .segments
                    .iter()
                    .find(|s| s.end() > marks[p as usize] && s.count > 0)
                {
                    if oldest.is_none_or(|o| s.max_ms < o.0) {
                        oldest = Some((s.max_ms, p, s.base, s.end(), s.len));
                    }
                }
            }
            let Some((_, p, base, end, len)) = oldest else {
                break;
            };
            let mark = &mut marks[p as usize];
            removed += end - (*mark).max(base);
            *mark = end;
            total = total.saturating_sub(len);
        }
        let changed: Vec<u32> = (0..n as u32)
            .filter(|p| self.part(*p).start != marks[*p as usize])
            .collect();
        for p in 0..n as u32 {
            self.part_mut(p).start = marks[p as usize];
        }
        for p in &changed {
            self.delete_below_mark(*p)?;
        }
        if !changed.is_empty() || self.marks_unsaved {
            // Whole segments went first: their absence says as much as a mark, and freeing
            // them must not depend on writing a file to a full disk. A mark that cannot be
            // saved only means records of a partly expired segment come back after a restart
            // until the next pass; it is retried then.
            match write_atomic(&self.shared.dir.join(START_FILE), &encode_u64s(&marks)) {
                Ok(()) => self.marks_unsaved = false,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot save the telemetry retention marks yet");
                    self.marks_unsaved = true;
                }
            }
        }
        Ok(removed)
    }

    /// Deletes partition `p`'s segments wholly below its start mark, rolling the newest first
    /// if it is one of them.
    fn delete_below_mark(&mut self, p: u32) -> SegResult<()> {
        let (mark, active_expired) = {
            let part = self.part(p);
            let expired = part
                .segments
                .last()
                .is_some_and(|s| s.count > 0 && s.end() <= part.start);
            (part.start, expired)
        };
        if active_expired {
            self.roll(p)?;
        }
        let (dir, doomed) = {
            let mut part = self.part_mut(p);
            let keep_from = part
                .segments
                .iter()
                .position(|s| s.end() > mark || s.count == 0)
                .unwrap_or(part.segments.len().saturating_sub(1));
            let doomed: Vec<Segment> = part.segments.drain(..keep_from).collect();
            (part.dir.clone(), doomed)
        };
        for seg in &doomed {
            if let Err(e) = std::fs::remove_file(&seg.path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(SegError::io(&seg.path, e));
                }
            }
        }
        if !doomed.is_empty() {
            sync_dir(&dir)?;
        }
        Ok(())
    }
}

fn batch_error(msg: &str, full: bool) -> StoreError {
    let msg = format!("telemetry commit failed: {msg}");
    if full {
        StoreError::Full(msg.into())
    } else {
        StoreError::Task(msg)
    }
}

/// The first sequence in `[from, next)` whose record was enqueued at or after `t`, or
/// `next`. Segments whose newest record is older are skipped without reading them.
fn first_at_or_after(segs: &[Segment], from: u64, next: u64, t: i64) -> SegResult<u64> {
    for seg in segs.iter().filter(|s| s.end() > from && s.count > 0) {
        if seg.max_ms < t {
            continue;
        }
        let mut found = None;
        let from_here = from.max(seg.base);
        scan(&seg.path, seg.offset_for(from_here), seg.len, |_, bytes| {
            let (seq, ms, _) = record::peek(bytes)
                .map_err(|_| SegError::Corrupt("segment".into(), "bad record".into()))?;
            if seq >= from_here && ms >= t {
                found = Some(seq);
                return Ok(false);
            }
            Ok(true)
        })
        .or_else(|e| match e {
            // Deleted by retention meanwhile: its records are gone anyway.
            SegError::Io { ref source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                Ok((0, None))
            }
            e => Err(e),
        })?;
        if let Some(seq) = found {
            return Ok(seq);
        }
    }
    Ok(next)
}

/// What a reader needs of a segment, copied under the lock so the file is read without it.
struct ReadPlan {
    path: PathBuf,
    offset: u64,
    len: u64,
}

fn read_records(shared: &Shared, p: u32, from: u64, max: usize) -> Result<Vec<EventRecord>> {
    let (from, plans) = {
        let part = shared.part(p)?;
        let from = from.max(part.first());
        let plans: Vec<ReadPlan> = part
            .segments
            .iter()
            .filter(|s| s.end() > from && s.count > 0)
            .map(|s| ReadPlan {
                path: s.path.clone(),
                offset: s.offset_for(from),
                len: s.len,
            })
            .collect();
        (from, plans)
    };
    let mut out = Vec::with_capacity(max.min(1024));
    for seg in plans {
        if out.len() >= max {
            break;
        }
        let result = scan(&seg.path, seg.offset, seg.len, |_, bytes| {
            let (seq, event, _) = record::decode(bytes)
                .map_err(|e| SegError::Corrupt(seg.path.display().to_string(), format!("{e:?}")))?;
            if seq >= from {
                out.push(EventRecord {
                    partition: p,
                    sequence: seq,
                    event,
                });
            }
            Ok(out.len() < max)
        });
        match result {
            Ok(_) => {}
            Err(SegError::Io { ref source, .. })
                if source.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}

#[async_trait]
impl TelemetryLog for SegmentLog {
    async fn enqueue(&self, event: NewEvent) -> Result<Durable> {
        let p = self.partition_of(&event.device_id);
        let (tx, rx) = oneshot::channel();
        self.inner
            .tx
            .send(Command::Append(p, event, tx))
            .await
            .map_err(|_| StoreError::from(SegError::Stopped))?;
        Ok(Box::pin(async move {
            rx.await.map_err(|_| StoreError::from(SegError::Stopped))?
        }))
    }

    fn partition_count(&self) -> u32 {
        self.inner.shared.parts.len() as u32
    }

    fn partition_of(&self, device_id: &str) -> u32 {
        partition_for(device_id, self.partition_count())
    }

    async fn read(&self, partition: u32, from: u64, max: usize) -> Result<Vec<EventRecord>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        self.blocking(move |s| read_records(s, partition, from, max))
            .await
    }

    async fn resolve(&self, partition: u32, position: StartPosition) -> Result<u64> {
        let (first, next) = {
            let part = self.inner.shared.part(partition)?;
            (part.first(), part.next())
        };
        match position {
            StartPosition::End => Ok(next),
            StartPosition::Start => Ok(first),
            StartPosition::Sequence(s) => Ok(s.min(next)),
            StartPosition::EnqueuedAt(t) => {
                self.blocking(move |s| {
                    let segs = s.part(partition)?.segments.clone();
                    Ok(first_at_or_after(&segs, first, next, t)?)
                })
                .await
            }
        }
    }

    fn watch_commits(&self) -> watch::Receiver<u64> {
        self.inner.commits.clone()
    }

    async fn checkpoints(&self, group: &str) -> Result<BTreeMap<u32, u64>> {
        let cps = self
            .inner
            .shared
            .checkpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        Ok(cps.map.get(group).cloned().unwrap_or_default())
    }

    async fn save_checkpoint(&self, group: &str, partition: u32, next_sequence: u64) -> Result<()> {
        let group = group.to_string();
        self.blocking(move |s| {
            let mut cps = s.checkpoints.lock().unwrap_or_else(|e| e.into_inner());
            let Checkpoints { map, file } = &mut *cps;
            let old = map
                .entry(group.clone())
                .or_default()
                .insert(partition, next_sequence);
            let result = file.save(&encode_checkpoints(map));
            if result.is_err() {
                // Memory keeps saying what the disk says.
                let parts = map.entry(group.clone()).or_default();
                match old {
                    Some(o) => {
                        parts.insert(partition, o);
                    }
                    None => {
                        parts.remove(&partition);
                        if parts.is_empty() {
                            map.remove(&group);
                        }
                    }
                }
            }
            Ok(result?)
        })
        .await
    }

    async fn enforce_retention(&self, retention: Retention, now: Timestamp) -> Result<u64> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .tx
            .send(Command::Retention(retention, now.unix_ms(), tx))
            .await
            .map_err(|_| StoreError::from(SegError::Stopped))?;
        rx.await.map_err(|_| StoreError::from(SegError::Stopped))?
    }
}
