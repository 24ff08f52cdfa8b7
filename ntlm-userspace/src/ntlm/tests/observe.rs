//! Tests of the observer: its stop rules on their own ([`Watch`]), and [`observe`] over real
//! loopback sockets, replaying the captured exchanges (`fixtures/`) between a scripted client
//! and backend, then carrying on with a plain copy, as the engine would, and checking every
//! byte at both ends.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use super::*;
use crate::{
    lifecycle::{End, Side},
    ntlm::fixtures::{FIXTURES, Fixture},
};

fn fixture(file: &str) -> &'static Fixture {
    FIXTURES.iter().find(|f| f.file == file).unwrap()
}

/// A connection through the observer: the client's end, the proxy's two sockets, the
/// backend's end.
struct Wire {
    client: TcpStream,
    proxy_client: TcpStream,
    proxy_backend: TcpStream,
    backend: TcpStream,
}

async fn connected(l: &TcpListener, addr: SocketAddr) -> (TcpStream, TcpStream) {
    let (near, far) = tokio::join!(TcpStream::connect(addr), l.accept());
    (near.unwrap(), far.unwrap().0)
}

async fn wire() -> Wire {
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let back = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (client, proxy_client) = connected(&front, front.local_addr().unwrap()).await;
    let (proxy_backend, backend) = connected(&back, back.local_addr().unwrap()).await;
    Wire { client, proxy_client, proxy_backend, backend }
}

/// `len` pseudo-random bytes (xorshift), different for each seed.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Plays one end of `turns`: writes its own turns and reads the other end's, checking each
/// byte; then sends `tail_out` and half-closes while reading the other end's `tail_in` up
/// to its EOF.
async fn play(mut sock: TcpStream, me: Dir, turns: Vec<(Dir, Vec<u8>)>, tail_out: Vec<u8>, tail_in: Vec<u8>) {
    let last = turns.len();
    for (i, (dir, bytes)) in turns.into_iter().enumerate() {
        if dir == me {
            // The last turn goes out with the tail in one write, so that the observer reads
            // the message that stops it together with bytes after it.
            if i + 1 == last {
                sock.write_all(&[&bytes[..], &tail_out[..]].concat()).await.unwrap();
                return finish(sock, &[], tail_in, me).await;
            }
            sock.write_all(&bytes).await.unwrap();
        } else {
            let mut got = vec![0; bytes.len()];
            sock.read_exact(&mut got).await.unwrap();
            assert!(got == bytes, "{me:?} end: turn {i} differs");
        }
    }
    finish(sock, &tail_out, tail_in, me).await;
}

