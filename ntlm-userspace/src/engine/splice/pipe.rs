//! The splice engine's pipes: how large they are made (`--pipe-size`) within the user's
//! pipe budget, and the pool that lends them to connections only while a burst is in flight.

use std::{
    io,
    os::fd::OwnedFd,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use crate::sys::{
    caps::{self, Cap},
    pipe::{self as sys_pipe, page_size},
};

/// The kernel's default pipe capacity (16 pages), which a pipe keeps when it cannot be
/// enlarged.
const DEFAULT_PIPE: usize = 64 << 10;
/// Empty pipes kept for reuse; more are closed when returned.
const PIPE_POOL_MAX: usize = 256;

/// Pages of enlarged pipes alive in this process, against [`PipeSizing::budget`].
static BIG_PIPE_PAGES: AtomicUsize = AtomicUsize::new(0);

/// Empty pipes to lend, all made with one sizing.
pub(super) struct PipePool {
    pool: Mutex<Vec<Pipe>>,
    sizing: PipeSizing,
}

impl PipePool {
    /// An empty pool whose pipes get `pipe_size` bytes where the kernel allows (0: its default).
    pub(super) fn new(pipe_size: u64) -> PipePool {
        PipePool { pool: Mutex::new(Vec::new()), sizing: PipeSizing::new(pipe_size) }
    }

    /// Computes the pipe budget again for the process's user and capabilities now
    /// ([`PipeSizing::refresh`]).
    pub(super) fn refresh_budget(&self) {
        self.sizing.refresh();
    }

    /// A pooled pipe, or a new one.
    pub(super) fn take(&self) -> io::Result<Pipe> {
        if let Some(p) = self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(p);
        }
        Pipe::new(&self.sizing)
    }

    /// Takes back an empty pipe.
    pub(super) fn give(&self, p: Pipe) {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < PIPE_POOL_MAX {
            pool.push(p);
        }
    }

    /// Pipes waiting in the pool.
    #[cfg(test)]
    pub(super) fn pooled(&self) -> usize {
        self.pool.lock().unwrap().len()
    }
}

/// How large new pipes are made (`--pipe-size`).
pub(super) struct PipeSizing {
    /// Requested capacity in bytes; 0: the kernel's default.
    bytes: usize,
    /// Most pages of enlarged pipes alive at once. Without CAP_SYS_RESOURCE or
    /// CAP_SYS_ADMIN, once a user's pipes hold more than `fs.pipe-user-pages-soft` pages the
    /// kernel refuses to enlarge more and gives every new pipe of that user (ours and its
    /// other processes') 2 pages instead of 16; half that limit leaves room for the rest.
    /// Atomic: a switch of user ([`crate::privilege`]) changes it after the engine was made.
    budget: AtomicUsize,
}

impl PipeSizing {
    pub(super) fn new(bytes: u64) -> PipeSizing {
        let bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
        PipeSizing { bytes, budget: AtomicUsize::new(Self::budget_now()) }
    }

    /// For tests: a fixed budget.
    #[cfg(test)]
    fn with_budget(bytes: usize, budget: usize) -> PipeSizing {
        PipeSizing { bytes, budget: AtomicUsize::new(budget) }
    }

    /// Computes the budget again: after a switch of user the pipes are counted against the
    /// new user, and without CAP_SYS_RESOURCE its `fs.pipe-user-pages-soft` applies.
    pub(super) fn refresh(&self) {
        self.budget.store(Self::budget_now(), Ordering::Relaxed);
    }

    /// The budget for the process's user and capabilities now.
    fn budget_now() -> usize {
        let privileged = caps::any(&[Cap::SysResource, Cap::SysAdmin]);
        let soft = std::fs::read_to_string("/proc/sys/fs/pipe-user-pages-soft")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok());
        match soft {
            _ if privileged => usize::MAX,
            Some(0) => usize::MAX,
            Some(pages) => pages / 2,
            None => 4096, // 16 MiB of 4 KiB pages when the limit cannot be read
        }
    }
}

