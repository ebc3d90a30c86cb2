//! A small blocking HTTP/1.1 client for the node agent, on `std::net::TcpStream`.
//!
//! Why not hyper: the emissary has a 2 MB static budget, and tokio + hyper + hyper-util cost
//! ~0.5 MB of it (supervision.md section 5) for what is a handful of requests per task to one
//! address on the node. The agent is an IP literal (`$(HOST_IP):PORT`): no DNS, no TLS. One
//! request per connection (`Connection: close`) keeps the parser trivial; uploads stream with
//! chunked transfer encoding from any writer, downloads stream into any reader.

use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::transfer::cancel;

/// A failed request: no answer at all (`status: None`) or a non-2xx status.
#[derive(Debug, Clone)]
pub struct HttpError {
    pub status: Option<u16>,
    pub message: String,
}

impl HttpError {
    fn io(what: &str, e: io::Error) -> HttpError {
        HttpError {
            status: None,
            message: format!("{what}: {e}"),
        }
    }

    /// Worth trying again: the agent was not reached, broke off, or said "later" (5xx, 429).
    pub fn retryable(&self) -> bool {
        self.status.is_none_or(|s| s >= 500 || s == 429)
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status {
            Some(status) => write!(f, "HTTP {status}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// The agent at one address, with one task's token.
#[derive(Clone)]
pub struct Client {
    addr: SocketAddr,
    token: String,
    timeout: Duration,
}

impl Client {
    /// `addr` must be `IP:PORT` (the emissary resolves no names).
    pub fn new(addr: &str, token: &str) -> Result<Client, String> {
        let addr: SocketAddr = addr.parse().map_err(|_| {
            format!("agent address {addr:?} is not IP:PORT (the emissary does no DNS lookups)")
        })?;
        Ok(Client {
            addr,
            token: token.to_owned(),
            timeout: Duration::from_secs(30),
        })
    }

    fn connect(&self, read_timeout: Duration) -> Result<TcpStream, HttpError> {
        let stream = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))
            .map_err(|e| HttpError::io(&format!("connecting to the agent at {}", self.addr), e))?;
        let _ = stream.set_nodelay(true);
        stream
            .set_read_timeout(Some(read_timeout))
            .map_err(|e| HttpError::io("socket", e))?;
        stream
            .set_write_timeout(Some(self.timeout))
            .map_err(|e| HttpError::io("socket", e))?;
        Ok(stream)
    }

    fn head(&self, method: &str, path: &str, extra: &str) -> String {
        format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nConnection: close\r\n{extra}\r\n",
            self.addr, self.token
        )
    }

    /// A request with an in-memory body (or none); the whole answer.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        read_timeout: Duration,
    ) -> Result<Response, HttpError> {
        let mut stream = self.connect(read_timeout)?;
        let extra = match body {
            Some(b) => format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ),
            None => "Content-Length: 0\r\n".to_owned(),
        };
        let mut request = self.head(method, path, &extra).into_bytes();
        request.extend_from_slice(body.unwrap_or_default());
        stream
            .write_all(&request)
            .map_err(|e| HttpError::io(&format!("{method} {path}"), e))?;
        Response::read(stream, method, path)
    }

    /// POSTs `value` as JSON; the answer's body must be 2xx.
    pub fn post_json(
        &self,
        path: &str,
        value: &impl serde::Serialize,
    ) -> Result<Vec<u8>, HttpError> {
        let body = serde_json::to_vec(value).map_err(|e| HttpError {
            status: None,
            message: e.to_string(),
        })?;
        self.send("POST", path, Some(&body), self.timeout)?
            .into_success()
    }

    /// Starts a PUT whose body is written through the returned writer (chunked).
    pub fn put_stream(&self, path: &str) -> Result<Upload, HttpError> {
        let mut stream = self.connect(Duration::from_secs(300))?;
        // The agent holds a body back while other uploads fill its part budget: minutes, not
        // seconds, before a stalled write means a dead agent.
        stream
            .set_write_timeout(Some(Duration::from_secs(300)))
            .map_err(|e| HttpError::io("socket", e))?;
        let head = self.head(
            "PUT",
            path,
            "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n",
        );
        stream
            .write_all(head.as_bytes())
            .map_err(|e| HttpError::io(&format!("PUT {path}"), e))?;
        Ok(Upload {
            _transfer: cancel::transfer(&stream),
            stream,
            path: path.to_owned(),
            broken: false,
        })
    }
}

/// A chunked request body in flight.
pub struct Upload {
    /// A stop shuts the socket down. First, to be dropped before the socket closes.
    _transfer: cancel::Transfer,
    stream: TcpStream,
    path: String,
    /// A write to the agent failed (as opposed to reading what is being sent).
    broken: bool,
}

