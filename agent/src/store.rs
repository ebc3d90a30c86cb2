//! Artifact stores behind one type: a local directory (the default: nothing to configure) or
//! S3 (aws-sdk-s3: multipart streaming upload with one part in memory, streamed download).
//!
//! Keys are `{prefix}/{workflow}/{task}/{attempt}/{file}`. An upload that fails leaves nothing
//! visible: a temporary file renamed into place, or an aborted multipart upload.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aws_runtime::auth::PayloadSigningOverride;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextMut;
use aws_sdk_s3::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_s3::error::BoxError;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use protocol::api::StoredArtifact;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::body::{Body, Chunks, channel};
use crate::digest;

/// How a local upload's temporary file begins: `~` is in no artifact name, so no object's key
/// can look like one.
const TEMP_PREFIX: &str = ".~upload.";

/// S3 multipart part size to begin with (S3's minimum is 5 MiB); see [`part_size`].
const PART_SIZE: usize = 8 << 20;
/// Parts uploading while the next is received: one upload holds at most
/// `(PARTS_IN_FLIGHT + 1)` parts of memory (24 MiB for most).
const PARTS_IN_FLIGHT: usize = 2;
/// Part buffers of all uploads together, in `PART_SIZE` units (128 MiB): ten tasks uploading
/// at once would otherwise hold 240 MiB, near the DaemonSet's 256 MiB limit. An upload waits
/// for room before it reads more of its body.
pub const PARTS_BUDGET: usize = 16;

/// How a store operation failed.
#[derive(Debug, Clone)]
pub enum StoreError {
    /// The store could not be reached or answered 5xx: worth retrying.
    Unavailable(String),
    /// The upload's own source failed (the client went away, timed out).
    Source(String),
    /// The key itself is refused (absolute, `..`): the caller's mistake, not worth retrying.
    BadKey(String),
    /// Anything else (a 4xx from S3, a local write that failed).
    Failed(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Unavailable(m) => write!(f, "store unavailable: {m}"),
            StoreError::Source(m) => write!(f, "upload interrupted: {m}"),
            StoreError::BadKey(m) | StoreError::Failed(m) => write!(f, "store error: {m}"),
        }
    }
}

/// An object's identity for caching: its size and the store's entity tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub size: u64,
    pub etag: String,
}

/// Where artifacts live (cheap to clone: the S3 client is shared).
#[derive(Clone)]
pub enum Store {
    Local {
        root: PathBuf,
    },
    S3 {
        client: Client,
        /// The endpoint URL, or `aws` for AWS's own (the store's identity, with the bucket).
        endpoint: String,
        bucket: String,
        prefix: String,
        /// Shared by every upload: see [`PARTS_BUDGET`].
        part_buffers: Arc<PartBudget>,
    },
    /// Read-only: the key is an `http(s)://` URL (Argo's `http` input artifacts), fetched with
    /// these request headers.
    Http {
        client: Box<HttpClient>,
        headers: Arc<Vec<(String, String)>>,
    },
}

/// The agent's HTTP(S) client for `http` artifacts (system roots).
pub type HttpClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Empty<Bytes>,
>;

/// A client for [`Store::Http`]: five seconds to connect, the system's roots for https.
pub fn http_client() -> HttpClient {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.set_connect_timeout(Some(std::time::Duration::from_secs(5)));
    http.enforce_http(false);
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    let tls = tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(connector)
}

/// S3 settings from the agent's configuration.
pub struct S3Settings {
    pub endpoint: Option<String>,
    pub region: String,
    pub path_style: bool,
}

