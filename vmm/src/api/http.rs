//! HTTP/1.1 over the API's Unix socket: one thread per connection, requests parsed by `httparse`.
//!
//! Why `httparse`: the API needs request lines, a few headers and a body of a known length, on a
//! blocking Unix socket. `httparse` is the parser under hyper (maintained by its author, no
//! dependencies, no unsafe in its API, fuzzed upstream) and does exactly that, without pulling in
//! an async runtime the way hyper or axum would; Firecracker's own `micro_http` is not published
//! on crates.io. What the parser leaves to us is framing, and that is where the limits live:
//!
//! - the head (request line and headers) is capped at [`MAX_HEAD`] bytes and 32 headers;
//! - the body is capped at [`MAX_BODY`] bytes (Firecracker's `micro_http` limit, answered as it
//!   answers, with 400 and a fault message), checked on `Content-Length` before reading;
//! - chunked bodies are refused (Firecracker's clients send `Content-Length`);
//! - each read waits at most [`READ_TIMEOUT`], and a whole request must arrive within it from
//!   its first byte: a client that stops or trickles mid-request loses its connection, and only
//!   its own thread waited;
//! - at most [`MAX_CONNECTIONS`] connections at once; more are closed at once.
//!
//! Each connection thread runs a [`ConnectionStart`] before it reads a byte (where the VMM
//! confines it with a seccomp filter); the accept thread sets the connection's timeouts first,
//! so that the thread that parses what the client sends cannot change its socket.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Request line and headers.
pub const MAX_HEAD: usize = 8 * 1024;
/// Firecracker's `micro_http` payload limit.
pub const MAX_BODY: usize = 51_200;
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
pub const MAX_CONNECTIONS: usize = 32;
const MAX_HEADERS: usize = 32;

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path without its query string.
    pub path: String,
    pub body: Vec<u8>,
}

/// An answer: a status and, unless 204, a JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Option<String>,
}

impl Response {
    pub fn no_content() -> Self {
        Response {
            status: 204,
            body: None,
        }
    }

    pub fn json(status: u16, body: String) -> Self {
        Response {
            status,
            body: Some(body),
        }
    }

    /// Firecracker's error shape, `{"fault_message": "..."}`.
    pub fn fault(status: u16, message: &str) -> Self {
        Self::json(
            status,
            serde_json::json!({ "fault_message": message }).to_string(),
        )
    }

    fn reason(&self) -> &'static str {
        match self.status {
            200 => "OK",
            204 => "No Content",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            413 => "Payload Too Large",
            500 => "Internal Server Error",
            503 => "Service Unavailable",
            _ => "Unknown",
        }
    }

    /// The bytes on the wire.
    pub fn to_bytes(&self, keep_alive: bool) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nServer: vmm (Firecracker API)\r\nConnection: {}\r\n",
            self.status,
            self.reason(),
            if keep_alive { "keep-alive" } else { "close" }
        );
        let body = self.body.as_deref().unwrap_or("");
        if self.body.is_some() {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(body.as_bytes());
        bytes
    }
}

/// What reading one request gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    Request {
        request: Request,
        keep_alive: bool,
    },
    /// The client sent something we answer with an error and then close.
    Bad(Response),
    /// The client closed the connection (or timed out) between requests.
    Closed,
}

/// Reads requests from one connection. `buffer` keeps bytes that arrived after a request.
pub struct Connection<S> {
    stream: S,
    buffer: Vec<u8>,
}

/// The head of a request, parsed.
struct Head {
    len: usize,
    method: String,
    path: String,
    content_length: usize,
    keep_alive: bool,
    expect_continue: bool,
}

fn bad(message: &str) -> Incoming {
    Incoming::Bad(Response::fault(400, message))
}

