//! The metrics endpoint (`[metrics] listen`, `--metrics-listen`): a small HTTP/1.x server
//! that answers one request per connection and closes.
//!
//! - `GET /metrics`: every metric, in the Prometheus text format (version 0.0.4);
//! - `GET /healthz`: 200 while the process runs;
//! - `GET /readyz`: 200 when every listen address has its accept loop and every route has a
//!   backend up, else 503 with the reason on one line ([`Metrics::readiness`]).
//!
//! `HEAD` works as `GET` without the body. The request is parsed by `httparse` from at most
//! [`MAX_REQUEST`] bytes read within [`REQUEST_TIMEOUT`]; anything else gets an error status
//! (400 for a malformed request, 404, 405, 408, 431), never a panic. Each connection is one
//! small task, at most [`MAX_SCRAPES`] at once (more wait in the listen backlog).

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpListener,
    sync::Semaphore,
};

use super::Metrics;

/// Most bytes of a request (request line and headers) read before it is refused with 431.
pub const MAX_REQUEST: usize = 8 << 10;
/// Most request headers parsed; more are refused with 431.
pub const MAX_HEADERS: usize = 32;
/// Time a client has to send its whole request (then 408), and to read the response.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Most scrape connections served at once.
pub const MAX_SCRAPES: usize = 16;
/// After the response, how long the endpoint reads (and drops) what the client still sends
/// before it closes, so that unread request bytes do not turn the close into a reset that
/// could destroy the response in flight.
const LINGER: Duration = Duration::from_secs(1);
/// Most bytes dropped while lingering.
const LINGER_BYTES: usize = 64 << 10;
/// Pause after accept fails for lack of descriptors or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// `Content-Type` of the plain answers.
const TEXT: &str = "text/plain; charset=utf-8";

/// Binds the endpoint's address.
pub fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    crate::server::bind(addr).context("the metrics endpoint ([metrics] listen, --metrics-listen) cannot start")
}

/// Serves the endpoint on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    let slots = Arc::new(Semaphore::new(MAX_SCRAPES));
    loop {
        let permit = slots.clone().acquire_owned().await.expect("the scrape semaphore is never closed");
        match listener.accept().await {
            Ok((stream, _)) => {
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    scrape(stream, &metrics).await;
                    drop(permit);
                });
            }
            Err(e) => {
                log::warn!("metrics endpoint: accept failed: {e}; retrying in {ACCEPT_BACKOFF:?}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Answers the one request of connection `s`, then closes it.
pub async fn scrape<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, metrics: &Metrics) {
    let response = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut s)).await {
        Ok(Ok(Some(request))) => answer(request, metrics),
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            log::debug!("metrics endpoint: reading a request: {e}");
            return;
        }
        Err(_) => error(408, "Request Timeout", "the request did not arrive in time"),
    };
    let sent = tokio::time::timeout(REQUEST_TIMEOUT, async {
        s.write_all(&response).await?;
        s.shutdown().await
    })
    .await;
    match sent {
        Ok(Ok(())) => linger(&mut s).await,
        Ok(Err(e)) => log::debug!("metrics endpoint: writing a response: {e}"),
        Err(_) => log::debug!("metrics endpoint: the client did not read its response in time"),
    }
}