impl Store {
    /// `file:///DIR` or `s3://BUCKET/PREFIX`.
    pub async fn open(url: &str, s3: &S3Settings) -> Result<Store, String> {
        if let Some(dir) = url.strip_prefix("file://") {
            let root = PathBuf::from(dir);
            if !root.is_absolute() {
                return Err(format!(
                    "--store {url:?}: the directory must be absolute (file:///DIR)"
                ));
            }
            tokio::fs::create_dir_all(&root)
                .await
                .map_err(|e| format!("cannot create store {dir}: {e}"))?;
            return Ok(Store::Local { root });
        }
        let Some(rest) = url.strip_prefix("s3://") else {
            return Err(format!(
                "--store {url:?}: expected file:///DIR or s3://BUCKET/PREFIX"
            ));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(format!("--store {url:?}: no bucket"));
        }
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(s3.region.clone()));
        if let Some(endpoint) = &s3.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        let shared = loader.load().await;
        let config = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(s3.path_style)
            // Checksums only where S3 requires them: portable to S3-compatible servers.
            .request_checksum_calculation(
                aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
            )
            .response_checksum_validation(
                aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
            )
            .build();
        Ok(Store::S3 {
            client: Client::from_conf(config),
            endpoint: s3.endpoint.clone().unwrap_or_else(|| "aws".into()),
            bucket: bucket.to_owned(),
            prefix: prefix.trim_matches('/').to_owned(),
            part_buffers: PartBudget::new(),
        })
    }

    /// An Argo artifact repository: one bucket of an S3 endpoint with static credentials (or the
    /// usual AWS chain when `credentials` is `None`). Keys are whole (no prefix), derived by
    /// the agent from the task's own template; uploads share `part_buffers` with the node's.
    pub fn s3_repository(
        endpoint: &str,
        region: &str,
        credentials: Option<aws_sdk_s3::config::Credentials>,
        bucket: &str,
        part_buffers: Arc<PartBudget>,
    ) -> Store {
        let mut config = aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new(region.to_owned()))
            .endpoint_url(endpoint)
            // S3-compatible servers (MinIO...) address buckets by path; AWS takes both.
            .force_path_style(!endpoint.contains("amazonaws.com"))
            .request_checksum_calculation(
                aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
            )
            .response_checksum_validation(
                aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
            );
        if let Some(credentials) = credentials {
            config = config.credentials_provider(credentials);
        }
        Store::S3 {
            client: Client::from_conf(config.build()),
            endpoint: endpoint.to_owned(),
            bucket: bucket.to_owned(),
            prefix: String::new(),
            part_buffers,
        }
    }

    /// The budget of part buffers this store's uploads draw from (S3 only).
    pub fn part_buffers(&self) -> Option<Arc<PartBudget>> {
        match self {
            Store::Local { .. } => None,
            Store::S3 { part_buffers, .. } => Some(part_buffers.clone()),
            Store::Http { .. } => None,
        }
    }

    /// Names the store for the node cache: a key means one object only within one store.
    pub fn identity(&self) -> String {
        match self {
            Store::Local { root } => format!("file://{}", root.display()),
            Store::S3 {
                endpoint, bucket, ..
            } => format!("s3://{endpoint}/{bucket}"),
            Store::Http { .. } => "http".to_owned(),
        }
    }

    /// The key prefix every object of this agent goes under (empty for a local store).
    /// The directory of a local store.
    pub fn local_root(&self) -> Option<&Path> {
        match self {
            Store::Local { root } => Some(root),
            _ => None,
        }
    }

    pub fn prefix(&self) -> &str {
        match self {
            Store::Local { .. } | Store::Http { .. } => "",
            Store::S3 { prefix, .. } => prefix,
        }
    }

    /// Refuses a key that is not a plain relative path under this agent's prefix: a task's token
    /// must not reach other prefixes of the bucket, nor odd keys a proxy might normalise.
    pub fn check_key(&self, key: &str) -> Result<(), StoreError> {
        let bad = |why: &str| Err(StoreError::BadKey(format!("store key {key:?} {why}")));
        if let Store::Http { .. } = self {
            return check_url(key).map_err(StoreError::BadKey);
        }
        if key.is_empty() || key.len() > 1024 {
            return bad("must be 1 to 1024 bytes");
        }
        if key.chars().any(char::is_control) {
            return bad("contains a control character");
        }
        if key
            .split('/')
            .any(|segment| matches!(segment, "" | "." | ".."))
        {
            return bad("must be a relative path without . or .. or empty segments");
        }
        let prefix = self.prefix();
        if !prefix.is_empty() && !key.starts_with(&format!("{prefix}/")) {
            return bad(&format!("is outside this agent's store prefix {prefix}/"));
        }
        Ok(())
    }

    /// Removes what uploads cut by a crash left in a local store: temporary files
    /// ([`TEMP_PREFIX`]) last written before `started` (an upload running now keeps writing, so
    /// its file is newer). Returns how many went. Blocking: run it off the runtime.
    pub fn sweep_leftovers(&self, started: std::time::SystemTime) -> usize {
        fn sweep(dir: &Path, started: std::time::SystemTime) -> usize {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return 0;
            };
            let mut removed = 0;
            for entry in entries.flatten() {
                let Ok(kind) = entry.file_type() else {
                    continue;
                };
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if kind.is_dir() {
                    removed += sweep(&entry.path(), started);
                } else if kind.is_file()
                    && name.starts_with(TEMP_PREFIX)
                    && entry
                        .metadata()
                        .and_then(|m| m.modified())
                        .is_ok_and(|t| t < started)
                    && std::fs::remove_file(entry.path()).is_ok()
                {
                    removed += 1;
                }
            }
            removed
        }
        match self {
            Store::Local { root } => sweep(root, started),
            Store::S3 { .. } => 0, // a bucket lifecycle rule aborts what a crash left there
            Store::Http { .. } => 0,
        }
    }

    /// True when reads are local anyway (no point in a node cache).
    pub fn is_local(&self) -> bool {
        matches!(self, Store::Local { .. })
    }

    /// Streams `source` to `key`; the object appears only once complete.
    pub async fn put(
        &self,
        key: &str,
        source: &mut impl Chunks,
    ) -> Result<StoredArtifact, StoreError> {
        self.check_key(key)?;
        match self {
            Store::Local { root } => put_local(root, key, source).await,
            Store::S3 {
                client,
                bucket,
                part_buffers,
                ..
            } => put_s3(client, bucket, key, source, part_buffers).await,
            Store::Http { .. } => Err(StoreError::Failed("an http location is read-only".into())),
        }
    }

    pub async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StoreError> {
        self.check_key(key)?;
        match self {
            Store::Local { root } => {
                let path = local_path(root, key);
                match tokio::fs::metadata(&path).await {
                    // A directory (a key prefix) is not an object.
                    Ok(meta) if !meta.is_file() => Ok(None),
                    Ok(meta) => {
                        use std::os::unix::fs::MetadataExt;
                        Ok(Some(ObjectMeta {
                            size: meta.len(),
                            etag: format!("{}-{}", meta.mtime_nsec(), meta.len()),
                        }))
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(StoreError::Failed(format!("{key}: {e}"))),
                }
            }
            Store::S3 { client, bucket, .. } => {
                match client.head_object().bucket(bucket).key(key).send().await {
                    Ok(head) => Ok(Some(ObjectMeta {
                        size: head.content_length().unwrap_or(0).max(0) as u64,
                        etag: head.e_tag().unwrap_or_default().to_owned(),
                    })),
                    Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(None),
                    Err(e) => Err(s3_error("head", key, e)),
                }
            }
            Store::Http { .. } => {
                let Some(response) = self.http("HEAD", key).await? else {
                    return Ok(None);
                };
                Ok(Some(http_meta(&response)))
            }
        }
    }

    /// An HTTP request of [`Store::Http`]: `None` on 404, an error on any other failure.
    async fn http(
        &self,
        method: &str,
        url: &str,
    ) -> Result<Option<hyper::Response<hyper::body::Incoming>>, StoreError> {
        let Store::Http { client, headers } = self else {
            unreachable!("only for http stores")
        };
        let mut request = hyper::Request::builder().method(method).uri(url);
        for (name, value) in headers.iter() {
            request = request.header(name, value);
        }
        let request = request
            .body(http_body_util::Empty::new())
            .map_err(|e| StoreError::BadKey(format!("{url}: {e}")))?;
        let response =
            tokio::time::timeout(std::time::Duration::from_secs(60), client.request(request))
                .await
                .map_err(|_| StoreError::Unavailable(format!("{method} {url}: no answer in 60 s")))?
                .map_err(|e| StoreError::Unavailable(format!("{method} {url}: {e}")))?;
        match response.status().as_u16() {
            200..=299 => Ok(Some(response)),
            404 | 410 => Ok(None),
            500..=599 | 429 => Err(StoreError::Unavailable(format!(
                "{method} {url}: {}",
                response.status()
            ))),
            _ => Err(StoreError::Failed(format!(
                "{method} {url}: {}",
                response.status()
            ))),
        }
    }

    /// The objects under `prefix` (a key and `/`): their keys and sizes, in key order, at most
    /// `limit` of them. (Argo stores a directory without an archive as one object per file.)
    pub async fn list(&self, prefix: &str, limit: usize) -> Result<Vec<(String, u64)>, StoreError> {
        self.check_key(prefix.trim_end_matches('/'))?;
        let mut objects = Vec::new();
        match self {
            Store::Local { root } => {
                let mut dirs = vec![local_path(root, prefix)];
                while let Some(dir) = dirs.pop() {
                    let Ok(mut entries) = tokio::fs::read_dir(&dir).await else {
                        continue;
                    };
                    while let Ok(Some(entry)) = entries.next_entry().await {
                        let Ok(meta) = entry.metadata().await else {
                            continue;
                        };
                        let name = entry.file_name().to_string_lossy().into_owned();
                        if meta.is_dir() {
                            dirs.push(entry.path());
                        } else if meta.is_file() && !name.starts_with(TEMP_PREFIX) {
                            let relative = entry.path();
                            let key = relative.strip_prefix(root).unwrap_or(&relative);
                            objects.push((key.to_string_lossy().into_owned(), meta.len()));
                        }
                    }
                }
            }
            Store::Http { .. } => {}
            Store::S3 { client, bucket, .. } => {
                let mut token = None;
                loop {
                    let page = client
                        .list_objects_v2()
                        .bucket(bucket)
                        .prefix(prefix)
                        .set_continuation_token(token.take())
                        .send()
                        .await
                        .map_err(|e| s3_error("list", prefix, e))?;
                    for object in page.contents() {
                        if let Some(key) = object.key() {
                            objects
                                .push((key.to_owned(), object.size().unwrap_or(0).max(0) as u64));
                        }
                    }
                    match page.next_continuation_token() {
                        Some(next) if objects.len() < limit => token = Some(next.to_owned()),
                        _ => break,
                    }
                }
            }
        }
        objects.sort();
        objects.truncate(limit);
        Ok(objects)
    }

    /// Opens `key` as a streamed body; `None` when there is no such object.
    pub async fn get(&self, key: &str) -> Result<Option<(ObjectMeta, Body)>, StoreError> {
        self.check_key(key)?;
        match self {
            Store::Local { root } => {
                let path = local_path(root, key);
                let Some(meta) = self.head(key).await? else {
                    return Ok(None);
                };
                let file = match tokio::fs::File::open(&path).await {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(StoreError::Failed(format!("{key}: {e}"))),
                };
                Ok(Some((meta, stream_file(file))))
            }
            Store::S3 { client, bucket, .. } => {
                let object = match client.get_object().bucket(bucket).key(key).send().await {
                    Ok(o) => o,
                    Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => {
                        return Ok(None);
                    }
                    Err(e) => return Err(s3_error("get", key, e)),
                };
                let meta = ObjectMeta {
                    size: object.content_length().unwrap_or(0).max(0) as u64,
                    etag: object.e_tag().unwrap_or_default().to_owned(),
                };
                // Polled where it is read: a task relaying it would cost a hand-off per frame.
                let body = object.body.into_inner().map_err(io::Error::other).boxed();
                Ok(Some((meta, body)))
            }
            Store::Http { .. } => {
                let Some(response) = self.http("GET", key).await? else {
                    return Ok(None);
                };
                let meta = http_meta(&response);
                let body = response.into_body().map_err(io::Error::other).boxed();
                Ok(Some((meta, body)))
            }
        }
    }
}

