//! The HTTP server: accept loop, one task per TCP connection, and the connection-bound
//! NTLM state machine that IIS Windows Authentication implements.
//!
//! The authenticated identity lives in the connection task's local state, so it can
//! only ever be seen by requests that arrive on that same TCP connection.
//!
//! Besides the pages, an authenticated connection may move bulk data: `GET
//! /pattern?seed=S&len=N` answers N bytes of the positional pattern of stream S
//! ([`crate::servers::pattern_fill`]), and `PUT /pattern?seed=S` checks its body against
//! that pattern and answers `len=N mismatch=none` (or the offset of the first wrong byte);
//! neither is kept in memory, so a test can move hundreds of MiB after a login.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use log::{debug, warn};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::User;
use super::auth::{Directory, Identity};
use super::http::{self, HttpError, HttpReader, RequestHead, ResponseBuilder};
use super::message;
use crate::servers::{self, Verifier};

/// Most connections served at once; further clients wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 4096;
/// How long a kept-alive connection may sit idle between requests (IIS's default
/// `connectionTimeout`).
pub const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(120);
/// Pause after a failed `accept` (EMFILE and the like) before trying again.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// Value of the `Server` response header.
const SERVER_HEADER: &str = "ntlm-testd";
/// Body of every 401.
const UNAUTHORIZED_BODY: &str = "401 Unauthorized: NTLM authentication required\n";
/// The bulk-data path (see the module's doc).
pub const PATTERN_PATH: &str = "/pattern";
/// Largest body `PUT /pattern` accepts, and largest `len` `GET /pattern` sends.
pub const MAX_PATTERN_BYTES: u64 = 4 << 30;

/// An AUTHENTICATE message the server received and checked: the names as the client
/// sent them (never a response or a hash), and the verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginRecord {
    /// The client (here: the proxy's side of the backend connection).
    pub peer: SocketAddr,
    /// DomainName as sent ("" if the message did not parse).
    pub domain: String,
    /// UserName as sent ("" if the message did not parse).
    pub user: String,
    /// Workstation as sent ("" if the message did not parse).
    pub workstation: String,
    /// Whether the login succeeded.
    pub ok: bool,
}

/// A running NTLM test backend. Dropping it stops the accept loop and closes every
/// connection it is serving.
#[derive(Debug)]
pub struct NtlmServer {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
}

#[derive(Debug)]
struct Shared {
    directory: Directory,
    accepted: AtomicU64,
    /// The peer address of every accepted connection, in order.
    peers: Mutex<Vec<SocketAddr>>,
    /// Every AUTHENTICATE message received, in order.
    logins: Mutex<Vec<LoginRecord>>,
}

impl NtlmServer {
    /// Binds (use "127.0.0.1:0" in tests), spawns the accept loop on the current tokio runtime.
    pub async fn start(
        addr: SocketAddr,
        domain: &str,
        users: Vec<User>,
    ) -> std::io::Result<NtlmServer> {
        let listener = TcpListener::bind(addr).await?;
        NtlmServer::from_listener(listener, domain, users)
    }

    /// Serves on an already bound listener. Must be called within a tokio runtime.
    pub fn from_listener(
        listener: TcpListener,
        domain: &str,
        users: Vec<User>,
    ) -> std::io::Result<NtlmServer> {
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            directory: Directory::new(domain, users),
            accepted: AtomicU64::new(0),
            peers: Mutex::new(Vec::new()),
            logins: Mutex::new(Vec::new()),
        });
        let shutdown = CancellationToken::new();
        tokio::spawn(accept_loop(listener, Arc::clone(&shared), shutdown.clone()));
        Ok(NtlmServer {
            local_addr,
            shared,
            shutdown,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Number of TCP connections accepted so far (lets tests prove 1:1 pairing).
    pub fn connections_accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// The peer address of every connection accepted so far, in order (lets tests see
    /// which source address the proxy connected from).
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.shared.peers.lock().expect("peers lock").clone()
    }

    /// Every AUTHENTICATE message received so far, in order (lets tests see what a client
    /// actually sent, and whether a login reached the backend at all).
    pub fn logins(&self) -> Vec<LoginRecord> {
        self.shared.logins.lock().expect("logins lock").clone()
    }

    /// The configured domain, upper case.
    pub fn domain(&self) -> &str {
        self.shared.directory.domain()
    }

    /// The user names served, in table order.
    pub fn user_names(&self) -> Vec<String> {
        self.shared
            .directory
            .user_names()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for NtlmServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            permit = Arc::clone(&limit).acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                shared.peers.lock().expect("peers lock").push(peer);
                let id = shared.accepted.fetch_add(1, Ordering::SeqCst) + 1;
                let shared = Arc::clone(&shared);
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    serve_connection(stream, id, peer, &shared, shutdown).await;
                    drop(permit);
                });
            }
            Err(e) => {
                warn!("ntlm-testd: accept failed, retrying in {ACCEPT_ERROR_BACKOFF:?}: {e}");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => {}
                }
            }
        }
    }
}