impl Write for Upload {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        // One chunk per write (the caller writes in large pieces), framed without a copy.
        let size = format!("{:x}\r\n", buf.len());
        let mut frame = [
            io::IoSlice::new(size.as_bytes()),
            io::IoSlice::new(buf),
            io::IoSlice::new(b"\r\n"),
        ];
        let mut unsent = &mut frame[..];
        while !unsent.is_empty() {
            match self.stream.write_vectored(unsent) {
                Ok(0) => {
                    self.broken = true;
                    return Err(io::ErrorKind::WriteZero.into());
                }
                Ok(n) => io::IoSlice::advance_slices(&mut unsent, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.broken = true;
                    return Err(e);
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush().inspect_err(|_| self.broken = true)
    }
}

/// The most one chunk of [`Upload::send_file`] carries.
const FILE_CHUNK: i64 = 4 << 20;

impl Upload {
    /// Sends `file` from its start as chunks that the kernel copies from the page cache to the
    /// socket (`sendfile`), instead of reading them into the emissary to write them out again.
    /// Each chunk's size is the file's at the time: a file still growing is sent to where it
    /// ends, one that shrinks mid-chunk is an error.
    pub fn send_file(&mut self, file: &std::fs::File) -> io::Result<()> {
        use nix::errno::Errno;
        use std::os::unix::fs::FileExt;
        let shrank = || io::Error::other("the file shrank while it was sent");
        let mut offset: libc::off_t = 0;
        // Empty until sendfile is refused (a file system that cannot splice its pages): the
        // rest is then read and written.
        let mut buffer = Vec::new();
        loop {
            let size = i64::try_from(file.metadata()?.len()).unwrap_or(i64::MAX);
            let chunk = (size - offset).min(FILE_CHUNK);
            if chunk <= 0 {
                return Ok(());
            }
            self.send_more(format!("{chunk:x}\r\n").as_bytes())?;
            let end = offset + chunk;
            while offset < end {
                let want = (end - offset) as usize;
                if buffer.is_empty() {
                    match nix::sys::sendfile::sendfile(&self.stream, file, Some(&mut offset), want)
                    {
                        Ok(0) => return Err(shrank()),
                        Ok(_) | Err(Errno::EINTR) => continue,
                        Err(Errno::EINVAL | Errno::ENOSYS) => buffer.resize(super::CHUNK, 0),
                        Err(e) => {
                            // The socket's (a timeout, a reset) unless the file could not be read.
                            self.broken = e != Errno::EIO;
                            return Err(e.into());
                        }
                    }
                }
                let n = want.min(buffer.len());
                let n = file.read_at(&mut buffer[..n], offset as u64)?;
                if n == 0 {
                    return Err(shrank());
                }
                self.send_more(&buffer[..n])?;
                offset += n as libc::off_t;
            }
            self.send_more(b"\r\n")?;
        }
    }

    /// Writes all of `bytes`, telling the kernel that more follows: a chunk's frame goes out
    /// with its data, not in a packet of its own (the socket has Nagle off).
    fn send_more(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        while !bytes.is_empty() {
            // SAFETY: `bytes` is valid for its length; the socket is ours.
            let n = unsafe {
                libc::send(
                    self.stream.as_raw_fd(),
                    bytes.as_ptr().cast(),
                    bytes.len(),
                    libc::MSG_MORE | libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                self.broken = true;
                return Err(e);
            }
            bytes = &bytes[n as usize..];
        }
        Ok(())
    }

    /// Whether the connection failed (not the source of the bytes).
    pub fn broken(&self) -> bool {
        self.broken
    }

    /// The agent's answer when it broke off the body (a refusal such as 401 or 413 is sent
    /// before the body is read, then the connection closed): `None` if there is none.
    pub fn refusal(self) -> Option<HttpError> {
        self.stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .ok()?;
        let response = Response::read(self.stream, "PUT", &self.path).ok()?;
        (!(200..300).contains(&response.status)).then(|| response.into_error())
    }

    /// Ends the body and reads the answer, which must be 2xx.
    pub fn finish(mut self) -> Result<Vec<u8>, HttpError> {
        self.stream
            .write_all(b"0\r\n\r\n")
            .map_err(|e| HttpError::io(&format!("PUT {}", self.path), e))?;
        Response::read(self.stream, "PUT", &self.path)?.into_success()
    }
}

/// An answer whose body is still on the socket.
pub struct Response {
    pub status: u16,
    /// The body is a directory sent as tar (`x-emissary-directory: tar`).
    pub directory: bool,
    body: Box<dyn Read + Send>,
    what: String,
    socket: std::os::fd::RawFd,
}

impl Response {
    fn read(stream: TcpStream, method: &str, path: &str) -> Result<Response, HttpError> {
        let socket = std::os::fd::AsRawFd::as_raw_fd(&stream);
        let mut response = Response::parse(stream, &format!("{method} {path}"))?;
        response.socket = socket;
        Ok(response)
    }

    /// Reads the status line and headers of an answer from `stream`; `what` names the request
    /// in errors. Lines are bounded ([`MAX_LINE`]): a peer cannot make it buffer without end.
    pub fn parse(stream: impl Read + Send + 'static, what: &str) -> Result<Response, HttpError> {
        let what = what.to_owned();
        let mut reader = BufReader::with_capacity(64 * 1024, stream);
        let fail = |e: io::Error| HttpError::io(&what, e);
        let mut line = String::new();
        read_line(&mut reader, &mut line).map_err(fail)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| HttpError {
                status: None,
                message: format!("{what}: bad status line {:?}", line.trim()),
            })?;
        let (mut length, mut chunked, mut directory) = (None, false, false);
        loop {
            line.clear();
            if read_line(&mut reader, &mut line).map_err(fail)? == 0 {
                return Err(HttpError {
                    status: None,
                    message: format!("{what}: connection closed in the headers"),
                });
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.parse::<u64>().ok();
                } else if name.eq_ignore_ascii_case("transfer-encoding")
                    && value.eq_ignore_ascii_case("chunked")
                {
                    chunked = true;
                } else if name.eq_ignore_ascii_case("x-emissary-directory") {
                    directory = value == "tar";
                }
            }
        }
        let body: Box<dyn Read + Send> = if chunked {
            Box::new(Chunked {
                inner: reader,
                left: 0,
                done: false,
            })
        } else if let Some(length) = length {
            Box::new(Exact {
                inner: reader.take(length),
                expected: length,
            })
        } else {
            Box::new(reader)
        };
        Ok(Response {
            status,
            directory,
            body,
            what,
            socket: -1,
        })
    }

    /// The body, if the status is 2xx; else an error carrying the agent's message.
    pub fn into_success(mut self) -> Result<Vec<u8>, HttpError> {
        if !(200..300).contains(&self.status) {
            return Err(self.into_error());
        }
        let mut bytes = Vec::new();
        self.body
            .read_to_end(&mut bytes)
            .map_err(|e| HttpError::io(&self.what, e))?;
        Ok(bytes)
    }

    /// This (non-2xx) answer as an error, with the agent's `{"error": ...}` message.
    pub fn into_error(mut self) -> HttpError {
        let mut bytes = Vec::new();
        let _ = self.body.by_ref().take(64 * 1024).read_to_end(&mut bytes);
        let detail = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).trim().to_owned());
        HttpError {
            status: Some(self.status),
            message: format!("{}: {detail}", self.what),
        }
    }

    /// The body as a stream (for 2xx answers), cut short by a stop.
    pub fn into_reader(self) -> Box<dyn Read + Send> {
        let transfer = cancel::transfer(&self.socket);
        Box::new(Stoppable {
            _transfer: transfer,
            inner: self.body,
        })
    }
}

