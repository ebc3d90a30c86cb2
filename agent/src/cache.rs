//! The node input cache: objects from a remote store kept on the node's disk, named by
//! SHA-256 of (key, ETag) so a changed object is a different entry; least recently used first
//! out past a byte bound; one download however many tasks ask at once; kept across restarts.
//!
//! `latest/SHA256(key)` names the entry last served for a key. While the store is unreachable
//! (and only then) that entry is served unverified: stale-if-error, as HTTP caches do. Argo
//! writes each artifact under a fresh key, so the entry is almost always the object itself; a
//! key overwritten during the outage is the price of running through it.
//!
//! A version the store gave (HEAD: size and ETag) holds for `--cache-fresh-for`: the readers
//! of one input within it cost one round trip to the store, and an object replaced in the
//! store under the same key is served as it was for that long at most.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::body::{Body, channel};
use crate::store::{ObjectMeta, Store, StoreError, hex};

/// The directory of per-key pointers to the entry last served.
const LATEST: &str = "latest";
/// Downloads are written, and their readers fed, in pieces of this size.
const PIECE: usize = 256 * 1024;
/// Pieces queued for the request that started a download, at most: past them it reads the
/// file instead, and the download does not wait for it.
const FEED_PIECES: usize = 4;

pub struct Cache {
    dir: PathBuf,
    max_bytes: u64,
    total: Mutex<u64>,
    /// Downloads in progress, by entry name: every request for the entry reads this one.
    downloads: Mutex<HashMap<String, Fill>>,
    /// The version the store last gave for a key, and when: within `fresh_for` a read is
    /// served without asking again.
    checked: Mutex<HashMap<String, (ObjectMeta, Instant)>>,
    /// How long a version the store gave holds (`--cache-fresh-for`): a fan-out of readers of
    /// one input costs one HEAD, not one each, and an object replaced in the store is seen
    /// within this much.
    fresh_for: Duration,
}

/// Versions remembered at once, at most (stale ones are dropped first).
const CHECKED: usize = 4096;

/// Downloads into the cache at once: past it, or past the cache's bound in bytes being
/// downloaded, an input is streamed through uncached, so that a burst of new inputs cannot fill
/// the node's disk before eviction runs.
const FILLS: usize = 16;
/// Free space a fill leaves on the cache's disk at least (the journal may share it).
const DISK_MARGIN: u64 = 64 << 20;

/// Where a lookup found the object.
pub enum Lookup {
    /// Already on the node's disk.
    Hit(PathBuf),
    /// Being downloaded, by this request (`started`) or an earlier one: read as it fills, so
    /// the first bytes go out at once however large the object.
    Filling { body: Body, started: bool },
    /// Not cached: too many downloads, or too many bytes, are in progress.
    Bypass,
}

/// A download in progress: its file (read by position, so readers share it) and how far it is.
#[derive(Clone)]
pub struct Fill {
    file: Arc<std::fs::File>,
    state: watch::Receiver<FillState>,
    size: u64,
}

#[derive(Clone)]
enum FillState {
    Opening,
    Writing(u64),
    Done(u64),
    Failed(StoreError),
}

impl Cache {
    pub fn open(dir: &Path, max_bytes: u64, fresh_for: Duration) -> std::io::Result<Cache> {
        std::fs::create_dir_all(dir.join(LATEST))?;
        let mut total = 0;
        for entry in std::fs::read_dir(dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == LATEST {
                continue;
            }
            if name.starts_with('.') {
                // A download cut short by a crash.
                let _ = std::fs::remove_file(entry.path());
            } else {
                total += entry.metadata()?.len();
            }
        }
        let cache = Cache {
            dir: dir.to_owned(),
            max_bytes,
            total: Mutex::new(total),
            downloads: Mutex::default(),
            checked: Mutex::default(),
            fresh_for,
        };
        cache.prune_pointers();
        Ok(cache)
    }

    /// Removes the `latest/` pointers whose entry is gone, so that there are never more
    /// pointers than entries (run at start and after each eviction).
    fn prune_pointers(&self) {
        for pointer in std::fs::read_dir(self.dir.join(LATEST))
            .into_iter()
            .flatten()
            .flatten()
        {
            let target = std::fs::read_to_string(pointer.path()).unwrap_or_default();
            if target.is_empty() || !self.dir.join(target.trim()).is_file() {
                let _ = std::fs::remove_file(pointer.path());
            }
        }
    }