fn parse_head(buffer: &[u8]) -> Result<Option<Head>, Incoming> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buffer) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(bad(&format!("Invalid HTTP request: {e}."))),
    };
    let method = req.method.unwrap_or_default().to_string();
    let target = req.path.unwrap_or_default();
    let path = target.split('?').next().unwrap_or_default().to_string();
    // HTTP/1.0 closes after each answer unless it asks otherwise; HTTP/1.1 keeps the connection.
    let mut keep_alive = req.version == Some(1);
    let mut content_length = 0usize;
    let mut expect_continue = false;
    for header in req.headers.iter() {
        let value = std::str::from_utf8(header.value).unwrap_or("").trim();
        match header.name.to_ascii_lowercase().as_str() {
            "content-length" => {
                content_length = value
                    .parse()
                    .map_err(|_| bad(&format!("Invalid Content-Length {value:?}.")))?;
            }
            "transfer-encoding" => {
                return Err(bad(
                    "Transfer-Encoding is not supported; send Content-Length.",
                ));
            }
            "connection" => match value.to_ascii_lowercase().as_str() {
                "close" => keep_alive = false,
                "keep-alive" => keep_alive = true,
                _ => {}
            },
            "expect" if value.eq_ignore_ascii_case("100-continue") => expect_continue = true,
            _ => {}
        }
    }
    if content_length > MAX_BODY {
        return Err(bad(&format!(
            "Request payload with size {content_length} is larger than the limit of {MAX_BODY} \
             allowed by server."
        )));
    }
    Ok(Some(Head {
        len,
        method,
        path,
        content_length,
        keep_alive,
        expect_continue,
    }))
}

impl<S: Read + Write> Connection<S> {
    pub fn new(stream: S) -> Self {
        Connection {
            stream,
            buffer: Vec::new(),
        }
    }

