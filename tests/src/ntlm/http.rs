//! A small HTTP/1.1 message reader and writer: request and status lines, headers,
//! `Content-Length` bodies, keep-alive. Enough for the NTLM test backend and its raw
//! test client; chunked bodies are refused rather than guessed at.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest request or status line plus headers accepted. NTLM AUTHENTICATE headers
/// are a few KiB at most; IIS's default limit is 16 KiB per header field.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most header fields accepted in one message.
pub const MAX_HEADERS: usize = 100;
/// Largest `Content-Length` body accepted.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 8 * 1024;
/// Bytes asked of the socket per read while a body is streamed through a callback.
const STREAM_CHUNK: usize = 256 * 1024;

/// Why an HTTP message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The transport failed.
    #[error("i/o error reading HTTP message")]
    Io(#[from] std::io::Error),
    /// The peer closed the connection in the middle of a message.
    #[error("connection closed in the middle of an HTTP message")]
    UnexpectedEof,
    /// The head (start line + headers) is over [`MAX_HEAD_BYTES`].
    #[error("HTTP head longer than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    /// More than [`MAX_HEADERS`] header fields.
    #[error("more than {MAX_HEADERS} HTTP header fields")]
    TooManyHeaders,
    /// The body is over [`MAX_BODY_BYTES`].
    #[error("HTTP body of {len} bytes is over the {MAX_BODY_BYTES} byte limit")]
    BodyTooLarge {
        /// announced length
        len: u64,
    },
    /// The message is not valid HTTP/1.x.
    #[error("malformed HTTP message: {what}")]
    Malformed {
        /// what is wrong
        what: &'static str,
    },
    /// Valid HTTP this implementation does not handle (e.g. chunked bodies).
    #[error("unsupported HTTP feature: {what}")]
    Unsupported {
        /// the feature
        what: &'static str,
    },
}

impl HttpError {
    /// The status a server answers this error with before closing.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::HeadTooLarge | HttpError::TooManyHeaders => 431,
            HttpError::BodyTooLarge { .. } => 413,
            HttpError::Unsupported { .. } => 501,
            _ => 400,
        }
    }
}

/// Header fields in arrival order; names compare case-insensitively.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    /// An empty set.
    pub fn new() -> Headers {
        Headers(Vec::new())
    }

    /// Appends a field.
    pub fn push(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.0.push((name.into(), value.into()));
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.get_all(name).next()
    }

    /// Every value of `name`, in order.
    pub fn get_all<'a, 'n>(&'a self, name: &'n str) -> impl Iterator<Item = &'a str> + use<'a, 'n> {
        self.0
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether a comma-separated header (`Connection`) lists `token`.
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.get_all(name)
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// All fields.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// The body length announced by `Content-Length` (0 when absent).
    fn content_length(&self) -> Result<Option<u64>, HttpError> {
        let mut found = None;
        for value in self.get_all("content-length") {
            let value = value.trim();
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HttpError::Malformed {
                    what: "Content-Length is not a number",
                });
            }
            let len: u64 = value.parse().map_err(|_| HttpError::Malformed {
                what: "Content-Length overflows",
            })?;
            if found.is_some_and(|f| f != len) {
                return Err(HttpError::Malformed {
                    what: "conflicting Content-Length fields",
                });
            }
            found = Some(len);
        }
        Ok(found)
    }

    /// Content-Length checked against `max` (usually [`MAX_BODY_BYTES`]); Transfer-Encoding
    /// refused.
    fn body_len(&self, max: usize) -> Result<Option<usize>, HttpError> {
        if self.get("transfer-encoding").is_some() {
            return Err(HttpError::Unsupported {
                what: "Transfer-Encoding",
            });
        }
        match self.content_length()? {
            Some(len) if len > max as u64 => Err(HttpError::BodyTooLarge { len }),
            Some(len) => Ok(Some(len as usize)),
            None => Ok(None),
        }
    }
}

/// A request head, its body not yet read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// Method, e.g. `GET`.
    pub method: String,
    /// Request target as sent, e.g. `/whoami?x=1`.
    pub target: String,
    /// Minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// Header fields.
    pub headers: Headers,
    /// Body length from Content-Length (0 when absent).
    pub content_length: usize,
}

impl RequestHead {
    /// The path without the query string.
    pub fn path(&self) -> &str {
        self.target.split(['?', '#']).next().unwrap_or("")
    }

