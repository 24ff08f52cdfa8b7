//! A connection's way into the maps and out again: the set-up order, reading the sockets'
//! baselines, and the RAII owner of every map entry, registration and budget a connection
//! holds ([`Entries`]), whose `Drop` deletes them all (trap 7).
//!
//! # Set-up order
//!
//! 1. Both sockets must be ESTABLISHED; otherwise (e.g. a client that sent its request and
//!    half-closed before we got here) the sockets never touch a map and the whole connection
//!    goes to the splice engine (trap 8).
//! 2. Baselines: bytes already written to each socket and already consumed from it, so that
//!    the drain check compares only what this relay moved.
//! 3. STATS and CTL entries and the event registration, so the verdict can count from the
//!    first byte.
//! 4. Both PEER entries (no programs attached: nothing changes for the sockets yet).
//! 5. Both FWD entries, each followed by an `SO_RCVLOWAT` kick for bytes that arrived
//!    earlier (trap 4). Inserting after the PEER entries means the verdict always finds the
//!    peer (trap 5). A socket whose FWD insertion fails because its FIN just arrived is
//!    copied in userspace instead (trap 8).

use std::{
    io,
    os::fd::{AsFd as _, BorrowedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use ntlm_common::{SockCtl, SockStats};
use tokio::net::TcpStream;

use super::{Inner, flow::stop_at, kernel::BPF_NOEXIST, session::Conn, sock};
use crate::{
    lifecycle::{Dir, Side},
    sys::clock::monotonic_ns,
};

/// The connection's map entries, registrations and budget; dropping it removes them all
/// (trap 7), whatever state the connection ended in.
pub(super) struct Entries {
    /// The engine whose maps and budget these are (owned: a parked connection keeps its
    /// entries without a task that borrows the engine).
    eng: Arc<Inner>,
    /// The connection's id (for the log).
    id: u64,
    /// `SO_COOKIE` of the client and backend sockets: the keys of every entry.
    cookie: [u64; 2],
    /// Both cookies are registered for events.
    registered: AtomicBool,
    /// STATS/CTL entries exist for socket i.
    tracked: [AtomicBool; 2],
    /// `PEER[cookie of socket i]` is set.
    in_peer: [AtomicBool; 2],
    /// The source of direction d is in FWD now.
    pub(super) in_fwd: [AtomicBool; 2],
    /// Global budget held by direction d.
    pub(super) reserved: [AtomicU64; 2],
    /// Set by `Conn::drop`, after which the sockets close before this drops: a socket leaves
    /// every SockHash when it closes (`sock_map_close`), so the FWD and PEER entries need no
    /// deletion. Left unset when set-up hands the open sockets to the splice engine.
    pub(super) sockets_closed: AtomicBool,
}

/// Why a connection could not enter the maps; set-up then hands it whole to the splice
/// engine, with nothing forwarded yet.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SetupError {
    /// A socket is past ESTABLISHED (e.g. its FIN arrived before set-up): it cannot enter a
    /// map (trap 8).
    #[error("the {} socket is not ESTABLISHED (TCP state {state}, e.g. it already sent its FIN)", name(*side))]
    NotEstablished {
        /// The socket.
        side: Side,
        /// Its `tcpi_state`.
        state: u8,
    },
    /// Reading a socket's state before it entered a map failed.
    #[error("reading the {} socket's {what} failed", name(*side))]
    Read {
        /// The socket.
        side: Side,
        /// What was read (`TCP_INFO`, `SO_COOKIE`, its byte counters).
        what: &'static str,
        /// The error.
        source: io::Error,
    },
    /// Creating a socket's entry in a side map (STATS, CTL) failed.
    #[error("creating the {map} entry of the {} socket failed", name(*side))]
    Entry {
        /// The map.
        map: &'static str,
        /// The socket the entry is for.
        side: Side,
        /// The error.
        source: io::Error,
    },
    /// Inserting a socket into a sockhash (PEER) failed; it may have closed.
    #[error("inserting the {} socket in {map} failed (it may have closed)", name(*side))]
    Insert {
        /// The map.
        map: &'static str,
        /// The socket inserted.
        side: Side,
        /// The error.
        source: io::Error,
    },
}

/// A connection that did not enter the maps: its two sockets, untouched and open, handed
/// back with the reason.
#[derive(Debug)]
pub(super) struct Unpaired {
    /// The client socket.
    pub(super) client: TcpStream,
    /// The backend socket.
    pub(super) backend: TcpStream,
    /// Why.
    pub(super) why: SetupError,
}

/// A socket's name in messages.
fn name(side: Side) -> &'static str {
    match side {
        Side::Client => "client",
        Side::Backend => "backend",
    }
}