/// Size and validator of an HTTP answer: its ETag, else its Last-Modified; empty when it has
/// neither, or no length (such an object is not cached: nothing would tell a changed one, or
/// a cut one).
fn http_meta(response: &hyper::Response<hyper::body::Incoming>) -> ObjectMeta {
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let size = header("content-length").parse().ok();
    let etag = match header("etag") {
        _ if size.is_none() => String::new(),
        tag if !tag.is_empty() => tag,
        _ => header("last-modified"),
    };
    ObjectMeta {
        size: size.unwrap_or(0),
        etag,
    }
}

/// An `http` artifact's URL: http or https, and not in the link-local range (a cloud's instance
/// metadata service, which a pod's Argo executor could reach too, but the agent's identity there
/// may be worth more than the pod's).
fn check_url(url: &str) -> Result<(), String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("URL {url:?}: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(format!("URL {url:?}: only http and https are fetched"));
    }
    let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
    let refused = match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(ip)) => ip.is_link_local() || ip.is_unspecified(),
        Ok(std::net::IpAddr::V6(ip)) => {
            ip.is_unspecified() || (ip.segments()[0] & 0xffc0) == 0xfe80
        }
        Err(_) => host.is_empty(),
    };
    if refused {
        return Err(format!(
            "URL {url:?}: the agent does not fetch from link-local or unspecified addresses"
        ));
    }
    Ok(())
}

