//! Userspace engine: splice(2) from the source socket into a pipe and from the pipe into
//! the destination socket, driven by tokio readiness. Payload pages move by reference; the
//! process never reads a byte. A plain copy is used only where the kernel refuses splice(2)
//! for a socket (EINVAL), or when no pipe can be had (descriptor limit).
//!
//! Pipes are borrowed from a small pool only while a burst is in flight and returned empty,
//! so an idle connection holds just its two sockets (a 10,000-connection box would
//! otherwise need 40,000 extra descriptors).
//!
//! - `mod.rs` (here): the engine and the per-connection state machine, which applies the
//!   lifecycle contract of [`crate::lifecycle`] (ends, resets, idle timeout, parking);
//! - `pipe.rs`: the pipes, their size (`--pipe-size`) and budget, the pool;
//! - `urgent.rs`: filling a pipe from a socket, and TCP urgent data, which splice(2) cannot
//!   pass.

mod pipe;
mod urgent;

use std::{
    future::Future,
    io,
    os::fd::{AsFd, AsRawFd},
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use tokio::{io::Interest, net::TcpStream};

use super::driver::socket_error;
use crate::{
    lifecycle::{Dir, End, EngineKind, Fault, Fins, Progress, RelayCtl, Relayed, Side, idle_deadline},
    sys::{
        clock::{duration_ns, monotonic_ns},
        pipe as sys_pipe,
        sock::{set_linger_zero, shutdown_write},
    },
};

pub use pipe::pipe_check;
use pipe::{Pipe, PipePool};

/// Buffer of the copy fallback.
const COPY_BUF: usize = 64 << 10;

/// The splice engine: holds the shared pipe pool.
pub struct SpliceEngine {
    pipes: PipePool,
}

impl Default for SpliceEngine {
    fn default() -> Self {
        Self::new(0)
    }
}

impl SpliceEngine {
    /// A new engine with an empty pipe pool whose pipes get `pipe_size` bytes of capacity
    /// where the kernel allows (0: its default).
    pub fn new(pipe_size: u64) -> Self {
        Self { pipes: PipePool::new(pipe_size) }
    }

    /// Computes the budget of enlarged pipes again, for the process's user and capabilities
    /// now (after [`crate::privilege`] switched them).
    pub fn refresh_pipe_budget(&self) {
        self.pipes.refresh_budget();
    }

    /// Relays one paired connection to its end, or until it is parked.
    ///
    /// One hand-written state machine per connection instead of a tree of `async fn`s: an
    /// idle connection costs what its task holds, so the state is kept to the sockets, two
    /// small lanes, the idle timer and the shutdown waiter (`relay_future_is_small` keeps it
    /// so). Not an `async fn`, whose by-value arguments would be stored twice. The lifecycle
    /// is the contract of [`crate::lifecycle`], which [`super::driver::drive`] runs for the other engine: both directions run until
    /// each passed its FIN on; a failure resets the other socket; the idle timeout; a forced
    /// shutdown. With `ctl.park_after`, a connection that moved nothing for that long, with
    /// nothing in flight and both directions open, returns its sockets instead
    /// ([`Relayed::Parked`]); `progress` is where a parked one goes on from.
    pub fn relay<'a>(
        &'a self,
        id: u64,
        client: TcpStream,
        backend: TcpStream,
        ctl: &'a RelayCtl,
        progress: Progress,
    ) -> impl Future<Output = Relayed> + Send + 'a {
        let socks = [client, backend];
        // Made here, not in the block: the block would keep `progress` beside it.
        let mut st = Conn::new(self, ctl, progress);
        async move {
            // One timer serves the idle timeout, parking and the half-close timeout: it is
            // re-armed for the earliest.
            let first = [ctl.idle_timeout, ctl.park_after, ctl.half_close_timeout].into_iter().flatten().min();
            let timers = Timers { timer: first.map(tokio::time::sleep), cancelled: ctl.hand_over.wake().cancelled() };
            tokio::pin!(timers);
            let mut watch: Watch<'_> = None;
            let stop = std::future::poll_fn(|cx| st.poll(&socks, &mut watch, timers.as_mut(), cx)).await;
            drop(watch);
            let progress = Progress { bytes: st.bytes, last_ns: st.last };
            let (end, fault) = match stop {
                Stop::End(end, fault) => (end, fault),
                Stop::Park => {
                    let [client, backend] = socks;
                    // Deregistering can fail only if epoll_ctl(2) does (out of memory); the
                    // socket is then closed, and the connection ends.
                    return match (client.into_std(), backend.into_std()) {
                        (Ok(c), Ok(b)) => Relayed::Parked { socks: [c.into(), b.into()], progress, kept: None },
                        (Err(e), _) | (_, Err(e)) => {
                            log::warn!("conn={id} cannot take the sockets out of the runtime to park them: {e}");
                            Relayed::Ended(progress.ended(End::Internal, Some(Fault::Internal(e)), EngineKind::Splice))
                        }
                    };
                }
            };
            for &side in fault.as_ref().map_or(&[][..], Fault::resets) {
                if let Err(e) = set_linger_zero(socks[side as usize].as_fd()) {
                    log::debug!("conn={id} SO_LINGER on {side:?} socket failed: {e}");
                }
            }
            Relayed::Ended(progress.ended(end, fault, EngineKind::Splice))
        }
    }
}