/// An error and its sources, `: `-separated (as anyhow's `{:#}`), for a log line.
pub(super) struct Chain<'a>(pub(super) &'a dyn std::error::Error);

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

/// What set-up reads from both sockets before they enter a map.
struct Baselines {
    /// `SO_COOKIE` of each socket (the map key).
    cookie: [u64; 2],
    /// Bytes already written to each socket (as a destination).
    written: [u64; 2],
    /// Data bytes already taken out of each socket by a reader (as a source).
    consumed: [u64; 2],
}

/// Set-up steps 1-2.
fn baselines(client: &TcpStream, backend: &TcpStream) -> Result<Baselines, SetupError> {
    let mut b = Baselines { cookie: [0; 2], written: [0; 2], consumed: [0; 2] };
    for (side, s) in [(Side::Client, client), (Side::Backend, backend)] {
        let i = side as usize;
        let fd = s.as_fd();
        let read = |what| move |source| SetupError::Read { side, what, source };
        let info = sock::tcp_info(fd).map_err(read("TCP_INFO"))?;
        let state = info.state;
        if state != sock::TCP_ESTABLISHED {
            return Err(SetupError::NotEstablished { side, state });
        }
        b.cookie[i] = sock::cookie(fd).map_err(read("SO_COOKIE"))?;
        (b.written[i], b.consumed[i]) = sock::setup_counters(fd, info).map_err(read("byte counters"))?;
    }
    Ok(b)
}

/// Sets a connection up in the maps (the whole set-up order above); on failure nothing
/// forwards and the sockets come back, open, in [`Unpaired`].
pub(super) fn setup(eng: &Arc<Inner>, id: u64, client: TcpStream, backend: TcpStream) -> Result<Conn<'_>, Unpaired> {
    let Baselines { cookie, written: base_written, consumed: base_consumed } = match baselines(&client, &backend) {
        Ok(v) => v,
        Err(why) => return Err(Unpaired { client, backend, why }),
    };
    if eng.sndbuf != 0 {
        for (side, s) in [(Side::Client, &client), (Side::Backend, &backend)] {
            size_sndbuf(eng, id, side, s.as_fd());
        }
    }
    let maps = Entries {
        eng: Arc::clone(eng),
        id,
        cookie,
        registered: AtomicBool::new(true),
        tracked: Default::default(),
        in_peer: Default::default(),
        in_fwd: Default::default(),
        reserved: Default::default(),
        sockets_closed: AtomicBool::new(false),
    };
    let wake = [eng.registry.register(cookie[0]), eng.registry.register(cookie[1])];
    if let Err(why) = maps.enter(&client, &backend) {
        // Nothing forwards yet; dropping `maps` removes what went in.
        return Err(Unpaired { client, backend, why });
    }
    let conn = Conn {
        eng,
        id,
        maps,
        socks: [client, backend],
        cookie,
        base_written,
        base_consumed,
        wake,
        dirs: Default::default(),
        last_user: AtomicU64::new(monotonic_ns()),
        reset: Default::default(),
    };
    for d in [Dir::Up, Dir::Down] {
        if conn.maps.in_fwd[d as usize].load(Ordering::Relaxed) {
            conn.dirs[d as usize].kernel.store(true, Ordering::Relaxed);
        }
    }
    Ok(conn)
}

impl Entries {
    /// Registers both cookies for events again (a parked connection coming back): their
    /// events wake the returned `Notify`s from now on.
    pub(super) fn register(&self) -> [Arc<tokio::sync::Notify>; 2] {
        self.registered.store(true, Ordering::Relaxed);
        [self.eng.registry.register(self.cookie[0]), self.eng.registry.register(self.cookie[1])]
    }

    /// Moves everything these entries own into a new owner (a connection parking keeps them
    /// while its task, and this, go away); this one then removes nothing when dropped.
    pub(super) fn hand_over(&self) -> Entries {
        let flag = |a: &AtomicBool| AtomicBool::new(a.swap(false, Ordering::Relaxed));
        let flags = |a: &[AtomicBool; 2]| [flag(&a[0]), flag(&a[1])];
        let held = |a: &AtomicU64| AtomicU64::new(a.swap(0, Ordering::Relaxed));
        Entries {
            eng: Arc::clone(&self.eng),
            id: self.id,
            cookie: self.cookie,
            registered: flag(&self.registered),
            tracked: flags(&self.tracked),
            in_peer: flags(&self.in_peer),
            in_fwd: flags(&self.in_fwd),
            reserved: [held(&self.reserved[0]), held(&self.reserved[1])],
            sockets_closed: AtomicBool::new(false),
        }
    }