/// A file as a body, read on a task in 256 KiB chunks.
pub fn stream_file(mut file: tokio::fs::File) -> Body {
    let (tx, body) = channel(4);
    tokio::spawn(async move {
        loop {
            let mut buf = BytesMut::with_capacity(256 * 1024);
            match file.read_buf(&mut buf).await {
                Ok(0) => break,
                Ok(_) => {
                    if tx.send(Ok(buf.freeze())).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    break;
                }
            }
        }
    });
    body
}

/// Where `key` lives in a local store; the key has passed [`Store::check_key`] (a relative
/// path with no empty, `.` or `..` segment), so the path stays under `root`.
fn local_path(root: &Path, key: &str) -> PathBuf {
    root.join(key)
}

/// Refuses to go on writing to `root`'s filesystem once fewer than `reserve` bytes are free:
/// the journal and the node cache live there too, and the node's own disk pressure.
pub fn check_free_space(root: &Path, reserve: u64) -> Result<(), String> {
    let free = free_bytes(root).map_err(|e| format!("free space of {}: {e}", root.display()))?;
    if free < reserve {
        return Err(format!(
            "the store's filesystem ({}) has {free} bytes free, under the {reserve} it keeps \
             for the journal and the node",
            root.display()
        ));
    }
    Ok(())
}