    /// Whether the connection stays open after the response: HTTP/1.1 unless
    /// `Connection: close`, HTTP/1.0 only with `Connection: keep-alive`.
    pub fn keep_alive(&self) -> bool {
        if self.headers.has_token("connection", "close") {
            return false;
        }
        self.minor_version >= 1 || self.headers.has_token("connection", "keep-alive")
    }

    /// Whether the client waits for `100 Continue` before sending its body.
    pub fn expects_continue(&self) -> bool {
        self.minor_version >= 1
            && self
                .headers
                .get("expect")
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("100-continue"))
    }
}

/// A response as read by a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header fields.
    pub headers: Headers,
    /// Body.
    pub body: Vec<u8>,
}

impl Response {
    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads HTTP messages from a byte stream, keeping whatever arrived past the end of
/// one message for the next (pipelining, partial reads).
#[derive(Debug)]
pub struct HttpReader<S> {
    stream: S,
    buf: Vec<u8>,
    /// Bytes read from the stream so far, consumed or not.
    received: u64,
}

impl<S: AsyncRead + Unpin> HttpReader<S> {
    /// Wraps `stream`.
    pub fn new(stream: S) -> HttpReader<S> {
        HttpReader {
            stream,
            buf: Vec::new(),
            received: 0,
        }
    }

    /// Bytes read from the stream so far (whether consumed as a message yet or not).
    pub fn received(&self) -> u64 {
        self.received
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// The underlying stream, e.g. to write a response.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Bytes received but not yet consumed as part of a message.
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    /// Reads more bytes; `Ok(false)` on EOF.
    async fn fill(&mut self) -> Result<bool, HttpError> {
        let start = self.buf.len();
        self.buf.resize(start + READ_CHUNK, 0);
        let read = self.stream.read(&mut self.buf[start..]).await;
        let n = *read.as_ref().unwrap_or(&0);
        self.buf.truncate(start + n);
        read?;
        self.received += n as u64;
        Ok(n > 0)
    }

    /// Reads up to and including the blank line ending a head and returns the head's
    /// lines. `Ok(None)` when the peer closed cleanly between messages.
    async fn read_head_lines(&mut self) -> Result<Option<Vec<String>>, HttpError> {
        let mut scanned: usize = 0;
        loop {
            // RFC 9112 2.2: ignore empty lines before a start line.
            while self.buf.starts_with(b"\r\n") {
                self.buf.drain(..2);
                scanned = 0;
            }
            if let Some(pos) = find(&self.buf[scanned.saturating_sub(3)..], b"\r\n\r\n") {
                let end = scanned.saturating_sub(3) + pos;
                let head: Vec<u8> = self.buf.drain(..end + 4).collect();
                let text = std::str::from_utf8(&head[..end]).map_err(|_| HttpError::Malformed {
                    what: "head is not UTF-8",
                })?;
                return Ok(Some(text.split("\r\n").map(str::to_owned).collect()));
            }
            if self.buf.len() > MAX_HEAD_BYTES {
                return Err(HttpError::HeadTooLarge);
            }
            scanned = self.buf.len();
            if !self.fill().await? {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(HttpError::UnexpectedEof)
                };
            }
        }
    }

    /// Reads exactly `len` body bytes.
    pub async fn read_body(&mut self, len: usize) -> Result<Vec<u8>, HttpError> {
        while self.buf.len() < len {
            if !self.fill().await? {
                return Err(HttpError::UnexpectedEof);
            }
        }
        Ok(self.buf.drain(..len).collect())
    }

    /// Reads exactly `len` body bytes, handing them to `f` piece by piece instead of
    /// keeping them (bodies of any size).
    pub async fn read_body_with(&mut self, len: u64, mut f: impl FnMut(&[u8])) -> Result<(), HttpError> {
        let buffered = self.buf.len().min(usize::try_from(len).unwrap_or(usize::MAX));
        f(&self.buf[..buffered]);
        self.buf.drain(..buffered);
        let mut left = len - buffered as u64;
        let mut chunk = vec![0u8; STREAM_CHUNK];
        while left > 0 {
            let want = usize::try_from(left).unwrap_or(usize::MAX).min(STREAM_CHUNK);
            let n = self.stream.read(&mut chunk[..want]).await?;
            if n == 0 {
                return Err(HttpError::UnexpectedEof);
            }
            self.received += n as u64;
            f(&chunk[..n]);
            left -= n as u64;
        }
        Ok(())
    }

