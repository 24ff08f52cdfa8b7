//! One thread reads the kernel's wake events and wakes the connection they are for.
//!
//! The verdict program emits a `WakeEvent` when a socket's redirected byte count crosses the
//! threshold its connection set (see `budget`). This thread sleeps in `epoll_wait` on the
//! ring buffer, so an idle connection costs nothing: no timer, no poll. A plain thread (not a
//! tokio task) so that the engine works under any runtime, including the self-test's own.

use std::{
    collections::HashMap,
    io,
    os::fd::AsRawFd as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    thread::JoinHandle,
};

use aya::maps::{MapData, RingBuf};
use ntlm_common::WakeEvent;
use tokio::sync::Notify;

use crate::{
    park::Bell,
    sys::epoll::{Epoll, EventFd},
};

/// Epoll key of the ring buffer.
const RING: u64 = 0;
/// Epoll key of the stop eventfd.
const STOP: u64 = 1;

/// Who an event for a socket wakes.
enum Waiter {
    /// The connection's task, waiting on its direction's `Notify`.
    Task(Arc<Notify>),
    /// A parked connection: its parker's bell, rung with its key ([`crate::park::Bell`]).
    Parked(Arc<Bell>, u64),
}

/// Connections waiting for events, by socket cookie.
#[derive(Default)]
pub(crate) struct Registry {
    waiters: Mutex<HashMap<u64, Waiter>>,
    /// Events read from the ring buffer.
    pub(crate) events: AtomicU64,
    /// Events for a cookie nobody waits for (a connection that just ended).
    pub(crate) orphans: AtomicU64,
}

impl Registry {
    /// Registers `cookie`; its events notify the returned `Notify` (a permit is stored when
    /// nobody is waiting, so no event is lost between two waits).
    pub(crate) fn register(&self, cookie: u64) -> Arc<Notify> {
        let n = Arc::new(Notify::new());
        self.lock().insert(cookie, Waiter::Task(Arc::clone(&n)));
        n
    }

    /// Hands `cookie`'s events to the parker of a connection parked under `key`, if they
    /// still go to `task` (the `Notify` of the task that parked it). Returns false if
    /// another task registered it since (the connection already came back) or it is gone.
    pub(crate) fn park(&self, cookie: u64, task: &Arc<Notify>, bell: &Arc<Bell>, key: u64) -> bool {
        let mut w = self.lock();
        let Some(entry) = w.get_mut(&cookie) else { return false };
        if !matches!(&*entry, Waiter::Task(n) if Arc::ptr_eq(n, task)) {
            return false;
        }
        *entry = Waiter::Parked(Arc::clone(bell), key);
        true
    }

    /// Forgets `cookie`.
    pub(crate) fn unregister(&self, cookie: u64) {
        self.lock().remove(&cookie);
    }

    /// Number of registered cookies (tests).
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Waiter>> {
        self.waiters.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn wake(&self, cookie: u64) {
        self.events.fetch_add(1, Ordering::Relaxed);
        match self.lock().get(&cookie) {
            Some(Waiter::Task(n)) => n.notify_one(),
            Some(Waiter::Parked(bell, key)) => bell.ring(*key),
            None => {
                self.orphans.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The dispatcher thread; stopped and joined on drop.
pub(crate) struct Dispatcher {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Dispatcher {
    /// Starts the thread reading `ring` into `registry`.
    pub(crate) fn start(ring: RingBuf<MapData>, registry: Arc<Registry>) -> io::Result<Dispatcher> {
        let stop = EventFd::new()?;
        let stop_wait = stop.try_clone()?;
        let thread = std::thread::Builder::new().name("sockmap-events".into()).spawn(move || {
            if let Err(e) = run(ring, &registry, &stop_wait) {
                log::error!("sockmap event dispatcher stopped: {e}; in-flight limits now rely on polling");
            }
        })?;
        Ok(Dispatcher { stop, thread: Some(thread) })
    }
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        if let Err(e) = self.stop.notify() {
            log::warn!("cannot stop the sockmap event thread: {e}");
            return;
        }
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            log::warn!("the sockmap event thread panicked");
        }
    }
}

fn run(mut ring: RingBuf<MapData>, registry: &Registry, stop: &EventFd) -> io::Result<()> {
    let ep = Epoll::new()?;
    ep.add(ring.as_raw_fd(), libc::EPOLLIN as u32, RING)?;
    ep.add(stop.as_raw_fd(), libc::EPOLLIN as u32, STOP)?;
    let mut events = [Epoll::EMPTY; 2];
    loop {
        // Drain first: events may have been queued before the first wait.
        while let Some(item) = ring.next() {
            if item.len() >= size_of::<WakeEvent>() {
                // SAFETY: the record holds at least one WakeEvent; read unaligned.
                let ev: WakeEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                registry.wake(ev.cookie);
            }
        }
        // Blocking: this is the dispatcher's own thread.
        let n = match ep.wait(&mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if events[..n].iter().any(|e| e.u64 == STOP) {
            return Ok(());
        }
    }
}