/// For `doctor`: what a new pipe gets with `--pipe-size` `pipe_size` on this host.
pub fn pipe_check(pipe_size: u64) -> String {
    let sizing = PipeSizing::new(pipe_size);
    let pages = sizing.budget.load(Ordering::Relaxed);
    let budget = if pages == usize::MAX {
        "no limit on enlarged pipes".to_string()
    } else {
        format!(
            "at most {} MiB of enlarged pipes at once (half of fs.pipe-user-pages-soft; no CAP_SYS_RESOURCE)",
            (pages * page_size()) >> 20
        )
    };
    match Pipe::new(&sizing) {
        Ok(p) => format!("{} bytes per pipe (--pipe-size {pipe_size}); {budget}", p.cap),
        Err(e) => format!("cannot create a pipe: {e}"),
    }
}

/// A pipe pair; both ends non-blocking.
pub(super) struct Pipe {
    pub(super) r: OwnedFd,
    pub(super) w: OwnedFd,
    /// Bytes it holds (the most one splice(2) into it can move); above [`DEFAULT_PIPE`], its
    /// pages are counted in [`BIG_PIPE_PAGES`]. A `u32`: every connection carries two lanes.
    pub(super) cap: u32,
}

impl Pipe {
    pub(super) fn new(sizing: &PipeSizing) -> io::Result<Pipe> {
        let (r, w) = sys_pipe::pipe()?;
        let mut p = Pipe { r, w, cap: DEFAULT_PIPE as u32 };
        if sizing.bytes > DEFAULT_PIPE {
            let pages = sizing.bytes.div_ceil(page_size());
            if BIG_PIPE_PAGES.fetch_add(pages, Ordering::Relaxed).saturating_add(pages)
                <= sizing.budget.load(Ordering::Relaxed)
            {
                let got = sys_pipe::set_capacity(&p.w, sizing.bytes);
                if let Ok(got) = got.as_ref().map(|&g| u32::try_from(g).unwrap_or(u32::MAX))
                    && got as usize > DEFAULT_PIPE
                {
                    // The kernel rounds up to a power of two pages: count what it gave.
                    p.cap = got;
                    BIG_PIPE_PAGES.fetch_add(p.pages(), Ordering::Relaxed);
                    BIG_PIPE_PAGES.fetch_sub(pages, Ordering::Relaxed);
                    return Ok(p);
                }
                // EPERM (above fs.pipe-max-size, or the user's pipe pages) or ENOMEM: the
                // pipe keeps the default size.
                if let Err(e) = got {
                    log::debug!("F_SETPIPE_SZ {}: {e}; this pipe keeps the default size", sizing.bytes);
                }
            }
            BIG_PIPE_PAGES.fetch_sub(pages, Ordering::Relaxed);
        }
        Ok(p)
    }
}

impl Pipe {
    /// Buffers (slots) the pipe holds: one page each, at most.
    pub(super) fn slots(&self) -> usize {
        self.cap as usize / page_size()
    }

    /// Pages counted in [`BIG_PIPE_PAGES`] for this pipe.
    fn pages(&self) -> usize {
        if self.cap as usize > DEFAULT_PIPE { self.cap as usize / page_size() } else { 0 }
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        BIG_PIPE_PAGES.fetch_sub(self.pages(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipe_capacity(p: &Pipe) -> i32 {
        sys_pipe::capacity(&p.w).unwrap() as i32
    }

    /// `--pipe-size` reaches the kernel, and splice(2) calls are sized to what the pipe got;
    /// 0, or no budget left for enlarged pipes, leaves the kernel's default.
    #[test]
    fn pipes_get_the_configured_size_within_the_budget() {
        let big = Pipe::new(&PipeSizing::with_budget(1 << 20, usize::MAX)).unwrap();
        assert_eq!((pipe_capacity(&big), big.cap), (1 << 20, 1 << 20));
        let odd = Pipe::new(&PipeSizing::with_budget(300 << 10, usize::MAX)).unwrap();
        assert_eq!((pipe_capacity(&odd), odd.cap), (512 << 10, 512 << 10), "rounded up to a power of two pages");
        for sizing in [PipeSizing::with_budget(0, usize::MAX), PipeSizing::with_budget(1 << 20, 0)] {
            let p = Pipe::new(&sizing).unwrap();
            assert_eq!((pipe_capacity(&p), p.cap as usize), (DEFAULT_PIPE as i32, DEFAULT_PIPE));
        }
    }
}
