//! The outbox: every event is appended to an on-disk journal, and fsynced, before the emissary
//! hears "ok"; it is delivered to the controller in order and removed only once acknowledged.
//!
//! Layout under `DATA_DIR/journal/`: segments `NNNNNNNNNNNNNNNNNNNN.jsonl` (named by their first
//! record id; one JSON record per line), `cursor` (the last delivered id), `seqs.json` (the last
//! `seq` of every task attempt whose records are gone). A kill -9 loses nothing acknowledged: a
//! half-written last line is ignored on restart, records after the cursor are sent again (the
//! controller deduplicates by `(workflow, task_id, attempt, seq)`), and `seq` never repeats.
//!
//! Full journal (`--journal-max-bytes`): new events are refused with 503 and the emissary
//! retries with backoff; nothing is ever dropped to make room.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use protocol::api::{Event, Phase};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, oneshot};
use tracing::warn;

/// A new segment starts past this size.
const SEGMENT_BYTES: u64 = 8 << 20;
/// Attempts whose last event was final are forgotten from the seq map after this long.
const SEQ_RETENTION_SECS: u64 = 7 * 24 * 3600;

/// One journal line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub id: u64,
    pub event: Event,
}

/// Why an append was refused.
#[derive(Debug)]
pub enum AppendError {
    Full,
    Io(String),
}

impl std::fmt::Display for AppendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AppendError::Full => {
                f.write_str("the event journal is full (the controller is not taking events)")
            }
            AppendError::Io(e) => write!(f, "journal write failed: {e}"),
        }
    }
}

struct Append {
    event: Event,
    done: oneshot::Sender<Result<Event, AppendError>>,
}

/// The writing side, shared by request handlers.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Append>,
    /// Wakes the delivery loop when records land.
    pub appended: Arc<Notify>,
    /// Bytes of undelivered records (the writer adds, delivery subtracts).
    pub bytes: Arc<AtomicU64>,
    pub dir: PathBuf,
}

impl Outbox {
    /// Opens (or recovers) the journal in `dir` and starts its writer thread.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Outbox> {
        fs::create_dir_all(dir)?;
        let mut seqs: HashMap<SeqKey, SeqState> = read_seqs(dir)?;
        let cursor = read_cursor(dir)?;
        let (mut next_id, mut live_bytes) = (cursor + 1, 0u64);
        let segments = segments(dir)?;
        for (i, segment) in segments.iter().enumerate() {
            let file = File::open(&segment.path)?;
            let size = file.metadata()?.len();
            let (records, complete) = read_records(file)?;
            if i + 1 == segments.len() && complete < size {
                // A torn last line: cut it, so that what is appended next starts a line.
                OpenOptions::new()
                    .write(true)
                    .open(&segment.path)?
                    .set_len(complete)?;
            }
            for (record, len) in records {
                if record.id > cursor {
                    live_bytes += len;
                }
                next_id = next_id.max(record.id + 1);
                let state = seqs.entry(seq_key(&record.event)).or_default();
                state.seq = state.seq.max(record.event.seq);
            }
        }
        let bytes = Arc::new(AtomicU64::new(live_bytes));
        let appended = Arc::new(Notify::new());
        let (tx, rx) = mpsc::channel(1024);
        let writer = Writer {
            dir: dir.to_owned(),
            seqs,
            next_id,
            current: None,
            bytes: bytes.clone(),
            max_bytes,
            appended: appended.clone(),
        };
        std::thread::Builder::new()
            .name("journal".into())
            .spawn(move || writer.run(rx))?;
        Ok(Outbox {
            tx,
            appended,
            bytes,
            dir: dir.to_owned(),
        })
    }

    /// Journals `event` (its `seq` is assigned here); returns it once it is on disk.
    pub async fn append(&self, event: Event) -> Result<Event, AppendError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Append { event, done })
            .await
            .map_err(|_| AppendError::Io("journal writer stopped".into()))?;
        wait.await
            .map_err(|_| AppendError::Io("journal writer stopped".into()))?
    }
}

/// `seq` counts per (workflow, task id, attempt).
type SeqKey = (String, String, u32);

fn seq_key(event: &Event) -> SeqKey {
    (event.workflow.clone(), event.task_id.clone(), event.attempt)
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
    current: Option<(File, u64)>,
    bytes: Arc<AtomicU64>,
    max_bytes: u64,
    appended: Arc<Notify>,
}

