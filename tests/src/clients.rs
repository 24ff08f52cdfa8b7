//! Real HTTP clients as subprocesses: `curl` (with `--ntlm`) and Python `requests-ntlm`
//! (`tests/python/ntlm_client.py`), for the suites that log in through the proxy.

use std::{net::IpAddr, path::PathBuf, process::ExitStatus, process::Stdio, time::Duration};

use tokio::process::Command;

use crate::harness::within;

/// Bound for one client subprocess (curl, python) from start to exit.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// curl's own `--max-time`, below [`CLIENT_TIMEOUT`] so curl reports what it was doing.
const CURL_MAX_TIME_SECS: &str = "45";
/// Marker that starts curl's `--write-out` line after each transfer.
pub const CURL_MARK: &str = "@@ntlm-test ";

/// One transfer of a curl run, from its `--write-out` line.
#[derive(Debug)]
pub struct Transfer {
    /// The HTTP status (0: no response).
    pub status: u16,
    /// New TCP connections curl made for this transfer (0 = re-used the previous one).
    pub connects: u32,
    /// The response body.
    pub body: String,
}

/// How to run curl.
#[derive(Debug, Default, Clone, Copy)]
pub struct CurlOptions<'a> {
    /// `--ntlm -u USER:PASSWORD`.
    pub auth: Option<(&'a str, &'a str)>,
    /// `--interface ADDR`: the client's source address (e.g. 127.0.0.2).
    pub interface: Option<IpAddr>,
    /// `-v`: the request and response headers go to stderr.
    pub verbose: bool,
}

/// What a curl run did.
#[derive(Debug)]
pub struct CurlRun {
    /// curl's exit status (52: empty reply, 56: reset, ...).
    pub status: ExitStatus,
    /// One per URL curl got to.
    pub transfers: Vec<Transfer>,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error (with `verbose`: the headers, `> ` out and `< ` in).
    pub stderr: String,
}

/// Runs curl against `urls` (one invocation, so one connection when it can keep it),
/// whatever its exit status.
pub async fn curl_run(opts: &CurlOptions<'_>, urls: &[String]) -> CurlRun {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--noproxy", "*", "--max-time", CURL_MAX_TIME_SECS])
        .args(["--write-out", &format!("\n{CURL_MARK}status=%{{http_code}} connects=%{{num_connects}}\n")]);
    if let Some((user, password)) = opts.auth {
        cmd.args(["--ntlm", "-u", &format!("{user}:{password}")]);
    }
    if let Some(source) = opts.interface {
        cmd.args(["--interface", &source.to_string()]);
    }
    if opts.verbose {
        cmd.arg("-v");
    }
    cmd.args(urls).stdin(Stdio::null()).kill_on_drop(true);
    let out = within(CLIENT_TIMEOUT, &format!("curl {urls:?}"), cmd.output())
        .await
        .unwrap_or_else(|e| panic!("cannot run curl (is it installed?): {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    CurlRun {
        status: out.status,
        transfers: parse_curl(&stdout),
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs curl against `urls` with `--ntlm -u USER:PASSWORD` when `auth` is given; panics
/// unless curl succeeds with one transfer per URL.
pub async fn curl(auth: Option<(&str, &str)>, urls: &[String]) -> Vec<Transfer> {
    let run = curl_run(&CurlOptions { auth, ..CurlOptions::default() }, urls).await;
    assert!(run.status.success(), "curl {urls:?} failed with {}: {}\n{}", run.status, run.stderr, run.stdout);
    assert_eq!(run.transfers.len(), urls.len(), "one --write-out line per URL:\n{}\n{}", run.stdout, run.stderr);
    run.transfers
}

/// The transfers of curl's standard output.
pub fn parse_curl(stdout: &str) -> Vec<Transfer> {
    let mut transfers = Vec::new();
    let mut rest = stdout;
    while let Some(at) = rest.find(&format!("\n{CURL_MARK}")) {
        let body = rest[..at].trim_end_matches('\n').to_owned();
        let after = &rest[at + 1 + CURL_MARK.len()..];
        let (line, tail) = after.split_once('\n').unwrap_or((after, ""));
        let field = |key: &str| -> u32 {
            line.split(' ')
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("curl --write-out line without {key}: {line:?}"))
        };
        let status = u16::try_from(field("status")).expect("HTTP status fits u16");
        transfers.push(Transfer { status, connects: field("connects"), body });
        rest = tail;
    }
    transfers
}

/// One request of the Python requests-ntlm client.
#[derive(Debug)]
pub struct PyResponse {
    /// The HTTP status.
    pub status: u16,
    /// Whether this request needed an NTLM handshake (a 401 first).
    pub handshake: bool,
    /// The response body.
    pub body: String,
}

/// tests/python/ntlm_client.py.
pub fn python_client() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/ntlm_client.py")
}

/// Runs tests/python/ntlm_client.py: one requests.Session with HttpNtlmAuth doing
/// `count` GETs of `url`.
pub async fn requests_ntlm(url: &str, user: &str, password: &str, count: usize) -> Vec<PyResponse> {
    let script = python_client();
    let mut cmd = Command::new("python3");
    cmd.arg(&script).args([url, user, password, "--count", &count.to_string()]).stdin(Stdio::null()).kill_on_drop(true);
    let out = within(CLIENT_TIMEOUT, &format!("python3 {} {url}", script.display()), cmd.output())
        .await
        .unwrap_or_else(|e| panic!("cannot run python3 {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(3) {
        panic!("Python requests-ntlm is missing - pip install requests-ntlm (cargo xtask test installs it): {stderr}");
    }
    assert!(out.status.success(), "{} failed with {}: {stderr}\n{stdout}", script.display(), out.status);
    let responses: Vec<PyResponse> = stdout
        .lines()
        .map(|line| {
            let parse = || -> Option<PyResponse> {
                let rest = line.strip_prefix("status=")?;
                let (status, rest) = rest.split_once(" handshake=")?;
                let (handshake, body) = rest.split_once(" body=")?;
                Some(PyResponse { status: status.parse().ok()?, handshake: handshake == "1", body: body.to_owned() })
            };
            parse().unwrap_or_else(|| panic!("unexpected output line from {}: {line:?}", script.display()))
        })
        .collect();
    assert_eq!(responses.len(), count, "one output line per request:\n{stdout}\n{stderr}");
    responses
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_curl_write_out() {
        let out = format!(
            "EXAMPLE\\alice\n\n{CURL_MARK}status=200 connects=1\n401 denied\n\n{CURL_MARK}status=401 connects=0\n\n{CURL_MARK}status=000 connects=0\n"
        );
        let t = parse_curl(&out);
        assert_eq!(t.len(), 3);
        assert_eq!((t[0].status, t[0].connects, t[0].body.as_str()), (200, 1, "EXAMPLE\\alice"));
        assert_eq!((t[1].status, t[1].connects, t[1].body.as_str()), (401, 0, "401 denied"));
        assert_eq!((t[2].status, t[2].body.as_str()), (0, ""));
    }
}