    /// `key` at version `meta` from the node's disk, or from its download (started here if
    /// none runs). A download outlives the request that started it, so a client that goes
    /// away leaves neither a partial entry nor a wasted transfer. What fails before the first
    /// byte is an error here, not a cut body.
    pub async fn get(
        self: &Arc<Self>,
        store: &Store,
        key: &str,
        meta: &ObjectMeta,
    ) -> Result<Lookup, StoreError> {
        let id = identity(store, key);
        let name = hex(&Sha256::digest(format!("{id}\0{}", meta.etag).as_bytes()));
        let path = self.dir.join(&name);
        if touch(&path) {
            self.remember(&id, &name);
            return Ok(Lookup::Hit(path));
        }
        let (fill, started) = {
            let mut downloads = self.downloads.lock().unwrap();
            match downloads.get(&name) {
                Some(fill) => (fill.clone(), None),
                None if touch(&path) => return Ok(Lookup::Hit(path)), // it just finished
                None if downloads.len() >= FILLS || {
                    let filling = downloads.values().map(|f| f.size).sum::<u64>() + meta.size;
                    // A full disk is no reason to fail a download: it goes around the cache.
                    let free = crate::store::free_bytes(&self.dir).unwrap_or(0);
                    filling > self.max_bytes || filling.saturating_add(DISK_MARGIN) > free
                } =>
                {
                    return Ok(Lookup::Bypass);
                }
                None => {
                    let tmp = self.dir.join(format!(".{name}.{}", rand::random::<u64>()));
                    let file = std::fs::File::options()
                        .read(true)
                        .write(true)
                        .create_new(true)
                        .open(&tmp)
                        .map_err(|e| {
                            StoreError::Failed(format!("node cache {}: {e}", tmp.display()))
                        })?;
                    let (progress, state) = watch::channel(FillState::Opening);
                    let (feed, fed) = mpsc::channel(FEED_PIECES);
                    let fill = Fill {
                        file: Arc::new(file),
                        state,
                        size: meta.size,
                    };
                    downloads.insert(name.clone(), fill.clone());
                    let download = Download {
                        store: store.clone(),
                        key: key.to_owned(),
                        meta: meta.clone(),
                        name,
                        tmp,
                        file: fill.file.clone(),
                        progress,
                        feed: Some(feed),
                    };
                    tokio::spawn(self.clone().download(download));
                    (fill, Some(fed))
                }
            }
        };
        let mut state = fill.state.clone();
        let first = state
            .wait_for(|s| !matches!(s, FillState::Opening))
            .await
            .map(|s| s.clone());
        match first {
            Ok(FillState::Failed(e)) => Err(e),
            Err(_) => Err(StoreError::Failed(format!("the download of {key} stopped"))),
            Ok(_) => Ok(Lookup::Filling {
                started: started.is_some(),
                body: match started {
                    Some(fed) => StarterBody {
                        fed: Some(fed),
                        ready: Vec::new().into_iter(),
                        at: 0,
                        fill,
                        file: None,
                    }
                    .boxed(),
                    None => fill.body_from(0),
                },
            }),
        }
    }

    /// The version of `key` the store gave less than `fresh_for` ago.
    pub fn fresh(&self, store: &Store, key: &str) -> Option<ObjectMeta> {
        let checked = self.checked.lock().unwrap();
        let (meta, at) = checked.get(&identity(store, key))?;
        (at.elapsed() < self.fresh_for).then(|| meta.clone())
    }

    /// Notes the version of `key` the store just gave.
    pub fn checked(&self, store: &Store, key: &str, meta: &ObjectMeta) {
        let mut checked = self.checked.lock().unwrap();
        if checked.len() >= CHECKED {
            checked.retain(|_, (_, at)| at.elapsed() < self.fresh_for);
            if checked.len() >= CHECKED {
                checked.clear();
            }
        }
        checked.insert(identity(store, key), (meta.clone(), Instant::now()));
    }