/// A download whose socket a stop shuts down while it is read.
struct Stoppable {
    /// Dropped (unregistered) before `inner` closes the socket.
    _transfer: cancel::Transfer,
    inner: Box<dyn Read + Send>,
}

impl Read for Stoppable {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

/// A Content-Length body that fails if the connection ends early (a truncated download must
/// never look complete).
struct Exact<R> {
    inner: io::Take<R>,
    expected: u64,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() && self.inner.limit() > 0 {
            let got = self.expected - self.inner.limit();
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("connection closed after {got} of {} bytes", self.expected),
            ));
        }
        Ok(n)
    }
}

/// A chunked body.
struct Chunked<R> {
    inner: R,
    left: u64,
    done: bool,
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut line = String::new();
            if read_line(&mut self.inner, &mut line)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside a chunked body",
                ));
            }
            let size = line.trim().split(';').next().unwrap_or("");
            self.left = u64::from_str_radix(size, 16)
                .map_err(|_| io::Error::other(format!("bad chunk size {size:?}")))?;
            if self.left == 0 {
                self.done = true;
                // Trailers, then the final empty line.
                loop {
                    line.clear();
                    if read_line(&mut self.inner, &mut line)? == 0 || line.trim().is_empty() {
                        return Ok(0);
                    }
                }
            }
        }
        let want = buf.len().min(self.left as usize);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed inside a chunk",
            ));
        }
        self.left -= n as u64;
        if self.left == 0 {
            let mut crlf = [0u8; 2];
            self.inner.read_exact(&mut crlf)?;
            if &crlf != b"\r\n" {
                return Err(io::Error::other("a chunk not followed by CRLF"));
            }
        }
        Ok(n)
    }
}

