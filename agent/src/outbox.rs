//! The outbox: every event is appended to an on-disk journal, and fsynced, before the emissary
//! hears "ok"; it is delivered to the controller in order and removed only once acknowledged.
//!
//! Layout under `DATA_DIR/journal/`: segments `NNNNNNNNNNNNNNNNNNNN.jsonl` (named by their first
//! record id; one JSON record per line), `cursor` (the last delivered id), `seqs.json` (the last
//! `seq` of every task attempt whose records are gone). A kill -9 loses nothing acknowledged: a
//! half-written last line is ignored on restart, records after the cursor are sent again (the
//! controller deduplicates by `(workflow, task_id, attempt, seq)`), and `seq` never repeats.
//! Records and `seqs.json` are fsynced; the cursor is not (a stale one only repeats events).
//! A segment's space is allocated when it starts ([`SEGMENT_BYTES`], read back as zeros until
//! written): a commit then writes its records in place, and its fsync need not also write the
//! file's new size (one I/O less per commit: 0.5-0.8 ms → 0.3 ms on journaled ext4 here). A line
//! that begins with a zero byte is where a segment's records end.
//! What was committed lately is also kept in memory, bounded, so that delivery sends it without
//! reading it back from disk and parsing it again.
//!
//! Full journal (`--journal-max-bytes`): new events are refused with 503 and the emissary
//! retries with backoff; nothing is ever dropped to make room. One task cannot fill it for the
//! others: an attempt's undelivered events are bounded (`--task-journal-max-bytes`, 429 beyond),
//! and the last quarter is kept for final events, so results still land while starts and
//! progress wait.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use protocol::api::{Event, Phase};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, oneshot};
use tracing::warn;

/// A new segment starts past this size; it is allocated up front.
const SEGMENT_BYTES: u64 = 8 << 20;
/// Attempts whose last event was final are forgotten from the seq map after this long.
const SEQ_RETENTION_SECS: u64 = 7 * 24 * 3600;
/// Committed lines kept in memory for delivery; past it, delivery reads them from the segments.
const TAIL_BYTES: u64 = 4 << 20;
/// The least time from one commit to the next: appends that come meanwhile wait to share the
/// next fsync. A flood then costs the disk 1,000 fsyncs a second at most (a cloud volume's IOPS
/// are a budget: gp3's baseline is 3,000), for at most this much more latency; an append after
/// a quiet spell is committed at once.
const COMMIT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(1);

/// One journal line, as read back (`Writer::commit` writes it by hand, in this shape).
#[derive(Deserialize)]
struct Record {
    id: u64,
    event: Event,
}

/// Why an append was refused.
#[derive(Debug)]
pub enum AppendError {
    Full,
    /// This attempt's undelivered events reached their quota.
    Quota(u64),
    Io(String),
}

impl std::fmt::Display for AppendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AppendError::Full => {
                f.write_str("the event journal is full (the controller is not taking events)")
            }
            AppendError::Quota(limit) => write!(
                f,
                "this task attempt has {limit} bytes of events waiting for the controller already"
            ),
            AppendError::Io(e) => write!(f, "journal write failed: {e}"),
        }
    }
}

struct Append {
    event: Event,
    /// The event's seq, once journaled.
    done: oneshot::Sender<Result<u64, AppendError>>,
}

/// A journaled event, as delivery takes it: its record id and its JSON.
pub struct Journaled {
    pub id: u64,
    pub event: Bytes,
}

/// Records committed lately, in journal order, for delivery to take without reading them back.
/// Not every record passes through here (past [`TAIL_BYTES`], or from before a restart): the
/// reader takes an entry only where it starts exactly where the reader stands, else it reads
/// the segments.
#[derive(Default)]
struct Tail {
    entries: VecDeque<Committed>,
    bytes: u64,
}

/// A record of the commit being written: its answer, and where it is in the commit's lines.
struct Written {
    done: oneshot::Sender<Result<u64, AppendError>>,
    seq: u64,
    key: SeqKey,
    line: std::ops::Range<usize>,
    event: std::ops::Range<usize>,
}

struct Committed {
    id: u64,
    /// The segment (its first id) and the line's byte range in it.
    segment: u64,
    from: u64,
    to: u64,
    key: SeqKey,
    event: Bytes,
}

/// The writing side, shared by request handlers.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Append>,
    /// Wakes the delivery loop when records land.
    pub appended: Arc<Notify>,
    /// Bytes of undelivered records (the writer adds, delivery subtracts).
    pub bytes: Arc<AtomicU64>,
    /// The same, per attempt.
    live: Live,
    tail: Arc<std::sync::Mutex<Tail>>,
    durable: Durable,
    /// Group commits (one fsync each).
    pub syncs: Counter,
    pub dir: PathBuf,
}