    /// Reads the next request head. `Ok(None)` on a clean close between requests.
    pub async fn read_request_head(&mut self) -> Result<Option<RequestHead>, HttpError> {
        self.read_request_head_up_to(MAX_BODY_BYTES).await
    }

    /// Reads the next request head, accepting a `Content-Length` up to `max_body` (the
    /// caller reads such a body with [`HttpReader::read_body_with`]).
    pub async fn read_request_head_up_to(&mut self, max_body: usize) -> Result<Option<RequestHead>, HttpError> {
        let Some(lines) = self.read_head_lines().await? else {
            return Ok(None);
        };
        let mut parts = lines[0].split(' ');
        let (Some(method), Some(target), Some(version), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(HttpError::Malformed {
                what: "request line is not METHOD TARGET VERSION",
            });
        };
        if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic() || b == b'-') {
            return Err(HttpError::Malformed { what: "bad method" });
        }
        if target.is_empty() {
            return Err(HttpError::Malformed {
                what: "empty request target",
            });
        }
        let minor_version = parse_version(version)?;
        let headers = parse_headers(&lines[1..])?;
        let content_length = headers.body_len(max_body)?.unwrap_or(0);
        Ok(Some(RequestHead {
            method: method.to_owned(),
            target: target.to_owned(),
            minor_version,
            headers,
            content_length,
        }))
    }

    /// Reads a whole response (client side). `head_request` tells that the request
    /// was HEAD, whose response has no body whatever Content-Length says.
    pub async fn read_response(&mut self, head_request: bool) -> Result<Response, HttpError> {
        let (status, headers) = self.read_response_head().await?;
        let body = if head_request || status == 204 || status == 304 {
            Vec::new()
        } else {
            match headers.body_len(MAX_BODY_BYTES)? {
                Some(len) => self.read_body(len).await?,
                None => self.read_to_end().await?,
            }
        };
        Ok(Response {
            status,
            headers,
            body,
        })
    }

    /// Reads a response to a GET whose body has a `Content-Length` (of any size), handing
    /// the body to `f` piece by piece; returns the status and the headers.
    pub async fn read_response_with(&mut self, f: impl FnMut(&[u8])) -> Result<(u16, Headers), HttpError> {
        let (status, headers) = self.read_response_head().await?;
        let len = headers.content_length()?.ok_or(HttpError::Malformed {
            what: "a streamed response without Content-Length",
        })?;
        self.read_body_with(len, f).await?;
        Ok((status, headers))
    }

    /// Reads a response's status line and headers, skipping interim 1xx responses.
    async fn read_response_head(&mut self) -> Result<(u16, Headers), HttpError> {
        let lines = loop {
            let Some(lines) = self.read_head_lines().await? else {
                return Err(HttpError::UnexpectedEof);
            };
            let status = parse_status_line(&lines[0])?;
            if !(100..200).contains(&status) || status == 101 {
                break lines;
            }
            // Interim 1xx responses (100 Continue) carry no body: skip them.
        };
        let status = parse_status_line(&lines[0])?;
        let headers = parse_headers(&lines[1..])?;
        Ok((status, headers))
    }

    /// Reads until the peer closes and returns what arrived (at most [`MAX_BODY_BYTES`]).
    pub async fn read_to_end(&mut self) -> Result<Vec<u8>, HttpError> {
        while self.fill().await? {
            if self.buf.len() > MAX_BODY_BYTES {
                return Err(HttpError::BodyTooLarge {
                    len: self.buf.len() as u64,
                });
            }
        }
        Ok(std::mem::take(&mut self.buf))
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn parse_version(version: &str) -> Result<u8, HttpError> {
    match version {
        "HTTP/1.1" => Ok(1),
        "HTTP/1.0" => Ok(0),
        v if v.starts_with("HTTP/") => Err(HttpError::Unsupported {
            what: "HTTP version other than 1.0/1.1",
        }),
        _ => Err(HttpError::Malformed {
            what: "bad HTTP version",
        }),
    }
}

fn parse_status_line(line: &str) -> Result<u16, HttpError> {
    let mut parts = line.splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(HttpError::Malformed {
            what: "status line is not VERSION CODE REASON",
        });
    };
    parse_version(version)?;
    if code.len() != 3 {
        return Err(HttpError::Malformed {
            what: "status code is not 3 digits",
        });
    }
    code.parse().map_err(|_| HttpError::Malformed {
        what: "status code is not 3 digits",
    })
}

fn parse_headers(lines: &[String]) -> Result<Headers, HttpError> {
    if lines.len() > MAX_HEADERS {
        return Err(HttpError::TooManyHeaders);
    }
    let mut headers = Headers::new();
    for line in lines {
        if line.starts_with([' ', '\t']) {
            return Err(HttpError::Malformed {
                what: "obsolete header line folding",
            });
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(HttpError::Malformed {
                what: "header line without a colon",
            });
        };
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            return Err(HttpError::Malformed {
                what: "bad header name",
            });
        }
        headers.push(name, value.trim_matches([' ', '\t']));
    }
    Ok(headers)
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A response to write. `Content-Length` and `Connection` are added by
/// [`ResponseBuilder::write_to`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseBuilder {
    /// Status code.
    pub status: u16,
    /// Header fields other than Content-Length and Connection.
    pub headers: Headers,
    /// Body.
    pub body: Vec<u8>,
}