/// Bytes an unprivileged writer may still use on `path`'s filesystem.
pub fn free_bytes(path: &Path) -> nix::Result<u64> {
    let stat = nix::sys::statvfs::statvfs(path)?;
    Ok(stat.blocks_available() as u64 * stat.fragment_size() as u64)
}

async fn put_local(
    root: &Path,
    key: &str,
    source: &mut impl Chunks,
) -> Result<StoredArtifact, StoreError> {
    let path = local_path(root, key);
    let dir = path.parent().unwrap_or(root).to_owned();
    let failed = |e: io::Error| StoreError::Failed(format!("{key}: {e}"));
    tokio::fs::create_dir_all(&dir).await.map_err(failed)?;
    let tmp = dir.join(format!(
        "{TEMP_PREFIX}{}.{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        rand::random::<u64>()
    ));
    // Removed unless renamed into place, even if this future is dropped mid-upload.
    let mut leftover = RemoveOnDrop(Some(tmp.clone()));
    let result = async {
        let mut file = tokio::fs::File::create(&tmp).await.map_err(failed)?;
        let (mut hasher, mut size) = (Sha256::new(), 0u64);
        while let Some(chunk) = source.next_chunk().await {
            let chunk = chunk.map_err(|e| StoreError::Source(e.to_string()))?;
            hasher.update(&chunk);
            size += chunk.len() as u64;
            file.write_all(&chunk).await.map_err(failed)?;
        }
        // Durable before it is visible: the result event will point at it.
        file.sync_all().await.map_err(failed)?;
        tokio::fs::rename(&tmp, &path).await.map_err(failed)?;
        leftover.0 = None;
        Ok(StoredArtifact {
            key: key.to_owned(),
            size,
            sha256: hex(&hasher.finalize()),
        })
    }
    .await;
    drop(leftover);
    result
}

/// A temporary file that goes away with this value, unless taken out first.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