/// Undelivered bytes per attempt.
type Live = Arc<std::sync::Mutex<HashMap<SeqKey, u64>>>;

/// Where the records fsynced by this agent end: (segment first id, size). Segments before it
/// are synced whole, those after it not yet at all; `None` before the first commit.
type Durable = Arc<std::sync::Mutex<Option<(u64, u64)>>>;

impl Outbox {
    /// Opens (or recovers) the journal in `dir` and starts its writer thread.
    pub fn open(dir: &Path, max_bytes: u64, attempt_max_bytes: u64) -> io::Result<Outbox> {
        fs::create_dir_all(dir)?;
        let mut seqs: HashMap<SeqKey, SeqState> = read_seqs(dir)?;
        let cursor = read_cursor(dir)?;
        let (mut next_id, mut live_bytes) = (cursor + 1, 0u64);
        let mut live = HashMap::new();
        let segments = segments(dir)?;
        for (i, segment) in segments.iter().enumerate() {
            let file = File::open(&segment.path)?;
            let size = file.metadata()?.len();
            let (records, complete) = read_records(file)?;
            if i + 1 == segments.len() && complete < size {
                // A torn last line, or space allocated and never written: cut off, so that
                // what is appended next starts a line, right after the last record.
                OpenOptions::new()
                    .write(true)
                    .open(&segment.path)?
                    .set_len(complete)?;
            }
            for (record, len) in records {
                if record.id > cursor {
                    live_bytes += len;
                    *live.entry(seq_key(&record.event)).or_default() += len;
                }
                next_id = next_id.max(record.id + 1);
                let state = seqs.entry(seq_key(&record.event)).or_default();
                state.seq = state.seq.max(record.event.seq);
            }
        }
        let bytes = Arc::new(AtomicU64::new(live_bytes));
        let live = Arc::new(std::sync::Mutex::new(live));
        let tail = Arc::default();
        let durable = Durable::default();
        let appended = Arc::new(Notify::new());
        let (tx, rx) = mpsc::channel(1024);
        let syncs = Counter::default();
        let writer = Writer {
            dir: dir.to_owned(),
            seqs,
            next_id,
            current: None,
            bytes: bytes.clone(),
            live: live.clone(),
            tail: Arc::clone(&tail),
            durable: Arc::clone(&durable),
            staged: HashMap::new(),
            max_bytes,
            attempt_max_bytes,
            appended: appended.clone(),
            syncs: syncs.clone(),
        };
        std::thread::Builder::new()
            .name("journal".into())
            .spawn(move || writer.run(rx))?;
        Ok(Outbox {
            tx,
            appended,
            bytes,
            live,
            tail,
            durable,
            syncs,
            dir: dir.to_owned(),
        })
    }

    /// Journals `event` and returns the `seq` it was given, once it is on disk.
    pub async fn append(&self, event: Event) -> Result<u64, AppendError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Append { event, done })
            .await
            .map_err(|_| AppendError::Io("journal writer stopped".into()))?;
        wait.await
            .map_err(|_| AppendError::Io("journal writer stopped".into()))?
    }
}

/// `seq` counts per (namespace, workflow, task id, attempt).
type SeqKey = (String, String, String, u32);

fn seq_key(event: &Event) -> SeqKey {
    (
        event.namespace.clone(),
        event.workflow.clone(),
        event.task_id.clone(),
        event.attempt,
    )
}

