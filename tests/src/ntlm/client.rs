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

/// Workstation name the client puts in AUTHENTICATE messages.
const WORKSTATION: &str = "TESTCLIENT";
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
}

impl HttpConn {
    /// Connects to `addr`.
    pub async fn connect(addr: SocketAddr) -> std::io::Result<HttpConn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(HttpConn {
            io: HttpReader::new(stream),
            host: addr.to_string(),
        })
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
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.host);
        for (name, value) in headers {
            req.push_str(&format!("{name}: {value}\r\n"));
        }
        req.push_str("\r\n");
        self.io.get_mut().write_all(req.as_bytes()).await?;
        self.io
            .read_response(method.eq_ignore_ascii_case("HEAD"))
            .await
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
            WORKSTATION,
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
        self.io.get_mut().write_all(bytes).await?;
        self.wait_closed().await
    }

    /// Waits for the server to close the connection; returns any bytes that arrived
    /// first (tests expect none).
    pub async fn wait_closed(&mut self) -> Result<Vec<u8>, HttpError> {
        self.io.read_to_end().await
    }
}