    /// The entry last served for `key` of `store`, if it is still cached (see the module docs).
    pub fn last_served(&self, store: &Store, key: &str) -> Option<PathBuf> {
        let name = std::fs::read_to_string(self.latest(&identity(store, key))).ok()?;
        let path = self.dir.join(name.trim());
        touch(&path).then_some(path)
    }

    fn latest(&self, key: &str) -> PathBuf {
        self.dir
            .join(LATEST)
            .join(hex(&Sha256::digest(key.as_bytes())))
    }

    /// Records that `key` was last served from entry `name` (best effort: a lost pointer
    /// only costs the outage fallback for that key).
    fn remember(&self, key: &str, name: &str) {
        let latest = self.latest(key);
        if std::fs::read_to_string(&latest).is_ok_and(|n| n == name) {
            return;
        }
        let tmp = latest.with_extension(format!("tmp{}", rand::random::<u64>()));
        if std::fs::write(&tmp, name)
            .and_then(|()| std::fs::rename(&tmp, &latest))
            .is_err()
        {
            let _ = std::fs::remove_file(&tmp);
        }
    }

    async fn download(self: Arc<Self>, mut d: Download) {
        let outcome = match self.fetch(&mut d).await {
            Ok(size) => std::fs::rename(&d.tmp, self.dir.join(&d.name))
                .map(|()| size)
                .map_err(|e| StoreError::Failed(format!("node cache {}: {e}", d.tmp.display()))),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(size) => {
                *self.total.lock().unwrap() += size;
                self.evict(&self.dir.join(&d.name));
                self.remember(&identity(&d.store, &d.key), &d.name);
                d.progress.send_replace(FillState::Done(size));
            }
            Err(e) => {
                let _ = std::fs::remove_file(&d.tmp);
                d.progress.send_replace(FillState::Failed(e));
            }
        }
        self.downloads.lock().unwrap().remove(&d.name);
    }

    /// Copies the object into the download's file, publishing how far it got; its size.
    async fn fetch(&self, d: &mut Download) -> Result<u64, StoreError> {
        let Some((got, mut body)) = d.store.get(&d.key).await? else {
            return Err(StoreError::Failed(format!(
                "{} vanished from the store",
                d.key
            )));
        };
        let changed = || StoreError::Unavailable(format!("{} changed while it was fetched", d.key));
        if got.etag != d.meta.etag {
            return Err(changed());
        }
        d.progress.send_replace(FillState::Writing(0));
        // Received so far, and the piece being gathered (the frames themselves, not a copy).
        let (mut size, mut piece, mut piece_len) = (0u64, Vec::new(), 0);
        // The piece being written, on a blocking thread while the next one arrives.
        let mut writing: Option<JoinHandle<std::io::Result<u64>>> = None;
        let written = |writing: JoinHandle<std::io::Result<u64>>| async {
            let at = writing
                .await
                .map_err(std::io::Error::other)
                .and_then(|written| written)
                .map_err(|e| StoreError::Failed(format!("node cache {}: {e}", d.tmp.display())))?;
            d.progress.send_replace(FillState::Writing(at));
            Ok::<_, StoreError>(())
        };
        loop {
            let frame = body.frame().await;
            let end = frame.is_none();
            if let Some(frame) = frame {
                let frame = frame
                    .map_err(|e| StoreError::Unavailable(format!("reading {}: {e}", d.key)))?;
                if let Ok(data) = frame.into_data() {
                    piece_len += data.len();
                    piece.push(data);
                }
            }
            if piece_len >= PIECE || (end && piece_len > 0) {
                let piece = std::mem::take(&mut piece);
                // Full (the client is slower than the store) or gone: it reads the file from
                // where the feed stopped.
                if d.feed
                    .as_ref()
                    .is_some_and(|feed| feed.try_send(piece.clone()).is_err())
                {
                    d.feed = None;
                }
                if let Some(writing) = writing.take() {
                    written(writing).await?;
                }
                let (file, mut at) = (d.file.clone(), size);
                writing = Some(tokio::task::spawn_blocking(move || {
                    for bytes in &piece {
                        file.write_all_at(bytes, at)?;
                        at += bytes.len() as u64;
                    }
                    Ok(at)
                }));
                size += piece_len as u64;
                piece_len = 0;
            }
            if end {
                break;
            }
        }
        if let Some(writing) = writing.take() {
            written(writing).await?;
        }
        if size != d.meta.size {
            return Err(changed());
        }
        Ok(size)
    }