impl Writer {
    /// Group commit: takes every append waiting, writes them, one fsync, then answers all.
    fn run(mut self, mut rx: mpsc::Receiver<Append>) {
        while let Some(first) = rx.blocking_recv() {
            let mut batch = vec![first];
            while let Ok(more) = rx.try_recv() {
                batch.push(more);
            }
            let mut written = Vec::with_capacity(batch.len());
            for append in batch {
                if self.bytes.load(Ordering::Relaxed) >= self.max_bytes {
                    let _ = append.done.send(Err(AppendError::Full));
                    continue;
                }
                match self.write(append.event) {
                    Ok(event) => written.push((append.done, event)),
                    Err(e) => {
                        let _ = append.done.send(Err(AppendError::Io(e.to_string())));
                    }
                }
            }
            let synced = match &mut self.current {
                Some((file, _)) => file.sync_data().map_err(|e| e.to_string()),
                None => Ok(()),
            };
            // A failed append was answered; the records written before it stand on the fsync.
            for (done, event) in written {
                let _ = done.send(synced.clone().map(|()| event).map_err(AppendError::Io));
            }
            self.appended.notify_one();
        }
        if let Some((file, _)) = &self.current {
            let _ = file.sync_all();
        }
        let _ = self.save_seqs();
    }

    fn write(&mut self, mut event: Event) -> io::Result<Event> {
        let state = self.seqs.entry(seq_key(&event)).or_default();
        state.seq += 1;
        event.seq = state.seq;
        if matches!(
            event.phase,
            Phase::Succeeded
                | Phase::Failed
                | Phase::TimedOut
                | Phase::Aborted
                | Phase::RetryableFailure
        ) {
            state.final_at = Some(crate::token::now());
        }
        let record = Record {
            id: self.next_id,
            event,
        };
        let mut line = serde_json::to_vec(&record).map_err(io::Error::other)?;
        line.push(b'\n');
        let rotate = self
            .current
            .as_ref()
            .is_none_or(|(_, size)| *size >= SEGMENT_BYTES);
        if rotate {
            // The snapshot covers every record of the segments delivery may now delete.
            self.save_seqs()?;
            let path = self.dir.join(format!("{:020}.jsonl", record.id));
            let file = OpenOptions::new().create(true).append(true).open(path)?;
            let size = file.metadata()?.len();
            self.current = Some((file, size));
        }
        let (file, size) = self.current.as_mut().expect("opened above");
        if let Err(e) = file.write_all(&line) {
            // A short write (disk full) leaves a torn line, and a reader stops at a torn line:
            // cut it off, or failing that start a new segment, so later records are read.
            if file.set_len(*size).is_err() {
                let _ = file.sync_data(); // for the records before it in this group commit
                self.current = None;
                self.next_id += 1; // the new segment's name must differ from the torn one's
            }
            return Err(e);
        }
        *size += line.len() as u64;
        self.bytes.fetch_add(line.len() as u64, Ordering::Relaxed);
        self.next_id += 1;
        Ok(record.event)
    }

    fn save_seqs(&mut self) -> io::Result<()> {
        let now = crate::token::now();
        self.seqs.retain(|_, s| {
            s.final_at
                .is_none_or(|t| now.saturating_sub(t) < SEQ_RETENTION_SECS)
        });
        let list: Vec<(&String, &String, u32, &SeqState)> = self
            .seqs
            .iter()
            .map(|((w, t, a), s)| (w, t, *a, s))
            .collect();
        write_atomic(
            &self.dir.join("seqs.json"),
            &serde_json::to_vec(&list).map_err(io::Error::other)?,
        )
    }
}

/// A `seqs.json` entry: `[workflow, task, attempt, state]`, or `[task, attempt, state]` as
/// agents wrote it before events carried their workflow (read as the empty workflow).
#[derive(Deserialize)]
#[serde(untagged)]
enum SeqEntry {
    Current(String, String, u32, SeqState),
    Legacy(String, u32, SeqState),
}

