//! HTTP bodies: small ones in memory, large ones streamed through a bounded channel.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body as HttpBody, Frame, Incoming};
use tokio::sync::mpsc;

/// Every response body.
pub type Body = BoxBody<Bytes, io::Error>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A body fed by a task through a bounded channel: the sender waits when the client is slow,
/// so memory stays at `depth` chunks whatever the size.
pub struct ChannelBody {
    rx: mpsc::Receiver<io::Result<Bytes>>,
}

pub fn channel(depth: usize) -> (mpsc::Sender<io::Result<Bytes>>, Body) {
    let (tx, rx) = mpsc::channel(depth);
    (tx, ChannelBody { rx }.boxed())
}

impl HttpBody for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|r| r.map(Frame::data)))
    }
}

/// Where an upload's bytes come from, one chunk at a time.
pub trait Chunks {
    /// The next chunk, `None` at the end.
    fn next_chunk(&mut self) -> impl Future<Output = Option<io::Result<Bytes>>> + Send;
}

/// A request body, with a limit on how long the client may stay silent, and on how slowly it
/// may send: a client that trickles a byte now and then would otherwise hold its upload's
/// resources (a share of the S3 part budget) for ever.
pub struct Upload {
    body: Incoming,
    idle: Duration,
    /// Bytes received in the current window of [`RATE_WINDOW`], and when it started.
    window: (u64, tokio::time::Instant),
}

/// Every window of this length must bring at least [`RATE_FLOOR`] bytes (the last, partial
/// window excepted): 64 KiB a minute is far below any emissary's packing speed.
const RATE_WINDOW: Duration = Duration::from_secs(60);
const RATE_FLOOR: u64 = 64 << 10;

impl Upload {
    pub fn new(body: Incoming, idle: Duration) -> Upload {
        Upload {
            body,
            idle,
            window: (0, tokio::time::Instant::now()),
        }
    }
}

impl Chunks for Upload {
    async fn next_chunk(&mut self) -> Option<io::Result<Bytes>> {
        loop {
            let frame = match tokio::time::timeout(self.idle, self.body.frame()).await {
                Err(_) => {
                    return Some(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client stopped sending",
                    )));
                }
                Ok(None) => return None,
                Ok(Some(Err(e))) => return Some(Err(io::Error::other(e))),
                Ok(Some(Ok(frame))) => frame,
            };
            if let Ok(data) = frame.into_data() {
                let (bytes, started) = &mut self.window;
                *bytes += data.len() as u64;
                if started.elapsed() >= RATE_WINDOW {
                    if *bytes < RATE_FLOOR {
                        return Some(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!(
                                "the client sent {bytes} bytes in {RATE_WINDOW:?}, under the \
                                 floor of {RATE_FLOOR}"
                            ),
                        )));
                    }
                    self.window = (0, tokio::time::Instant::now());
                }
                return Some(Ok(data));
            }
        }
    }
}

/// Bytes already in memory (an offloaded parameter value).
pub struct InMemory(pub Option<Bytes>);

impl Chunks for InMemory {
    async fn next_chunk(&mut self) -> Option<io::Result<Bytes>> {
        self.0.take().map(Ok)
    }
}

/// Why a whole body could not be read; each is its own status.
pub enum ReadError {
    TooLarge(usize),
    /// The client stopped sending (idle past the limit).
    Stalled,
    /// The body broke off or was malformed (bad chunking, connection closed).
    Broken(String),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::TooLarge(limit) => write!(f, "request body larger than {limit} bytes"),
            ReadError::Stalled => f.write_str("the client stopped sending"),
            ReadError::Broken(e) => write!(f, "reading the request body: {e}"),
        }
    }
}

/// Reads a whole request body, refusing more than `limit` bytes.
pub async fn read_limited(
    body: Incoming,
    limit: usize,
    idle: Duration,
) -> Result<Vec<u8>, ReadError> {
    let mut upload = Upload::new(body, idle);
    let mut out = Vec::new();
    while let Some(chunk) = upload.next_chunk().await {
        let chunk = chunk.map_err(|e| match e.kind() {
            io::ErrorKind::TimedOut => ReadError::Stalled,
            _ => ReadError::Broken(e.to_string()),
        })?;
        if out.len() + chunk.len() > limit {
            return Err(ReadError::TooLarge(limit));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}