/// Once one direction finished, its source is watched for errors (a reset after the FIN),
/// which nothing else reads any more. Boxed: it exists only while half-closed.
type Watch<'s> = Option<Pin<Box<dyn Future<Output = io::Error> + Send + 's>>>;

/// Why [`Conn::poll`] returned.
enum Stop {
    /// The connection ended.
    End(End, Option<Fault>),
    /// Idle for `--park-after` with nothing in flight: hand the sockets to the parker.
    Park,
}

/// The timer (idle timeout and parking) and the forced-shutdown waiter of one connection,
/// pinned together.
struct Timers<'a> {
    /// Armed for the earlier of the idle deadline and the park deadline; none if neither is on.
    timer: Option<tokio::time::Sleep>,
    cancelled: tokio_util::sync::WaitForCancellationFuture<'a>,
}

impl<'a> Timers<'a> {
    #[allow(clippy::type_complexity)]
    fn project<'p>(
        self: Pin<&'p mut Self>,
    ) -> (Option<Pin<&'p mut tokio::time::Sleep>>, Pin<&'p mut tokio_util::sync::WaitForCancellationFuture<'a>>) {
        // SAFETY: structural pinning: neither field is moved out of `self` while pinned,
        // and `Timers` has no Drop impl and is not Unpin-dependent.
        unsafe {
            let this = self.get_unchecked_mut();
            (this.timer.as_mut().map(|s| Pin::new_unchecked(s)), Pin::new_unchecked(&mut this.cancelled))
        }
    }
}

/// Longest the connection timer is set for at once; when nothing is due (no idle timeout,
/// half-closed, no half-close timeout) it fires this rarely and is set again.
const TIMER_MAX: Duration = Duration::from_secs(24 * 3600);

/// The timer instant for CLOCK_MONOTONIC ns `at`, read at `now`; at most [`TIMER_MAX`] away.
fn timer_at(now: u64, at: u64) -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_nanos(at.saturating_sub(now)).min(TIMER_MAX)
}

/// Nanoseconds from now until `deadline`.
fn until(deadline: tokio::time::Instant) -> u64 {
    duration_ns(deadline.saturating_duration_since(tokio::time::Instant::now()))
}

/// A zeroed copy buffer, allocated on the heap directly.
fn copy_buf() -> Box<[u8; COPY_BUF]> {
    vec![0; COPY_BUF].into_boxed_slice().try_into().expect("COPY_BUF bytes")
}

/// One direction's state.
#[derive(Default)]
struct Lane {
    /// The pipe, held only while a burst is in flight (returned to the pool empty).
    pipe: Option<Pipe>,
    /// Copy buffer, once the kernel refused splice(2) or no pipe could be had.
    copy: Option<Box<[u8; COPY_BUF]>>,
    /// Bytes read from the source and not yet written to the destination: in the pipe, or
    /// in the copy buffer at `copy_off`.
    pending: u32,
    copy_off: u32,
}

