//! The node input cache: objects from a remote store kept on the node's disk, named by
//! SHA-256 of (key, ETag) so a changed object is a different entry; least recently used first
//! out past a byte bound; one download however many tasks ask at once; kept across restarts.
//!
//! `latest/SHA256(key)` names the entry last served for a key. While the store is unreachable
//! (and only then) that entry is served unverified: stale-if-error, as HTTP caches do. Argo
//! writes each artifact under a fresh key, so the entry is almost always the object itself; a
//! key overwritten during the outage is the price of running through it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::store::{ObjectMeta, Store, StoreError, hex};

/// The directory of per-key pointers to the entry last served.
const LATEST: &str = "latest";

pub struct Cache {
    dir: PathBuf,
    max_bytes: u64,
    total: Mutex<u64>,
    downloads: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Whether a lookup found the object already cached.
pub enum Lookup {
    Hit(PathBuf),
    Fetched(PathBuf),
}

impl Cache {
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<Cache> {
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

    /// The cached file for `key` at version `meta`, downloading it first if needed.
    pub async fn get(
        &self,
        store: &Store,
        key: &str,
        meta: &ObjectMeta,
    ) -> Result<Lookup, StoreError> {
        let name = hex(&Sha256::digest(format!("{key}\0{}", meta.etag).as_bytes()));
        let path = self.dir.join(&name);
        if touch(&path) {
            self.remember(key, &name);
            return Ok(Lookup::Hit(path));
        }
        let lock = self
            .downloads
            .lock()
            .unwrap()
            .entry(name.clone())
            .or_default()
            .clone();
        let _one_download = lock.lock().await;
        if touch(&path) {
            return Ok(Lookup::Hit(path));
        }
        let result = self.download(store, key, &path).await;
        self.downloads.lock().unwrap().remove(&name);
        result?;
        self.remember(key, &name);
        Ok(Lookup::Fetched(path))
    }

    /// The entry last served for `key`, if it is still cached (see the module docs).
    pub fn last_served(&self, key: &str) -> Option<PathBuf> {
        let name = std::fs::read_to_string(self.latest(key)).ok()?;
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

    async fn download(&self, store: &Store, key: &str, path: &Path) -> Result<(), StoreError> {
        let Some((_, mut body)) = store.get(key).await? else {
            return Err(StoreError::Failed(format!("{key} vanished from the store")));
        };
        let tmp = self.dir.join(format!(
            ".{}.{}",
            path.file_name().unwrap_or_default().to_string_lossy(),
            rand::random::<u64>()
        ));
        let failed =
            |e: std::io::Error| StoreError::Failed(format!("node cache {}: {e}", tmp.display()));
        let written = async {
            let mut file = tokio::fs::File::create(&tmp).await.map_err(failed)?;
            let mut size = 0u64;
            while let Some(frame) = body.frame().await {
                let frame =
                    frame.map_err(|e| StoreError::Unavailable(format!("reading {key}: {e}")))?;
                if let Ok(data) = frame.into_data() {
                    size += data.len() as u64;
                    file.write_all(&data).await.map_err(failed)?;
                }
            }
            file.flush().await.map_err(failed)?;
            tokio::fs::rename(&tmp, path).await.map_err(failed)?;
            Ok(size)
        }
        .await;
        let size = match written {
            Ok(size) => size,
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e);
            }
        };
        *self.total.lock().unwrap() += size;
        self.evict(path);
        Ok(())
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
