//! Tests of the HTTP scanners: the captured exchanges (`fixtures/`) and synthetic ones fed
//! whole, split at every point and byte by byte; framing edge cases; hostile input; and
//! property tests that arbitrary bytes split anywhere never panic and scan the same as whole.

use proptest::{prelude::*, test_runner::TestCaseResult};

use super::*;
use crate::{lifecycle::Dir, ntlm::fixtures::FIXTURES};

/// What a scanner reported for a whole stream: the messages, and how the last feed ended.
type Scan<T> = (Vec<T>, Result<(), GiveUp>);

/// Feeds `chunks` to a request scanner in order.
fn requests(chunks: &[&[u8]]) -> Scan<Request> {
    let mut s = RequestScanner::new();
    let mut out = Vec::new();
    let mut result = Ok(());
    for c in chunks {
        let r = s.feed(c, &mut out);
        assert!(!(result.is_err() && r.is_ok()), "giving up is for good");
        result = r;
    }
    (out, result)
}

/// Feeds `chunks` to a response scanner told of `sent`, in order, first.
fn responses(sent: &[Request], chunks: &[&[u8]]) -> Scan<Response> {
    let mut s = ResponseScanner::new();
    let mut result = Ok(());
    for r in sent {
        if let Err(e) = s.expect(r) {
            result = Err(e);
        }
    }
    let mut out = Vec::new();
    for c in chunks {
        let r = s.feed(c, &mut out);
        assert!(!(result.is_err() && r.is_ok()), "giving up is for good");
        result = r;
    }
    (out, result)
}

/// `bytes` cut at `points` (sorted, each at most its length).
fn cut<'a>(bytes: &'a [u8], points: &[usize]) -> Vec<&'a [u8]> {
    let mut chunks = Vec::new();
    let mut from = 0;
    for &p in points {
        chunks.push(&bytes[from..p]);
        from = p;
    }
    chunks.push(&bytes[from..]);
    chunks
}

/// Scans `up` and `down` whole, then split at every point and byte by byte, and checks that
/// every way gives the same; returns the whole scans.
fn scan_every_way(up: &[u8], down: &[u8]) -> (Scan<Request>, Scan<Response>) {
    let whole_up = requests(&[up]);
    let whole_down = responses(&whole_up.0, &[down]);
    for i in 0..=up.len() {
        assert_eq!(requests(&cut(up, &[i])), whole_up, "requests split at {i}");
    }
    for i in 0..=down.len() {
        assert_eq!(responses(&whole_up.0, &cut(down, &[i])), whole_down, "responses split at {i}");
    }
    let bytewise = |b| <[u8]>::chunks(b, 1).collect::<Vec<_>>();
    assert_eq!(requests(&bytewise(up)), whole_up, "requests byte by byte");
    assert_eq!(responses(&whole_up.0, &bytewise(down)), whole_down, "responses byte by byte");
    (whole_up, whole_down)
}

/// The status codes at the start of each turn of a direction, read without the scanner.
fn statuses(turns: &[(Dir, Vec<u8>)]) -> Vec<u16> {
    turns
        .iter()
        .filter(|(d, _)| *d == Dir::Down)
        .map(|(_, b)| std::str::from_utf8(&b[9..12]).unwrap().parse().unwrap())
        .collect()
}

#[test]
fn the_captured_exchanges_scan_to_their_requests_and_responses() {
    for f in FIXTURES {
        let (up, down) = (f.stream(Dir::Up), f.stream(Dir::Down));
        let ((reqs, r), (resps, d)) = scan_every_way(&up, &down);
        assert_eq!((r, d), (Ok(()), Ok(())), "{}", f.file);
        let turns = f.turns();
        assert_eq!(reqs.len(), turns.iter().filter(|(d, _)| *d == Dir::Up).count(), "{}", f.file);
        let tokens = f.tokens(Dir::Up);
        let seen: Vec<_> = reqs.iter().filter_map(|r| r.auth.as_ref()).map(|a| a.token.clone()).collect();
        assert_eq!(seen, tokens.iter().map(|(_, t)| t.clone()).collect::<Vec<_>>(), "{}", f.file);
        let got: Vec<u16> = resps.iter().map(|r| r.status).collect();
        assert_eq!(got, statuses(&turns), "{}", f.file);
        // The backends offer NTLM or Negotiate on every 401.
        assert!(resps.iter().all(|r| r.offers_ntlm == (r.status == 401) || f.file == "spnego_ok.bin"), "{}", f.file);
    }
}