async fn put_s3(
    client: &Client,
    bucket: &str,
    key: &str,
    source: &mut impl Chunks,
    part_buffers: &Arc<PartBudget>,
) -> Result<StoredArtifact, StoreError> {
    let (mut hash, mut size) = (PartHash::default(), 0u64);
    // The part's memory is reserved when its first bytes arrive: a client that connects and
    // sends nothing holds none of the node's budget.
    let mut room = None;
    let mut part = BytesMut::new();
    // Aborts the multipart upload unless it completes, even if this future is dropped (the
    // client went away while parts were in flight): its parts must not linger in the bucket.
    let mut upload = MultipartGuard {
        client: client.clone(),
        bucket: bucket.to_owned(),
        key: key.to_owned(),
        id: None,
        in_flight: VecDeque::new(),
    };
    let mut parts = Vec::new();
    let result = async {
        loop {
            let chunk = source
                .next_chunk()
                .await
                .transpose()
                .map_err(|e| StoreError::Source(e.to_string()))?;
            let last = chunk.is_none();
            let mut chunk = chunk.unwrap_or_default();
            size += chunk.len() as u64;
            // A chunk may end one part and begin the next: each part is exactly its size, so
            // its buffer never grows (a copy into one twice as large).
            loop {
                let started = parts.len() + upload.in_flight.len();
                let target = part_size(started);
                if !chunk.is_empty() {
                    if room.is_none() {
                        let (buffer, reserved) = part_buffers.reserve(started).await?;
                        (part, room) = (buffer, Some(reserved));
                    }
                    let fits = chunk.len().min(target - part.len());
                    part.extend_from_slice(&chunk.split_to(fits));
                }
                if part.len() < target && !(last && upload.id.is_some() && !part.is_empty()) {
                    break;
                }
                let id = match &upload.id {
                    Some(id) => id.clone(),
                    None => {
                        let created = client
                            .create_multipart_upload()
                            .bucket(bucket)
                            .key(key)
                            .send()
                            .await
                            .map_err(|e| s3_error("create multipart upload", key, e))?;
                        upload
                            .id
                            .insert(created.upload_id().unwrap_or_default().to_owned())
                            .clone()
                    }
                };
                // Parts go up while the next one is received: a few in flight, no more (each
                // is PART_SIZE of memory).
                let number = started as i32 + 1;
                let body = std::mem::take(&mut part).freeze();
                let payload = hash.update(body.clone()).await?;
                let request = client
                    .upload_part()
                    .bucket(bucket)
                    .key(key)
                    .upload_id(id)
                    .part_number(number)
                    .body(ByteStream::from(body.clone()));
                let key = key.to_owned();
                let room = room.take();
                upload.in_flight.push_back(tokio::spawn(async move {
                    let sent = match payload.signed().await {
                        Ok(payload) => (request.customize().interceptor(payload).send().await)
                            .map_err(|e| s3_error("upload part", &key, e)),
                        Err(e) => Err(e),
                    };
                    if let Some(room) = room {
                        room.give_back(body);
                    }
                    let sent = sent?;
                    Ok(CompletedPart::builder()
                        .part_number(number)
                        .set_e_tag(sent.e_tag().map(str::to_owned))
                        .build())
                }));
                if upload.in_flight.len() > PARTS_IN_FLIGHT {
                    let oldest = upload.in_flight.pop_front().expect("not empty");
                    parts.push(joined(oldest).await?);
                }
            }
            if last {
                break;
            }
        }
        while let Some(handle) = upload.in_flight.pop_front() {
            parts.push(joined(handle).await?);
        }
        match upload.id.clone() {
            Some(id) => {
                let completed = CompletedMultipartUpload::builder()
                    .set_parts(Some(parts.clone()))
                    .build();
                client
                    .complete_multipart_upload()
                    .bucket(bucket)
                    .key(key)
                    .upload_id(&id)
                    .multipart_upload(completed)
                    .send()
                    .await
                    .map_err(|e| s3_error("complete multipart upload", key, e))?;
                upload.id = None; // an object now: nothing to abort
            }
            None => {
                // Small enough for one request.
                let body: Bytes = part.split().freeze();
                let payload = hash.update(body.clone()).await?.signed().await?;
                client
                    .put_object()
                    .bucket(bucket)
                    .key(key)
                    .body(ByteStream::from(body))
                    .customize()
                    .interceptor(payload)
                    .send()
                    .await
                    .map_err(|e| s3_error("put", key, e))?;
            }
        }
        Ok(StoredArtifact {
            key: key.to_owned(),
            size,
            sha256: hash.finish().await?,
        })
    }
    .await;
    drop(upload); // on failure: parts stopped, upload aborted
    result
}

/// A multipart upload in progress; dropped before it completed, it is aborted.
struct MultipartGuard {
    client: Client,
    bucket: String,
    key: String,
    id: Option<String>,
    /// Parts being sent: stopped first, so none lands after the abort.
    in_flight: VecDeque<JoinHandle<Result<CompletedPart, StoreError>>>,
}