fn is_final(phase: Phase) -> bool {
    matches!(
        phase,
        Phase::Succeeded
            | Phase::Failed
            | Phase::TimedOut
            | Phase::Aborted
            | Phase::RetryableFailure
    )
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct SeqState {
    seq: u64,
    #[serde(default)]
    final_at: Option<u64>,
}

struct Segment {
    first_id: u64,
    path: PathBuf,
}

struct Writer {
    dir: PathBuf,
    seqs: HashMap<SeqKey, SeqState>,
    next_id: u64,
    /// The segment written to: its file, first id and size.
    current: Option<(File, u64, u64)>,
    bytes: Arc<AtomicU64>,
    live: Live,
    tail: Arc<std::sync::Mutex<Tail>>,
    durable: Durable,
    /// Per attempt in the commit being written: the last seq, the bytes it adds, whether one
    /// of its events was final. Kept between commits for its capacity.
    staged: HashMap<SeqKey, (u64, u64, bool)>,
    max_bytes: u64,
    attempt_max_bytes: u64,
    appended: Arc<Notify>,
    syncs: Counter,
}

impl Writer {
    /// Group commit, one per [`COMMIT_INTERVAL`] at most: takes every append waiting, writes
    /// them with one write(2), one fsync, then answers all.
    fn run(mut self, mut rx: mpsc::Receiver<Append>) {
        let mut lines = Vec::new();
        let mut last_commit: Option<std::time::Instant> = None;
        while let Some(first) = rx.blocking_recv() {
            if let Some(wait) = last_commit.map(|t| COMMIT_INTERVAL.saturating_sub(t.elapsed())) {
                std::thread::sleep(wait);
            }
            last_commit = Some(std::time::Instant::now());
            let mut batch = vec![first];
            while let Ok(more) = rx.try_recv() {
                batch.push(more);
            }
            self.commit(batch, &mut lines);
            if lines.capacity() > SEGMENT_BYTES as usize {
                lines = Vec::new(); // after a commit of large results
            }
            self.appended.notify_one();
        }
        if let Some((file, ..)) = &self.current {
            let _ = file.sync_all();
        }
        let _ = self.save_seqs();
    }

    /// Journals what of `batch` fits, in `lines` (a reused buffer). Nothing of the batch is
    /// counted (seq, ids, bytes) unless its write landed whole.
    fn commit(&mut self, batch: Vec<Append>, lines: &mut Vec<u8>) {
        // Rotation is between commits: every record of the segment left behind was fsynced
        // by its own commit, and the snapshot covers all the segments delivery may delete.
        let rotate = self
            .current
            .as_ref()
            .is_none_or(|&(_, _, size)| size >= SEGMENT_BYTES);
        if rotate && let Err(e) = self.rotate() {
            for append in batch {
                let _ = append.done.send(Err(AppendError::Io(e.to_string())));
            }
            return;
        }
        lines.clear();
        let mut staged = std::mem::take(&mut self.staged);
        staged.clear();
        let mut written = Vec::with_capacity(batch.len());
        let total = self.bytes.load(Ordering::Relaxed);
        for Append { mut event, done } in batch {
            // The last quarter is for final events: results land while a flood waits.
            let limit = if is_final(event.phase) {
                self.max_bytes
            } else {
                self.max_bytes / 4 * 3
            };
            if total + lines.len() as u64 >= limit {
                let _ = done.send(Err(AppendError::Full));
                continue;
            }
            let key = seq_key(&event);
            let (seq, waiting, ended) = match staged.get(&key) {
                Some(&staged) => staged,
                None => (self.seqs.get(&key).map_or(0, |s| s.seq), 0, false),
            };
            event.seq = seq + 1;
            // A `Record`, written by hand so that the event's own JSON is known to be
            // `lines[event_start..end]` (the tail keeps it for delivery).
            let id = self.next_id + written.len() as u64;
            let start = lines.len();
            write!(lines, "{{\"id\":{id},\"event\":").expect("writing to memory");
            let event_start = lines.len();
            if let Err(e) = serde_json::to_writer(&mut *lines, &event) {
                lines.truncate(start);
                let _ = done.send(Err(AppendError::Io(e.to_string())));
                continue;
            }
            let end = lines.len();
            lines.extend_from_slice(b"}\n");
            let len = (lines.len() - start) as u64;
            let live = self.live.lock().unwrap().get(&key).copied().unwrap_or(0);
            if live + waiting + len > self.attempt_max_bytes {
                lines.truncate(start);
                let _ = done.send(Err(AppendError::Quota(self.attempt_max_bytes)));
                continue;
            }
            let ended = ended || is_final(event.phase);
            staged.insert(key.clone(), (event.seq, waiting + len, ended));
            written.push(Written {
                done,
                seq: event.seq,
                key,
                line: start..lines.len(),
                event: event_start..end,
            });
        }
        if written.is_empty() {
            return;
        }
        let (file, segment, size) = self.current.as_mut().expect("rotated above");
        if let Err(e) = std::os::unix::fs::FileExt::write_all_at(&*file, lines, *size) {
            // A short write (disk full) leaves a torn line, and a reader stops at a torn line:
            // cut it off, or failing that start a new segment, so later records are read.
            if file.set_len(*size).is_err() {
                self.current = None;
                self.next_id += written.len() as u64; // the new segment's name must differ
            }
            for Written { done, .. } in written {
                let _ = done.send(Err(AppendError::Io(e.to_string())));
            }
            return;
        }
        let (segment, offset) = (*segment, *size);
        *size += lines.len() as u64;
        self.next_id += written.len() as u64;
        self.bytes.fetch_add(lines.len() as u64, Ordering::Relaxed);
        let now = crate::token::now();
        {
            let mut live = self.live.lock().unwrap();
            for (key, &(_, bytes, _)) in &staged {
                match live.get_mut(key) {
                    Some(waiting) => *waiting += bytes,
                    None => {
                        live.insert(key.clone(), bytes);
                    }
                }
            }
        }
        for (key, (seq, _, ended)) in staged.drain() {
            let state = self.seqs.entry(key).or_default();
            state.seq = seq;
            if ended {
                state.final_at = Some(now);
            }
        }
        self.staged = staged; // its capacity, for the next commit
        self.syncs.inc();
        let synced = file.sync_data().map_err(|e| e.to_string());
        if synced.is_ok() {
            *self.durable.lock().unwrap() = Some((segment, offset + lines.len() as u64));
            self.keep(lines, segment, offset, &mut written);
        }
        for Written { done, seq, .. } in written {
            let _ = done.send(synced.clone().map(|()| seq).map_err(AppendError::Io));
        }
    }

    /// Keeps the records just committed (`lines`, written at `offset` of `segment`) in the
    /// tail, if it has room for them all (a partial commit there would only be read again).
    fn keep(&self, lines: &[u8], segment: u64, offset: u64, written: &mut [Written]) {
        let mut tail = self.tail.lock().unwrap();
        if tail.bytes + lines.len() as u64 > TAIL_BYTES {
            return;
        }
        tail.bytes += lines.len() as u64;
        let shared = Bytes::copy_from_slice(lines);
        let first_id = self.next_id - written.len() as u64;
        for (id, record) in (first_id..).zip(written) {
            tail.entries.push_back(Committed {
                id,
                segment,
                from: offset + record.line.start as u64,
                to: offset + record.line.end as u64,
                key: std::mem::take(&mut record.key),
                event: shared.slice(record.event.clone()),
            });
        }
    }

    /// Starts a segment named by the next record's id, after snapshotting the seqs.
    fn rotate(&mut self) -> io::Result<()> {
        self.save_seqs()?;
        let path = segment_path(&self.dir, self.next_id);
        // One already there (begun just before a restart, cut to its whole lines at open) is
        // written on after its end.
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(path)?;
        let size = file.metadata()?.len();
        // Best effort: without it (a file system that cannot, a disk nearly full) records are
        // appended as the file grows.
        if let Err(e) = nix::fcntl::fallocate(
            &file,
            nix::fcntl::FallocateFlags::empty(),
            0,
            SEGMENT_BYTES as i64,
        ) {
            tracing::debug!(error = %e, "journal segment not allocated up front");
        }
        self.current = Some((file, self.next_id, size));
        Ok(())
    }

    fn save_seqs(&mut self) -> io::Result<()> {
        let now = crate::token::now();
        self.seqs.retain(|_, s| {
            s.final_at
                .is_none_or(|t| now.saturating_sub(t) < SEQ_RETENTION_SECS)
        });
        let list: Vec<(&String, &String, &String, u32, &SeqState)> = self
            .seqs
            .iter()
            .map(|((n, w, t, a), s)| (n, w, t, *a, s))
            .collect();
        write_atomic(
            &self.dir.join("seqs.json"),
            &serde_json::to_vec(&list).map_err(io::Error::other)?,
        )
    }
}

/// A `seqs.json` entry: `[namespace, workflow, task, attempt, state]`; as older agents wrote
/// it, without the namespace, or without the workflow too (read as empty).
#[derive(Deserialize)]
#[serde(untagged)]
enum SeqEntry {
    Current(String, String, String, u32, SeqState),
    WithoutNamespace(String, String, u32, SeqState),
    Legacy(String, u32, SeqState),
}

/// Unreadable, the agent does not start: restarting the numbers would reuse some, and the
/// controller drops an event with a number it has seen as a duplicate.
fn read_seqs(dir: &Path) -> io::Result<HashMap<SeqKey, SeqState>> {
    let path = dir.join("seqs.json");
    match fs::read(&path) {
        Ok(bytes) => {
            let list: Vec<SeqEntry> = serde_json::from_slice(&bytes).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} is unreadable ({e}): it holds each task attempt's last event \
                         number, so that none is reused (the controller drops a reused one as a \
                         duplicate). Restore it, or remove it once no task on this node runs",
                        path.display()
                    ),
                )
            })?;
            Ok(list
                .into_iter()
                .map(|entry| match entry {
                    SeqEntry::Current(n, w, t, a, s) => ((n, w, t, a), s),
                    SeqEntry::WithoutNamespace(w, t, a, s) => ((String::new(), w, t, a), s),
                    SeqEntry::Legacy(t, a, s) => ((String::new(), String::new(), t, a), s),
                })
                .collect())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(HashMap::new()),
        Err(e) => Err(e),
    }
}