/// A 401 with a chunked body (extensions, a trailer) to a POST with a chunked body, then a
/// HEAD whose response has a Content-Length and no body, interim responses, a 204 and a 304,
/// and a 200 with a Content-Length body before a 404. (The bodies end in bytes that cannot
/// start a message, so a body skipped one byte short shows.)
const UP: &[u8] = b"\r\nPOST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
    4;ext=\"x\"\r\nbody\r\n0\r\nTrailer: t\r\n\r\n\
    HEAD / HTTP/1.1\r\nHost: a\r\nAuthorization: NTLM TlRMTVNTUAABAAAAB4IIAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n\
    GET /a HTTP/1.1\r\nAuthorization: Basic YWxpY2U6c2VjcmV0\r\n\r\n\
    GET /b HTTP/1.0\r\nauthorization:   negotiate   YII=  \r\nContent-Length: 3\r\n\r\nab/\
    PUT /c HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello\
    GET /d HTTP/1.1\r\n\r\n";
const DOWN: &[u8] = b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"a, b\", NTLM\r\n\
    Transfer-Encoding: chunked\r\n\r\n1a;name=value\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-T: 1\r\nY-T: 2\r\n\r\n\
    HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n\
    HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n\
    HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n\
    HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 12, 12\r\n\r\nhello world!\
    HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";

#[test]
fn bodies_are_skipped_by_their_framing_across_every_split() {
    let ((reqs, r), (resps, d)) = scan_every_way(UP, DOWN);
    assert_eq!((r, d), (Ok(()), Ok(())));
    let auth: Vec<_> = reqs.iter().map(|r| r.auth.as_ref().map(|a| (a.scheme, a.token.clone()))).collect();
    assert_eq!(
        auth,
        [
            None,
            Some((Scheme::Ntlm, b"TlRMTVNTUAABAAAAB4IIAAAAAAAAAAAAAAAAAAAAAAA=".to_vec())),
            None, // Basic: not kept
            Some((Scheme::Negotiate, b"YII=".to_vec())),
            None,
            None,
        ]
    );
    assert_eq!(reqs.iter().map(|r| r.head_method).collect::<Vec<_>>(), [false, true, false, false, false, false]);
    let got: Vec<_> = resps.iter().map(|r| (r.status, r.offers_ntlm)).collect();
    assert_eq!(got, [(401, true), (200, false), (204, false), (304, false), (200, false), (404, false)]);
}

#[test]
fn the_auth_token_is_not_in_debug_output() {
    let (reqs, _) = requests(&[b"GET / HTTP/1.1\r\nAuthorization: NTLM c2VjcmV0LXRva2Vu\r\n\r\n"]);
    let debug = format!("{reqs:?}");
    assert!(!debug.contains("c2VjcmV0") && !debug.contains("99, 50"), "{debug}");
    assert!(debug.contains("token_len: 16"), "{debug}");
}

/// A request head padded to exactly `len` bytes with one long field.
fn head_of_len(len: usize) -> Vec<u8> {
    let start = b"GET / HTTP/1.1\r\nX: ";
    let end = b"\r\n\r\n";
    let mut h = start.to_vec();
    h.resize(len - end.len(), b'a');
    h.extend_from_slice(end);
    h
}