/// What this connection has proven so far.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ConnAuth {
    /// Nothing: every request gets 401.
    Anonymous,
    /// A CHALLENGE was sent; the next request must carry the AUTHENTICATE.
    Challenged { server_challenge: [u8; 8] },
    /// Logged in: requests are served as this identity without any Authorization.
    Authenticated(Identity),
}

/// A request read whole: its head, and for `PUT /pattern` its body checked.
struct Request {
    head: RequestHead,
    /// The body of a `PUT /pattern`, checked against the pattern its query names.
    upload: Option<Verifier>,
}

/// Whether `head` is a bulk upload (`PUT /pattern`), whose body is checked, not kept.
fn is_upload(head: &RequestHead) -> bool {
    head.path() == PATTERN_PATH && head.method.eq_ignore_ascii_case("PUT")
}

/// The numeric query parameter `key` of `target` (`/path?a=1&b=2`).
fn query_u64(target: &str, key: &str) -> Option<u64> {
    let (_, query) = target.split_once('?')?;
    query.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// Reads the next request including its body (answering `Expect: 100-continue`).
async fn next_request(conn: &mut HttpReader<TcpStream>) -> Result<Option<Request>, HttpError> {
    let max = usize::try_from(MAX_PATTERN_BYTES).unwrap_or(usize::MAX);
    let Some(head) = conn.read_request_head_up_to(max).await? else {
        return Ok(None);
    };
    let upload = is_upload(&head);
    if !upload && head.content_length > http::MAX_BODY_BYTES {
        return Err(HttpError::BodyTooLarge {
            len: head.content_length as u64,
        });
    }
    if head.expects_continue() && head.content_length > 0 && conn.buffered().is_empty() {
        conn.get_mut()
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await?;
    }
    if upload {
        let mut v = Verifier::new(query_u64(&head.target, "seed").unwrap_or(0));
        conn.read_body_with(head.content_length as u64, |piece| v.update(piece)).await?;
        return Ok(Some(Request { head, upload: Some(v) }));
    }
    // The test pages ignore request bodies, but they must be consumed to keep framing.
    conn.read_body(head.content_length).await?;
    Ok(Some(Request { head, upload: None }))
}

/// What to answer.
enum Reply {
    /// A response held whole.
    Whole(ResponseBuilder),
    /// 200 with `len` bytes of pattern `seed`, written as they are made.
    Pattern { seed: u64, len: u64 },
}

impl Reply {
    async fn write_to(self, w: &mut TcpStream, minor_version: u8, head_only: bool, keep_alive: bool) -> std::io::Result<()> {
        match self {
            Reply::Whole(r) => r.write_to(w, minor_version, head_only, keep_alive).await,
            Reply::Pattern { seed, len } => {
                let head = format!(
                    "HTTP/1.{} 200 OK\r\nServer: {SERVER_HEADER}\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\nConnection: {}\r\n\r\n",
                    minor_version.min(1),
                    if keep_alive { "keep-alive" } else { "close" }
                );
                w.write_all(head.as_bytes()).await?;
                if !head_only {
                    servers::send_pattern(w, seed, len).await?;
                }
                w.flush().await
            }
        }
    }
}

async fn serve_connection(
    stream: TcpStream,
    id: u64,
    peer: SocketAddr,
    shared: &Shared,
    shutdown: CancellationToken,
) {
    if let Err(e) = stream.set_nodelay(true) {
        debug!("conn={id} client={peer}: set_nodelay failed: {e}");
    }
    let mut conn = HttpReader::new(stream);
    let mut auth = ConnAuth::Anonymous;
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return,
            next = tokio::time::timeout(KEEP_ALIVE_TIMEOUT, next_request(&mut conn)) => next,
        };
        let Request { head, upload } = match next {
            Err(_elapsed) => {
                debug!("conn={id} client={peer}: idle for {KEEP_ALIVE_TIMEOUT:?}, closing");
                return;
            }
            Ok(Ok(Some(request))) => request,
            Ok(Ok(None)) | Ok(Err(HttpError::UnexpectedEof)) => return,
            Ok(Err(HttpError::Io(e))) => {
                debug!("conn={id} client={peer}: read failed: {e}");
                return;
            }
            Ok(Err(e)) => {
                debug!("conn={id} client={peer}: bad request: {e}");
                let response = ResponseBuilder::text(e.status(), format!("{e}\n"))
                    .header("Server", SERVER_HEADER);
                if response
                    .write_to(conn.get_mut(), 1, false, false)
                    .await
                    .is_ok()
                {
                    conn.get_mut().shutdown().await.ok();
                }
                return;
            }
        };
        let response = respond(shared, peer, &mut auth, &head, upload, id);
        let keep_alive = head.keep_alive();
        let head_only = head.method.eq_ignore_ascii_case("HEAD");
        if let Err(e) = response
            .write_to(conn.get_mut(), head.minor_version, head_only, keep_alive)
            .await
        {
            debug!("conn={id} client={peer}: write failed: {e}");
            return;
        }
        if !keep_alive {
            conn.get_mut().shutdown().await.ok();
            return;
        }
    }
}