/// The last delivered id. The cursor is written without an fsync (see [`Reader::ack`]), so a
/// crash may leave it empty or stale: read as 0, everything still journaled is sent again.
fn read_cursor(dir: &Path) -> io::Result<u64> {
    match fs::read_to_string(dir.join("cursor")) {
        Ok(text) => Ok(text.trim().parse().unwrap_or_else(|_| {
            warn!(dir = %dir.display(), "the journal's cursor is unreadable (a crash while it was written): sending every journaled event again");
            0
        })),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// The segment whose first record is `first_id` (named so, zero-padded: names sort as ids).
fn segment_path(dir: &Path, first_id: u64) -> PathBuf {
    dir.join(format!("{first_id:020}.jsonl"))
}

fn segments(dir: &Path) -> io::Result<Vec<Segment>> {
    let mut list: Vec<Segment> = fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let first_id = name.strip_suffix(".jsonl")?.parse().ok()?;
            Some(Segment {
                first_id,
                path: e.path(),
            })
        })
        .collect();
    list.sort_by_key(|s| s.first_id);
    Ok(list)
}

/// Reads the next line of a segment into `line` (cleared first); 0 at the end of its records:
/// the end of the file, or space allocated and not yet written (a zero byte where a line
/// begins: from there on the segment is zeros, or a commit that a crash cut short).
fn next_line(reader: &mut BufReader<File>, line: &mut Vec<u8>) -> io::Result<usize> {
    line.clear();
    if reader.fill_buf()?.first() == Some(&0) {
        return Ok(0);
    }
    reader.read_until(b'\n', line)
}