    /// Removes least recently used entries until the cache fits its bound (never `keep`).
    fn evict(&self, keep: &Path) {
        let mut total = self.total.lock().unwrap();
        if *total <= self.max_bytes {
            return;
        }
        let mut entries: Vec<(SystemTime, u64, PathBuf)> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                !e.file_name().to_string_lossy().starts_with('.')
                    && e.file_type().is_ok_and(|t| t.is_file())
                    && e.path() != keep
            })
            .filter_map(|e| {
                let meta = e.metadata().ok()?;
                Some((meta.modified().ok()?, meta.len(), e.path()))
            })
            .collect();
        entries.sort();
        for (_, size, path) in entries {
            if *total <= self.max_bytes {
                break;
            }
            // An open reader keeps its file; the name goes now.
            if std::fs::remove_file(&path).is_ok() {
                *total -= size;
            }
        }
        drop(total);
        self.prune_pointers();
    }
}

/// Marks a cached file as just used; false when it is not there.
fn touch(path: &Path) -> bool {
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(SystemTime::now()))
        .is_ok()
}

/// What a download task needs.
struct Download {
    store: Store,
    key: String,
    meta: ObjectMeta,
    name: String,
    tmp: PathBuf,
    file: Arc<std::fs::File>,
    progress: watch::Sender<FillState>,
    /// The pieces for the request that started the download, while it keeps up.
    feed: Option<mpsc::Sender<Vec<Bytes>>>,
}

impl Fill {
    /// The object from byte `at` as a response body: what is written so far, then the rest
    /// as it lands.
    fn body_from(&self, mut at: u64) -> Body {
        let (tx, body) = channel(4);
        let (file, mut state) = (self.file.clone(), self.state.clone());
        tokio::spawn(async move {
            let mut closed = false;
            loop {
                let now = state.borrow_and_update().clone();
                let (written, done) = match now {
                    FillState::Opening => (0, false),
                    FillState::Writing(n) => (n, false),
                    FillState::Done(n) => (n, true),
                    FillState::Failed(e) => {
                        let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                        return;
                    }
                };
                if at < written {
                    let len = (written - at).min(PIECE as u64);
                    let file = file.clone();
                    let piece = tokio::task::spawn_blocking(move || {
                        let mut buf = vec![0; len as usize];
                        file.read_exact_at(&mut buf, at).map(|()| Bytes::from(buf))
                    })
                    .await
                    .map_err(std::io::Error::other)
                    .and_then(|read| read);
                    let failed = piece.is_err();
                    if tx.send(piece).await.is_err() || failed {
                        return; // the client went away, or was told
                    }
                    at += len;
                } else if done {
                    return;
                } else if closed {
                    let stopped = std::io::Error::other("the download stopped");
                    let _ = tx.send(Err(stopped)).await;
                    return;
                } else if state.changed().await.is_err() {
                    closed = true; // one more look at the last state
                }
            }
        });
        body
    }
}

/// The body of the request that started a download: the pieces as they arrive, with no
/// read back from the file, while it keeps up; from the file where they stopped (a client
/// slower than the store, or the end).
struct StarterBody {
    fed: Option<mpsc::Receiver<Vec<Bytes>>>,
    ready: std::vec::IntoIter<Bytes>,
    /// Bytes handed out so far.
    at: u64,
    fill: Fill,
    file: Option<Body>,
}

impl HttpBody for StarterBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        loop {
            if let Some(bytes) = this.ready.next() {
                this.at += bytes.len() as u64;
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
            let Some(fed) = &mut this.fed else { break };
            match std::task::ready!(fed.poll_recv(cx)) {
                Some(piece) => this.ready = piece.into_iter(),
                None => this.fed = None,
            }
        }
        let (fill, at) = (&this.fill, this.at);
        Pin::new(this.file.get_or_insert_with(|| fill.body_from(at))).poll_frame(cx)
    }
}

/// What an entry is the version of: a key within one store (several Argo repositories may
/// hold the same key).
fn identity(store: &Store, key: &str) -> String {
    format!("{}\0{key}", store.identity())
}