    /// Reads more bytes; false at end of stream or on a timeout or error.
    fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk) {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buffer.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// Reads more bytes of a request that began at `began` (None: no byte of it yet); false at
    /// end of stream, on a timeout or error, or when the request took longer than
    /// [`READ_TIMEOUT`] to arrive.
    fn fill_request(&mut self, began: &mut Option<Instant>) -> bool {
        if began.is_some_and(|t| t.elapsed() > READ_TIMEOUT) {
            return false;
        }
        let more = self.fill();
        if more && began.is_none() {
            *began = Some(Instant::now());
        }
        more
    }

    /// Reads the next request.
    pub fn next_request(&mut self) -> Incoming {
        let mut began = (!self.buffer.is_empty()).then(Instant::now);
        let head = loop {
            match parse_head(&self.buffer) {
                Ok(Some(head)) => break head,
                Ok(None) => {}
                Err(bad) => return bad,
            }
            if self.buffer.len() > MAX_HEAD {
                return bad(&format!(
                    "The request head is longer than the limit of {MAX_HEAD} bytes."
                ));
            }
            if !self.fill_request(&mut began) {
                return Incoming::Closed;
            }
        };
        if head.expect_continue && self.buffer.len() < head.len + head.content_length {
            let _ = self.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        while self.buffer.len() < head.len + head.content_length {
            if !self.fill_request(&mut began) {
                return Incoming::Closed;
            }
        }
        let end = head.len + head.content_length;
        let body = self.buffer[head.len..end].to_vec();
        self.buffer.drain(..end);
        Incoming::Request {
            request: Request {
                method: head.method,
                path: head.path,
                body,
            },
            keep_alive: head.keep_alive,
        }
    }

    /// Sends an answer.
    pub fn respond(&mut self, response: &Response, keep_alive: bool) -> std::io::Result<()> {
        self.stream.write_all(&response.to_bytes(keep_alive))
    }
}

/// What runs first on each connection thread, before it reads from the client. An error closes
/// the connection unanswered; the hook reports its own failure.
pub type ConnectionStart = Arc<dyn Fn() -> Result<(), ()> + Send + Sync>;

/// Serves one connection until the client closes it, times out, or sends something malformed.
fn serve_connection(stream: UnixStream, handler: &dyn Fn(&Request) -> Response) {
    let mut connection = Connection::new(stream);
    loop {
        match connection.next_request() {
            Incoming::Request {
                request,
                keep_alive,
            } => {
                log::info!("API: {} {}", request.method, request.path);
                let response = handler(&request);
                if connection.respond(&response, keep_alive).is_err() || !keep_alive {
                    return;
                }
            }
            Incoming::Bad(response) => {
                let _ = connection.respond(&response, false);
                return;
            }
            Incoming::Closed => return,
        }
    }
}

/// Accepts connections on `listener` forever, each on a thread of its own that runs `start`
/// first.
pub fn serve(
    listener: UnixListener,
    handler: Arc<dyn Fn(&Request) -> Response + Send + Sync>,
    start: ConnectionStart,
) {
    let open = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                log::warn!("API: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::SeqCst);
            let mut stream = stream;
            let _ = stream
                .write_all(&Response::fault(503, "Too many open API connections.").to_bytes(false));
            continue;
        }
        let timeouts = stream
            .set_read_timeout(Some(READ_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(READ_TIMEOUT)));
        if let Err(e) = timeouts {
            open.fetch_sub(1, Ordering::SeqCst);
            log::warn!("API: cannot set a connection's timeouts: {e}");
            continue;
        }
        let handler = handler.clone();
        let start = start.clone();
        let count = open.clone();
        let spawned = std::thread::Builder::new()
            .name("api-conn".to_string())
            .spawn(move || {
                if start().is_ok() {
                    serve_connection(stream, handler.as_ref());
                }
                count.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            open.fetch_sub(1, Ordering::SeqCst);
            log::warn!("API: cannot start a connection thread: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A stream that reads from a fixed input and records what is written.
    struct Fake {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Fake {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            // One byte at a time, to exercise partial heads and bodies.
            let n = buf.len().min(1);
            self.input.read(&mut buf[..n])
        }
    }

    impl Write for Fake {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn connection(input: &[u8]) -> Connection<Fake> {
        Connection::new(Fake {
            input: Cursor::new(input.to_vec()),
            output: Vec::new(),
        })
    }

    #[test]
    fn requests_are_framed_by_content_length_and_kept_alive() {
        let mut conn = connection(
            b"PUT /drives/rootfs?x=1 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\n\r\n{}\r\nGET / HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(
            conn.next_request(),
            Incoming::Request {
                request: Request {
                    method: "PUT".into(),
                    path: "/drives/rootfs".into(),
                    body: b"{}\r\n".to_vec()
                },
                keep_alive: true
            }
        );
        assert_eq!(
            conn.next_request(),
            Incoming::Request {
                request: Request {
                    method: "GET".into(),
                    path: "/".into(),
                    body: Vec::new()
                },
                keep_alive: false
            }
        );
        assert_eq!(conn.next_request(), Incoming::Closed);
    }

    #[test]
    fn oversized_bodies_are_refused_before_reading_them() {
        let mut conn = connection(b"PUT /actions HTTP/1.1\r\nContent-Length: 51201\r\n\r\n");
        let Incoming::Bad(response) = conn.next_request() else {
            panic!("accepted an oversized body");
        };
        assert_eq!(response.status, 400);
        assert!(response
            .body
            .unwrap()
            .contains("larger than the limit of 51200"));
    }

    #[test]
    fn oversized_heads_and_garbage_are_refused() {
        let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_HEAD + 10));
        assert!(matches!(connection(&long).next_request(), Incoming::Bad(r) if r.status == 400));
        assert!(matches!(
            connection(b"\x00\x01garbage\r\n\r\n").next_request(),
            Incoming::Bad(r) if r.status == 400
        ));
        assert!(matches!(
            connection(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").next_request(),
            Incoming::Bad(r) if r.status == 400
        ));
        assert!(matches!(
            connection(b"PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n").next_request(),
            Incoming::Bad(r) if r.status == 400
        ));
    }

    #[test]
    fn a_truncated_body_closes_the_connection() {
        let mut conn = connection(b"PUT /actions HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}");
        assert_eq!(conn.next_request(), Incoming::Closed);
    }

    #[test]
    fn expect_continue_is_answered() {
        let mut conn =
            connection(b"PUT /a HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}");
        assert!(matches!(conn.next_request(), Incoming::Request { .. }));
        assert!(conn
            .stream
            .output
            .starts_with(b"HTTP/1.1 100 Continue\r\n\r\n"));
    }

    #[test]
    fn responses_have_firecrackers_shape() {
        let text = String::from_utf8(Response::no_content().to_bytes(true)).unwrap();
        assert!(text.starts_with("HTTP/1.1 204 No Content\r\n"));
        assert!(!text.contains("Content-Length"));
        let text = String::from_utf8(Response::fault(400, "bad \"x\"").to_bytes(false)).unwrap();
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(text.ends_with("\r\n\r\n{\"fault_message\":\"bad \\\"x\\\"\"}"));
        assert!(text.contains("Content-Length: 29\r\n"));
    }
}