impl Drop for MultipartGuard {
    fn drop(&mut self) {
        for part in self.in_flight.drain(..) {
            part.abort();
        }
        let (Some(id), Ok(runtime)) = (self.id.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let request = self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(id);
        runtime.spawn(async move {
            let _ = request.send().await;
        });
    }
}

/// The SHA-256 of an upload and of each of its parts (which SigV4 signs), hashed in one pass on
/// a blocking thread while the next part is received: hashed inline, on the runtime's thread,
/// the body stalled for it.
#[derive(Default)]
struct PartHash {
    /// The parts so far being hashed: a blocking task that hands the upload's hash back.
    hashing: Option<JoinHandle<digest::Sha256>>,
}

impl PartHash {
    async fn take(&mut self) -> Result<digest::Sha256, StoreError> {
        match self.hashing.take() {
            Some(hashing) => hashing
                .await
                .map_err(|e| StoreError::Failed(format!("hashing the upload: {e}"))),
            None => Ok(digest::Sha256::default()),
        }
    }

    /// Hashes `part` after the parts before it; its own hash comes when ready.
    async fn update(&mut self, part: Bytes) -> Result<PayloadHash, StoreError> {
        let mut upload = self.take().await?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.hashing = Some(tokio::task::spawn_blocking(move || {
            let mut own = digest::Sha256::default();
            digest::update_both(&mut upload, &mut own, &part);
            let _ = tx.send(hex(&own.finish()));
            upload
        }));
        Ok(PayloadHash(rx))
    }

    async fn finish(mut self) -> Result<String, StoreError> {
        Ok(hex(&self.take().await?.finish()))
    }
}

/// A part's SHA-256, on its way from [`PartHash`].
struct PayloadHash(tokio::sync::oneshot::Receiver<String>);

impl PayloadHash {
    /// The hash, for the request to sign instead of hashing the body again.
    async fn signed(self) -> Result<SignedPayload, StoreError> {
        match self.0.await {
            Ok(hash) => Ok(SignedPayload(hash)),
            Err(_) => Err(StoreError::Failed("hashing the upload: stopped".into())),
        }
    }
}

/// Has SigV4 sign a body's SHA-256 computed beforehand.
#[derive(Debug)]
struct SignedPayload(String);

impl Intercept for SignedPayload {
    fn name(&self) -> &'static str {
        "SignedPayload"
    }

    fn modify_before_signing(
        &self,
        _request: &mut BeforeTransmitInterceptorContextMut<'_>,
        _components: &RuntimeComponents,
        config: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        config
            .interceptor_state()
            .store_put(PayloadSigningOverride::Precomputed(self.0.clone()));
        Ok(())
    }
}

/// The node's memory for upload parts: [`PARTS_BUDGET`] units of `PART_SIZE` that all uploads
/// share, and the buffers of parts already sent, kept for the next parts while uploads run. A
/// fresh 8 MiB buffer is faulted in page by page (jemalloc returns allocations that large to
/// the kernel when freed): a quarter of the agent's CPU in an upload.
pub struct PartBudget {
    units: Arc<Semaphore>,
    spare: std::sync::Mutex<Vec<BytesMut>>,
}

impl PartBudget {
    pub fn new() -> Arc<PartBudget> {
        Arc::new(PartBudget {
            units: Arc::new(Semaphore::new(PARTS_BUDGET)),
            spare: std::sync::Mutex::default(),
        })
    }

    /// Room for the part after `done` parts, waiting for it if need be, and a buffer to fill.
    /// A buffer is only made when none is spare, so buffers never outnumber the units held.
    async fn reserve(self: &Arc<Self>, done: usize) -> Result<(BytesMut, Room), StoreError> {
        let size = part_size(done);
        let permit = self
            .units
            .clone()
            .acquire_many_owned((size / PART_SIZE).min(PARTS_BUDGET) as u32)
            .await
            .map_err(|e| StoreError::Failed(format!("upload budget: {e}")))?;
        let room = Room {
            permit: Some(permit),
            budget: self.clone(),
        };
        let spare = match size {
            PART_SIZE => self.spare.lock().unwrap().pop(),
            _ => None,
        };
        Ok((spare.unwrap_or_else(|| BytesMut::with_capacity(size)), room))
    }
}

