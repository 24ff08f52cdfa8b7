//! The proxy's metrics endpoint (`[metrics] listen`, `--metrics-listen`) as the suites read
//! it: where it serves, a plain `GET`, and `/metrics` scraped into samples.

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::harness::{Proxy, within};

/// Bound for a scrape, or for the endpoint's log line.
const QUICK: Duration = Duration::from_secs(10);

/// The metrics endpoint's address, from the proxy's `metrics: serving ... at http://ADDR`.
pub async fn metrics_addr(proxy: &Proxy) -> SocketAddr {
    proxy.wait_for_log("metrics: serving", QUICK).await;
    let logs = proxy.logs();
    let line = logs.lines().find(|l| l.contains("metrics: serving")).expect("just seen");
    let addr = line.rsplit_once("http://").map(|(_, a)| a.trim()).unwrap_or_else(|| panic!("no address: {line}"));
    addr.parse().unwrap_or_else(|e| panic!("{addr:?} in {line:?}: {e}"))
}

/// `GET path` from the endpoint at `addr`: the status code and the body.
pub async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("connect to the endpoint {addr}: {e}"));
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        out
    };
    let out = within(QUICK, &format!("GET {path}"), exchange).await;
    let text = String::from_utf8(out).expect("a UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no response head: {text:?}"));
    let code = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("status line: {head:?}"));
    (code, body.to_string())
}

/// The samples of one scrape: each series as printed (`name{labels}`) to its value.
pub type Samples = HashMap<String, f64>;

/// Scrapes `/metrics` at `addr`.
pub async fn scrape(addr: SocketAddr) -> Samples {
    let (code, body) = get(addr, "/metrics").await;
    assert_eq!(code, 200, "/metrics: {body}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {l:?}"));
            (series.to_string(), value.parse().unwrap_or_else(|_| panic!("not a value: {l:?}")))
        })
        .collect()
}

/// The change of `series` from `before` to `after`; a series absent from a scrape is 0 there.
pub fn delta(before: &Samples, after: &Samples, series: &str) -> f64 {
    after.get(series).copied().unwrap_or(0.0) - before.get(series).copied().unwrap_or(0.0)
}

/// The value of `series` in `s`, which must have it.
pub fn value(s: &Samples, series: &str) -> f64 {
    *s.get(series).unwrap_or_else(|| panic!("no series {series}; have: {:#?}", s.keys().collect::<Vec<_>>()))
}
