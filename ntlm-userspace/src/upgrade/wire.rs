//! The messages of the upgrade link between the old and the new process, one per
//! `SOCK_SEQPACKET` message, descriptors attached by [`crate::sys::fdpass`]. Hand-written
//! length-prefixed fields: both ends are this program, but the new one may be a newer
//! version, so decoding checks every length and says what was wrong.

use std::{net::SocketAddr, time::Duration};

use crate::ntlm::{Login, LoginResult, Names};

/// Longest message (a connection's identity is far below it).
pub const MAX_MESSAGE: usize = 16 << 10;

/// One message of the link.
#[derive(Debug, PartialEq)]
pub enum Msg {
    /// Old to new: the listening socket bound for this configured address (one descriptor).
    Listener(SocketAddr),
    /// Old to new: the metrics endpoint's listening socket (one descriptor).
    Metrics(SocketAddr),
    /// Old to new: every listener was sent.
    ListenersDone,
    /// New to old: configuration loaded, engines built, listeners taken: ready to serve.
    Ready {
        /// The new process's pid.
        pid: u32,
    },
    /// Old to new: the old process stopped accepting; the first connection id to use.
    NextId(u64),
    /// Old to new: a live connection (descriptors: client, backend).
    Conn(Box<ConnState>),
    /// Old to new: nothing more comes; what is left drains in the old process.
    Done,
}

/// What a moved connection carries besides its two sockets.
#[derive(Debug, PartialEq)]
pub struct ConnState {
    /// Its id in the logs.
    pub id: u64,
    /// The client's address.
    pub client: SocketAddr,
    /// The balancer its PROXY header came from.
    pub via: Option<SocketAddr>,
    /// How long ago it was accepted.
    pub age: Duration,
    /// Its route's name.
    pub route: String,
    /// Its backend's address.
    pub backend: SocketAddr,
    /// Bytes delivered (client to backend, backend to client).
    pub bytes: [u64; 2],
    /// CLOCK_MONOTONIC ns of its last byte (the clock is the machine's, shared by both).
    pub last_ns: u64,
    /// The NTLM login seen on it.
    pub ntlm: Option<Login>,
}

/// Why a message could not be read.
#[derive(Debug, thiserror::Error)]
#[error("bad upgrade message: {0}")]
pub struct BadMessage(&'static str);

struct Enc(Vec<u8>);

impl Enc {
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    fn addr(&mut self, a: SocketAddr) -> &mut Self {
        self.str(&a.to_string())
    }
}

struct Dec<'a>(&'a [u8]);

impl Dec<'_> {
    fn u64(&mut self) -> Result<u64, BadMessage> {
        let (head, rest) = self.0.split_first_chunk::<8>().ok_or(BadMessage("too short"))?;
        self.0 = rest;
        Ok(u64::from_le_bytes(*head))
    }
    fn str(&mut self) -> Result<String, BadMessage> {
        let n = usize::try_from(self.u64()?).map_err(|_| BadMessage("length"))?;
        if n > self.0.len() {
            return Err(BadMessage("a string longer than the message"));
        }
        let (s, rest) = self.0.split_at(n);
        self.0 = rest;
        String::from_utf8(s.to_vec()).map_err(|_| BadMessage("a string that is not UTF-8"))
    }
    fn addr(&mut self) -> Result<SocketAddr, BadMessage> {
        self.str()?.parse().map_err(|_| BadMessage("an address"))
    }
}

const RESULTS: [LoginResult; 5] = LoginResult::ALL;