/// The longest status, header or chunk-size line taken.
pub const MAX_LINE: u64 = 64 * 1024;

/// `read_line`, refusing a line longer than [`MAX_LINE`] (or not UTF-8).
fn read_line(reader: &mut impl BufRead, line: &mut String) -> io::Result<usize> {
    let n = reader.take(MAX_LINE).read_line(line)?;
    if n as u64 == MAX_LINE && !line.ends_with('\n') {
        return Err(io::Error::other(format!(
            "a line longer than {MAX_LINE} bytes"
        )));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A one-shot server: reads one request, answers `reply`, returns what it read.
    fn serve_once(reply: &'static [u8]) -> (String, std::thread::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let handle = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream
                .set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                if got.ends_with(b"0\r\n\r\n")
                    || (got.windows(4).any(|w| w == b"\r\n\r\n") && !got.starts_with(b"PUT"))
                {
                    break;
                }
            }
            stream.write_all(reply).unwrap();
            got
        });
        (addr, handle)
    }

    #[test]
    fn posts_json_with_the_token_and_reads_a_length_body() {
        let (addr, server) = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{\"seq\":1}");
        let client = Client::new(&addr, "tok").unwrap();
        let body = client
            .post_json("/v1/x", &serde_json::json!({"a": 1}))
            .unwrap();
        assert_eq!(body, b"{\"seq\":1}");
        let request = String::from_utf8(server.join().unwrap()).unwrap();
        assert!(request.starts_with("POST /v1/x HTTP/1.1\r\n"), "{request}");
        assert!(
            request.contains("Authorization: Bearer tok\r\n") && request.ends_with("{\"a\":1}"),
            "{request}"
        );
    }

    #[test]
    fn streams_a_chunked_upload_and_reads_a_chunked_answer() {
        let (addr, server) = serve_once(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n");
        let client = Client::new(&addr, "t").unwrap();
        let mut upload = client.put_stream("/v1/up").unwrap();
        upload.write_all(b"hello ").unwrap();
        upload.write_all(b"world").unwrap();
        assert_eq!(upload.finish().unwrap(), b"abcde");
        let request = String::from_utf8(server.join().unwrap()).unwrap();
        assert!(
            request.ends_with("6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n"),
            "{request}"
        );
    }

    #[test]
    fn sends_a_file_as_chunks_of_at_most_four_mebibytes() {
        let (addr, server) = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}");
        let mut content = vec![b'a'; FILE_CHUNK as usize];
        content.extend_from_slice(b"xyz");
        let path = std::env::temp_dir().join(format!("emissary-send-file-{}", std::process::id()));
        std::fs::write(&path, &content).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let client = Client::new(&addr, "t").unwrap();
        let mut upload = client.put_stream("/v1/up").unwrap();
        upload.send_file(&file).unwrap();
        assert_eq!(upload.finish().unwrap(), b"{}");
        let request = server.join().unwrap();
        let body = &request[request.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4..];
        let mut expected = b"400000\r\n".to_vec();
        expected.extend_from_slice(&content[..FILE_CHUNK as usize]);
        expected.extend_from_slice(b"\r\n3\r\nxyz\r\n0\r\n\r\n");
        assert!(body == expected, "{} bytes of body", body.len());
    }

    #[test]
    fn errors_say_what_and_whether_to_retry() {
        let (addr, _server) = serve_once(
            b"HTTP/1.1 403 Forbidden\r\nContent-Length: 20\r\n\r\n{\"error\":\"not you\"}\n",
        );
        let err = Client::new(&addr, "t")
            .unwrap()
            .post_json("/v1/x", &1)
            .unwrap_err();
        assert_eq!(err.status, Some(403));
        assert!(err.message.contains("not you") && !err.retryable(), "{err}");

        let (addr, _server) = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort");
        let err = Client::new(&addr, "t")
            .unwrap()
            .post_json("/v1/x", &1)
            .unwrap_err();
        assert!(
            err.message.contains("5 of 100 bytes") && err.retryable(),
            "{err}"
        );

        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        let err = Client::new(&closed, "t")
            .unwrap()
            .post_json("/", &1)
            .unwrap_err();
        assert!(err.status.is_none() && err.retryable());
        assert!(Client::new("agent.local:7946", "t").is_err());
    }
}