/// The state of one connection besides its sockets and timers.
struct Conn<'a> {
    engine: &'a SpliceEngine,
    /// Indexed by [`Dir`].
    lanes: [Lane; 2],
    /// Bytes delivered, indexed by [`Dir`].
    bytes: [u64; 2],
    /// CLOCK_MONOTONIC ns of the last byte moved.
    last: u64,
    /// Timeouts and parking.
    ctl: &'a RelayCtl,
    /// CLOCK_MONOTONIC ns at which a half-closed connection times out (u64::MAX: not
    /// half-closed, or no half-close timeout).
    half_at: u64,
    /// Directions finished (the source's EOF passed on), and which first.
    fins: Fins,
}

impl<'a> Conn<'a> {
    fn new(engine: &'a SpliceEngine, ctl: &'a RelayCtl, progress: Progress) -> Self {
        Conn {
            engine,
            lanes: Default::default(),
            bytes: progress.bytes,
            last: progress.last_ns,
            ctl,
            half_at: u64::MAX,
            fins: Fins::default(),
        }
    }

    /// Polls the whole connection; `Ready` with why it stopped.
    fn poll<'s>(
        &mut self,
        socks: &'s [TcpStream; 2],
        watch: &mut Watch<'s>,
        timers: Pin<&mut Timers<'_>>,
        cx: &mut Context<'_>,
    ) -> Poll<Stop> {
        let (timer, cancelled) = timers.project();
        // Woken by the forced close, or by the live upgrade's hand-over.
        let woken = cancelled.poll(cx).is_ready();
        if woken && self.ctl.force_close.is_cancelled() {
            return Poll::Ready(Stop::End(End::Shutdown, None));
        }
        let was_half = self.fins.half();
        if let Poll::Ready((end, fault)) = self.poll_dirs(socks, watch, cx) {
            return Poll::Ready(Stop::End(end, fault));
        }
        // The hand-over: park (for the new process) as soon as nothing is in flight; until
        // then every byte event polls this again.
        if woken && self.ctl.hand_over.is_on() && self.parkable() {
            return Poll::Ready(Stop::Park);
        }
        if let Some(mut sleep) = timer {
            if !was_half && self.fins.half() {
                // The first FIN was just passed on: the half-close timeout starts now.
                self.half_at = idle_deadline(monotonic_ns(), self.ctl.half_close_timeout);
                let now = monotonic_ns();
                if self.half_at < now.saturating_add(until(sleep.deadline())) {
                    sleep.as_mut().reset(timer_at(now, self.half_at));
                }
            }
            while sleep.as_mut().poll(cx).is_ready() {
                let now = monotonic_ns();
                let idle_at = idle_deadline(self.last, self.ctl.idle_timeout);
                if now >= idle_at {
                    return Poll::Ready(Stop::End(End::IdleTimeout, None));
                }
                if now >= self.half_at {
                    return Poll::Ready(Stop::End(End::HalfCloseTimeout, None));
                }
                // Parking is for connections with both directions open only.
                let park_ns = self.ctl.park_after.filter(|_| self.fins.none()).map_or(u64::MAX, duration_ns);
                let mut park_at = self.last.saturating_add(park_ns);
                if now >= park_at {
                    // Everything was just drained (poll_dirs above): nothing is in flight unless
                    // a destination is not reading, and then the connection is not idle.
                    if self.parkable() {
                        return Poll::Ready(Stop::Park);
                    }
                    park_at = now.saturating_add(park_ns);
                }
                let at = idle_at.min(park_at).min(self.half_at);
                sleep.as_mut().reset(timer_at(now, at));
            }
        }
        Poll::Pending
    }

    /// Both directions open (so no error watch either), no bytes held, no pipe borrowed. A
    /// copy buffer (the fallback) holds nothing then and is let go.
    fn parkable(&self) -> bool {
        self.fins.none() && self.lanes.iter().all(|l| l.pending == 0 && l.pipe.is_none())
    }

    /// Polls both directions; `Ready` with why the connection ended.
    fn poll_dirs<'s>(
        &mut self,
        socks: &'s [TcpStream; 2],
        watch: &mut Watch<'s>,
        cx: &mut Context<'_>,
    ) -> Poll<(End, Option<Fault>)> {
        for dir in [Dir::Up, Dir::Down] {
            if !self.fins.is_done(dir) {
                match self.poll_lane(socks, dir, cx) {
                    Poll::Ready(Ok(())) => {
                        if let Some(end) = self.fins.finish(dir) {
                            return Poll::Ready((end, None));
                        }
                        *watch = Some(Box::pin(socket_error(&socks[dir.src() as usize])));
                    }
                    Poll::Ready(Err(f)) => return Poll::Ready(f.ending()),
                    Poll::Pending => {}
                }
            }
        }
        if let Some(w) = watch
            && let Poll::Ready(e) = w.as_mut().poll(cx)
        {
            // Exactly one direction is done while a watch exists: its source failed.
            let side = if self.fins.is_done(Dir::Up) { Side::Client } else { Side::Backend };
            return Poll::Ready(Fault::on(side)(e).ending());
        }
        Poll::Pending
    }

    fn moved(&mut self, dir: Dir, n: usize) {
        self.bytes[dir as usize] += n as u64;
        self.last = monotonic_ns();
    }

    /// Moves `dir` until its source has nothing more for now (`Pending`, the task's waker
    /// registered), or reached EOF and the FIN was passed on (`Ready(Ok)`).
    fn poll_lane(&mut self, socks: &[TcpStream; 2], dir: Dir, cx: &mut Context<'_>) -> Poll<Result<(), Fault>> {
        let (src, dst) = (&socks[dir.src() as usize], &socks[dir.dst() as usize]);
        loop {
            let lane = &mut self.lanes[dir as usize];
            if lane.pending > 0 {
                if let Err(e) = ready!(dst.poll_write_ready(cx)) {
                    return Poll::Ready(Err(Fault::on(dir.dst())(e)));
                }
                let r = match (&lane.copy, &lane.pipe) {
                    (Some(buf), _) => dst.try_write(&buf[lane.copy_off as usize..(lane.copy_off + lane.pending) as usize]),
                    (None, Some(pipe)) => {
                        dst.try_io(Interest::WRITABLE, || sys_pipe::splice(pipe.r.as_raw_fd(), dst.as_raw_fd(), lane.pending as usize))
                    }
                    (None, None) => unreachable!("pending bytes are in the pipe or the copy buffer"),
                };
                match r {
                    Ok(n) => {
                        // n <= pending <= COPY_BUF or the pipe's capacity: fits u32.
                        lane.pending -= n as u32;
                        lane.copy_off += n as u32;
                        self.moved(dir, n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(Fault::on(dir.dst())(e))),
                }
                continue;
            }
            match src.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(Fault::on(dir.src())(e))),
                // Nothing to read, known from a short splice (below) rather than a failed one:
                // the empty pipe goes back before the task waits.
                Poll::Pending => {
                    self.give_back(dir);
                    return Poll::Pending;
                }
            }
            if lane.copy.is_none() && lane.pipe.is_none() {
                match self.engine.pipes.take() {
                    Ok(p) => lane.pipe = Some(p),
                    Err(e) => {
                        log::debug!("no pipe ({e}); copying in userspace");
                        lane.copy = Some(copy_buf());
                    }
                }
            }
            let r = match (&mut lane.copy, &lane.pipe) {
                (Some(buf), _) => {
                    lane.copy_off = 0;
                    src.try_read(&mut buf[..])
                }
                (None, Some(pipe)) => urgent::fill_pipe(src, pipe),
                (None, None) => unreachable!("a pipe or a copy buffer was just set"),
            };
            match r {
                Ok(0) => {
                    self.give_back(dir);
                    if self.fins.is_done(dir.other()) {
                        // The last direction: both sockets are closed right after, and close(2)
                        // sends this FIN (no RST: each socket's source side reached EOF, so
                        // neither has unread bytes). One syscall per connection saved.
                        return Poll::Ready(Ok(()));
                    }
                    return Poll::Ready(shutdown_write(dst.as_fd()).map_err(Fault::on(dir.dst())));
                }
                Ok(n) => lane.pending = n as u32,
                // Drained for now: the empty pipe goes back; poll_read_ready registers the waker.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.give_back(dir),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) && lane.copy.is_none() => {
                    log::debug!("splice(2) refused for this socket; copying in userspace");
                    self.give_back(dir);
                    self.lanes[dir as usize].copy = Some(copy_buf());
                }
                // recv(2) passes the mark (dropping the urgent byte, as it does for any reader
                // without SO_OOBINLINE, nginx stream included), so this direction copies from
                // now on; the socket is still readable, so the copy reads at once.
                Err(e) if urgent::is_urgent_mark(&e) => {
                    log::debug!("urgent data on the {:?} socket; copying this direction in userspace", dir.src());
                    self.give_back(dir);
                    self.lanes[dir as usize].copy = Some(copy_buf());
                }
                Err(e) => return Poll::Ready(Err(Fault::on(dir.src())(e))),
            }
        }
    }

    /// Returns `dir`'s pipe to the pool; only called when it is empty.
    fn give_back(&mut self, dir: Dir) {
        if let Some(p) = self.lanes[dir as usize].pipe.take() {
            self.engine.pipes.give(p);
        }
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        (c, l.accept().await.unwrap().0)
    }

    /// The relay future is most of an idle connection's task (see `conn::serve`).
    #[tokio::test]
    async fn relay_future_is_small() {
        let e = SpliceEngine::new(0);
        let ctl = RelayCtl {
            idle_timeout: Some(Duration::from_secs(60)),
            park_after: Some(Duration::from_secs(2)),
            half_close_timeout: Some(Duration::from_secs(30)),
            ..RelayCtl::unlimited()
        };
        let (c, _fc) = pair().await;
        let (b, _fb) = pair().await;
        let size = size_of_val(&e.relay(1, c, b, &ctl, Progress::new()));
        eprintln!("splice relay future: {size} bytes");
        assert!(size <= 448, "the splice relay future grew to {size} bytes");
    }

    /// A pipe is borrowed only while a burst is in flight: once the bytes are through, the
    /// live but idle connection holds none, and the next burst (of any connection) reuses
    /// the pooled one instead of creating a pipe.
    #[tokio::test]
    async fn an_idle_connection_holds_no_pipe() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (e, ctl) = (SpliceEngine::new(0), no_park());
        let (mut client_far, mut backend_far, relay) = relayed(&e, &ctl).await;
        tokio::pin!(relay);
        let mut one = [0u8; 1];
        for round in 0..3u8 {
            client_far.write_all(&[round]).await.unwrap();
            tokio::select! {
                _ = &mut relay => panic!("relay ended early"),
                r = backend_far.read_exact(&mut one) => { r.unwrap(); }
            }
            backend_far.write_all(&[round]).await.unwrap();
            tokio::select! {
                _ = &mut relay => panic!("relay ended early"),
                r = client_far.read_exact(&mut one) => { r.unwrap(); }
            }
            assert_eq!(one, [round]);
            // Let the relay see EAGAIN and return the pipe.
            let _ = tokio::time::timeout(Duration::from_millis(20), &mut relay).await;
            assert_eq!(e.pipes.pooled(), 1, "round {round}: the idle connection kept its pipe");
        }
        drop(client_far);
        drop(backend_far);
        let Relayed::Ended(o) = relay.await else { panic!("parked without --park-after") };
        assert_eq!((o.bytes_up, o.bytes_down), (3, 3));
    }

    /// Writes of every size through the kernel's 16-slot pipe, read by the far side as they
    /// come: every byte arrives, in order. Only a splice shorter than the pipe's slot count
    /// may be taken for a drained socket: one that stopped because the slots were full
    /// (bursts queued as many page fragments) is short of the capacity too, and taking it for
    /// drained would leave bytes behind until the sender wrote again; this sender stops after
    /// its last byte. (Counting slots as bytes makes this test hang.)
    #[tokio::test]
    async fn writes_of_every_size_through_a_pipe_with_few_slots_all_arrive() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (e, ctl) = (SpliceEngine::new(0), no_park());
        let (mut client_far, mut backend_far, relay) = relayed(&e, &ctl).await;
        tokio::pin!(relay);
        client_far.set_nodelay(true).unwrap();
        // 20,000 one-byte writes, then 4 MiB in writes of 1 to 12,000 bytes.
        let sizes: Vec<usize> = std::iter::repeat_n(1, 20_000)
            .chain((0..).map(|i: usize| 1 + (i * 7919) % 12_000).scan(0usize, |sum, n| {
                *sum += n;
                (*sum <= 4 << 20).then_some(n)
            }))
            .collect();
        let total: usize = sizes.iter().sum();
        let pattern = |i: usize| (i % 251) as u8;
        let writer = async move {
            let mut off = 0;
            for n in sizes {
                let chunk: Vec<u8> = (off..off + n).map(pattern).collect();
                client_far.write_all(&chunk).await.unwrap();
                off += n;
            }
            client_far
        };
        let reader = async {
            let mut got = 0usize;
            let mut buf = vec![0u8; 64 << 10];
            while got < total {
                let n = backend_far.read(&mut buf).await.unwrap();
                assert!(n > 0, "EOF after {got} bytes");
                assert!(buf[..n].iter().enumerate().all(|(i, &b)| b == pattern(got + i)), "wrong bytes at {got}");
                got += n;
            }
        };
        let both = async { tokio::join!(writer, reader) };
        let (_client_far, ()) = tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(30), both) => r.expect("bytes stuck in the relay"),
            o = &mut relay => panic!("relay ended: {o:?}"),
        };
    }

    /// A relay under `ctl` between two fresh socket pairs: the far end of the client, the far
    /// end of the backend, and the relay future.
    async fn relayed<'a>(
        e: &'a SpliceEngine,
        ctl: &'a RelayCtl,
    ) -> (TcpStream, TcpStream, impl Future<Output = Relayed> + 'a) {
        let (client_far, c) = pair().await;
        let (b, backend_far) = pair().await;
        (client_far, backend_far, e.relay(1, c, b, ctl, Progress::new()))
    }

    fn no_park() -> RelayCtl {
        RelayCtl::unlimited()
    }

    /// send(2) of one byte as TCP urgent data (MSG_OOB).
    fn send_urgent(s: &TcpStream, byte: u8) {
        let sent = crate::sys::sock::send_flags(s.as_fd(), &[byte], libc::MSG_OOB);
        assert_eq!(sent.unwrap(), 1, "send(MSG_OOB)");
    }

    /// Reads from `r` until `got` holds `want` bytes, or fails after 5 s saying what came.
    async fn read_until(r: &mut TcpStream, got: &mut Vec<u8>, want: usize, what: &str) {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 64];
        let reading = async {
            while got.len() < want {
                let n = r.read(&mut buf).await.unwrap();
                assert!(n > 0, "{what}: EOF after {got:?}");
                got.extend_from_slice(&buf[..n]);
            }
        };
        if tokio::time::timeout(Duration::from_secs(5), reading).await.is_err() {
            panic!("{what}: only {got:?} arrived");
        }
    }

    /// TCP urgent data (MSG_OOB) in the stream: splice(2) cannot read past it, so without
    /// care the bytes behind it never arrive. They do; the urgent byte itself is dropped, as
    /// recv(2) drops it for any reader without SO_OOBINLINE (nginx stream included).
    #[tokio::test]
    async fn bytes_after_urgent_data_still_arrive() {
        use tokio::io::AsyncWriteExt;
        let (e, ctl) = (SpliceEngine::new(0), no_park());
        let (mut client_far, mut backend_far, relay) = relayed(&e, &ctl).await;
        tokio::pin!(relay);
        let mut got = Vec::new();
        for (bytes, urgent, want) in [(&b"abc"[..], Some(b'!'), 3), (b"def", None, 6), (b"ghi", None, 9)] {
            client_far.write_all(bytes).await.unwrap();
            tokio::select! {
                _ = &mut relay => panic!("relay ended"),
                () = read_until(&mut backend_far, &mut got, want, "bytes after the urgent byte") => {}
            }
            if let Some(u) = urgent {
                send_urgent(&client_far, u);
            }
        }
        assert_eq!(got, b"abcdefghi");
    }

    /// Bytes, an urgent byte and more bytes all queued before the relay reads: the splice
    /// stops short at the mark, which must not be taken for a drained socket.
    #[tokio::test]
    async fn bytes_queued_behind_urgent_data_still_arrive() {
        use tokio::io::AsyncWriteExt;
        let (e, ctl) = (SpliceEngine::new(0), no_park());
        let (mut client_far, mut backend_far, relay) = relayed(&e, &ctl).await;
        tokio::pin!(relay);
        client_far.write_all(b"jkl").await.unwrap();
        send_urgent(&client_far, b'?');
        client_far.write_all(b"mno").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut got = Vec::new();
        tokio::select! {
            _ = &mut relay => panic!("relay ended"),
            () = read_until(&mut backend_far, &mut got, 6, "bytes queued behind the urgent byte") => {}
        }
        assert_eq!(got, b"jklmno");
    }

    /// A client that half-closed while the backend stays open and silent: the connection ends
    /// at the half-close timeout, not at the (longer) idle timeout, and both far ends see it
    /// close. The timeout starts at the FIN, not at the connection's start.
    #[tokio::test]
    async fn a_half_closed_connection_ends_at_the_half_close_timeout() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let e = SpliceEngine::new(0);
        let ctl = RelayCtl {
            idle_timeout: Some(Duration::from_secs(60)),
            half_close_timeout: Some(Duration::from_millis(200)),
            ..RelayCtl::unlimited()
        };
        let (mut client_far, mut backend_far, relay) = relayed(&e, &ctl).await;
        tokio::pin!(relay);
        // Longer than the half-close timeout with both directions open: nothing ends.
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(400), &mut relay).await {
            panic!("ended with both directions open: {r:?}");
        }
        client_far.shutdown().await.unwrap();
        let fin = std::time::Instant::now();
        let mut rest = Vec::new();
        tokio::select! {
            _ = &mut relay => panic!("ended before the FIN was passed on"),
            r = backend_far.read_to_end(&mut rest) => { r.unwrap(); }
        }
        let Relayed::Ended(o) = tokio::time::timeout(Duration::from_secs(5), relay).await.expect("half-close timeout unseen")
        else {
            panic!("a half-closed connection parked")
        };
        assert_eq!(o.end, End::HalfCloseTimeout);
        assert!(fin.elapsed() >= Duration::from_millis(190), "ended {:?} after the FIN", fin.elapsed());
        let mut buf = [0u8; 1];
        assert_eq!(client_far.read(&mut buf).await.unwrap(), 0, "the client's side was not closed");
    }

    fn parking_ctl(after: Duration) -> RelayCtl {
        RelayCtl { idle_timeout: Some(Duration::from_secs(60)), park_after: Some(after), ..RelayCtl::unlimited() }
    }

    /// An idle connection hands its (open) sockets back with its counters after
    /// `park_after`; relayed again from them it goes on where it stopped, counters included.
    #[tokio::test]
    async fn an_idle_connection_parks_and_goes_on_from_its_progress() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let e = SpliceEngine::new(0);
        let ctl = parking_ctl(Duration::from_millis(100));
        let (mut client_far, c) = pair().await;
        let (b, mut backend_far) = pair().await;
        let (mut c, mut b, mut progress) = (c, b, Progress::new());
        let mut buf = [0u8; 5];
        for round in 0..2u64 {
            let t0 = std::time::Instant::now();
            let relay = e.relay(1, c, b, &ctl, progress);
            tokio::pin!(relay);
            client_far.write_all(b"hello").await.unwrap();
            tokio::select! {
                _ = &mut relay => panic!("relay stopped with bytes in flight"),
                r = backend_far.read_exact(&mut buf) => { r.unwrap(); }
            }
            backend_far.write_all(b"world").await.unwrap();
            tokio::select! {
                _ = &mut relay => panic!("relay stopped with bytes in flight"),
                r = client_far.read_exact(&mut buf) => { r.unwrap(); }
            }
            assert_eq!(&buf, b"world");
            let Relayed::Parked { socks: [cs, bs], progress: p, .. } = relay.await else { panic!("an idle connection did not park") };
            assert!(t0.elapsed() >= Duration::from_millis(100), "parked before --park-after");
            assert_eq!(p.bytes, [5 * (round + 1); 2], "round {round}");
            c = TcpStream::from_std(std::net::TcpStream::from(cs)).unwrap();
            b = TcpStream::from_std(std::net::TcpStream::from(bs)).unwrap();
            progress = p;
        }
        // A FIN that arrives while parked is passed on once relayed again.
        drop(client_far);
        let relay = e.relay(1, c, b, &ctl, progress);
        tokio::pin!(relay);
        let mut rest = Vec::new();
        tokio::select! {
            _ = &mut relay => panic!("relay ended before the backend closed"),
            r = backend_far.read_to_end(&mut rest) => { r.unwrap(); }
        }
        assert!(rest.is_empty());
        drop(backend_far);
        let Relayed::Ended(o) = relay.await else { panic!("a half-closed connection parked") };
        assert_eq!((o.bytes_up, o.bytes_down, o.end), (10, 10, End::ClientFin));
    }

    /// Bytes the destination does not read are in flight: the connection stays in its task
    /// however long that lasts, and parks only once they are through.
    #[tokio::test]
    async fn a_connection_with_bytes_in_flight_does_not_park() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (e, ctl) = (SpliceEngine::new(0), parking_ctl(Duration::from_millis(50)));
        let (mut client_far, mut backend_far, relay) = relayed(&e, &ctl).await;
        tokio::pin!(relay);
        // More than the two sockets' buffers and a pipe hold: the writer blocks.
        let total = 32usize << 20;
        let writer = tokio::spawn(async move {
            let chunk = vec![7u8; 1 << 20];
            for _ in 0..total >> 20 {
                client_far.write_all(&chunk).await.unwrap();
            }
            client_far
        });
        // Several park periods with the backend not reading.
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(400), &mut relay).await {
            panic!("stopped while bytes were in flight: {r:?}");
        }
        let mut got = 0usize;
        let mut buf = vec![0u8; 1 << 20];
        while got < total {
            tokio::select! {
                r = &mut relay => panic!("stopped with {got} of {total} bytes read: {r:?}"),
                n = backend_far.read(&mut buf) => got += n.unwrap(),
            }
        }
        let _client_far = writer.await.unwrap();
        let Relayed::Parked { progress, .. } = relay.await else { panic!("did not park once idle") };
        assert_eq!(progress.bytes, [total as u64, 0]);
    }

    /// The live upgrade's hand-over: a connection that would never park by itself (no
    /// `park_after`) parks once asked, but only when nothing is in flight, with its counters.
    #[tokio::test]
    async fn the_hand_over_parks_a_connection_once_nothing_is_in_flight() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (e, ctl) = (SpliceEngine::new(0), no_park());
        let (mut client_far, mut backend_far, relay) = relayed(&e, &ctl).await;
        tokio::pin!(relay);
        // More than the sockets' buffers and a pipe hold, the backend not reading yet.
        let total = 32usize << 20;
        let writer = tokio::spawn(async move {
            let chunk = vec![7u8; 1 << 20];
            for _ in 0..total >> 20 {
                client_far.write_all(&chunk).await.unwrap();
            }
            client_far
        });
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(200), &mut relay).await {
            panic!("stopped before the hand-over: {r:?}");
        }
        ctl.hand_over.start();
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(300), &mut relay).await {
            panic!("parked for the hand-over with bytes in flight: {r:?}");
        }
        // Read as it comes; the relay may park before the last bytes are read here (they are
        // in the backend socket then, not in flight in the relay).
        let mut got = 0usize;
        let mut buf = vec![0u8; 1 << 20];
        let mut parked = None;
        while got < total {
            tokio::select! {
                r = &mut relay, if parked.is_none() => parked = Some(r),
                n = backend_far.read(&mut buf) => got += n.unwrap(),
            }
        }
        let _client_far = writer.await.unwrap();
        let r = match parked {
            Some(r) => r,
            None => tokio::time::timeout(Duration::from_secs(5), relay).await.expect("not parked once quiet"),
        };
        let Relayed::Parked { progress, .. } = r else { panic!("ended instead of parking: {r:?}") };
        assert_eq!(progress.bytes, [total as u64, 0]);
    }
}