#[test]
fn a_head_over_the_cap_is_given_up_on() {
    assert_eq!(requests(&[&head_of_len(MAX_HEAD)]).1, Ok(()));
    let over = head_of_len(MAX_HEAD + 1);
    assert_eq!(requests(&[&over]), (vec![], Err(GiveUp::HeadTooLarge)));
    assert_eq!(requests(&cut(&over, &[100, 9000])), (vec![], Err(GiveUp::HeadTooLarge)));
    let many: Vec<u8> = [&b"GET / HTTP/1.1\r\n"[..], &b"A: b\r\n".repeat(MAX_HEADERS + 1), b"\r\n"].concat();
    assert_eq!(requests(&[&many]), (vec![], Err(GiveUp::TooManyHeaders)));
    // A trailer section over the cap.
    let mut down = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n".to_vec();
    down.extend_from_slice(&b"T: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n".repeat(MAX_HEAD / 32));
    let get = requests(&[b"GET / HTTP/1.1\r\n\r\n"]).0;
    assert_eq!(responses(&get, &[&down]).1, Err(GiveUp::HeadTooLarge));
}

#[test]
fn what_is_not_http1_is_given_up_on_at_its_first_bytes() {
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    assert_eq!(requests(&[preface]), (vec![], Err(GiveUp::NotHttp1)));
    assert_eq!(requests(&[&preface[..16]]).1, Err(GiveUp::NotHttp1), "on its first line");
    // A TLS ClientHello (captured from curl, for the SNI tests): at its first byte.
    let hello = include_bytes!("../../sni/fixtures/curl.bin");
    assert_eq!(requests(&[&hello[..1]]), (vec![], Err(GiveUp::NotHttp1)));
    // A TLS record from the backend, before any request went.
    assert_eq!(responses(&[], &[b"\x16\x03\x03\x00\x7a\x02"]), (vec![], Err(GiveUp::NotHttp1)));
    assert_eq!(requests(&[b"GET / HTTP/1.1\r\nBad Name: x\r\n"]).1, Err(GiveUp::NotHttp1));
    assert_eq!(responses(&[], &[b"HTTP/3.0 200 OK\r\n"]).1, Err(GiveUp::NotHttp1));
}

