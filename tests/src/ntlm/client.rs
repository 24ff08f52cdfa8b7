//! A raw HTTP/1.1 client over one TCP connection, with an NTLMv2 login, for tests
//! that need to hold a connection open and control exactly what goes on the wire.

use std::net::SocketAddr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::crypto;
use super::http::{HttpError, HttpReader, Response};
use super::message::{self, Credentials, NtlmError, flags};
use crate::servers::{self, Verifier};

/// Workstation name the client puts in AUTHENTICATE messages.
pub const WORKSTATION: &str = "TESTCLIENT";
/// Flags of the NEGOTIATE message, as a current Windows client sends them.
const NEGOTIATE_FLAGS: u32 = flags::UNICODE
    | flags::OEM
    | flags::REQUEST_TARGET
    | flags::NTLM
    | flags::ALWAYS_SIGN
    | flags::EXTENDED_SESSIONSECURITY
    | flags::VERSION
    | flags::NEGOTIATE_128
    | flags::NEGOTIATE_56;

/// Why an NTLM login could not complete (a refused login is not an error: it is a
/// 401 response).
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The HTTP exchange failed.
    #[error("HTTP exchange failed during NTLM login")]
    Http(#[from] HttpError),
    /// The NEGOTIATE was not answered with a 401 carrying a challenge.
    #[error("server answered the NTLM NEGOTIATE with status {status} and no {scheme} challenge")]
    NoChallenge {
        /// status of that response
        status: u16,
        /// scheme used
        scheme: String,
    },
    /// The challenge token is not a valid CHALLENGE message.
    #[error("server sent an invalid NTLM challenge")]
    BadChallenge(#[from] NtlmError),
}

/// One client TCP connection.
#[derive(Debug)]
pub struct HttpConn {
    io: HttpReader<TcpStream>,
    host: String,
    /// Bytes written to the connection so far.
    sent: u64,
}

impl HttpConn {
    /// Connects to `addr`.
    pub async fn connect(addr: SocketAddr) -> std::io::Result<HttpConn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(HttpConn::new(stream, addr))
    }

    /// A connection made elsewhere (e.g. by a thread in another network namespace), for tokio.
    pub fn from_std(stream: std::net::TcpStream) -> std::io::Result<HttpConn> {
        let addr = stream.peer_addr()?;
        stream.set_nonblocking(true)?;
        let stream = TcpStream::from_std(stream)?;
        stream.set_nodelay(true)?;
        Ok(HttpConn::new(stream, addr))
    }

    /// Connects to `addr` from `source` (a free port), e.g. a loopback address of its own
    /// such as 127.0.0.7, so that the client is recognisable by its address.
    pub async fn connect_from(source: std::net::IpAddr, addr: SocketAddr) -> std::io::Result<HttpConn> {
        let socket = if source.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }?;
        socket.bind(SocketAddr::new(source, 0))?;
        let stream = socket.connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(HttpConn::new(stream, addr))
    }

    fn new(stream: TcpStream, addr: SocketAddr) -> HttpConn {
        HttpConn {
            io: HttpReader::new(stream),
            host: addr.to_string(),
            sent: 0,
        }
    }

    /// Bytes written to the connection so far.
    pub fn bytes_sent(&self) -> u64 {
        self.sent
    }

    /// Bytes read from the connection so far.
    pub fn bytes_received(&self) -> u64 {
        self.io.received()
    }

    /// Writes `bytes`, counting them.
    async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.io.get_mut().write_all(bytes).await?;
        self.sent += bytes.len() as u64;
        Ok(())
    }

    /// The head of a request with a body of `len` bytes.
    fn head(&self, method: &str, path: &str, headers: &[(&str, &str)], len: Option<u64>) -> String {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.host);
        for (name, value) in headers {
            req.push_str(&format!("{name}: {value}\r\n"));
        }
        if let Some(len) = len {
            req.push_str(&format!("Content-Length: {len}\r\n"));
        }
        req.push_str("\r\n");
        req
    }

    /// The local address of the connection.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.io.get_ref().local_addr()
    }

    /// Sends a request without a body and reads the response.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Response, HttpError> {
        let req = self.head(method, path, headers, None);
        self.write(req.as_bytes()).await?;
        self.io
            .read_response(method.eq_ignore_ascii_case("HEAD"))
            .await
    }

    /// `GET path` whose response body (any size, with a Content-Length) is checked against
    /// pattern `seed` as it arrives, not kept: the status and the verifier.
    pub async fn get_pattern(&mut self, path: &str, seed: u64) -> Result<(u16, Verifier), HttpError> {
        let req = self.head("GET", path, &[], None);
        self.write(req.as_bytes()).await?;
        let mut v = Verifier::new(seed);
        let (status, _) = self.io.read_response_with(|piece| v.update(piece)).await?;
        Ok((status, v))
    }

    /// `PUT path` with a body of `len` bytes of pattern `seed`, written as it is made.
    pub async fn put_pattern(&mut self, path: &str, seed: u64, len: u64) -> Result<Response, HttpError> {
        let req = self.head("PUT", path, &[], Some(len));
        self.write(req.as_bytes()).await?;
        servers::send_pattern(self.io.get_mut(), seed, len).await?;
        self.sent += len;
        self.io.read_response(false).await
    }

    /// `GET path` without any Authorization.
    pub async fn get(&mut self, path: &str) -> Result<Response, HttpError> {
        self.request("GET", path, &[]).await
    }

    /// NTLM login (scheme `NTLM`) with `GET path`; returns the response to the
    /// AUTHENTICATE leg: 200 on success, 401 when refused.
    pub async fn login(
        &mut self,
        path: &str,
        creds: &Credentials<'_>,
    ) -> Result<Response, LoginError> {
        self.login_with_scheme("NTLM", path, creds).await
    }

    /// Like [`HttpConn::login`] with the given scheme (`NTLM` or `Negotiate`).
    pub async fn login_with_scheme(
        &mut self,
        scheme: &str,
        path: &str,
        creds: &Credentials<'_>,
    ) -> Result<Response, LoginError> {
        self.login_from(scheme, path, creds, WORKSTATION).await
    }

    /// Like [`HttpConn::login_with_scheme`], naming `workstation` in the AUTHENTICATE.
    pub async fn login_from(
        &mut self,
        scheme: &str,
        path: &str,
        creds: &Credentials<'_>,
        workstation: &str,
    ) -> Result<Response, LoginError> {
        let type1 = format!(
            "{scheme} {}",
            BASE64.encode(message::negotiate_message(NEGOTIATE_FLAGS))
        );
        let r = self
            .request("GET", path, &[("Authorization", &type1)])
            .await?;
        let prefix = format!("{scheme} ");
        let token = r
            .headers
            .get_all("www-authenticate")
            .find_map(|v| v.strip_prefix(&prefix))
            .filter(|_| r.status == 401)
            .and_then(|t| BASE64.decode(t.trim()).ok())
            .ok_or_else(|| LoginError::NoChallenge {
                status: r.status,
                scheme: scheme.to_owned(),
            })?;
        let challenge = message::parse_challenge(&token)?;
        let client_challenge: [u8; 8] = rand::random();
        let type3 = message::authenticate_message(
            &challenge,
            creds,
            workstation,
            &client_challenge,
            crypto::filetime_now(),
        );
        let type3 = format!("{scheme} {}", BASE64.encode(type3));
        Ok(self
            .request("GET", path, &[("Authorization", &type3)])
            .await?)
    }

    /// Writes raw bytes and returns everything the server sends until it closes.
    pub async fn raw_exchange(&mut self, bytes: &[u8]) -> Result<Vec<u8>, HttpError> {
        self.write(bytes).await?;
        self.wait_closed().await
    }

    /// Half-closes the connection (FIN), then waits for the server to close its side;
    /// returns any bytes that arrived first (tests expect none).
    pub async fn finish(&mut self) -> Result<Vec<u8>, HttpError> {
        self.io.get_mut().shutdown().await?;
        self.wait_closed().await
    }

    /// Waits for the server to close the connection; returns any bytes that arrived
    /// first (tests expect none).
    pub async fn wait_closed(&mut self) -> Result<Vec<u8>, HttpError> {
        self.io.read_to_end().await
    }
}