impl ResponseBuilder {
    /// A `text/plain` response.
    pub fn text(status: u16, body: impl Into<Vec<u8>>) -> ResponseBuilder {
        let mut headers = Headers::new();
        headers.push("Content-Type", "text/plain; charset=utf-8");
        ResponseBuilder {
            status,
            headers,
            body: body.into(),
        }
    }

    /// Adds a header field.
    pub fn header(mut self, name: &str, value: impl Into<String>) -> ResponseBuilder {
        self.headers.push(name, value);
        self
    }

    /// Serialises the response. `head_only` leaves the body out (HEAD requests);
    /// `keep_alive` chooses the `Connection` field.
    pub fn to_bytes(&self, minor_version: u8, head_only: bool, keep_alive: bool) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.{} {} {}\r\n",
            minor_version.min(1),
            self.status,
            reason(self.status)
        );
        for (name, value) in self.headers.iter() {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        out.push_str(if keep_alive {
            "Connection: keep-alive\r\n"
        } else {
            "Connection: close\r\n"
        });
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if !head_only {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }

    /// Writes the response in one `write_all`.
    pub async fn write_to<W: AsyncWrite + Unpin>(
        &self,
        w: &mut W,
        minor_version: u8,
        head_only: bool,
        keep_alive: bool,
    ) -> std::io::Result<()> {
        w.write_all(&self.to_bytes(minor_version, head_only, keep_alive))
            .await?;
        w.flush().await
    }
}