    /// `SO_COOKIE` of the client and backend sockets.
    pub(super) fn cookie(&self) -> [u64; 2] {
        self.cookie
    }

    /// The engine these entries are in.
    pub(super) fn engine(&self) -> &Arc<Inner> {
        &self.eng
    }

    /// Steps 3-5 of the set-up. An error means nothing forwards yet (no FWD entry) and the
    /// caller hands the connection to splice.
    fn enter(&self, client: &TcpStream, backend: &TcpStream) -> Result<(), SetupError> {
        let k = &self.eng.kernel;
        let fd = |side: Side| match side {
            Side::Client => client.as_fd(),
            Side::Backend => backend.as_fd(),
        };
        for side in [Side::Client, Side::Backend] {
            let i = side as usize;
            let entry = |map| move |source| SetupError::Entry { map, side, source };
            let fresh = SockStats { fired_at: u64::MAX, ..SockStats::default() };
            k.stats.put(self.cookie[i], &fresh, BPF_NOEXIST).map_err(entry("STATS"))?;
            self.tracked[i].store(true, Ordering::Relaxed);
            // The first redirected byte wakes us; the first check grants budget.
            let ctl = SockCtl { wake_at: 1, paused: 0, user_copied: 0, stop_at: stop_at(&self.eng, 0, 0) };
            k.ctl.put(self.cookie[i], &ctl, BPF_NOEXIST).map_err(entry("CTL"))?;
        }
        if self.eng.breaks.fwd_first {
            self.enter_fwd(&fd);
        }
        // PEER[cookie of the client] = backend socket, and the reverse.
        for side in [Side::Client, Side::Backend] {
            k.peer.put_sock(self.cookie[side as usize], fd(side.other())).map_err(|source| SetupError::Insert {
                map: "PEER",
                side: side.other(),
                source,
            })?;
            self.in_peer[side as usize].store(true, Ordering::Relaxed);
        }
        if !self.eng.breaks.fwd_first {
            self.enter_fwd(&fd);
        }
        Ok(())
    }

    /// Inserts each source into FWD and kicks it; a source that cannot go in (its FIN
    /// arrived) is left to the userspace copy.
    fn enter_fwd<'s>(&self, fd: &impl Fn(Side) -> BorrowedFd<'s>) {
        for dir in [Dir::Up, Dir::Down] {
            let src = dir.src();
            match self.eng.kernel.fwd.put_sock(self.cookie[src as usize], fd(src)) {
                Ok(()) => {
                    self.in_fwd[dir as usize].store(true, Ordering::Relaxed);
                    kick(&self.eng, self.id, src, fd(src));
                }
                Err(e) => log::debug!(
                    "conn={} sockmap: {src:?} socket not inserted in FWD ({e}); copying {dir:?} in userspace",
                    self.id
                ),
            }
        }
    }

    /// Deletes every map entry and registration of this connection. Idempotent.
    fn cleanup(&self) {
        let k = &self.eng.kernel;
        let fail = |what: &str, e: io::Error| {
            self.eng.counters.cleanup_failures.fetch_add(1, Ordering::Relaxed);
            log::warn!("conn={} sockmap: deleting {what} failed: {e}", self.id);
        };
        // Forwarding stops first, then the redirect targets, then the side maps.
        if self.sockets_closed.load(Ordering::Relaxed) {
            for f in self.in_fwd.iter().chain(&self.in_peer) {
                f.store(false, Ordering::Relaxed);
            }
        }
        for dir in [Dir::Up, Dir::Down] {
            if self.in_fwd[dir as usize].swap(false, Ordering::Relaxed)
                && let Err(e) = k.fwd.delete(self.cookie[dir.src() as usize])
            {
                fail("a FWD entry", e);
            }
        }
        for i in 0..2 {
            if self.in_peer[i].swap(false, Ordering::Relaxed)
                && let Err(e) = k.peer.delete(self.cookie[i])
            {
                fail("a PEER entry", e);
            }
        }
        if self.registered.swap(false, Ordering::Relaxed) {
            for c in self.cookie {
                self.eng.registry.unregister(c);
            }
        }
        for i in 0..2 {
            if self.tracked[i].swap(false, Ordering::Relaxed) && !self.eng.breaks.no_cleanup {
                if let Ok(st) = self.eng.kernel.stats_of(self.cookie[i]) {
                    let c = &self.eng.counters;
                    c.empty_skbs.fetch_add(st.empty_skbs, Ordering::Relaxed);
                    c.overlap_skbs.fetch_add(st.overlap_skbs, Ordering::Relaxed);
                    c.cap_stops.fetch_add(st.cap_stops, Ordering::Relaxed);
                    c.linearized.fetch_add(st.linearized, Ordering::Relaxed);
                    c.overlap_bytes.fetch_add(st.overlap_bytes, Ordering::Relaxed);
                    if st.overlap_skbs != 0 {
                        // More than one loopback segment in one buffer: TCP merged retransmitted
                        // segments; rare enough to show.
                        let level = if st.overlap_max > 64 << 10 { log::Level::Info } else { log::Level::Debug };
                        log::log!(
                            level,
                            "conn={} sockmap: cut {} overlapping bytes off {} retransmitted buffers from the {:?} socket \
                             (largest overlap {} bytes)",
                            self.id,
                            st.overlap_bytes,
                            st.overlap_skbs,
                            if i == 0 { Side::Client } else { Side::Backend },
                            st.overlap_max
                        );
                    }
                }
                if let Err(e) = k.stats.delete(self.cookie[i]) {
                    fail("a STATS entry", e);
                }
                if let Err(e) = k.ctl.delete(self.cookie[i]) {
                    fail("a CTL entry", e);
                }
            }
        }
        for r in &self.reserved {
            self.eng.budget.release(r.swap(0, Ordering::Relaxed));
        }
    }
}