/// 401 asking for a fresh handshake, as IIS words it: both schemes offered.
fn unauthorized() -> ResponseBuilder {
    ResponseBuilder::text(401, UNAUTHORIZED_BODY)
        .header("Server", SERVER_HEADER)
        .header("WWW-Authenticate", "Negotiate")
        .header("WWW-Authenticate", "NTLM")
}

/// Decides the response to one request and advances the connection's auth state.
fn respond(
    shared: &Shared,
    peer: SocketAddr,
    auth: &mut ConnAuth,
    head: &RequestHead,
    upload: Option<Verifier>,
    id: u64,
) -> Reply {
    let mut authorization = head.headers.get_all("authorization");
    if let Some(value) = authorization.next() {
        if authorization.next().is_some() {
            *auth = ConnAuth::Anonymous;
            return Reply::Whole(unauthorized());
        }
        match handshake_step(shared, peer, auth, value, id) {
            Step::Challenge { scheme, token } => {
                return Reply::Whole(
                    ResponseBuilder::text(401, UNAUTHORIZED_BODY)
                        .header("Server", SERVER_HEADER)
                        .header("WWW-Authenticate", format!("{scheme} {token}")),
                );
            }
            Step::Authenticated => {}
            Step::Rejected => {
                *auth = ConnAuth::Anonymous;
                return Reply::Whole(unauthorized());
            }
        }
    }
    match auth {
        ConnAuth::Authenticated(identity) => page(identity, head, upload),
        // A request without Authorization abandons a handshake in progress.
        _ => {
            *auth = ConnAuth::Anonymous;
            Reply::Whole(unauthorized())
        }
    }
}

fn page(identity: &Identity, head: &RequestHead, upload: Option<Verifier>) -> Reply {
    let text = |status, body: String| Reply::Whole(ResponseBuilder::text(status, body).header("Server", SERVER_HEADER));
    match (head.path(), upload) {
        (PATTERN_PATH, Some(v)) => {
            let mismatch = v.first_mismatch.map_or("none".to_string(), |at| at.to_string());
            text(200, format!("len={} mismatch={mismatch}\n", v.len))
        }
        (PATTERN_PATH, None) => match (query_u64(&head.target, "seed"), query_u64(&head.target, "len")) {
            (Some(seed), Some(len)) if len <= MAX_PATTERN_BYTES => Reply::Pattern { seed, len },
            _ => text(400, format!("GET {PATTERN_PATH} needs ?seed=S&len=N, N at most {MAX_PATTERN_BYTES}\n")),
        },
        ("/" | "/whoami", _) => text(200, format!("{identity}\n")),
        _ => text(404, "404 Not Found\n".to_string()),
    }
}