impl Msg {
    /// The bytes of this message.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc(Vec::new());
        match self {
            Msg::Listener(a) => e.u64(1).addr(*a),
            Msg::Metrics(a) => e.u64(2).addr(*a),
            Msg::ListenersDone => e.u64(3),
            Msg::Ready { pid } => e.u64(4).u64(u64::from(*pid)),
            Msg::NextId(n) => e.u64(5).u64(*n),
            Msg::Conn(c) => {
                e.u64(6).u64(c.id).addr(c.client);
                match c.via {
                    Some(v) => e.u64(1).addr(v),
                    None => e.u64(0),
                };
                let age = u64::try_from(c.age.as_nanos()).unwrap_or(u64::MAX);
                e.u64(age).str(&c.route).addr(c.backend).u64(c.bytes[0]).u64(c.bytes[1]).u64(c.last_ns);
                match &c.ntlm {
                    Some(l) => {
                        let r = RESULTS.iter().position(|r| *r == l.result).unwrap_or(0) as u64;
                        e.u64(1).u64(r).str(&l.names.domain).str(&l.names.user).str(&l.names.workstation)
                    }
                    None => e.u64(0),
                }
            }
            Msg::Done => e.u64(7),
        };
        e.0
    }

    /// Reads a message.
    pub fn decode(b: &[u8]) -> Result<Msg, BadMessage> {
        let mut d = Dec(b);
        let m = match d.u64()? {
            1 => Msg::Listener(d.addr()?),
            2 => Msg::Metrics(d.addr()?),
            3 => Msg::ListenersDone,
            4 => Msg::Ready { pid: u32::try_from(d.u64()?).map_err(|_| BadMessage("pid"))? },
            5 => Msg::NextId(d.u64()?),
            6 => {
                let (id, client) = (d.u64()?, d.addr()?);
                let via = if d.u64()? == 1 { Some(d.addr()?) } else { None };
                let age = Duration::from_nanos(d.u64()?);
                let (route, backend) = (d.str()?, d.addr()?);
                let bytes = [d.u64()?, d.u64()?];
                let last_ns = d.u64()?;
                let ntlm = if d.u64()? == 1 {
                    let result = *RESULTS.get(d.u64()? as usize).ok_or(BadMessage("login result"))?;
                    let names = Names { domain: d.str()?, user: d.str()?, workstation: d.str()? };
                    Some(Login { names, result })
                } else {
                    None
                };
                Msg::Conn(Box::new(ConnState { id, client, via, age, route, backend, bytes, last_ns, ntlm }))
            }
            7 => Msg::Done,
            _ => return Err(BadMessage("unknown kind")),
        };
        if !d.0.is_empty() {
            return Err(BadMessage("trailing bytes"));
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind of message reads back as written; a cut one is refused.
    #[test]
    fn messages_round_trip() {
        let a: SocketAddr = "[::1]:443".parse().unwrap();
        let conn = ConnState {
            id: 42,
            client: "10.0.0.1:5000".parse().unwrap(),
            via: Some("10.0.0.9:6000".parse().unwrap()),
            age: Duration::from_millis(1234),
            route: "web".into(),
            backend: "192.0.2.1:80".parse().unwrap(),
            bytes: [7, 9],
            last_ns: 99,
            ntlm: Some(Login {
                names: Names { domain: "CORP".into(), user: "alice".into(), workstation: "WS1".into() },
                result: LoginResult::Ok,
            }),
        };
        let bare = ConnState { via: None, ntlm: None, ..ConnState { route: String::new(), ..conn_clone(&conn) } };
        for m in [
            Msg::Listener(a),
            Msg::Metrics(a),
            Msg::ListenersDone,
            Msg::Ready { pid: 7 },
            Msg::NextId(1 << 40),
            Msg::Conn(Box::new(conn)),
            Msg::Conn(Box::new(bare)),
            Msg::Done,
        ] {
            let b = m.encode();
            assert_eq!(Msg::decode(&b).unwrap(), m);
            assert!(Msg::decode(&b[..b.len() - 1]).is_err(), "{m:?} cut short");
        }
    }

    fn conn_clone(c: &ConnState) -> ConnState {
        ConnState {
            id: c.id,
            client: c.client,
            via: c.via,
            age: c.age,
            route: c.route.clone(),
            backend: c.backend,
            bytes: c.bytes,
            last_ns: c.last_ns,
            ntlm: c.ntlm.clone(),
        }
    }
}