#[test]
fn tunnels_and_upgrades_end_the_scan() {
    assert_eq!(requests(&[b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n"]), (vec![], Err(GiveUp::Connect)));
    let up =
        b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nAuthorization: NTLM eA==\r\n\r\n\x81\x05";
    let (reqs, r) = requests(&[up]);
    assert_eq!((reqs.len(), r), (1, Err(GiveUp::Upgrade)), "the request is reported, then the scan ends");
    let down = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello";
    assert_eq!(responses(&reqs, &[down]), (vec![Response { status: 101, offers_ntlm: false }], Err(GiveUp::Upgrade)));
}

#[test]
fn framing_it_cannot_be_sure_of_is_given_up_on() {
    let bad_requests: &[&[u8]] = &[
        b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 1 2\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: \r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n;ext\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nbad trailer\n",
    ];
    for up in bad_requests {
        let (_, r) = requests(&[up]);
        assert_eq!(r, Err(GiveUp::Framing), "{}", String::from_utf8_lossy(up));
    }
    // A refused request is not reported: the backend will not serve it.
    assert_eq!(requests(&[bad_requests[6]]).0, vec![]);
    let mut long_line = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;".to_vec();
    long_line.resize(long_line.len() + MAX_CHUNK_LINE, b'x');
    assert_eq!(requests(&[&long_line]).1, Err(GiveUp::Framing));
    // Responses: the status is reported, then the scan ends.
    let get = requests(&[b"GET / HTTP/1.1\r\n\r\n"]).0;
    for (down, why) in [
        (&b"HTTP/1.1 200 OK\r\n\r\nbody until close"[..], GiveUp::UntilClose),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", GiveUp::UntilClose),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n", GiveUp::UntilClose),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n", GiveUp::Framing),
    ] {
        let want = (vec![Response { status: 200, offers_ntlm: false }], Err(why));
        assert_eq!(responses(&get, &[down]), want, "{}", String::from_utf8_lossy(down));
    }
}

#[test]
fn responses_are_matched_to_requests_in_order() {
    // No request: nothing to answer.
    assert_eq!(responses(&[], &[b"HTTP/1.1 408 Request Timeout\r\n\r\n"]), (vec![], Err(GiveUp::Unsolicited)));
    // One request, two responses.
    let get = requests(&[b"GET / HTTP/1.1\r\n\r\n"]).0;
    let two = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
    assert_eq!(responses(&get, &[two]).1, Err(GiveUp::Unsolicited));
    // Too many waiting.
    let many = vec![get[0].clone(); MAX_PENDING + 1];
    assert_eq!(responses(&many, &[]).1, Err(GiveUp::Pipelined));
    assert_eq!(responses(&many[..MAX_PENDING], &[]).1, Ok(()));
}

#[test]
fn a_scanner_that_gave_up_reports_nothing_more() {
    let mut s = RequestScanner::new();
    let mut out = Vec::new();
    assert_eq!(s.feed(b"CONNECT a:1 HTTP/1.1\r\n\r\n", &mut out), Err(GiveUp::Connect));
    assert_eq!(s.feed(b"GET / HTTP/1.1\r\nAuthorization: NTLM eA==\r\n\r\n", &mut out), Err(GiveUp::Connect));
    assert!(out.is_empty());
}

// The properties below are strategies and checks apart, the shape a time-bounded fuzz
// target takes them in (the fuzz branch's `ntlm_fuzz::Target::property`).

/// Both directions of an exchange and where to cut each into reads.
#[derive(Clone, Debug)]
struct Split {
    up: Vec<u8>,
    down: Vec<u8>,
    up_cuts: Vec<usize>,
    down_cuts: Vec<usize>,
}

/// Sorted cut points inside a stream of `len` bytes.
fn points(picks: &[prop::sample::Index], len: usize) -> Vec<usize> {
    let mut p: Vec<usize> = picks.iter().map(|i| i.index(len + 1)).collect();
    p.sort_unstable();
    p
}

/// `up` and `down` with up to 8 cuts each.
fn split(up: Vec<u8>, down: Vec<u8>, picks: &[prop::sample::Index]) -> Split {
    let (up_cuts, down_cuts) = (points(picks, up.len()), points(&picks[picks.len() / 2..], down.len()));
    Split { up, down, up_cuts, down_cuts }
}

fn picks() -> impl Strategy<Value = Vec<prop::sample::Index>> {
    proptest::collection::vec(any::<prop::sample::Index>(), 0..8)
}

/// Arbitrary bytes each way, cut anywhere.
fn arbitrary_split() -> impl Strategy<Value = Split> {
    let bytes = || proptest::collection::vec(any::<u8>(), 0..400);
    (bytes(), bytes(), picks()).prop_map(|(up, down, picks)| split(up, down, &picks))
}

/// The captured exchanges (NTLM and Negotiate logins, a 401 offering NTLM) and the synthetic
/// one (chunked bodies with extensions and trailers, a 401 with WWW-Authenticate, HEAD,
/// 100-continue and 103, 204, 304): both directions of each.
fn valid_exchanges() -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut all: Vec<_> = FIXTURES.iter().map(|f| (f.stream(Dir::Up), f.stream(Dir::Down))).collect();
    all.push((UP.to_vec(), DOWN.to_vec()));
    all
}

/// The captured exchanges and the synthetic one, with a few bytes overwritten each way, cut
/// anywhere.
fn mutated_split() -> impl Strategy<Value = Split> {
    let edits = proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6);
    (any::<prop::sample::Index>(), edits, picks()).prop_map(|(which, edits, picks)| {
        let mut all = valid_exchanges();
        let (mut up, mut down) = all.swap_remove(which.index(all.len()));
        for (i, (at, b)) in edits.into_iter().enumerate() {
            let s = if i % 2 == 0 { &mut up } else { &mut down };
            let n = s.len();
            s[at.index(n)] = b;
        }
        split(up, down, &picks)
    })
}

/// The valid exchanges ([`valid_exchanges`]) with random edits (see [`ntlm_fuzz::havoc`]) in
/// one direction or both, cut anywhere.
fn havoc_on_valid_split() -> impl Strategy<Value = Split> {
    prop::sample::select(valid_exchanges())
        .prop_flat_map(|(up, down)| {
            let side = |bytes: Vec<u8>| prop_oneof![1 => Just(bytes.clone()), 2 => ntlm_fuzz::havoc(Just(bytes))];
            (side(up), side(down), picks())
        })
        .prop_map(|(up, down, picks)| split(up, down, &picks))
}