enum Step {
    /// Send this CHALLENGE (base64) under `scheme`.
    Challenge { scheme: &'static str, token: String },
    /// The AUTHENTICATE verified; the state now holds the identity.
    Authenticated,
    /// Anything else: start over.
    Rejected,
}

/// Handles one `Authorization` value. Any NTLM token restarts or continues the
/// handshake; a NEGOTIATE on an authenticated connection drops the old identity.
fn handshake_step(shared: &Shared, peer: SocketAddr, auth: &mut ConnAuth, value: &str, id: u64) -> Step {
    let directory = &shared.directory;
    let (scheme, token) = value.trim().split_once(' ').unwrap_or((value.trim(), ""));
    let scheme = if scheme.eq_ignore_ascii_case("NTLM") {
        "NTLM"
    } else if scheme.eq_ignore_ascii_case("Negotiate") {
        // IIS accepts raw NTLM tokens under Negotiate; SPNEGO/Kerberos is not offered here.
        "Negotiate"
    } else {
        debug!("conn={id}: unsupported Authorization scheme");
        return Step::Rejected;
    };
    let Ok(token) = BASE64.decode(token.trim()) else {
        debug!("conn={id}: Authorization token is not base64");
        return Step::Rejected;
    };
    match message::message_type(&token) {
        Ok(message::NEGOTIATE) => {
            let server_challenge: [u8; 8] = rand::random();
            match directory.challenge(&token, server_challenge) {
                Ok(challenge) => {
                    *auth = ConnAuth::Challenged { server_challenge };
                    Step::Challenge {
                        scheme,
                        token: BASE64.encode(challenge),
                    }
                }
                Err(e) => {
                    debug!("conn={id}: bad NEGOTIATE message: {e}");
                    Step::Rejected
                }
            }
        }
        Ok(message::AUTHENTICATE) => {
            let ConnAuth::Challenged { server_challenge } = *auth else {
                let names = message::parse_authenticate(&token).ok();
                shared.logins.lock().expect("logins lock").push(LoginRecord {
                    peer,
                    domain: names.as_ref().map(|m| m.domain.clone()).unwrap_or_default(),
                    user: names.as_ref().map(|m| m.user.clone()).unwrap_or_default(),
                    workstation: names.map(|m| m.workstation).unwrap_or_default(),
                    ok: false,
                });
                debug!("conn={id}: AUTHENTICATE without a challenge on this connection");
                return Step::Rejected;
            };
            let verdict = directory.verify(&server_challenge, &token);
            shared.logins.lock().expect("logins lock").push(LoginRecord {
                peer,
                domain: verdict.claimed_domain.clone().unwrap_or_default(),
                user: verdict.claimed_user.clone().unwrap_or_default(),
                workstation: verdict.workstation.clone().unwrap_or_default(),
                ok: verdict.result.is_ok(),
            });
            let user = verdict.claimed_user.as_deref().unwrap_or("-");
            match verdict.result {
                Ok(identity) => {
                    debug!("conn={id}: user={user} authenticated");
                    *auth = ConnAuth::Authenticated(identity);
                    Step::Authenticated
                }
                Err(e) => {
                    debug!("conn={id}: user={user} authentication failed: {e}");
                    Step::Rejected
                }
            }
        }
        _ => {
            debug!("conn={id}: Authorization token is not an NTLM NEGOTIATE or AUTHENTICATE");
            Step::Rejected
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ntlm::client::HttpConn;
    use crate::ntlm::message::Credentials;
    use crate::ntlm::{DEFAULT_DOMAIN, demo_users};

    const ALICE: Credentials<'static> = Credentials {
        domain: "EXAMPLE",
        user: "alice",
        password: "Alice-Pass-1",
    };

    async fn server() -> NtlmServer {
        NtlmServer::start(
            "127.0.0.1:0".parse().expect("addr"),
            DEFAULT_DOMAIN,
            demo_users(),
        )
        .await
        .expect("bind test server")
    }

    fn assert_fresh_401(r: &crate::ntlm::http::Response, what: &str) {
        assert_eq!(r.status, 401, "{what}: {r:?}");
        assert_eq!(
            r.headers.get_all("www-authenticate").collect::<Vec<_>>(),
            ["Negotiate", "NTLM"],
            "{what}: a fresh handshake is asked for"
        );
        assert_eq!(r.text(), UNAUTHORIZED_BODY, "{what}");
        assert!(
            r.headers.has_token("connection", "keep-alive"),
            "{what}: 401 keeps the connection"
        );
    }

    #[tokio::test]
    async fn identity_is_bound_to_the_connection() {
        let server = server().await;
        let mut alice = HttpConn::connect(server.local_addr())
            .await
            .expect("connect");
        assert_fresh_401(
            &alice.get("/whoami").await.expect("anonymous"),
            "anonymous request",
        );

        let r = alice.login("/whoami", &ALICE).await.expect("login");
        assert_eq!((r.status, r.text().as_str()), (200, "EXAMPLE\\alice\n"));
        assert_eq!(
            r.headers.get("content-type"),
            Some("text/plain; charset=utf-8")
        );
        for path in ["/whoami", "/", "/whoami?again=1"] {
            let r = alice.get(path).await.expect("later request");
            assert_eq!(
                (r.status, r.text().as_str()),
                (200, "EXAMPLE\\alice\n"),
                "{path} without Authorization"
            );
        }
        let r = alice.get("/nope").await.expect("404");
        assert_eq!(r.status, 404);

        // A second connection starts anonymous, also for unknown paths.
        let mut other = HttpConn::connect(server.local_addr())
            .await
            .expect("connect");
        assert_fresh_401(
            &other.get("/whoami").await.expect("other"),
            "new connection",
        );
        assert_fresh_401(
            &other.get("/nope").await.expect("other 404"),
            "unknown path, anonymous",
        );
        // ... and alice's connection is still alice.
        assert_eq!(
            alice.get("/").await.expect("alice again").text(),
            "EXAMPLE\\alice\n"
        );
        assert_eq!(server.connections_accepted(), 2);
    }

    #[tokio::test]
    async fn wrong_password_leaves_the_connection_anonymous() {
        let server = server().await;
        let mut conn = HttpConn::connect(server.local_addr())
            .await
            .expect("connect");
        let wrong = Credentials {
            password: "Bob-Pass-2",
            ..ALICE
        };
        assert_fresh_401(
            &conn.login("/whoami", &wrong).await.expect("login"),
            "wrong password",
        );
        assert_fresh_401(
            &conn.get("/whoami").await.expect("after failure"),
            "after a failed login",
        );
        // A fresh handshake on the same connection then works.
        assert_eq!(
            conn.login("/whoami", &ALICE).await.expect("login").text(),
            "EXAMPLE\\alice\n"
        );
        // Logging in again as someone else replaces the identity; a failed re-login drops it.
        let bob = Credentials {
            user: "bob",
            password: "Bob-Pass-2",
            domain: "",
        };
        assert_eq!(
            conn.login("/whoami", &bob).await.expect("bob").text(),
            "EXAMPLE\\bob\n"
        );
        assert_fresh_401(
            &conn.login("/whoami", &wrong).await.expect("re-login"),
            "failed re-login",
        );
        assert_fresh_401(
            &conn.get("/whoami").await.expect("after failed re-login"),
            "identity dropped",
        );
    }

    #[tokio::test]
    async fn negotiate_scheme_with_an_ntlm_token_works_like_ntlm() {
        let server = server().await;
        let mut conn = HttpConn::connect(server.local_addr())
            .await
            .expect("connect");
        let r = conn
            .login_with_scheme("Negotiate", "/whoami", &ALICE)
            .await
            .expect("login");
        assert_eq!((r.status, r.text().as_str()), (200, "EXAMPLE\\alice\n"));
        assert_eq!(conn.get("/whoami").await.expect("again").status, 200);
    }

    #[tokio::test]
    async fn out_of_order_and_garbage_tokens_get_401() {
        let server = server().await;
        let mut conn = HttpConn::connect(server.local_addr())
            .await
            .expect("connect");
        // An AUTHENTICATE with no CHALLENGE on this connection.
        let type3 = BASE64.encode(crate::ntlm::message::tests::ms_nlmp_authenticate());
        for value in [
            format!("NTLM {type3}"),
            "NTLM !!!".into(),
            "Basic YWxpY2U6eA==".into(),
            "Negotiate YIIBhwYGKwYBBQUCoII=".into(),
        ] {
            let r = conn
                .request("GET", "/whoami", &[("Authorization", &value)])
                .await
                .expect("request");
            assert_fresh_401(&r, &value);
        }
        // A handshake abandoned half way (no Authorization on the next request) resets.
        let mut other = HttpConn::connect(server.local_addr())
            .await
            .expect("connect");
        let r = other
            .request(
                "GET",
                "/",
                &[("Authorization", "NTLM TlRMTVNTUAABAAAAB4IIog==")],
            )
            .await
            .expect("type1");
        assert_eq!(r.status, 401);
        let challenge = r.headers.get("www-authenticate").expect("challenge header");
        assert!(
            challenge.starts_with("NTLM TlRMTVNTUAACAAAA"),
            "{challenge}"
        );
        assert_fresh_401(
            &other.get("/").await.expect("abandon"),
            "abandoned handshake",
        );
    }

    #[tokio::test]
    async fn connection_close_and_http_1_0_are_honoured() {
        let server = server().await;
        let mut conn = HttpConn::connect(server.local_addr())
            .await
            .expect("connect");
        let r = conn
            .request("GET", "/", &[("Connection", "close")])
            .await
            .expect("request");
        assert_eq!(r.status, 401);
        assert!(r.headers.has_token("connection", "close"));
        assert_eq!(conn.wait_closed().await.expect("EOF"), b"");

        let mut conn = HttpConn::connect(server.local_addr())
            .await
            .expect("connect");
        let r = conn
            .raw_exchange(b"GET / HTTP/1.0\r\n\r\n")
            .await
            .expect("1.0");
        assert!(
            r.starts_with(b"HTTP/1.0 401 Unauthorized\r\n"),
            "{}",
            String::from_utf8_lossy(&r)
        );
        assert!(r.ends_with(UNAUTHORIZED_BODY.as_bytes()));

        let mut conn = HttpConn::connect(server.local_addr())
            .await
            .expect("connect");
        let r = conn
            .raw_exchange(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n")
            .await
            .expect("bad request");
        assert!(
            r.starts_with(b"HTTP/1.1 400 Bad Request\r\n"),
            "{}",
            String::from_utf8_lossy(&r)
        );
    }

    #[tokio::test]
    async fn records_logins_and_moves_patterns_only_when_logged_in() {
        const LEN: u64 = (3 << 20) + 11;
        let server = server().await;
        let mut conn = HttpConn::connect(server.local_addr()).await.expect("connect");
        let get = format!("{PATTERN_PATH}?seed=5&len={LEN}");
        assert_eq!(conn.get(&get).await.expect("anonymous").status, 401);
        let wrong = Credentials { password: "Bob-Pass-2", ..ALICE };
        let r = conn.login_from("NTLM", "/", &wrong, "WS-1").await.expect("login");
        assert_eq!(r.status, 401);
        let r = conn.login_from("NTLM", "/", &ALICE, "WS-2").await.expect("login");
        assert_eq!(r.status, 200);
        let peer = conn.local_addr().expect("local");
        let record = |workstation: &str, ok| LoginRecord {
            peer,
            domain: "EXAMPLE".into(),
            user: "alice".into(),
            workstation: workstation.into(),
            ok,
        };
        assert_eq!(server.logins(), [record("WS-1", false), record("WS-2", true)]);

        let (status, v) = conn.get_pattern(&get, 5).await.expect("GET pattern");
        assert_eq!(status, 200);
        v.assert_exact(LEN, "GET /pattern");
        let r = conn.put_pattern(&format!("{PATTERN_PATH}?seed=6"), 6, LEN).await.expect("PUT");
        assert_eq!((r.status, r.text()), (200, format!("len={LEN} mismatch=none\n")));
        // A body of another stream is reported at its first wrong byte.
        let r = conn.put_pattern(&format!("{PATTERN_PATH}?seed=7"), 6, 100).await.expect("PUT");
        assert_eq!(r.status, 200);
        assert!(r.text().starts_with("len=100 mismatch=") && !r.text().contains("none"), "{}", r.text());
        let before = (conn.bytes_sent(), conn.bytes_received());
        assert!(before.0 > LEN && before.1 > LEN, "{before:?}");
        assert_eq!(conn.get("/whoami").await.expect("whoami").text(), "EXAMPLE\\alice\n");
        assert!(conn.bytes_sent() > before.0 && conn.bytes_received() > before.1);
    }

    #[tokio::test]
    async fn dropping_the_server_closes_its_connections() {
        let server = server().await;
        let mut conn = HttpConn::connect(server.local_addr())
            .await
            .expect("connect");
        assert_eq!(conn.get("/").await.expect("request").status, 401);
        drop(server);
        assert_eq!(conn.wait_closed().await.expect("EOF after drop"), b"");
    }
}
