//! Parked connections: where an idle splice-engine connection waits without a task.
//!
//! A connection in its task costs the process about 1.6 KB while it waits: tokio's task cell
//! (the relay state machine, 128-byte aligned) and one runtime registration per socket. Most
//! connections behind an NTLM service spend most of their life idle (a browser's kept-alive
//! connection between pages), so after `--park-after` without a byte either way the splice
//! engine hands the two open sockets back ([`Relayed::Parked`](crate::engine::Relayed)); the
//! connection task ends, and the connection waits here as one [`ParkedConn`] in a table,
//! its sockets in this module's own epoll instance (`EPOLLIN | EPOLLRDHUP`, one-shot).
//!
//! The first event on either socket (bytes, a FIN, an error) takes the connection out of the
//! table and starts a new task that relays it from its [`Progress`]: the same pairing, the
//! same counters, the same access-log line at its end. While parked, the idle timeout still
//! runs (a timer for the earliest deadline), and a forced shutdown closes what is parked.
//! Parking changes nothing of the pairing: the two sockets stay open and paired throughout.
//!
//! Freed task memory stays resident in glibc's heaps unless trimmed, so the parker trims
//! once after a burst of parking ([`trim`]).

use std::{
    collections::BTreeSet,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use slab::Slab;
use tokio::{io::unix::AsyncFd, sync::Notify};
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::{
    conn::{self, ConnMeta, Shared},
    engine::Progress,
    relay::{End, duration_ns, monotonic_ns},
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

/// A connection waiting for its next byte.
pub struct ParkedConn {
    /// Who it is (id, client, backend lease, start, connection slot).
    pub meta: ConnMeta,
    /// Keeps the connection counted by the drain on shutdown.
    pub token: TaskTrackerToken,
    /// Client, backend: open, out of the runtime.
    pub socks: [OwnedFd; 2],
    /// Counters to go on with.
    pub progress: Progress,
}

/// The table of parked connections and the epoll instance that watches their sockets.
pub struct Parker {
    epoll: AsyncFd<OwnedFd>,
    table: Mutex<Table>,
    /// Wakes the parker's loop to look at the table again: a connection parked with an idle
    /// deadline earlier than all others, or the first since the last heap trim.
    earlier: Notify,
}

#[derive(Default)]
struct Table {
    conns: Slab<Slot>,
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
}

struct Slot {
    generation: u32,
    deadline: Option<u64>,
    conn: ParkedConn,
}

impl Parker {
    /// A parker with an empty table. Needs the runtime (its epoll instance is watched by it).
    pub fn new() -> io::Result<Parker> {
        // SAFETY: plain syscall.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: epoll_create1 returned a fresh descriptor that we now own; the AsyncFd owns
        // it from here until it is dropped, and an OwnedFd always returns that descriptor.
        let epoll = unsafe {
            AsyncFd::register_with_interest(OwnedFd::from_raw_fd(fd), tokio::io::Interest::READABLE)
        }?;
        Ok(Parker {
            epoll,
            table: Mutex::default(),
            earlier: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of connections parked now.
    pub fn len(&self) -> usize {
        self.lock().conns.len()
    }

    /// Whether nothing is parked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Parks `conn`. If its sockets cannot be watched (epoll_ctl(2) fails: out of memory,
    /// or `fs.epoll.max_user_watches`), it is relayed again at once instead; after a forced
    /// shutdown it is closed.
    pub fn park(&self, shared: &Arc<Shared>, conn: ParkedConn) {
        let mut t = self.lock();
        if t.closed {
            drop(t);
            conn::close_parked(shared, conn, End::Shutdown);
            return;
        }
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
            Err(e) => {
                drop(t);
                log::debug!("conn={} cannot park ({e}); relaying it on", conn.meta.id);
                conn::resume_now(shared, conn);
                return;
            }
        };
        let deadline = shared.ctl.idle_timeout.map(|t| conn.progress.last_ns.saturating_add(duration_ns(t)));
        log::debug!("conn={} parked", conn.meta.id);
        entry.insert(Slot { generation, deadline, conn });
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
    }

    /// Adds both sockets to the epoll instance under `key`, or neither.
    fn watch_pair(&self, socks: &[OwnedFd; 2], key: u64) -> io::Result<()> {
        self.watch(socks[0].as_raw_fd(), key)?;
        self.watch(socks[1].as_raw_fd(), key).inspect_err(|_| self.unwatch(socks[0].as_raw_fd()))
    }

    fn watch(&self, fd: RawFd, key: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32,
            u64: key,
        };
        // SAFETY: both descriptors are open; ev is a valid event.
        if unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn unwatch(&self, fd: RawFd) {
        // SAFETY: both descriptors are open; the event argument may be null for DEL.
        if unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) } != 0 {
            log::debug!("epoll_ctl(DEL) of a parked socket: {}", io::Error::last_os_error());
        }
    }

}

impl Table {
    /// Takes the connection of `key` out of the table, if it is still there.
    fn take(&mut self, key: u64) -> Option<ParkedConn> {
        let index = (key & u64::from(u32::MAX)) as usize;
        if self.conns.get(index).is_none_or(|s| u64::from(s.generation) != key >> 32) {
            return None;
        }
        let slot = self.conns.remove(index);
        if let Some(d) = slot.deadline {
            self.deadlines.remove(&(d, key));
        }
        Some(slot.conn)
    }
}

/// Runs the parker of `shared` until a forced shutdown, which closes every parked
/// connection. Wakes parked connections whose sockets have events and closes those whose
/// idle timeout passed.
pub async fn run(shared: Arc<Shared>) {
    let Some(parker) = shared.parker.as_ref() else { return };
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; EVENTS];
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
            () = shared.ctl.force_close.cancelled() => {
                let all: Vec<ParkedConn> = {
                    let mut t = parker.lock();
                    t.closed = true;
                    t.deadlines.clear();
                    t.conns.drain().map(|s| s.conn).collect()
                };
                if !all.is_empty() {
                    log::info!("shutdown: closing parked={} idle connections", all.len());
                }
                for conn in all {
                    conn::close_parked(&shared, conn, End::Shutdown);
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
                    // SAFETY: events is a valid buffer of EVENTS entries; timeout 0 never blocks.
                    let n = unsafe {
                        libc::epoll_wait(parker.epoll.as_raw_fd(), events.as_mut_ptr(), EVENTS as i32, 0)
                    };
                    if n < 0 {
                        let e = io::Error::last_os_error();
                        if e.kind() == io::ErrorKind::Interrupted {
                            continue;
                        }
                        // Cannot happen with a valid instance and buffer; do not spin on it.
                        log::error!("parked connections: epoll_wait: {e}");
                        guard.clear_ready();
                        break;
                    }
                    for ev in &events[..n as usize] {
                        let key = ev.u64;
                        let Some(conn) = parker.lock().take(key) else {
                            continue; // the other socket's event of a connection already woken
                        };
                        for s in &conn.socks {
                            parker.unwatch(s.as_raw_fd());
                        }
                        log::debug!("conn={} unparked", conn.meta.id);
                        conn::resume_now(&shared, conn);
                    }
                    if (n as usize) < EVENTS {
                        guard.clear_ready();
                        break;
                    }
                }
            }
            () = sleep => {
                let now = monotonic_ns();
                let expired: Vec<ParkedConn> = {
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
                    conn::close_parked(&shared, conn, End::IdleTimeout);
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
    #[cfg(target_env = "gnu")]
    {
        let t0 = std::time::Instant::now();
        // SAFETY: malloc_trim only releases free memory; callable from any thread.
        unsafe { libc::malloc_trim(0) };
        log::debug!("heap trimmed after {parked} connections parked, in {:?}", t0.elapsed());
    }
    #[cfg(not(target_env = "gnu"))]
    let _ = parked;
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, time::Instant};

    use tokio::sync::Semaphore;
    use tokio_util::task::TaskTracker;

    use super::*;
    use crate::{balance::Balancer, config::Balance};

    fn parked(id: u64, tracker: &TaskTracker, balancer: &Balancer, slots: &Arc<Semaphore>) -> ParkedConn {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        ParkedConn {
            meta: ConnMeta {
                id,
                peer: SocketAddr::from(([127, 0, 0, 1], 1)),
                started: Instant::now(),
                lease: balancer.lease(0),
                permit: slots.clone().try_acquire_owned().unwrap(),
            },
            token: tracker.token(),
            socks: [a.into(), b.into()],
            progress: Progress::new(),
        }
    }

    /// An event queued for a connection that has left (the other socket's event of one
    /// already woken, say) must not take out the connection that reused its slot; taking a
    /// connection also drops its idle deadline.
    #[test]
    fn a_stale_key_takes_nothing_and_taking_drops_the_deadline() {
        let tracker = TaskTracker::new();
        let balancer = Balancer::new(Balance::RoundRobin, vec![SocketAddr::from(([127, 0, 0, 1], 2))]);
        let slots = Arc::new(Semaphore::new(4));
        let mut t = Table::default();
        let key = |generation: u32, index: usize| u64::from(generation) << 32 | index as u64;

        let first = t.conns.insert(Slot { generation: 7, deadline: Some(100), conn: parked(1, &tracker, &balancer, &slots) });
        t.deadlines.insert((100, key(7, first)));
        assert_eq!(t.take(key(7, first)).map(|c| c.meta.id), Some(1));
        assert!(t.deadlines.is_empty(), "the deadline left with the connection");
        assert!(t.take(key(7, first)).is_none(), "taken twice");

        let second = t.conns.insert(Slot { generation: 8, deadline: None, conn: parked(2, &tracker, &balancer, &slots) });
        assert_eq!(second, first, "the slot is reused");
        assert!(t.take(key(7, second)).is_none(), "an event for the old occupant took the new one");
        assert_eq!(t.take(key(8, second)).map(|c| c.meta.id), Some(2));
        assert!(t.take(key(8, 5)).is_none(), "an index never used");
        assert_eq!(slots.available_permits(), 4, "taken connections were dropped with their slots");
    }
}
