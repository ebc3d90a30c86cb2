//! Where artifacts come from and go to: one trait, a local directory here; the node agent
//! (`crate::transfer::agent`) is the other implementation.

use std::fs;
use std::io::{BufWriter, Read, Write};
use std::path::{Component, Path, PathBuf};

use protocol::api::StoredArtifact;
use protocol::spec::Packing;

use crate::fsutil;
use crate::transfer::archive;

/// Why an object could not be opened.
#[derive(Debug)]
pub enum GetError {
    /// The key itself is refused (absolute, `..`): the spec's mistake, retrying cannot help.
    BadKey(String),
    /// The store failed: the platform's problem.
    Failed(String),
}

/// An input's bytes.
pub struct Input<'a> {
    pub bytes: Box<dyn Read + 'a>,
    /// A directory stored file by file (Argo's `archive: none`), sent as tar: unpacked whatever
    /// the input's `archive` says.
    pub directory: bool,
}

impl<'a> Input<'a> {
    pub fn object(bytes: Box<dyn Read + 'a>) -> Input<'a> {
        Input {
            bytes,
            directory: false,
        }
    }
}

/// An artifact store as the emissary sees it.
pub trait Store {
    /// Opens the object at `key`; `Ok(None)` when there is none.
    fn get(&self, key: &str) -> Result<Option<Box<dyn Read + '_>>, GetError>;
    /// Opens input `artifact`: by its key, unless the store locates inputs itself (the agent
    /// of an Argo pod, by name from the pod's template).
    fn get_input(
        &self,
        artifact: &protocol::spec::InputArtifact,
    ) -> Result<Option<Input<'_>>, GetError> {
        match artifact.store_key() {
            Some(key) => Ok(self.get(key)?.map(Input::object)),
            None => Ok(None),
        }
    }
    /// Packs `source` and stores it as `file` (`{artifact}.{ext}`); the store picks the key.
    fn put(&self, file: &str, source: &Path, packing: Packing) -> Result<StoredArtifact, String>;
}

/// A directory: keys are relative paths inside it; outputs land in `artifacts/`.
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalStore { root: root.into() }
    }

    fn path_of(&self, key: &str) -> Result<PathBuf, String> {
        let relative = Path::new(key);
        let clean = relative
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
        if key.is_empty() || !clean {
            return Err(format!(
                "store key {key:?} must be a relative path without . or .."
            ));
        }
        Ok(self.root.join(relative))
    }
}

impl Store for LocalStore {
    fn get(&self, key: &str) -> Result<Option<Box<dyn Read + '_>>, GetError> {
        let path = self.path_of(key).map_err(GetError::BadKey)?;
        match std::fs::metadata(&path) {
            // A directory (a key prefix) is not an object.
            Ok(meta) if meta.is_dir() => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            _ => {}
        }
        // Only a regular file is an object: a FIFO at a key must not block the step.
        match crate::fsutil::open_regular(&path) {
            Ok(file) => Ok(Some(Box::new(file))),
            Err(e) => Err(GetError::Failed(format!("{}: {e}", path.display()))),
        }
    }

    fn put(&self, file: &str, source: &Path, packing: Packing) -> Result<StoredArtifact, String> {
        let key = format!("artifacts/{file}");
        let path = self.path_of(&key)?;
        let dir = path.parent().unwrap_or(&self.root);
        fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        // Packed into a temporary name and renamed: a reader never sees half an archive.
        let tmp = fsutil::temp_name(&path);
        let written = (|| {
            let mut file = BufWriter::with_capacity(super::CHUNK, fsutil::create_new(&tmp)?);
            let digest = archive::pack(source, packing, &mut file)?;
            file.flush()?;
            fs::rename(&tmp, &path)?;
            Ok::<_, std::io::Error>(digest)
        })();
        match written {
            Ok(digest) => Ok(StoredArtifact {
                key,
                size: digest.size,
                sha256: digest.sha256,
            }),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(format!("storing {}: {e}", path.display()))
            }
        }
    }
}