/// The units of the part budget one part holds. Whichever room is let go of last, by a part
/// sent or by an upload aborted, frees the spare buffers: no upload runs to use them.
struct Room {
    permit: Option<OwnedSemaphorePermit>,
    budget: Arc<PartBudget>,
}

impl Room {
    /// Keeps a sent part's buffer for the next part, if nothing else refers to it.
    fn give_back(self, buffer: Bytes) {
        if buffer.len() == PART_SIZE
            && let Ok(mut buffer) = buffer.try_into_mut()
        {
            buffer.clear();
            self.budget.spare.lock().unwrap().push(buffer);
        }
        // Then the room goes: if it was the last, the buffer just kept goes with the rest.
    }
}

impl Drop for Room {
    fn drop(&mut self) {
        drop(self.permit.take());
        if self.budget.units.available_permits() == PARTS_BUDGET {
            // Freed after the lock is let go: a `reserve` may be waiting for it.
            let freed = std::mem::take(&mut *self.budget.spare.lock().unwrap());
            drop(freed);
        }
    }
}

/// The size of the next part after `done` parts: 8 MiB, doubling every 2000 parts, so an
/// upload of unknown length fits S3's 10,000 parts up to ~500 GB while small ones stay cheap.
fn part_size(done: usize) -> usize {
    PART_SIZE << (done / 2000).min(5)
}

async fn joined(
    handle: JoinHandle<Result<CompletedPart, StoreError>>,
) -> Result<CompletedPart, StoreError> {
    handle
        .await
        .map_err(|e| StoreError::Failed(format!("part upload task: {e}")))?
}

fn s3_error<E: std::error::Error + 'static>(
    what: &str,
    key: &str,
    e: aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> StoreError {
    use aws_sdk_s3::error::SdkError;
    // Not reached, timed out, or 5xx/429: another try may work. A 4xx will not.
    let retryable = matches!(
        e,
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) | SdkError::ResponseError(_)
    ) || e
        .raw_response()
        .is_some_and(|r| r.status().as_u16() >= 500 || r.status().as_u16() == 429);
    let message = format!(
        "{what} {key}: {}",
        aws_sdk_s3::error::DisplayErrorContext(&e)
    );
    if retryable {
        StoreError::Unavailable(message)
    } else {
        StoreError::Failed(message)
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent_part() -> Bytes {
        let mut part = BytesMut::with_capacity(PART_SIZE);
        part.resize(PART_SIZE, 7);
        part.freeze()
    }

    fn kept(budget: &PartBudget) -> usize {
        budget.spare.lock().unwrap().len()
    }

    #[tokio::test]
    async fn a_sent_part_buffer_is_kept_for_the_next_part_while_uploads_run() {
        let budget = PartBudget::new();
        let (_, first) = budget.reserve(0).await.unwrap();
        let (_, second) = budget.reserve(0).await.unwrap();
        first.give_back(sent_part());
        assert_eq!(kept(&budget), 1);
        let (reused, _third) = budget.reserve(1).await.unwrap();
        assert!(reused.is_empty() && reused.capacity() >= PART_SIZE);
        assert_eq!(kept(&budget), 0);
        drop(second);
    }

    #[tokio::test]
    async fn the_last_room_let_go_frees_the_kept_buffers_even_when_an_upload_aborts() {
        let budget = PartBudget::new();
        let (_, sent) = budget.reserve(0).await.unwrap();
        let (_, aborted) = budget.reserve(0).await.unwrap();
        sent.give_back(sent_part());
        assert_eq!(kept(&budget), 1);
        drop(aborted); // a part being filled when its upload was dropped
        assert_eq!(kept(&budget), 0);
        assert_eq!(budget.units.available_permits(), PARTS_BUDGET);

        // The last part sent: its own buffer goes too.
        let (_, last) = budget.reserve(0).await.unwrap();
        last.give_back(sent_part());
        assert_eq!(kept(&budget), 0);
    }

    #[tokio::test]
    async fn a_buffer_still_referenced_is_not_kept() {
        let budget = PartBudget::new();
        let (_, room) = budget.reserve(0).await.unwrap();
        let (_, _other) = budget.reserve(0).await.unwrap();
        let part = sent_part();
        let retried = part.clone(); // the SDK may still hold the body
        room.give_back(part);
        assert_eq!(kept(&budget), 0);
        drop(retried);
    }
}