/// Reads and drops what the client still sends, until its EOF, for [`LINGER`] at most.
async fn linger<S: AsyncRead + Unpin>(s: &mut S) {
    let mut sink = [0u8; 1024];
    let mut left = LINGER_BYTES;
    let drain = async {
        while left > 0 {
            match s.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _elapsed = tokio::time::timeout(LINGER, drain).await;
}

/// What the client asked for, or the error response a bad request gets.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// A `GET` (`head: false`) or `HEAD` of `path` (its query string cut off).
    Get {
        /// The path.
        path: String,
        /// Whether it was `HEAD`.
        head: bool,
    },
    /// Not a request this endpoint serves: the whole response to send.
    Refused(Vec<u8>),
}

/// The request at the start of `s`: `None` if the client closed before sending a byte.
async fn read_request<S: AsyncRead + Unpin>(s: &mut S) -> io::Result<Option<Request>> {
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut len = 0;
    loop {
        let n = s.read(&mut buf[len..]).await?;
        if n == 0 {
            return Ok((len > 0).then(|| Request::Refused(error(400, "Bad Request", "incomplete request"))));
        }
        len += n;
        if let Some(request) = parse(&buf[..len]) {
            return Ok(Some(request));
        }
        if len == MAX_REQUEST {
            let why = format!("the request head is longer than {MAX_REQUEST} bytes");
            return Ok(Some(Request::Refused(error(431, "Request Header Fields Too Large", &why))));
        }
    }
}

/// The request in `buf`, or `None` while it is incomplete.
pub fn parse(buf: &[u8]) -> Option<Request> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let refused = |code, reason, why: &str| Some(Request::Refused(error(code, reason, why)));
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => None,
        Ok(httparse::Status::Complete(_)) => {
            let (Some(method), Some(path)) = (req.method, req.path) else {
                return refused(400, "Bad Request", "no request line");
            };
            let head = match method {
                "GET" => false,
                "HEAD" => true,
                _ => {
                    let body = format!("method {method:?} is not served here; use GET or HEAD\n");
                    return Some(Request::Refused(response(405, "Method Not Allowed", TEXT, &body, false)));
                }
            };
            let path = path.split_once('?').map_or(path, |(p, _)| p).to_string();
            Some(Request::Get { path, head })
        }
        Err(httparse::Error::TooManyHeaders) => {
            refused(431, "Request Header Fields Too Large", &format!("more than {MAX_HEADERS} headers"))
        }
        Err(e) => refused(400, "Bad Request", &format!("not an HTTP/1.x request ({e})")),
    }
}

/// The response to `request`.
pub fn answer(request: Request, metrics: &Metrics) -> Vec<u8> {
    let (path, head) = match request {
        Request::Refused(response) => return response,
        Request::Get { path, head } => (path, head),
    };
    match path.as_str() {
        "/metrics" => {
            let content_type = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
            response(200, "OK", content_type, &metrics.render(), head)
        }
        "/healthz" => response(200, "OK", TEXT, "ok\n", head),
        "/readyz" => match metrics.readiness() {
            Ok(()) => response(200, "OK", TEXT, "ready\n", head),
            Err(why) => response(503, "Service Unavailable", TEXT, &format!("not ready: {why}\n"), head),
        },
        _ => {
            let body = format!("{path:?} is not served here; try /metrics, /healthz or /readyz\n");
            response(404, "Not Found", TEXT, &body, head)
        }
    }
}