/// Every complete record of a segment with its line's length, and the length of its complete
/// lines (a torn last line, from a crash mid-write, is past it). A complete line that is not a
/// record (corrupt, or from a format this agent does not read) is skipped, not an end.
fn read_records(file: File) -> io::Result<(Vec<(Record, u64)>, u64)> {
    let mut records = Vec::new();
    let mut reader = BufReader::new(file);
    let (mut line, mut complete) = (Vec::new(), 0u64);
    loop {
        let n = next_line(&mut reader, &mut line)?;
        if n == 0 || !line.ends_with(b"\n") {
            break;
        }
        complete += n as u64;
        match serde_json::from_slice::<Record>(&line) {
            Ok(record) => records.push((record, n as u64)),
            Err(e) => warn!(error = %e, "skipping a journal line that is not an event record"),
        }
    }
    Ok((records, complete))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, path)
}

/// The reading side: records after the cursor, in order, and acknowledgement.
pub struct Reader {
    dir: PathBuf,
    cursor: u64,
    /// Where the next unread record is: (segment first id, byte offset).
    position: Option<(u64, u64)>,
    /// Where the position moves once the last peeked batch is acknowledged, and its bytes.
    pending: Option<(u64, u64, u64)>,
    /// The last peeked batch's bytes per attempt.
    pending_live: HashMap<SeqKey, u64>,
    /// `cursor`, opened at the first acknowledgement.
    cursor_file: Option<File>,
    /// The segment the reader was in when the ones wholly delivered were last removed.
    swept: Option<u64>,
    bytes: Arc<AtomicU64>,
    live: Live,
    tail: Arc<std::sync::Mutex<Tail>>,
    durable: Durable,
}

impl Reader {
    pub fn open(outbox: &Outbox) -> io::Result<Reader> {
        Ok(Reader {
            dir: outbox.dir.clone(),
            cursor: read_cursor(&outbox.dir)?,
            position: None,
            pending: None,
            pending_live: HashMap::new(),
            cursor_file: None,
            swept: None,
            bytes: outbox.bytes.clone(),
            live: outbox.live.clone(),
            tail: outbox.tail.clone(),
            durable: outbox.durable.clone(),
        })
    }

