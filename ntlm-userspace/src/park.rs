//! Parked connections: where an idle splice-engine connection waits without a task.
//!
//! A connection in its task costs the process about 1.6 KB while it waits: tokio's task cell
//! (the relay state machine, 128-byte aligned) and one runtime registration per socket. Most
//! connections behind an NTLM service spend most of their life idle (a browser's kept-alive
//! connection between pages), so after `--park-after` without a byte either way the splice
//! engine hands the two open sockets back ([`Relayed::Parked`](crate::lifecycle::Relayed)); the
//! connection task ends, and the connection waits here as one [`Parked`] in a table,
//! its sockets in this module's own epoll instance (`EPOLLIN | EPOLLRDHUP`, one-shot).
//!
//! The first event on either socket (bytes, a FIN, an error) takes the connection out of the
//! table and hands it back to its [`Owner`] (the connection lifecycle, `conn`), which starts a
//! new task that relays it from its [`Progress`]: the same pairing, the
//! same counters, the same access-log line at its end. While parked, the idle timeout still
//! runs (a timer for the earliest deadline), and a forced shutdown closes what is parked: both
//! go back to the owner with the [`End`] to log. This module knows nothing of what a
//! connection carries besides its sockets and progress: the owner's `M` rides along.
//! Parking changes nothing of the pairing: the two sockets stay open and paired throughout.
//!
//! Besides its sockets' events, a parked connection can be woken by its [`Bell`]: the sockmap
//! engine rings it with the connection's key when the kernel forwarded a byte of it (bytes the
//! kernel forwards never show on the sockets).
//!
//! Freed task memory stays resident in glibc's heaps unless trimmed, so the parker trims
//! once after a burst of parking ([`trim`]).