impl Drop for Entries {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Gives a socket `--sockmap-sndbuf`. The kernel's redirect worker (`sk_psock_backlog`)
/// sends into a socket only while less than half its send buffer is queued; otherwise it
/// retries one timer tick later (4 ms at HZ=250), and the wake-up that more room would
/// bring is lost because the retry is already pending. With the autotuned 4 MiB at most,
/// 2 MiB lasts about 2 ms at loopback speed and the socket sat idle for the rest of each
/// tick: the kernel path moved 547-650 MiB/s, and 846-1,036 MiB/s with 8 MiB, against
/// 887-1,181 MiB/s through the splice engine in the same minutes (1 GiB uploads, pause off).
fn size_sndbuf(eng: &Inner, id: u64, side: Side, fd: BorrowedFd<'_>) {
    match sock::set_sndbuf(fd, eng.sndbuf) {
        Ok(got) if got < eng.sndbuf && !eng.sndbuf_short.swap(true, Ordering::Relaxed) => log::warn!(
            "sockmap: asked for a {} byte send buffer, the kernel gave {got} (net.core.wmem_max, and no \
             CAP_NET_ADMIN for SO_SNDBUFFORCE?); bulk transfers through the kernel will be slower",
            eng.sndbuf
        ),
        Ok(_) => {}
        Err(e) => log::debug!("conn={id} sockmap: SO_SNDBUF on {side:?}: {e}"),
    }
}

/// `SO_RCVLOWAT` kick (trap 4), unless switched off for a test.
pub(super) fn kick(eng: &Inner, id: u64, side: Side, fd: BorrowedFd<'_>) {
    if eng.breaks.no_kick {
        return;
    }
    if let Err(e) = sock::kick(fd) {
        log::debug!("conn={id} sockmap: SO_RCVLOWAT kick on {side:?} failed: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The log line names the step, the socket and the kernel's error: the source is kept,
    /// not flattened into a string.
    #[test]
    fn a_setup_error_keeps_its_source() {
        let why = SetupError::Insert {
            map: "PEER",
            side: Side::Backend,
            source: io::Error::from_raw_os_error(libc::EOPNOTSUPP),
        };
        let source = std::error::Error::source(&why).expect("the io::Error is the source");
        assert_eq!(source.to_string(), io::Error::from_raw_os_error(libc::EOPNOTSUPP).to_string());
        let line = Chain(&why).to_string();
        assert!(line.starts_with("inserting the backend socket in PEER failed"), "{line}");
        assert!(line.ends_with(&format!(": {source}")), "{line}");
        let state = SetupError::NotEstablished { side: Side::Client, state: 8 };
        assert!(std::error::Error::source(&state).is_none());
        assert_eq!(Chain(&state).to_string(), state.to_string());
        assert!(state.to_string().contains("client socket is not ESTABLISHED (TCP state 8"), "{state}");
    }
}