/// A whole response: status line, headers, and the body unless `head_only`.
fn response(code: u16, reason: &str, content_type: &str, body: &str, head_only: bool) -> Vec<u8> {
    let allow = if code == 405 { "Allow: GET, HEAD\r\n" } else { "" };
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n{allow}\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

/// An error response whose body is `why` on one line.
fn error(code: u16, reason: &str, why: &str) -> Vec<u8> {
    response(code, reason, TEXT, &format!("{why}\n"), false)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use tokio::io::duplex;

    use super::*;

    /// The response to `request` sent over a pipe of 8 bytes (so every read and write is
    /// partial), the client half-closing after its request when `close` says so, else once it
    /// read the response. The client writes and reads at once, as over TCP: the server may
    /// answer before it read everything.
    async fn exchange(metrics: &Metrics, request: &[u8], close: bool) -> Vec<u8> {
        let (client, server) = duplex(8);
        let (mut rx, mut tx) = tokio::io::split(client);
        let (read, was_read) = tokio::sync::oneshot::channel::<()>();
        let send = async move {
            // A server that answered early stops reading: then the rest cannot go.
            if tx.write_all(request).await.is_ok() && close {
                tx.shutdown().await.ok();
            }
            was_read.await.ok();
            // The server lingers until this EOF.
            tx.shutdown().await.ok();
        };
        let receive = async move {
            let mut out = Vec::new();
            rx.read_to_end(&mut out).await.unwrap();
            read.send(()).ok();
            out
        };
        let ((), (), out) = tokio::join!(scrape(server, metrics), send, receive);
        out
    }

    /// The status code and body of a response.
    fn status_and_body(response: &[u8]) -> (u16, String) {
        let text = String::from_utf8(response.to_vec()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no head end: {text:?}"));
        let code = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("{head:?}"));
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no Content-Length: {head:?}"));
        if !head.starts_with("HTTP/1.1 ") || !(body.is_empty() || body.len() == length) {
            panic!("bad response framing: {text:?}");
        }
        (code, body.to_string())
    }

    #[tokio::test]
    async fn the_three_paths_answer() {
        let m = Metrics::new();
        let (code, body) = status_and_body(&exchange(&m, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", false).await);
        assert_eq!(code, 200);
        assert!(body.contains("# TYPE ntlm_splice_connections_parked gauge\n"), "{body}");
        let (code, body) = status_and_body(&exchange(&m, b"GET /healthz HTTP/1.0\r\n\r\n", false).await);
        assert_eq!((code, body.as_str()), (200, "ok\n"));
        // No route table yet: not ready, saying why.
        let (code, body) = status_and_body(&exchange(&m, b"GET /readyz?verbose HTTP/1.1\r\n\r\n", false).await);
        assert_eq!((code, body.as_str()), (503, "not ready: starting: no route table yet\n"));
        // HEAD: the same head, no body.
        let head = exchange(&m, b"HEAD /healthz HTTP/1.1\r\n\r\n", false).await;
        assert!(
            String::from_utf8(head)
                .unwrap()
                .ends_with("Content-Length: 3\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n")
        );
    }

    #[tokio::test]
    async fn bad_requests_get_their_status() {
        let m = Metrics::new();
        let cases: [(&[u8], u16); 7] = [
            (b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", 405),
            (b"GET /metricsHTTP/1.9\r\nHost:AA\r\n\r\n", 400),
            (b"GET /nope HTTP/1.1\r\n\r\n", 404),
            (b"GET /metrics HTTP/2.0\r\n\r\n", 400),
            (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),
            (b"GET /metrics HTTP/1.1\r\nHost", 400),
            (b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n", 400),
        ];
        for (request, want) in cases {
            let (code, body) = status_and_body(&exchange(&m, request, true).await);
            assert_eq!(code, want, "{:?}: {body}", String::from_utf8_lossy(request));
            assert!(body.ends_with('\n') && body.lines().count() == 1, "{body:?}");
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: y\r\n")).collect();
        let request = format!("GET /metrics HTTP/1.1\r\n{many}\r\n");
        assert_eq!(status_and_body(&exchange(&m, request.as_bytes(), false).await).0, 431);
        let long = format!("GET /metrics HTTP/1.1\r\nX: {}", "a".repeat(MAX_REQUEST));
        assert_eq!(status_and_body(&exchange(&m, long.as_bytes(), false).await).0, 431);
        // A client that closes without a byte gets nothing.
        assert!(exchange(&m, b"", true).await.is_empty());
    }

    /// A client that never finishes its request gets 408 after REQUEST_TIMEOUT, not before.
    #[tokio::test(start_paused = true)]
    async fn a_slow_request_times_out() {
        let m = Metrics::new();
        let (client, server) = duplex(64);
        let (mut rx, mut tx) = tokio::io::split(client);
        let started = tokio::time::Instant::now();
        let talk = async move {
            tx.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
            let mut out = Vec::new();
            rx.read_to_end(&mut out).await.unwrap();
            tx.shutdown().await.unwrap();
            (out, started.elapsed())
        };
        let ((), (out, took)) = tokio::join!(scrape(server, &m), talk);
        assert_eq!(status_and_body(&out).0, 408);
        assert!(took >= REQUEST_TIMEOUT, "answered after {took:?}");
    }

    /// Requests that look almost right: the real methods and paths, and some near them.
    const NEAR_REQUEST: &str = concat!(
        "(GET|HEAD|POST|get|) (/metrics|/healthz|/readyz|/|\\*|/m\\?x=\u{e9}|) ?(HTTP/1\\.[019]|HTTP/2|)(\r\n|\n)",
        "((Host|X-A|Bad Name|:): ?[ -~]{0,8}(\r\n|\n)){0,3}(\r\n|\n)?",
    );

    proptest! {
        /// Whatever the bytes, the request handling answers with a well-framed response (or
        /// nothing, for no bytes at all), and never panics.
        #[test]
        fn any_bytes_get_a_framed_answer(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let m = Metrics::new();
            let out = rt.block_on(exchange(&m, &bytes, true));
            if bytes.is_empty() {
                prop_assert!(out.is_empty());
            } else {
                let (code, _) = status_and_body(&out);
                prop_assert!([200, 400, 404, 405, 431, 503].contains(&code), "{}", code);
            }
        }

        /// Requests that look almost right ([`NEAR_REQUEST`]): the same.
        #[test]
        fn near_requests_get_a_framed_answer(text in NEAR_REQUEST) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let m = Metrics::new();
            let out = rt.block_on(exchange(&m, text.as_bytes(), true));
            let (code, _) = status_and_body(&out);
            prop_assert!([200, 400, 404, 405, 503].contains(&code), "{}", code);
        }
    }
}