/// Sends `out` and half-closes, while reading to EOF and checking it is `want`.
async fn finish(sock: TcpStream, out: &[u8], want: Vec<u8>, me: Dir) {
    let (mut r, mut w) = sock.into_split();
    let send = async {
        w.write_all(out).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let receive = async {
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        got
    };
    let ((), got) = tokio::join!(send, receive);
    assert_eq!(got.len(), want.len(), "{me:?} end: tail length");
    assert!(got == want, "{me:?} end: tail bytes differ");
}

/// Replays `f` through [`observe`] with `tail` bytes each way after the exchange, then a
/// plain copy; checks both ends got every byte and the counts add up.
async fn replay(f: &Fixture, tail: usize) -> Observed {
    let Wire { client, proxy_client, proxy_backend, backend } = wire().await;
    let (up_tail, down_tail) = (pattern(1, tail), pattern(2, tail));
    let turns = f.turns();
    let total = [f.stream(Dir::Up).len() + tail, f.stream(Dir::Down).len() + tail];
    let client = tokio::spawn(play(client, Dir::Up, turns.clone(), up_tail.clone(), down_tail.clone()));
    let backend = tokio::spawn(play(backend, Dir::Down, turns, down_tail, up_tail));
    let observed =
        observe(&proxy_client, &proxy_backend, &RelayCtl::unlimited(), &ObserveLimits::default(), |_: &Names| true)
            .await;
    assert!(observed.stop.hands_over(), "{}: {:?}", f.file, observed.stop);
    let (mut c, mut b) = (proxy_client, proxy_backend);
    let (up, down) = tokio::io::copy_bidirectional(&mut c, &mut b).await.unwrap();
    client.await.unwrap();
    backend.await.unwrap();
    let moved = [observed.progress.bytes[0] + up, observed.progress.bytes[1] + down];
    assert_eq!(moved, total.map(|n| n as u64), "{}: bytes observed + copied", f.file);
    observed
}

/// The login a fixture was captured with.
fn login_of(f: &Fixture) -> Login {
    let (domain, user, workstation, status) = f.login.unwrap();
    Login {
        names: Names { domain: domain.into(), user: user.into(), workstation: workstation.into() },
        result: LoginResult::of(status),
    }
}

#[tokio::test]
async fn a_login_is_read_and_4_mib_after_it_pass_byte_exact() {
    let f = fixture("curl_ok.bin");
    let observed = replay(f, 4 << 20).await;
    assert!(matches!(observed.stop, Stop::Login), "{:?}", observed.stop);
    assert_eq!(observed.login, Some(login_of(f)));
    assert_eq!(observed.login.unwrap().result, LoginResult::Ok);
    // It stopped at the 200 that answered the AUTHENTICATE: all the client's handshake, and
    // the backend's with whatever the read holding that head held after it.
    assert_eq!(observed.progress.bytes[0], f.stream(Dir::Up).len() as u64);
    assert!(observed.progress.bytes[1] >= f.stream(Dir::Down).len() as u64);
}

#[tokio::test]
async fn every_captured_login_is_read_with_its_result() {
    for f in FIXTURES.iter().filter(|f| f.login.is_some()) {
        let observed = replay(f, 64 << 10).await;
        assert!(matches!(observed.stop, Stop::Login), "{}: {:?}", f.file, observed.stop);
        assert_eq!(observed.login, Some(login_of(f)), "{}", f.file);
    }
    assert_eq!(login_of(fixture("curl_denied.bin")).result, LoginResult::Denied);
}

#[tokio::test]
async fn a_client_that_sends_no_ntlm_is_handed_over_after_the_first_response() {
    let turns = vec![
        (Dir::Up, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec()),
        (Dir::Down, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello".to_vec()),
    ];
    let Wire { client, proxy_client, proxy_backend, backend } = wire().await;
    let c = tokio::spawn(play(client, Dir::Up, turns.clone(), pattern(3, 1000), vec![]));
    let b = tokio::spawn(play(backend, Dir::Down, turns.clone(), vec![], pattern(3, 1000)));
    let observed =
        observe(&proxy_client, &proxy_backend, &RelayCtl::unlimited(), &ObserveLimits::default(), |_: &Names| true)
            .await;
    assert!(matches!(observed.stop, Stop::NotAuthenticating), "{:?}", observed.stop);
    assert_eq!(observed.login, None);
    assert_eq!(observed.progress.bytes, [turns[0].1.len() as u64, turns[1].1.len() as u64]);
    let (mut pc, mut pb) = (proxy_client, proxy_backend);
    tokio::io::copy_bidirectional(&mut pc, &mut pb).await.unwrap();
    c.await.unwrap();
    b.await.unwrap();
}

#[tokio::test]
async fn one_anonymous_401_offering_ntlm_is_watched_past_not_two() {
    let get = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec();
    let unauthorized = fixture("curl_anonymous.bin").stream(Dir::Down);
    let turns = vec![
        (Dir::Up, get.clone()),
        (Dir::Down, unauthorized.clone()),
        (Dir::Up, get.clone()),
        (Dir::Down, unauthorized.clone()),
    ];
    let Wire { client, proxy_client, proxy_backend, backend } = wire().await;
    let c = tokio::spawn(play(client, Dir::Up, turns.clone(), vec![], vec![]));
    let b = tokio::spawn(play(backend, Dir::Down, turns, vec![], vec![]));
    let observed =
        observe(&proxy_client, &proxy_backend, &RelayCtl::unlimited(), &ObserveLimits::default(), |_: &Names| true)
            .await;
    assert!(matches!(observed.stop, Stop::NotAuthenticating), "{:?}", observed.stop);
    assert_eq!(observed.progress.bytes, [2 * get.len() as u64, 2 * unauthorized.len() as u64]);
    let (mut pc, mut pb) = (proxy_client, proxy_backend);
    tokio::io::copy_bidirectional(&mut pc, &mut pb).await.unwrap();
    c.await.unwrap();
    b.await.unwrap();
}

#[tokio::test]
async fn a_fin_is_passed_on_and_the_pair_can_be_handed_over_after_it() {
    // curl without credentials: its request, the 401, then curl closes. The backend then
    // sends more (a late write) and closes.
    let f = fixture("curl_anonymous.bin");
    let Wire { client, proxy_client, proxy_backend, backend } = wire().await;
    let late = pattern(4, 300_000);
    let c = tokio::spawn(play(client, Dir::Up, f.turns(), vec![], late.clone()));
    let late_len = late.len() as u64;
    let (got_eof, eof) = tokio::sync::oneshot::channel();
    let backend = tokio::spawn(async move {
        let mut backend = backend;
        let (request, response) = (f.stream(Dir::Up), f.stream(Dir::Down));
        let mut got = vec![0; request.len()];
        backend.read_exact(&mut got).await.unwrap();
        backend.write_all(&response).await.unwrap();
        // The client's FIN reaches the backend through the observer, before any copy.
        assert_eq!(backend.read(&mut [0; 1]).await.unwrap(), 0, "EOF passed on");
        got_eof.send(()).unwrap();
        backend.write_all(&late).await.unwrap();
    });
    let observed =
        observe(&proxy_client, &proxy_backend, &RelayCtl::unlimited(), &ObserveLimits::default(), |_: &Names| true)
            .await;
    assert!(matches!(observed.stop, Stop::Fin(Dir::Up)), "{:?}", observed.stop);
    assert!(observed.stop.hands_over());
    assert_eq!(observed.progress.bytes, [f.stream(Dir::Up).len() as u64, f.stream(Dir::Down).len() as u64]);
    // Bounds a failure only: the FIN is on its way when observe returns.
    tokio::time::timeout(Duration::from_secs(10), eof).await.expect("the backend got the FIN").unwrap();
    // The copy finds the client's EOF again, and carries the backend's late bytes.
    let (mut pc, mut pb) = (proxy_client, proxy_backend);
    let copy = tokio::spawn(async move { tokio::io::copy_bidirectional(&mut pc, &mut pb).await.unwrap() });
    backend.await.unwrap();
    let (up, down) = copy.await.unwrap();
    assert_eq!((up, down), (0, late_len));
    c.await.unwrap();
}

#[tokio::test]
async fn an_authenticate_without_its_response_is_unanswered() {
    let f = fixture("curl_ok.bin");
    let turns: Vec<_> = f.turns().into_iter().take(3).collect(); // NEGOTIATE, challenge, AUTHENTICATE
    let Wire { client, proxy_client, proxy_backend, backend } = wire().await;
    let c = tokio::spawn(play(client, Dir::Up, turns.clone(), vec![], vec![]));
    let b = tokio::spawn(play(backend, Dir::Down, turns, vec![], vec![]));
    let observed =
        observe(&proxy_client, &proxy_backend, &RelayCtl::unlimited(), &ObserveLimits::default(), |_: &Names| true)
            .await;
    assert!(matches!(observed.stop, Stop::Fin(Dir::Up)), "{:?}", observed.stop);
    assert_eq!(observed.login, Some(Login { result: LoginResult::Unanswered, ..login_of(f) }));
    let (mut pc, mut pb) = (proxy_client, proxy_backend);
    tokio::io::copy_bidirectional(&mut pc, &mut pb).await.unwrap();
    c.await.unwrap();
    b.await.unwrap();
}

#[tokio::test]
async fn a_refused_login_never_reaches_the_backend() {
    let f = fixture("curl_ok.bin");
    let turns = f.turns();
    let Wire { mut client, proxy_client, proxy_backend, mut backend } = wire().await;
    let (negotiate, challenge, authenticate) = (turns[0].1.clone(), turns[1].1.clone(), turns[2].1.clone());
    let backend = tokio::spawn(async move {
        let mut got = vec![0; negotiate.len()];
        backend.read_exact(&mut got).await.unwrap();
        backend.write_all(&challenge).await.unwrap();
        let mut rest = Vec::new();
        // The proxy closes both sockets (here with a FIN: nothing is left unread), and not one
        // byte of the AUTHENTICATE came before.
        backend.read_to_end(&mut rest).await.unwrap();
        rest
    });
    let client = tokio::spawn(async move {
        client.write_all(&turns[0].1).await.unwrap();
        let mut got = vec![0; turns[1].1.len()];
        client.read_exact(&mut got).await.unwrap();
        client.write_all(&authenticate).await.unwrap();
        client
    });
    let asked = Arc::new(Mutex::new(Vec::new()));
    let record = asked.clone();
    let admit = move |n: &Names| {
        record.lock().unwrap().push(n.account());
        n.user != "alice"
    };
    let observed =
        observe(&proxy_client, &proxy_backend, &RelayCtl::unlimited(), &ObserveLimits::default(), admit).await;
    assert!(matches!(observed.stop, Stop::Blocked) && !observed.stop.hands_over(), "{:?}", observed.stop);
    // The challenge was written in full and nothing else is awaited: the proxy may answer.
    assert!(observed.answerable);
    assert_eq!(observed.login, Some(Login { result: LoginResult::Blocked, ..login_of(f) }));
    assert_eq!(*asked.lock().unwrap(), ["EXAMPLE\\alice"]);
    assert_eq!(observed.progress.bytes, [turns_len(f, 0), turns_len(f, 1)]);
    drop((proxy_client, proxy_backend));
    assert_eq!(backend.await.unwrap(), b"", "the backend got nothing after the NEGOTIATE");
    drop(client.await.unwrap());
}

/// Length of turn `i` of `f`.
fn turns_len(f: &Fixture, i: usize) -> u64 {
    f.turns()[i].1.len() as u64
}

#[tokio::test]
async fn the_byte_cap_hands_over_mid_body() {
    let body = pattern(5, 100_000);
    let head = format!("POST /upload HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len());
    let request = [head.as_bytes(), &body].concat();
    let turns = vec![(Dir::Up, request.clone()), (Dir::Down, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec())];
    let Wire { client, proxy_client, proxy_backend, backend } = wire().await;
    // Small buffers towards the backend: writes wait on it, so the read that crosses the cap
    // is still being written when the reading stops.
    socket2::SockRef::from(&proxy_backend).set_send_buffer_size(4096).unwrap();
    socket2::SockRef::from(&backend).set_recv_buffer_size(4096).unwrap();
    let c = tokio::spawn(play(client, Dir::Up, turns.clone(), vec![], vec![]));
    let b = tokio::spawn(play(backend, Dir::Down, turns, vec![], vec![]));
    let limits = ObserveLimits { max_bytes: 64 << 10, ..ObserveLimits::default() };
    let observed = observe(&proxy_client, &proxy_backend, &RelayCtl::unlimited(), &limits, |_: &Names| true).await;
    assert!(matches!(observed.stop, Stop::ByteCap(Dir::Up)), "{:?}", observed.stop);
    let up = observed.progress.bytes[0];
    assert!(up >= limits.max_bytes && up < request.len() as u64, "stopped after the cap, mid-body: {up}");
    let (mut pc, mut pb) = (proxy_client, proxy_backend);
    tokio::io::copy_bidirectional(&mut pc, &mut pb).await.unwrap();
    c.await.unwrap();
    b.await.unwrap();
}

#[tokio::test]
async fn a_scanner_that_cannot_follow_hands_over() {
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    let turns = vec![(Dir::Up, preface.clone())];
    let Wire { client, proxy_client, proxy_backend, backend } = wire().await;
    let c = tokio::spawn(play(client, Dir::Up, turns.clone(), pattern(6, 5000), pattern(7, 5000)));
    let b = tokio::spawn(play(backend, Dir::Down, turns, pattern(7, 5000), pattern(6, 5000)));
    let observed =
        observe(&proxy_client, &proxy_backend, &RelayCtl::unlimited(), &ObserveLimits::default(), |_: &Names| true)
            .await;
    assert!(matches!(observed.stop, Stop::CannotFollow { dir: Dir::Up, why: GiveUp::NotHttp1 }), "{:?}", observed.stop);
    assert!(observed.progress.bytes[0] >= preface.len() as u64);
    let (mut pc, mut pb) = (proxy_client, proxy_backend);
    tokio::io::copy_bidirectional(&mut pc, &mut pb).await.unwrap();
    c.await.unwrap();
    b.await.unwrap();
}

#[tokio::test]
async fn the_time_limit_hands_over_what_is_in_flight() {
    tokio::time::pause();
    let Wire { mut client, proxy_client, proxy_backend, mut backend } = wire().await;
    let (part1, part2) = (b"GET / HTTP/1.1\r\n".to_vec(), b"Host: a\r\n\r\n".to_vec());
    client.write_all(&part1).await.unwrap();
    let limits = ObserveLimits { max_time: Duration::from_secs(3), ..ObserveLimits::default() };
    let before = Instant::now();
    let observed = observe(&proxy_client, &proxy_backend, &RelayCtl::unlimited(), &limits, |_: &Names| true).await;
    assert!(matches!(observed.stop, Stop::TimeLimit), "{:?}", observed.stop);
    assert!(before.elapsed() >= limits.max_time);
    assert!(observed.progress.bytes[0] <= part1.len() as u64);
    let (mut pc, mut pb) = (proxy_client, proxy_backend);
    let copy = tokio::spawn(async move { tokio::io::copy_bidirectional(&mut pc, &mut pb).await.unwrap() });
    client.write_all(&part2).await.unwrap();
    client.shutdown().await.unwrap();
    let mut got = Vec::new();
    backend.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, [&part1[..], &part2].concat());
    backend.shutdown().await.unwrap();
    let (up, _) = copy.await.unwrap();
    assert_eq!(observed.progress.bytes[0] + up, got.len() as u64);
}

#[tokio::test]
async fn nothing_moving_for_the_idle_timeout_ends_the_connection() {
    tokio::time::pause();
    let Wire { client, proxy_client, proxy_backend, backend } = wire().await;
    let ctl = RelayCtl { idle_timeout: Some(Duration::from_secs(2)), ..RelayCtl::unlimited() };
    let limits = ObserveLimits { max_time: Duration::from_secs(60), ..ObserveLimits::default() };
    let before = Instant::now();
    let observed = observe(&proxy_client, &proxy_backend, &ctl, &limits, |_: &Names| true).await;
    assert!(matches!(observed.stop, Stop::IdleTimeout) && !observed.stop.hands_over(), "{:?}", observed.stop);
    assert!((Duration::from_secs(2)..limits.max_time).contains(&before.elapsed()));
    drop((client, backend));
}

#[tokio::test]
async fn the_forced_shutdown_ends_the_connection() {
    let Wire { client, proxy_client, proxy_backend, backend } = wire().await;
    let ctl = RelayCtl::unlimited();
    ctl.force_close.cancel();
    let observed = observe(&proxy_client, &proxy_backend, &ctl, &ObserveLimits::default(), |_: &Names| true).await;
    assert!(matches!(observed.stop, Stop::Shutdown) && !observed.stop.hands_over(), "{:?}", observed.stop);
    drop((client, backend));
}

#[tokio::test]
async fn a_reset_backend_is_a_backend_failure() {
    let Wire { mut client, proxy_client, proxy_backend, backend } = wire().await;
    client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let b = backend.into_std().unwrap();
    socket2::SockRef::from(&b).set_linger(Some(Duration::ZERO)).unwrap();
    drop(b); // a reset
    let observed =
        observe(&proxy_client, &proxy_backend, &RelayCtl::unlimited(), &ObserveLimits::default(), |_: &Names| true)
            .await;
    let Stop::Failed(fault) = &observed.stop else { panic!("{:?}", observed.stop) };
    assert_eq!((fault.end(), fault.resets()), (End::BackendReset, &[Side::Client][..]));
    assert!(!observed.stop.hands_over());
}

/// The stop rules on their own, fed as the relay feeds them.
mod rules {
    use super::*;

    fn watch() -> Watch<fn(&Names) -> bool> {
        Watch::new(|_| true)
    }

    #[test]
    fn the_response_that_stops_may_be_followed_by_more_in_the_same_read() {
        let f = fixture("curl_ok.bin");
        let turns = f.turns();
        let mut w = watch();
        for (i, (dir, bytes)) in turns.iter().enumerate() {
            let mut bytes = bytes.clone();
            if i + 1 == turns.len() {
                bytes.extend_from_slice(b"HTTP/1.1 200 OK\r\n... and whatever follows");
            }
            let stop = match dir {
                Dir::Up => w.up(&bytes),
                Dir::Down => w.down(&bytes),
            };
            assert_eq!(stop.is_some(), i + 1 == turns.len(), "turn {i}: {stop:?}");
        }
        assert_eq!(w.login, Some(login_of(f)));
    }

    #[test]
    fn a_login_pipelined_behind_a_plain_request_is_waited_for() {
        let f = fixture("curl_ok.bin");
        let turns = f.turns();
        let mut w = watch();
        // A plain GET and the NEGOTIATE in one read; the GET's 200 does not end the watch.
        let first = [&b"GET /a HTTP/1.1\r\n\r\n"[..], &turns[0].1].concat();
        assert!(w.up(&first).is_none());
        assert!(w.down(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").is_none());
        assert!(w.down(&turns[1].1).is_none());
        assert!(w.up(&turns[2].1).is_none());
        assert!(matches!(w.down(&turns[3].1), Some(Stop::Login)));
    }

    #[test]
    fn a_negotiate_answered_without_a_challenge_is_not_a_login() {
        let f = fixture("curl_ok.bin");
        let mut w = watch();
        assert!(w.up(&f.turns()[0].1).is_none());
        assert!(matches!(w.down(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), Some(Stop::NotAuthenticating)));
    }

    #[test]
    fn an_anonymous_401_without_an_ntlm_offer_is_not_watched_past() {
        let mut w = watch();
        assert!(w.up(b"GET / HTTP/1.1\r\n\r\n").is_none());
        let basic = b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"x\"\r\nContent-Length: 0\r\n\r\n";
        assert!(matches!(w.down(basic), Some(Stop::NotAuthenticating)));
    }

    #[test]
    fn login_results_follow_the_status() {
        let cases = [
            (200, LoginResult::Ok),
            (302, LoginResult::Ok),
            (101, LoginResult::Ok),
            (403, LoginResult::Ok),
            (404, LoginResult::Ok),
            (401, LoginResult::Denied),
            (500, LoginResult::Error),
            (503, LoginResult::Error),
            (600, LoginResult::Error),
        ];
        for (status, want) in cases {
            assert_eq!(LoginResult::of(status), want, "{status}");
        }
    }
}

/// A judge like a route's guard: admits everyone, records the logins decided, and watches
/// on after a denied one when `watch` is set.
struct Recorder {
    watch: bool,
    decided: Vec<LoginResult>,
}

impl Judge for &mut Recorder {
    fn admit(&mut self, _: &Names) -> bool {
        true
    }

    fn decided(&mut self, login: &Login) {
        self.decided.push(login.result);
    }

    fn watches_denied(&self) -> bool {
        self.watch
    }
}

#[tokio::test]
async fn with_a_guard_a_denied_login_is_watched_on_and_the_next_try_judged() {
    let (denied, ok) = (fixture("curl_denied.bin"), fixture("curl_ok.bin"));
    // Both logins on one connection: the wrong password, then the right one.
    let turns = [denied.turns(), ok.turns()].concat();
    let tail = 200_000;
    let Wire { client, proxy_client, proxy_backend, backend } = wire().await;
    let c = tokio::spawn(play(client, Dir::Up, turns.clone(), pattern(6, tail), pattern(7, tail)));
    let b = tokio::spawn(play(backend, Dir::Down, turns, pattern(7, tail), pattern(6, tail)));
    let mut judge = Recorder { watch: true, decided: Vec::new() };
    let observed =
        observe(&proxy_client, &proxy_backend, &RelayCtl::unlimited(), &ObserveLimits::default(), &mut judge).await;
    assert!(matches!(observed.stop, Stop::Login), "{:?}", observed.stop);
    assert_eq!(judge.decided, [LoginResult::Denied, LoginResult::Ok]);
    assert_eq!(observed.login, Some(login_of(ok)));
    let (mut pc, mut pb) = (proxy_client, proxy_backend);
    let (up, down) = tokio::io::copy_bidirectional(&mut pc, &mut pb).await.unwrap();
    c.await.unwrap();
    b.await.unwrap();
    let streams = [denied.stream(Dir::Up).len() + ok.stream(Dir::Up).len(), 0];
    assert_eq!(observed.progress.bytes[0] + up, (streams[0] + tail) as u64);
    assert!(down > 0);
}

#[tokio::test]
async fn with_a_guard_a_denied_connection_is_never_handed_over_unwatched() {
    let f = fixture("curl_denied.bin");
    for watch in [false, true] {
        // After the 401, bytes the scanners cannot follow, both ways.
        let Wire { client, proxy_client, proxy_backend, backend } = wire().await;
        let c = tokio::spawn(play(client, Dir::Up, f.turns(), pattern(8, 5000), pattern(9, 5000)));
        let b = tokio::spawn(play(backend, Dir::Down, f.turns(), pattern(9, 5000), pattern(8, 5000)));
        let mut judge = Recorder { watch, decided: Vec::new() };
        let observed =
            observe(&proxy_client, &proxy_backend, &RelayCtl::unlimited(), &ObserveLimits::default(), &mut judge).await;
        assert_eq!(judge.decided, [LoginResult::Denied]);
        assert_eq!(observed.login.as_ref().map(|l| l.result), Some(LoginResult::Denied));
        if watch {
            assert!(matches!(observed.stop, Stop::DeniedUnwatched), "{:?}", observed.stop);
            assert!(!observed.stop.hands_over());
            c.abort();
            b.abort();
        } else {
            assert!(matches!(observed.stop, Stop::Login), "{:?}", observed.stop);
            let (mut pc, mut pb) = (proxy_client, proxy_backend);
            tokio::io::copy_bidirectional(&mut pc, &mut pb).await.unwrap();
            c.await.unwrap();
            b.await.unwrap();
        }
    }
}