fn read_seqs(dir: &Path) -> io::Result<HashMap<SeqKey, SeqState>> {
    match fs::read(dir.join("seqs.json")) {
        Ok(bytes) => {
            let list: Vec<SeqEntry> = serde_json::from_slice(&bytes).map_err(io::Error::other)?;
            Ok(list
                .into_iter()
                .map(|entry| match entry {
                    SeqEntry::Current(w, t, a, s) => ((w, t, a), s),
                    SeqEntry::Legacy(t, a, s) => ((String::new(), t, a), s),
                })
                .collect())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(HashMap::new()),
        Err(e) => Err(e),
    }
}

fn read_cursor(dir: &Path) -> io::Result<u64> {
    match fs::read_to_string(dir.join("cursor")) {
        Ok(text) => text
            .trim()
            .parse()
            .map_err(|_| io::Error::other(format!("{}/cursor is corrupt", dir.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
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

/// Every complete record of a segment with its line's length, and the length of its complete
/// lines (a torn last line, from a crash mid-write, is past it). A complete line that is not a
/// record (corrupt, or from a format this agent does not read) is skipped, not an end.
fn read_records(file: File) -> io::Result<(Vec<(Record, u64)>, u64)> {
    let mut records = Vec::new();
    let mut reader = BufReader::new(file);
    let (mut line, mut complete) = (Vec::new(), 0u64);
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
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
    bytes: Arc<AtomicU64>,
}

impl Reader {
    pub fn open(outbox: &Outbox) -> io::Result<Reader> {
        Ok(Reader {
            dir: outbox.dir.clone(),
            cursor: read_cursor(&outbox.dir)?,
            position: None,
            pending: None,
            bytes: outbox.bytes.clone(),
        })
    }

    /// Up to `max` records after the cursor (without consuming them).
    pub fn peek(&mut self, max: usize) -> io::Result<Vec<Record>> {
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
        'segments: for segment in &segments[start..] {
            let mut offset = match self.position {
                Some((first, offset)) if first == segment.first_id => offset,
                _ => 0,
            };
            let mut file = File::open(&segment.path)?;
            file.seek(SeekFrom::Start(offset))?;
            let mut reader = BufReader::new(file);
            let mut line = Vec::new();
            loop {
                line.clear();
                let n = reader.read_until(b'\n', &mut line)?;
                if n == 0 || !line.ends_with(b"\n") {
                    break; // the end, or a line still being written
                }
                offset += n as u64;
                end = Some((segment.first_id, offset));
                let Ok(record) = serde_json::from_slice::<Record>(&line) else {
                    continue; // not a record (skipped at open too)
                };
                if record.id <= self.cursor {
                    continue; // delivered before a restart
                }
                bytes += n as u64;
                records.push(record);
                if records.len() >= max {
                    break 'segments;
                }
            }
        }
        self.pending = end.map(|(first, offset)| (first, offset, bytes));
        Ok(records)
    }

    /// Marks everything up to `id` delivered; drops segments wholly delivered.
    pub fn ack(&mut self, id: u64) -> io::Result<()> {
        self.cursor = id;
        write_atomic(&self.dir.join("cursor"), id.to_string().as_bytes())?;
        if let Some((first, offset, bytes)) = self.pending.take() {
            self.position = Some((first, offset));
            self.bytes.fetch_sub(bytes, Ordering::Relaxed);
        }
        let segments = segments(&self.dir)?;
        for pair in segments.windows(2) {
            if pair[1].first_id <= id + 1 {
                fs::remove_file(&pair[0].path)?;
            }
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

    fn event(workflow: &str) -> Event {
        serde_json::from_value(serde_json::json!({
            "workflow": workflow, "task_id": "t", "attempt": 0, "seq": 0, "phase": "Running",
            "timestamp": "2026-01-01T00:00:00Z", "node": "n"
        }))
        .unwrap()
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
        fs::write(dir.join(format!("{:020}.jsonl", 1)), segment).unwrap();
        fs::write(dir.join("seqs.json"), r#"[["gone",0,{"seq":7}]]"#).unwrap();
        let outbox = Outbox::open(&dir, 1 << 20).unwrap();
        let appended = outbox.append(event("wf")).await.unwrap();
        assert_eq!(appended.seq, 1, "a new workflow's attempt counts from 1");
        let legacy_again = outbox.append(event("")).await.unwrap();
        assert_eq!(legacy_again.seq, 4, "the legacy attempt's seq goes on");
        let mut reader = Reader::open(&outbox).unwrap();
        let seen: Vec<(String, u64)> = reader
            .peek(100)
            .unwrap()
            .into_iter()
            .map(|r| (r.event.workflow, r.event.seq))
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
}