use std::{
    collections::BTreeSet,
    io,
    os::fd::{AsRawFd, OwnedFd, RawFd},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use slab::Slab;
use tokio::{io::unix::AsyncFd, sync::Notify};
use tokio_util::sync::CancellationToken;

use crate::{
    lifecycle::{End, Progress, idle_deadline},
    metrics::Gauge,
    sys::{
        clock::monotonic_ns,
        epoll::{self, Epoll},
        mem,
    },
};

/// Events read per epoll_wait(2).
const EVENTS: usize = 64;
/// Most epoll_wait(2) batches per wake-up of the parker.
const BATCHES: usize = 16;
/// How long after a connection parks the heap is trimmed (so that a burst of parking
/// connections is trimmed once).
const TRIM_DELAY: Duration = Duration::from_secs(1);
/// Fewest connections parked since the last trim for which a trim is worth its cost (each
/// freed about 1.2 KB; fewer are left for new connections to reuse).
const TRIM_MIN: usize = 64;

/// Where [`Parker::divert`] sends connections.
pub type Diverted<M> = tokio::sync::mpsc::UnboundedSender<Parked<M>>;

/// A [`Parker::divert`] in force: where connections go, and which stay.
struct Divert<M> {
    to: Diverted<M>,
    stays: fn(&M) -> bool,
}

/// A connection waiting for its next byte.
pub struct Parked<M> {
    /// What its owner keeps with it (for `conn`: id, client, backend lease, start, slot).
    pub meta: M,
    /// Client, backend: open, out of the runtime.
    pub socks: [OwnedFd; 2],
    /// Counters to go on with.
    pub progress: Progress,
}

/// Where parked connections go back to: the connection lifecycle.
pub trait Owner<M> {
    /// An event arrived on a socket of `conn` (bytes, a FIN, an error): relay it again.
    fn resume(&self, conn: Parked<M>);
    /// `conn` must end without going back: its idle timeout passed, or a forced shutdown.
    fn close(&self, conn: Parked<M>, end: End);
}

/// Why [`Parker::park`] gave a connection back.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// Forced shutdown: parking is closed; the connection should end (`End::Shutdown`).
    #[error("parking is closed for shutdown")]
    Closed,
    /// Its sockets cannot be watched (epoll_ctl(2): out of memory, or
    /// `fs.epoll.max_user_watches`), or the table is full: relay it on instead.
    #[error("cannot watch its sockets: {0}")]
    Watch(#[source] io::Error),
}

/// Wakes parked connections by key (see [`Parker::park`]) from anywhere, including a thread
/// outside the runtime: for events the parker's epoll instance cannot see.
#[derive(Default)]
pub struct Bell {
    /// Keys rung since the parker last looked.
    rung: Mutex<Vec<u64>>,
    notify: Notify,
}

impl Bell {
    /// Hands the connection parked under `key` back to its owner, as an event on its sockets
    /// would; a key that is no longer parked takes nothing.
    pub fn ring(&self, key: u64) {
        self.rung.lock().unwrap_or_else(|e| e.into_inner()).push(key);
        self.notify.notify_one();
    }

    fn take(&self) -> Vec<u64> {
        std::mem::take(&mut *self.rung.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The table of parked connections and the epoll instance that watches their sockets.
pub struct Parker<M> {
    epoll: AsyncFd<Epoll>,
    bell: Arc<Bell>,
    table: Mutex<Table<M>>,
    /// Wakes the parker's loop to look at the table again: a connection parked with an idle
    /// deadline earlier than all others, or the first since the last heap trim.
    earlier: Notify,
}

struct Table<M> {
    conns: Slab<Slot<M>>,
    /// (idle deadline in CLOCK_MONOTONIC ns, key) of every parked connection, if the idle
    /// timeout is on.
    deadlines: BTreeSet<(u64, u64)>,
    /// Generation of the next slot taken: a key is (generation << 32 | index), so that an
    /// event for a connection that has left cannot wake the one that took its slot.
    next_gen: u32,
    /// Forced shutdown: parking closes at once.
    closed: bool,
    /// Connections parked since the last [`trim`].
    since_trim: usize,
    /// How many are parked, for metrics (changed with `conns`).
    parked: Gauge,
    /// The live upgrade's hand-over: connections that would park go here instead, but for
    /// those the function says stay (their engine keeps state in this process).
    divert: Option<Divert<M>>,
}

impl<M> Default for Table<M> {
    fn default() -> Self {
        let parked = Gauge::default();
        let (conns, deadlines, divert) = (Slab::new(), BTreeSet::new(), None);
        Table { conns, deadlines, next_gen: 0, closed: false, since_trim: 0, parked, divert }
    }
}

struct Slot<M> {
    generation: u32,
    deadline: Option<u64>,
    conn: Parked<M>,
}

impl<M> Parker<M> {
    /// A parker with an empty table, which keeps `parked` at the number of connections it
    /// holds. Needs the runtime (its epoll instance is watched by it).
    pub fn new(parked: Gauge) -> io::Result<Parker<M>> {
        // SAFETY: the AsyncFd owns the Epoll from here until it is dropped, and an Epoll
        // always returns the descriptor it owns.
        let epoll = unsafe { AsyncFd::register_with_interest(Epoll::new()?, tokio::io::Interest::READABLE) }?;
        let table = Table { parked, ..Table::default() };
        Ok(Parker { epoll, bell: Arc::default(), table: Mutex::new(table), earlier: Notify::new() })
    }

    fn lock(&self) -> MutexGuard<'_, Table<M>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The bell that wakes a connection of this table by the key [`Parker::park`] gave.
    pub fn bell(&self) -> &Arc<Bell> {
        &self.bell
    }

    /// Number of connections parked now.
    pub fn len(&self) -> usize {
        self.lock().conns.len()
    }

    /// Whether nothing is parked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Parks `conn`, which closes after `idle_timeout` without a byte (the timeout keeps
    /// running while parked), or gives it back saying why not. Returns its key, for the
    /// [`Bell`], or `None` if it was handed over instead ([`Parker::divert`]).
    pub fn park(&self, conn: Parked<M>, idle_timeout: Option<Duration>) -> Result<Option<u64>, (Parked<M>, Refused)> {
        self.park_then(conn, idle_timeout, |_, _| {})
    }

    /// [`Parker::park`], calling `then` with the connection's `meta` and key once it is in
    /// the table, before anything can take it out again (so that it can ring the [`Bell`]).
    pub fn park_then(
        &self,
        conn: Parked<M>,
        idle_timeout: Option<Duration>,
        then: impl FnOnce(&mut M, u64),
    ) -> Result<Option<u64>, (Parked<M>, Refused)> {
        let mut t = self.lock();
        if t.closed {
            return Err((conn, Refused::Closed));
        }
        let conn = match &t.divert {
            // Handed over: the receiver owns it now.
            Some(d) if !(d.stays)(&conn.meta) => match d.to.send(conn) {
                Ok(()) => return Ok(None),
                Err(e) => e.0,
            },
            _ => conn,
        };
        let generation = t.next_gen;
        t.next_gen = generation.wrapping_add(1);
        let entry = t.conns.vacant_entry();
        let watched = u32::try_from(entry.key())
            .map_err(|_| io::Error::other("the table of parked connections is full"))
            .and_then(|index| {
                let key = u64::from(generation) << 32 | u64::from(index);
                self.watch_pair(&conn.socks, key).map(|()| key)
            });
        let key = match watched {
            Ok(key) => key,
            Err(e) => return Err((conn, Refused::Watch(e))),
        };
        let deadline = idle_timeout.map(|_| idle_deadline(conn.progress.last_ns, idle_timeout));
        then(&mut entry.insert(Slot { generation, deadline, conn }).conn.meta, key);
        t.parked.inc();
        t.since_trim += 1;
        if t.since_trim == 1 {
            self.earlier.notify_one();
        }
        if let Some(d) = deadline {
            let earliest = t.deadlines.first().is_none_or(|&(first, _)| d < first);
            t.deadlines.insert((d, key));
            if earliest {
                self.earlier.notify_one();
            }
        }
        Ok(Some(key))
    }

    /// The live upgrade's hand-over ([`crate::upgrade`]): from now on every connection that
    /// would park is sent to `to` instead, until [`Parker::undivert`] (or `to`'s receiver is
    /// gone); returns every connection parked now, taken out of the table. Connections for
    /// which `stays` is true (a sockmap pair, whose map entries belong to this process) are
    /// neither taken nor sent: they stay parked here, their idle deadlines running.
    pub fn divert(&self, to: Diverted<M>, stays: fn(&M) -> bool) -> Vec<Parked<M>> {
        let mut t = self.lock();
        t.divert = Some(Divert { to, stays });
        let keys: Vec<u64> = t
            .conns
            .iter()
            .filter(|(_, slot)| !stays(&slot.conn.meta))
            .map(|(index, slot)| u64::from(slot.generation) << 32 | index as u64)
            .collect();
        let all: Vec<Parked<M>> = keys.into_iter().filter_map(|key| t.take(key)).collect();
        for conn in &all {
            for s in &conn.socks {
                self.unwatch(s.as_raw_fd());
            }
        }
        all
    }

    /// Ends [`Parker::divert`]: connections park here again.
    pub fn undivert(&self) {
        self.lock().divert = None;
    }

    /// Adds both sockets to the epoll instance under `key`, or neither.
    fn watch_pair(&self, socks: &[OwnedFd; 2], key: u64) -> io::Result<()> {
        self.watch(socks[0].as_raw_fd(), key)?;
        self.watch(socks[1].as_raw_fd(), key).inspect_err(|_| self.unwatch(socks[0].as_raw_fd()))
    }

    fn watch(&self, fd: RawFd, key: u64) -> io::Result<()> {
        self.epoll.get_ref().add(fd, epoll::IN_RDHUP_ONESHOT, key)
    }

    fn unwatch(&self, fd: RawFd) {
        if let Err(e) = self.epoll.get_ref().delete(fd) {
            log::debug!("epoll_ctl(DEL) of a parked socket: {e}");
        }
    }
}

impl<M> Table<M> {
    /// Takes the connection of `key` out of the table, if it is still there.
    fn take(&mut self, key: u64) -> Option<Parked<M>> {
        let index = (key & u64::from(u32::MAX)) as usize;
        if self.conns.get(index).is_none_or(|s| u64::from(s.generation) != key >> 32) {
            return None;
        }
        let slot = self.conns.remove(index);
        self.parked.dec();
        if let Some(d) = slot.deadline {
            self.deadlines.remove(&(d, key));
        }
        Some(slot.conn)
    }
}

/// Runs `parker` until `force_close`, which closes every parked connection. Hands parked
/// connections whose sockets have events back to `owner`, and closes those whose idle
/// timeout passed.
pub async fn run<M>(parker: &Parker<M>, owner: &impl Owner<M>, force_close: &CancellationToken) {
    let mut events = [Epoll::EMPTY; EVENTS];
    let mut trim_at: Option<tokio::time::Instant> = None;
    loop {
        let (next, to_trim) = {
            let t = parker.lock();
            (t.deadlines.first().map(|&(d, _)| d), t.since_trim)
        };
        if to_trim > 0 && trim_at.is_none() {
            trim_at = Some(tokio::time::Instant::now() + TRIM_DELAY);
        }
        let wake = next
            .map(|d| tokio::time::Instant::now() + Duration::from_nanos(d.saturating_sub(monotonic_ns())))
            .into_iter()
            .chain(trim_at)
            .min();
        let sleep = async {
            match wake {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = force_close.cancelled() => {
                let all: Vec<Parked<M>> = {
                    let mut t = parker.lock();
                    t.closed = true;
                    t.deadlines.clear();
                    let all: Vec<Parked<M>> = t.conns.drain().map(|s| s.conn).collect();
                    t.parked.dec_by(i64::try_from(all.len()).unwrap_or(i64::MAX));
                    all
                };
                if !all.is_empty() {
                    log::info!("shutdown: closing parked={} idle connections", all.len());
                }
                for conn in all {
                    owner.close(conn, End::Shutdown);
                }
                return;
            }
            r = parker.epoll.readable() => {
                let mut guard = match r {
                    Ok(g) => g,
                    Err(e) => {
                        log::error!("parked connections: cannot wait on their epoll instance: {e}");
                        return;
                    }
                };
                // At most BATCHES full batches per wake-up, so that a flood of returning
                // connections does not keep this worker from the rest (readable() is
                // ready again at once while events are left, within tokio's task budget).
                for _ in 0..BATCHES {
                    let n = match parker.epoll.get_ref().ready(&mut events) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            // Cannot happen with a valid instance and buffer; do not spin on it.
                            log::error!("parked connections: epoll_wait: {e}");
                            guard.clear_ready();
                            break;
                        }
                    };
                    for ev in &events[..n] {
                        let key = ev.u64;
                        let Some(conn) = parker.lock().take(key) else {
                            continue; // the other socket's event of a connection already woken
                        };
                        for s in &conn.socks {
                            parker.unwatch(s.as_raw_fd());
                        }
                        owner.resume(conn);
                    }
                    if n < EVENTS {
                        guard.clear_ready();
                        break;
                    }
                }
            }
            () = sleep => {
                let now = monotonic_ns();
                let expired: Vec<Parked<M>> = {
                    let mut t = parker.lock();
                    let mut out = Vec::new();
                    while let Some(&(d, key)) = t.deadlines.first() {
                        if d > now {
                            break;
                        }
                        match t.take(key) {
                            Some(c) => out.push(c),
                            None => {
                                t.deadlines.pop_first();
                            }
                        }
                    }
                    out
                };
                // Closing the sockets also takes them out of the epoll instance.
                for conn in expired {
                    owner.close(conn, End::IdleTimeout);
                }
                if trim_at.is_some_and(|at| at <= tokio::time::Instant::now()) {
                    trim_at = None;
                    let n = {
                        let mut t = parker.lock();
                        // Only trailing free slots can go: the others' keys are in epoll.
                        t.conns.shrink_to_fit();
                        std::mem::take(&mut t.since_trim)
                    };
                    if n >= TRIM_MIN {
                        trim(n);
                    }
                }
            }
            () = parker.earlier.notified() => {}
            () = parker.bell.notify.notified() => {
                for key in parker.bell.take() {
                    let Some(conn) = parker.lock().take(key) else { continue };
                    for s in &conn.socks {
                        parker.unwatch(s.as_raw_fd());
                    }
                    owner.resume(conn);
                }
            }
        }
    }
}

/// Gives the memory that parked connections' tasks freed back to the kernel.
///
/// glibc keeps freed memory in its heaps; only what is free at a heap's top is returned by
/// itself. The tasks of connections accepted together lie interleaved in the heap, so after
/// they park their pages stay resident (measured: 1,000 connections parked, RSS unchanged)
/// until malloc_trim(3) releases the free pages inside the heaps (madvise(MADV_DONTNEED)).
/// Other allocators return memory by themselves.
fn trim(parked: usize) {
    let t0 = std::time::Instant::now();
    mem::trim_heap();
    log::debug!("heap trimmed after {parked} connections parked, in {:?}", t0.elapsed());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parked(id: u64) -> Parked<u64> {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        Parked { meta: id, socks: [a.into(), b.into()], progress: Progress::new() }
    }

    /// An event queued for a connection that has left (the other socket's event of one
    /// already woken, say) must not take out the connection that reused its slot; taking a
    /// connection also drops its idle deadline.
    #[test]
    fn a_stale_key_takes_nothing_and_taking_drops_the_deadline() {
        let mut t = Table::default();
        let key = |generation: u32, index: usize| u64::from(generation) << 32 | index as u64;

        let first = t.conns.insert(Slot { generation: 7, deadline: Some(100), conn: parked(1) });
        t.deadlines.insert((100, key(7, first)));
        t.parked.inc();
        assert_eq!(t.take(key(7, first)).map(|c| c.meta), Some(1));
        assert_eq!(t.parked.get(), 0, "the gauge follows the table");
        assert!(t.deadlines.is_empty(), "the deadline left with the connection");
        assert!(t.take(key(7, first)).is_none(), "taken twice");

        let second = t.conns.insert(Slot { generation: 8, deadline: None, conn: parked(2) });
        assert_eq!(second, first, "the slot is reused");
        assert!(t.take(key(7, second)).is_none(), "an event for the old occupant took the new one");
        assert_eq!(t.take(key(8, second)).map(|c| c.meta), Some(2));
        assert!(t.take(key(8, 5)).is_none(), "an index never used");
        assert!(t.conns.is_empty());
    }

    /// The upgrade's hand-over: `divert` takes out every parked connection but those that
    /// stay (here: even ids), later ones go to the channel instead of the table (those that
    /// stay still park), and `undivert` ends that.
    #[tokio::test]
    async fn divert_takes_the_parked_and_sends_later_ones_until_undiverted() {
        let p = Parker::new(Gauge::default()).unwrap();
        let minute = Some(Duration::from_secs(60));
        assert!(p.park(parked(1), minute).is_ok() && p.park(parked(2), minute).is_ok());
        assert!(p.park(parked(3), None).is_ok());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut taken: Vec<u64> = p.divert(tx, |m| m % 2 == 0).into_iter().map(|c| c.meta).collect();
        taken.sort();
        assert_eq!(taken, [1, 3]);
        assert_eq!(p.len(), 1, "the one that stays is still parked");
        assert_eq!(p.lock().deadlines.len(), 1, "and keeps its idle deadline; the taken one's left");
        assert!(matches!(p.park(parked(5), None), Ok(None)), "handed over, no key");
        assert_eq!(rx.try_recv().map(|c| c.meta).ok(), Some(5), "parked while diverted");
        assert!(matches!(p.park(parked(4), None), Ok(Some(_))), "one that stays parks while diverted");
        assert_eq!(p.len(), 2);
        assert!(rx.try_recv().is_err());
        p.undivert();
        assert!(matches!(p.park(parked(7), None), Ok(Some(_))));
        assert_eq!(p.len(), 3);
        assert!(rx.try_recv().is_err());
    }
}