/// The reason phrase for the statuses this module sends.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncWriteExt, duplex};

    /// Feeds `input` through a duplex(8) pipe, so every read returns at most 8 bytes,
    /// and collects the request heads and bodies until EOF or error.
    async fn parse_all(input: &[u8]) -> (Vec<(RequestHead, Vec<u8>)>, Option<HttpError>) {
        let (mut client, server) = duplex(8);
        let input = input.to_vec();
        let writer = tokio::spawn(async move {
            // The reader may stop early on an error; ignore the broken pipe then.
            if client.write_all(&input).await.is_ok() {
                client.shutdown().await.ok();
            }
        });
        let mut reader = HttpReader::new(server);
        let mut out = Vec::new();
        let err = loop {
            match reader.read_request_head().await {
                Ok(Some(head)) => match reader.read_body(head.content_length).await {
                    Ok(body) => out.push((head, body)),
                    Err(e) => break Some(e),
                },
                Ok(None) => break None,
                Err(e) => break Some(e),
            }
        };
        drop(reader);
        writer.await.expect("writer task");
        (out, err)
    }

    #[tokio::test]
    async fn parses_pipelined_requests_over_8_byte_reads() {
        let input = b"GET /whoami HTTP/1.1\r\nHost: x\r\nAuthorization: NTLM TlRMTVNTUAABAAAAB4IIog==\r\n\r\n\
                      POST /upload?a=b HTTP/1.1\r\nhost: x\r\ncontent-length: 11\r\n\r\nhello world\
                      GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n\
                      GET /last HTTP/1.1\r\nConnection: close\r\n\r\n";
        let (reqs, err) = parse_all(input).await;
        assert!(err.is_none(), "unexpected error {err:?}");
        assert_eq!(reqs.len(), 4);
        let (first, body) = &reqs[0];
        assert_eq!(
            (first.method.as_str(), first.path(), first.minor_version),
            ("GET", "/whoami", 1)
        );
        assert_eq!(
            first.headers.get("AUTHORIZATION"),
            Some("NTLM TlRMTVNTUAABAAAAB4IIog==")
        );
        assert!(first.keep_alive() && body.is_empty());
        let (second, body) = &reqs[1];
        assert_eq!(
            (
                second.method.as_str(),
                second.path(),
                second.target.as_str()
            ),
            ("POST", "/upload", "/upload?a=b")
        );
        assert_eq!(body, b"hello world");
        assert!(
            reqs[2].0.keep_alive(),
            "HTTP/1.0 with Connection: keep-alive"
        );
        assert!(!reqs[3].0.keep_alive(), "Connection: close");
    }

    #[tokio::test]
    async fn eof_between_requests_is_clean_and_inside_one_is_an_error() {
        let (reqs, err) = parse_all(b"").await;
        assert!(reqs.is_empty() && err.is_none());
        let (_, err) = parse_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await;
        assert!(matches!(err, Some(HttpError::UnexpectedEof)), "{err:?}");
        let (reqs, err) = parse_all(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort").await;
        assert!(reqs.is_empty());
        assert!(matches!(err, Some(HttpError::UnexpectedEof)), "{err:?}");
        // Leading blank lines are tolerated.
        let (reqs, err) = parse_all(b"\r\n\r\nGET / HTTP/1.1\r\n\r\n").await;
        assert_eq!((reqs.len(), err.is_none()), (1, true));
    }

    #[tokio::test]
    async fn rejects_bad_requests_with_the_right_status() {
        let cases: &[(&[u8], u16)] = &[
            (b"GET /\r\n\r\n", 400),
            (b"GET / HTTP/2.0\r\n\r\n", 501),
            (b"GET / FTP/1.0\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
                400,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                501,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n",
                413,
            ),
        ];
        for (input, status) in cases {
            let (reqs, err) = parse_all(input).await;
            let err = err.unwrap_or_else(|| {
                panic!("{:?} parsed as {reqs:?}", String::from_utf8_lossy(input))
            });
            assert_eq!(
                err.status(),
                *status,
                "{:?}: {err}",
                String::from_utf8_lossy(input)
            );
        }
        let huge = format!(
            "GET / HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(MAX_HEAD_BYTES)
        );
        let (_, err) = parse_all(huge.as_bytes()).await;
        assert!(matches!(err, Some(HttpError::HeadTooLarge)), "{err:?}");
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        let (_, err) = parse_all(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()).await;
        assert!(matches!(err, Some(HttpError::TooManyHeaders)), "{err:?}");
    }

    #[tokio::test]
    async fn reads_responses_and_skips_100_continue() {
        let (mut server, client) = duplex(8);
        let response = ResponseBuilder::text(401, "denied\n")
            .header("WWW-Authenticate", "Negotiate")
            .header("WWW-Authenticate", "NTLM");
        let mut wire = b"HTTP/1.1 100 Continue\r\n\r\n".to_vec();
        wire.extend(response.to_bytes(1, false, true));
        wire.extend(ResponseBuilder::text(200, "EXAMPLE\\alice\n").to_bytes(1, true, false));
        wire.extend(b"HTTP/1.0 200 OK\r\n\r\nuntil eof");
        tokio::spawn(async move {
            server.write_all(&wire).await.expect("write");
        });
        let mut reader = HttpReader::new(client);
        let first = reader.read_response(false).await.expect("first");
        assert_eq!((first.status, first.text().as_str()), (401, "denied\n"));
        assert_eq!(
            first
                .headers
                .get_all("www-authenticate")
                .collect::<Vec<_>>(),
            ["Negotiate", "NTLM"]
        );
        assert_eq!(first.headers.get("content-length"), Some("7"));
        assert!(first.headers.has_token("connection", "keep-alive"));
        let second = reader.read_response(true).await.expect("HEAD response");
        assert_eq!((second.status, second.body.len()), (200, 0));
        assert_eq!(second.headers.get("content-length"), Some("14"));
        let third = reader.read_response(false).await.expect("read to EOF");
        assert_eq!(third.text(), "until eof");
    }

    #[test]
    fn serialises_exact_bytes() {
        let bytes = ResponseBuilder::text(404, "nope\n").to_bytes(1, false, false);
        assert_eq!(
            String::from_utf8(bytes).expect("ascii"),
            "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 5\r\nConnection: close\r\n\r\nnope\n"
        );
    }
}