    /// Up to `max` records after the cursor, and no more than `max_bytes` of them unless one
    /// alone is larger (without consuming them).
    pub fn peek(&mut self, max: usize, max_bytes: u64) -> io::Result<Vec<Journaled>> {
        self.pending_live.clear();
        if let Some(records) = self.peek_tail(max, max_bytes) {
            return Ok(records);
        }
        let mut records = Vec::new();
        let mut bytes = 0u64;
        let mut end = self.position;
        let segments = segments(&self.dir)?;
        let start = match self.position {
            Some((first, _)) => segments
                .iter()
                .position(|s| s.first_id == first)
                .unwrap_or(0),
            None => 0,
        };
        // Only what is fsynced: a record delivered and then lost in a crash would have its seq
        // given again, to another event, which the controller would drop as a duplicate.
        let durable = *self.durable.lock().unwrap();
        'segments: for segment in &segments[start..] {
            let limit = match durable {
                Some((first, _)) if segment.first_id > first => break,
                Some((first, offset)) if segment.first_id == first => offset,
                _ => u64::MAX,
            };
            let mut offset = match self.position {
                Some((first, offset)) if first == segment.first_id => offset,
                _ => 0,
            };
            let mut file = File::open(&segment.path)?;
            file.seek(SeekFrom::Start(offset))?;
            let mut reader = BufReader::new(file);
            let mut line = Vec::new();
            loop {
                let n = next_line(&mut reader, &mut line)?;
                if n == 0 || !line.ends_with(b"\n") || offset + n as u64 > limit {
                    break; // the end, or a line still being written or synced
                }
                let record = serde_json::from_slice::<Record>(&line)
                    .ok() // not a record: skipped (at open too)
                    .filter(|r| r.id > self.cursor); // or delivered before a restart
                if record.is_some() && !records.is_empty() && bytes + n as u64 > max_bytes {
                    break 'segments;
                }
                offset += n as u64;
                end = Some((segment.first_id, offset));
                let Some(record) = record else {
                    continue;
                };
                bytes += n as u64;
                *self.pending_live.entry(seq_key(&record.event)).or_default() += n as u64;
                // Serialized again rather than sliced: a line from an older agent reads
                // with defaults that its text lacks.
                records.push(Journaled {
                    id: record.id,
                    event: serde_json::to_vec(&record.event)
                        .map_err(io::Error::other)?
                        .into(),
                });
                if records.len() >= max {
                    break 'segments;
                }
            }
        }
        self.pending = end.map(|(first, offset)| (first, offset, bytes));
        Ok(records)
    }

    /// [`Reader::peek`] from the tail, if the next record is there.
    fn peek_tail(&mut self, max: usize, max_bytes: u64) -> Option<Vec<Journaled>> {
        let (segment, mut offset) = self.position?;
        let tail = self.tail.lock().unwrap();
        let first = tail
            .entries
            .iter()
            .position(|c| c.segment == segment && c.from == offset)?;
        let (mut records, mut bytes) = (Vec::new(), 0);
        for c in tail.entries.range(first..) {
            let len = c.to - c.from;
            let next = c.segment == segment && c.from == offset;
            if !next || records.len() >= max || (!records.is_empty() && bytes + len > max_bytes) {
                break;
            }
            (offset, bytes) = (c.to, bytes + len);
            *self.pending_live.entry(c.key.clone()).or_default() += len;
            records.push(Journaled {
                id: c.id,
                event: c.event.clone(),
            });
        }
        self.pending = Some((segment, offset, bytes));
        Some(records)
    }

    /// Marks everything up to `id` delivered; drops segments wholly delivered.
    pub fn ack(&mut self, id: u64) -> io::Result<()> {
        self.cursor = id;
        // Not fsynced: a cursor lost in a crash only sends delivered events again, which the
        // controller drops as duplicates. Syncing it cost a second fsync per delivery, taken
        // from the journal's group commits on the same disk (and a 4 ms stall of a worker).
        // Written in place, one fixed-width line in the file's first sector: a crash leaves
        // the old id, the new one, or an unreadable line (read as 0).
        let file = match &mut self.cursor_file {
            Some(file) => file,
            None => {
                let file = OpenOptions::new()
                    .create(true)
                    .write(true)
                    .truncate(false)
                    .open(self.dir.join("cursor"))?;
                self.cursor_file.insert(file)
            }
        };
        std::os::unix::fs::FileExt::write_all_at(file, format!("{id:020}\n").as_bytes(), 0)?;
        {
            let mut tail = self.tail.lock().unwrap();
            while let Some(len) = tail
                .entries
                .front()
                .filter(|c| c.id <= id)
                .map(|c| c.to - c.from)
            {
                tail.bytes -= len;
                tail.entries.pop_front();
            }
        }
        if let Some((first, offset, bytes)) = self.pending.take() {
            self.position = Some((first, offset));
            self.bytes.fetch_sub(bytes, Ordering::Relaxed);
            let mut live = self.live.lock().unwrap();
            for (key, bytes) in self.pending_live.drain() {
                if let Some(waiting) = live.get_mut(&key) {
                    *waiting = waiting.saturating_sub(bytes);
                    if *waiting == 0 {
                        live.remove(&key);
                    }
                }
            }
        }
        // Only once the reader has moved into another segment can one before it be wholly
        // delivered: the directory is listed then, not after every batch.
        let reading = self.position.map(|(segment, _)| segment);
        if reading != self.swept {
            for pair in segments(&self.dir)?.windows(2) {
                if pair[1].first_id <= id + 1 {
                    fs::remove_file(&pair[0].path)?;
                }
            }
            self.swept = reading;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("outbox-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A journal line as an agent wrote it before events carried their workflow.
    fn legacy_line(id: u64, seq: u64) -> String {
        format!(
            r#"{{"id":{id},"event":{{"task_id":"t","attempt":0,"seq":{seq},"phase":"Running","timestamp":"2026-01-01T00:00:00Z","node":"n"}}}}"#
        ) + "\n"
    }

    fn events(batch: Vec<Journaled>) -> Vec<Event> {
        batch
            .iter()
            .map(|j| serde_json::from_slice(&j.event).unwrap())
            .collect()
    }

    /// The seqs a new reader of `outbox` would deliver.
    fn delivered_seqs(outbox: &Outbox) -> Vec<u64> {
        let batch = Reader::open(outbox).unwrap().peek(100, 1 << 20).unwrap();
        events(batch).iter().map(|e| e.seq).collect()
    }

    fn event(workflow: &str) -> Event {
        serde_json::from_value(serde_json::json!({
            "workflow": workflow, "task_id": "t", "attempt": 0, "seq": 0, "phase": "Running",
            "timestamp": "2026-01-01T00:00:00Z", "node": "n"
        }))
        .unwrap()
    }

    #[test]
    fn an_unreadable_seqs_file_stops_the_outbox_and_says_which_and_why() {
        let dir = journal_dir("bad-seqs");
        fs::write(dir.join("seqs.json"), "[[\"wf\",").unwrap();
        let error = Outbox::open(&dir, 1 << 20, 1 << 20).err().expect("opened");
        let message = error.to_string();
        assert!(
            message.contains(&dir.join("seqs.json").display().to_string())
                && message.contains("reused"),
            "{message}"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn an_older_agents_journal_is_delivered_and_what_follows_a_torn_line_too() {
        let dir = journal_dir("upgrade");
        // Two legacy records, a line that is no record at all, another record, then a line
        // torn by a crash.
        let segment = format!(
            "{}not json\n{}{{\"id\":4,\"eve",
            legacy_line(1, 1) + &legacy_line(2, 2),
            legacy_line(3, 3)
        );
        fs::write(segment_path(&dir, 1), segment).unwrap();
        fs::write(dir.join("seqs.json"), r#"[["gone",0,{"seq":7}]]"#).unwrap();
        let outbox = Outbox::open(&dir, 1 << 20, 1 << 20).unwrap();
        let appended = outbox.append(event("wf")).await.unwrap();
        assert_eq!(appended, 1, "a new workflow's attempt counts from 1");
        let legacy_again = outbox.append(event("")).await.unwrap();
        assert_eq!(legacy_again, 4, "the legacy attempt's seq goes on");
        let mut reader = Reader::open(&outbox).unwrap();
        let seen: Vec<(String, u64)> = events(reader.peek(100, 1 << 20).unwrap())
            .into_iter()
            .map(|e| (e.workflow, e.seq))
            .collect();
        assert_eq!(
            seen,
            [
                (String::new(), 1),
                (String::new(), 2),
                (String::new(), 3),
                ("wf".into(), 1),
                (String::new(), 4)
            ]
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn delivery_reads_the_same_records_from_memory_as_from_the_segments() {
        let dir = journal_dir("tail");
        let outbox = Outbox::open(&dir, 1 << 30, 1 << 30).unwrap();
        // The second event is larger than the tail holds and fills its segment: the third
        // starts a new one.
        let mut large = event("wf");
        large.progress = Some("x".repeat(SEGMENT_BYTES as usize));
        for e in [event("wf"), large, event("wf"), event("wf")] {
            outbox.append(e).await.unwrap();
        }
        let ids = |reader: &Reader| -> Vec<u64> {
            let tail = reader.tail.lock().unwrap();
            tail.entries.iter().map(|c| c.id).collect()
        };
        // What a reader of the segments alone sends (a reader starts there).
        let from_segments = Reader::open(&outbox).unwrap().peek(10, 1 << 30).unwrap();
        let mut reader = Reader::open(&outbox).unwrap();
        assert_eq!(ids(&reader), [1, 3, 4], "in memory: what fits");
        assert_eq!(segments(&dir).unwrap().len(), 2);
        let mut delivered = Vec::new();
        for _ in 0..4 {
            // One at a time: from the segments (1, the large 2, 3 across the new segment's
            // start), then from memory (4).
            let batch = reader.peek(1, 1 << 30).unwrap();
            assert_eq!(batch.len(), 1);
            reader.ack(batch[0].id).unwrap();
            delivered.extend(batch);
        }
        assert!(ids(&reader).is_empty(), "acknowledged, forgotten");
        assert!(reader.peek(10, 1 << 30).unwrap().is_empty());
        assert_eq!(
            segments(&dir).unwrap().len(),
            1,
            "the delivered segment stayed"
        );
        let same = delivered.len() == from_segments.len()
            && delivered
                .iter()
                .zip(&from_segments)
                .all(|(a, b)| a.id == b.id && a.event == b.event);
        assert!(same, "the records differ from the segments' byte for byte");
        assert_eq!(
            events(delivered).iter().map(|e| e.seq).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn delivery_reads_no_record_before_it_is_fsynced() {
        let dir = journal_dir("durable");
        let outbox = Outbox::open(&dir, 1 << 30, 1 << 30).unwrap();
        for _ in 0..2 {
            outbox.append(event("wf")).await.unwrap();
        }
        let segment = segments(&dir).unwrap().remove(0);
        let text = fs::read_to_string(&segment.path).unwrap();
        let text = text.trim_end_matches('\0'); // the segment's space not yet written
        let synced = *outbox.durable.lock().unwrap();
        assert_eq!(synced, Some((segment.first_id, text.len() as u64)));
        // As if the second record were written but its fsync not done, and a segment begun
        // after it: delivery, reading the segments, sees the first record only.
        let first_line = text.find('\n').unwrap() as u64 + 1;
        *outbox.durable.lock().unwrap() = Some((segment.first_id, first_line));
        fs::write(segment_path(&dir, 3), legacy_line(3, 3)).unwrap();
        let ids = |batch: Vec<Journaled>| batch.iter().map(|j| j.id).collect::<Vec<_>>();
        assert_eq!(
            ids(Reader::open(&outbox).unwrap().peek(10, 1 << 30).unwrap()),
            [1]
        );
        *outbox.durable.lock().unwrap() = Some((3, 1 << 20));
        assert_eq!(
            ids(Reader::open(&outbox).unwrap().peek(10, 1 << 30).unwrap()),
            [1, 2, 3]
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_segment_is_allocated_as_it_starts_and_cut_to_its_records_on_restart() {
        let dir = journal_dir("allocated");
        let outbox = Outbox::open(&dir, 1 << 20, 1 << 20).unwrap();
        for _ in 0..2 {
            outbox.append(event("wf")).await.unwrap();
        }
        let segment = segments(&dir).unwrap().remove(0);
        let bytes = fs::read(&segment.path).unwrap();
        assert_eq!(bytes.len() as u64, SEGMENT_BYTES, "allocated as it started");
        let records = bytes.iter().position(|&b| b == 0).unwrap();
        assert_eq!(bytes[..records].iter().filter(|&&b| b == b'\n').count(), 2);
        assert!(bytes[records..].iter().all(|&b| b == 0));

        // The segment as a kill -9 leaves it, opened by the next agent (in a directory of its
        // own: this one's writer thread still runs).
        let restarted = journal_dir("allocated-restarted");
        let path = restarted.join(segment.path.file_name().unwrap());
        fs::write(&path, &bytes).unwrap();
        let outbox = Outbox::open(&restarted, 1 << 20, 1 << 20).unwrap();
        let len = fs::metadata(&path).unwrap().len();
        assert_eq!(len, records as u64, "cut to its records");
        assert_eq!(outbox.append(event("wf")).await.unwrap(), 3);
        assert_eq!(delivered_seqs(&outbox), [1, 2, 3]);
        let _ = fs::remove_dir_all(&dir);
        let _ = fs::remove_dir_all(&restarted);
    }

    #[tokio::test]
    async fn records_after_a_hole_that_a_crash_left_are_not_read() {
        let dir = journal_dir("hole");
        // A commit of records 2 and 3 cut short by a crash: its first page never reached
        // the disk (zeros), a later one did. Neither was acknowledged.
        let segment = format!(
            "{}{}{}",
            legacy_line(1, 1),
            "\0".repeat(100),
            legacy_line(3, 3)
        );
        let path = segment_path(&dir, 1);
        fs::write(&path, segment + &"\0".repeat(4096)).unwrap();
        let outbox = Outbox::open(&dir, 1 << 20, 1 << 20).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            legacy_line(1, 1).len() as u64
        );
        assert_eq!(outbox.append(event("")).await.unwrap(), 2, "seq 2 is free");
        let ids: Vec<u64> = Reader::open(&outbox)
            .unwrap()
            .peek(100, 1 << 20)
            .unwrap()
            .iter()
            .map(|j| j.id)
            .collect();
        assert_eq!(ids, [1, 2]);
        let _ = fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_cursor_torn_by_a_crash_sends_what_is_journaled_again() {
        let dir = journal_dir("torn-cursor");
        let outbox = Outbox::open(&dir, 1 << 20, 1 << 20).unwrap();
        for _ in 0..3 {
            outbox.append(event("wf")).await.unwrap();
        }
        let mut reader = Reader::open(&outbox).unwrap();
        assert_eq!(reader.peek(2, 1 << 20).unwrap().len(), 2);
        reader.ack(2).unwrap();
        assert_eq!(
            fs::read_to_string(dir.join("cursor")).unwrap(),
            "00000000000000000002\n"
        );
        drop(reader);
        fs::write(dir.join("cursor"), "").unwrap(); // as a crash may leave an unsynced file
        assert_eq!(
            delivered_seqs(&outbox),
            [1, 2, 3],
            "every journaled event, again"
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