/// Both directions in the recording format of `fixtures/` (`>` or `<`, a big-endian u32
/// length, the bytes): what a fuzz failure reports, ready to become a fixture.
fn recording(s: &Split) -> Vec<u8> {
    let mut out = Vec::new();
    for (dir, bytes) in [(b'>', &s.up), (b'<', &s.down)] {
        out.push(dir);
        out.extend_from_slice(&u32::try_from(bytes.len()).expect("a short stream").to_be_bytes());
        out.extend_from_slice(bytes);
    }
    out
}

/// No panic, and the reads' split changes nothing: the same requests, responses and verdicts
/// as when each direction is fed whole (the responses told of the requests scanned). No
/// `Debug` or `Display` text of what the scanners report shows bytes of the stream
/// ([`ntlm_fuzz::leak::shown`]): not a token, nor any other field.
fn scans_as_whole(s: Split) -> TestCaseResult {
    let whole_up = requests(&[&s.up]);
    prop_assert_eq!(requests(&cut(&s.up, &s.up_cuts)), whole_up.clone());
    // Arbitrary bytes rarely hold a request: the responses then answer three plain ones.
    let plain = vec![Request { auth: None, head_method: false }; 3];
    let sent = if whole_up.0.is_empty() { &plain } else { &whole_up.0 };
    let whole_down = responses(sent, &[&s.down]);
    prop_assert_eq!(responses(sent, &cut(&s.down, &s.down_cuts)), whole_down.clone());
    for (text, stream) in [(shown_text(&whole_up), &s.up), (shown_text(&whole_down), &s.down)] {
        if let Some(how) = ntlm_fuzz::leak::shown(&text, stream) {
            return Err(TestCaseError::fail(format!("{how}: {text}")));
        }
    }
    Ok(())
}

/// What a scan shows in a log or a failure message: the messages' `Debug`, the verdict's
/// `Debug` and `Display`.
fn shown_text<T: fmt::Debug>((messages, result): &Scan<T>) -> String {
    let verdict = result.err().map(|e| format!("{e}\n{e:?}")).unwrap_or_default();
    format!("{messages:?}\n{verdict}")
}

proptest! {
    #[test]
    fn arbitrary_bytes_split_anywhere_scan_as_whole(s in arbitrary_split()) {
        scans_as_whole(s)?;
    }

    #[test]
    fn mutated_exchanges_split_anywhere_scan_as_whole(s in mutated_split()) {
        scans_as_whole(s)?;
    }

    #[test]
    fn valid_exchanges_with_random_edits_split_anywhere_scan_as_whole(s in havoc_on_valid_split()) {
        scans_as_whole(s)?;
    }
}

/// The properties above on fresh cases for a time budget instead of proptest's 256 (see the
/// `ntlm_fuzz` crate): the product's HTTP/1.x head scanners. A failing case's input is both
/// directions in the recording format of `fixtures/` ([`recording`]).
#[test]
#[ignore = "fuzz target: `cargo xtask test` runs it for NTLM_SPLICE_FUZZ_SECS"]
fn fuzz_http_scanner() {
    ntlm_fuzz::Target::new("http_scanner")
        .property("arbitrary bytes", arbitrary_split(), recording, scans_as_whole)
        .property("mutated exchanges", mutated_split(), recording, scans_as_whole)
        .property("havoc on valid exchanges", havoc_on_valid_split(), recording, scans_as_whole)
        .run();
}

#[test]
fn a_recording_reads_back_as_its_streams() {
    let s = split(UP.to_vec(), DOWN.to_vec(), &[]);
    let file = Box::leak(recording(&s).into_boxed_slice());
    let f = crate::ntlm::fixtures::Fixture { file: "recording", bytes: file, login: None };
    assert_eq!((f.stream(Dir::Up), f.stream(Dir::Down)), (UP.to_vec(), DOWN.to_vec()));
}
