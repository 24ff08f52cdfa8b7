//! The process's credentials: looking a user up, switching every thread to it, narrowing every
//! thread's capability sets, and reading back what each thread holds.
//!
//! Linux keeps credentials per thread: setresuid(2), capset(2) and the prctl(2) capability and
//! no_new_privs calls change only the thread that makes them. glibc's set*id and setgroups
//! wrappers apply the change to every thread of the process (its "setxid" signal broadcast);
//! the raw system calls do not, and capset and prctl have no such wrapper at all. So:
//!
//! - user, group and supplementary groups go through glibc ([`set_ids`]);
//! - the capability steps go through [`on_every_thread`], which does what glibc does for
//!   set*id (and what libcap's psx and Go's `AllThreadsSyscall` do): it runs the step in the
//!   calling thread, then interrupts each other thread with a real-time signal whose handler
//!   runs the same step, and waits until every thread has answered or is gone;
//! - [`threads`] reads `/proc/self/task/*/status` back, so that the caller can check every
//!   thread, including any created meanwhile, instead of trusting the steps.
//!
//! The `caps` crate was considered: its capset and prctl calls also change only the calling
//! thread, and its functions allocate (hash sets, error strings), which a signal handler must
//! not; the handler here makes only system calls.

use std::{
    collections::HashSet,
    ffi::{CStr, CString},
    io,
    sync::{
        Mutex,
        atomic::{AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

/// CAP_SETPCAP: needed to drop capabilities from the bounding set.
pub const CAP_SETPCAP: u32 = 8;
/// CAP_SETGID, for setgroups(2) and setresgid(2).
pub const CAP_SETGID: u32 = 6;
/// CAP_SETUID, for setresuid(2).
pub const CAP_SETUID: u32 = 7;
/// Highest capability a `u64` set can name.
const MAX_CAP: u32 = 63;
/// How long the other threads get to run a step before [`on_every_thread`] gives up: each
/// only has to take a signal and make a few system calls.
const THREAD_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Threads one signal round can track; more are handled in further rounds.
const ACK_SLOTS: usize = 1024;
/// The `_LINUX_CAPABILITY_VERSION_3` header version: two 32-bit words per set.
const CAP_VERSION_3: u32 = 0x2008_0522;

/// The bit of capability `cap` in a set.
pub const fn bit(cap: u32) -> u64 {
    1 << cap
}

/// A user account as the system's user database (NSS) knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// The group to run with: the account's primary group, or the one asked for.
    pub gid: u32,
    /// Supplementary groups (getgrouplist(3): the groups that list the user, and `gid`).
    pub groups: Vec<u32>,
}

/// Why a user or group could not be looked up.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// No such user.
    #[error(
        "user {0:?} does not exist: create it (e.g. `useradd --system --no-create-home --shell /usr/sbin/nologin {0}`) or name an existing one"
    )]
    NoUser(String),
    /// No such group.
    #[error("group {0:?} does not exist: create it (`groupadd --system {0}`) or name an existing one")]
    NoGroup(String),
    /// A name with a NUL byte.
    #[error("{0:?} cannot be a user or group name (it has a NUL byte)")]
    BadName(String),
    /// The user database failed (NSS, /etc/passwd unreadable).
    #[error("looking up {name:?} in the user database failed: {source}")]
    Database {
        /// The name looked up.
        name: String,
        /// What the C library said.
        #[source]
        source: io::Error,
    },
}

/// Calls a `get*_r` function with a buffer that grows while it says ERANGE; returns the buffer
/// the strings of the result point into (`None`: not found).
fn with_buffer(
    name: &str,
    mut call: impl FnMut(&mut Vec<libc::c_char>) -> libc::c_int,
) -> Result<Option<Vec<libc::c_char>>, LookupError> {
    let mut buf: Vec<libc::c_char> = vec![0; 1024];
    loop {
        match call(&mut buf) {
            0 => return Ok(Some(buf)),
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 4, 0),
            // Not found: 0 with a null result, or one of these (getpwnam_r(3), NOTES).
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(None),
            e => return Err(LookupError::Database { name: name.into(), source: io::Error::from_raw_os_error(e) }),
        }
    }
}

fn cstring(name: &str) -> Result<CString, LookupError> {
    CString::new(name).map_err(|_| LookupError::BadName(name.into()))
}

/// Looks `user` up by name, with its primary group, or `group` instead when given, and its supplementary groups.
pub fn lookup(user: &str, group: Option<&str>) -> Result<Account, LookupError> {
    let c_user = cstring(user)?;
    // SAFETY: an all-zero passwd is a valid out-parameter (null pointers, zero ids).
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    let ok = with_buffer(user, |buf| {
        // SAFETY: every pointer is valid for the call; buf.len() is the buffer's size.
        unsafe { libc::getpwnam_r(c_user.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut found) }
    })?;
    if ok.is_none() || found.is_null() {
        return Err(LookupError::NoUser(user.into()));
    }
    let (uid, primary) = (pw.pw_uid, pw.pw_gid);
    let gid = match group {
        Some(g) => lookup_group(g)?,
        None => primary,
    };
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut n = libc::c_int::try_from(groups.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: groups has room for n entries; getgrouplist writes at most n and sets n.
        let rc = unsafe { libc::getgrouplist(c_user.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
        let n = usize::try_from(n).unwrap_or(0);
        if rc >= 0 {
            groups.truncate(n);
            break;
        }
        if n <= groups.len() || n > 1 << 16 {
            return Err(LookupError::Database { name: user.into(), source: io::Error::other("getgrouplist failed") });
        }
        groups.resize(n, 0);
    }
    groups.sort_unstable();
    groups.dedup();
    Ok(Account { name: user.into(), uid, gid, groups })
}

/// The gid of group `name`.
pub fn lookup_group(name: &str) -> Result<u32, LookupError> {
    let c_name = cstring(name)?;
    // SAFETY: an all-zero group is a valid out-parameter.
    let mut gr: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    let ok = with_buffer(name, |buf| {
        // SAFETY: every pointer is valid for the call; buf.len() is the buffer's size.
        unsafe { libc::getgrnam_r(c_name.as_ptr(), &mut gr, buf.as_mut_ptr(), buf.len(), &mut found) }
    })?;
    if ok.is_none() || found.is_null() {
        return Err(LookupError::NoGroup(name.into()));
    }
    Ok(gr.gr_gid)
}

/// The login name of `uid`, if the user database has one.
pub fn user_name(uid: u32) -> Option<String> {
    // SAFETY: an all-zero passwd is a valid out-parameter.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    let buf = with_buffer("", |buf| {
        // SAFETY: every pointer is valid for the call; buf.len() is the buffer's size.
        unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut found) }
    })
    .ok()??;
    if found.is_null() || pw.pw_name.is_null() {
        return None;
    }
    // SAFETY: getpwuid_r set pw_name to a NUL-terminated string inside buf, alive until the
    // end of this function.
    let name = unsafe { CStr::from_ptr(pw.pw_name) }.to_string_lossy().into_owned();
    drop(buf);
    Some(name)
}

/// Switches every thread of the process to `account`: supplementary groups, then the group,
/// then the user (real, effective and saved), each through glibc, which applies it to every
/// thread. Needs CAP_SETGID and CAP_SETUID.
pub fn set_ids(account: &Account) -> io::Result<()> {
    let check = |rc: libc::c_int, what: &str| {
        if rc == 0 {
            Ok(())
        } else {
            let e = io::Error::last_os_error();
            Err(io::Error::new(e.kind(), format!("{what}: {e}")))
        }
    };
    // SAFETY: the pointer and length describe account.groups.
    check(unsafe { libc::setgroups(account.groups.len(), account.groups.as_ptr()) }, "setgroups")?;
    let g = account.gid;
    // SAFETY: plain system call wrapper.
    check(unsafe { libc::setresgid(g, g, g) }, "setresgid")?;
    let u = account.uid;
    // SAFETY: plain system call wrapper.
    check(unsafe { libc::setresuid(u, u, u) }, "setresuid")
}

/// A step [`on_every_thread`] runs in each thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// `PR_SET_KEEPCAPS`: keep the permitted set across the coming change of user (otherwise
    /// the kernel empties it in every thread that goes from uid 0 to another).
    KeepCaps,
    /// Narrow this thread's capabilities to `keep` (those of it the thread holds):
    /// permitted and effective to `keep`, inheritable and ambient emptied, the bounding set cut
    /// to `keep` where CAP_SETPCAP is held, keep-caps off, and no_new_privs set.
    Narrow {
        /// The capabilities to keep, as a bit set.
        keep: u64,
    },
}

const STEP_KEEP_CAPS: u32 = 1;
const STEP_NARROW: u32 = 2;

/// The step the signal handler runs (one broadcast at a time, under [`BROADCAST`]).
static STEP: AtomicU32 = AtomicU32::new(0);
/// [`Step::Narrow`]'s set.
static KEEP: AtomicU64 = AtomicU64::new(0);
/// The highest capability this kernel knows (`/proc/sys/kernel/cap_last_cap`).
static LAST_CAP: AtomicU32 = AtomicU32::new(0);
/// The first error a thread met (an errno), 0 if none.
static FIRST_ERROR: AtomicI32 = AtomicI32::new(0);
/// Thread ids that ran the step in this round, in order; [`NEXT_ACK`] counts them.
static ACKS: [AtomicI32; ACK_SLOTS] = [const { AtomicI32::new(0) }; ACK_SLOTS];
static NEXT_ACK: AtomicUsize = AtomicUsize::new(0);
/// One broadcast at a time.
static BROADCAST: Mutex<()> = Mutex::new(());

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// This thread's (effective, permitted, inheritable) sets; an errno on failure.
fn capget() -> Result<(u64, u64, u64), libc::c_int> {
    let mut h = CapHeader { version: CAP_VERSION_3, pid: 0 };
    let mut d = [CapData::default(); 2];
    // SAFETY: a version 3 header and room for its two data words.
    if unsafe { libc::syscall(libc::SYS_capget, &raw mut h, d.as_mut_ptr()) } != 0 {
        return Err(errno());
    }
    let join = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    Ok((
        join(d[0].effective, d[1].effective),
        join(d[0].permitted, d[1].permitted),
        join(d[0].inheritable, d[1].inheritable),
    ))
}

/// Sets this thread's three sets; an errno on failure.
fn capset(effective: u64, permitted: u64, inheritable: u64) -> Result<(), libc::c_int> {
    let mut h = CapHeader { version: CAP_VERSION_3, pid: 0 };
    let split = |s: u64| (s as u32, (s >> 32) as u32);
    let (e0, e1) = split(effective);
    let (p0, p1) = split(permitted);
    let (i0, i1) = split(inheritable);
    let d = [
        CapData { effective: e0, permitted: p0, inheritable: i0 },
        CapData { effective: e1, permitted: p1, inheritable: i1 },
    ];
    // SAFETY: a version 3 header and its two data words.
    if unsafe { libc::syscall(libc::SYS_capset, &raw mut h, d.as_ptr()) } != 0 {
        return Err(errno());
    }
    Ok(())
}

/// Passes this thread's permitted capabilities among `caps` on to the program it is about to
/// execute (a live upgrade's new binary): adds them to the inheritable set and raises them as
/// ambient, which a process that is not root keeps across `execve` (with no_new_privs too).
/// Only system calls, no allocation: it runs between `fork` and `execve`. An errno on failure.
pub fn pass_on_exec(caps: u64) -> Result<(), libc::c_int> {
    let (effective, permitted, inheritable) = capget()?;
    let caps = caps & permitted;
    if caps == 0 {
        return Ok(());
    }
    capset(effective, permitted, inheritable | caps)?;
    for cap in 0..=MAX_CAP {
        if caps & bit(cap) != 0 {
            // SAFETY: PR_CAP_AMBIENT takes integer arguments only.
            let rc = unsafe {
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                    libc::c_ulong::from(cap),
                    0 as libc::c_ulong,
                    0 as libc::c_ulong,
                )
            };
            if rc != 0 {
                return Err(errno());
            }
        }
    }
    Ok(())
}

fn prctl(option: libc::c_int, arg: libc::c_ulong) -> Result<(), libc::c_int> {
    // SAFETY: the options used here take integer arguments only.
    if unsafe { libc::prctl(option, arg, 0 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong) } != 0 {
        return Err(errno());
    }
    Ok(())
}

fn errno() -> libc::c_int {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() }
}

/// Runs `step` in the calling thread. Only system calls: it also runs in the signal handler.
fn run_step(step: u32, keep: u64, last_cap: u32) -> Result<(), libc::c_int> {
    match step {
        STEP_KEEP_CAPS => prctl(libc::PR_SET_KEEPCAPS, 1),
        STEP_NARROW => {
            let (_, permitted, _) = capget()?;
            let keep = keep & permitted;
            let setpcap = permitted & bit(CAP_SETPCAP) != 0;
            // CAP_SETPCAP stays effective until the bounding set is cut.
            let interim = keep | if setpcap { bit(CAP_SETPCAP) } else { 0 };
            capset(interim, interim, 0)?;
            if setpcap {
                for cap in 0..=last_cap.min(MAX_CAP) {
                    if keep & bit(cap) == 0 {
                        match prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap)) {
                            // A capability this kernel does not have.
                            Ok(()) | Err(libc::EINVAL) => {}
                            Err(e) => return Err(e),
                        }
                    }
                }
            }
            // SAFETY: PR_CAP_AMBIENT takes integer arguments only.
            let rc = unsafe {
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                    0 as libc::c_ulong,
                    0 as libc::c_ulong,
                    0 as libc::c_ulong,
                )
            };
            // EINVAL: a kernel without ambient capabilities (before 4.3) has none to clear.
            if rc != 0 && errno() != libc::EINVAL {
                return Err(errno());
            }
            capset(keep, keep, 0)?;
            prctl(libc::PR_SET_KEEPCAPS, 0)?;
            prctl(libc::PR_SET_NO_NEW_PRIVS, 1)
        }
        _ => Ok(()),
    }
}

fn gettid() -> libc::pid_t {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::syscall(libc::SYS_gettid) as libc::pid_t }
}

/// The handler of [`step_signal`]: runs the current step, records the first error, and
/// acknowledges with its thread id. errno is saved and restored around it.
extern "C" fn on_signal(_sig: libc::c_int) {
    let saved = errno();
    let r = run_step(STEP.load(Ordering::Acquire), KEEP.load(Ordering::Acquire), LAST_CAP.load(Ordering::Acquire));
    if let Err(e) = r {
        // Only the first error is kept; later ones are the same step failing elsewhere.
        let _first = FIRST_ERROR.compare_exchange(0, e, Ordering::AcqRel, Ordering::Acquire);
    }
    let i = NEXT_ACK.fetch_add(1, Ordering::AcqRel);
    if let Some(slot) = ACKS.get(i) {
        slot.store(gettid(), Ordering::Release);
    }
    // SAFETY: restoring this thread's errno slot.
    unsafe { *libc::__errno_location() = saved };
}

/// The signal that carries a step to the other threads: a real-time signal above those glibc
/// keeps for itself, which nothing else in this process uses; its previous handler is put
/// back after each broadcast.
fn step_signal() -> libc::c_int {
    libc::SIGRTMIN() + 4
}

/// The ids of this process's threads now.
pub fn thread_ids() -> io::Result<Vec<libc::pid_t>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc/self/task")? {
        if let Some(tid) = e?.file_name().to_str().and_then(|s| s.parse().ok()) {
            out.push(tid);
        }
    }
    Ok(out)
}

/// Runs `step` in every thread of the process: here first, then in each other thread through
/// [`step_signal`], waiting until each has run it or has exited. Threads that appear meanwhile
/// get it in a further round. Fails with the first error any thread met, or when a thread
/// does not answer within [`THREAD_ANSWER_TIMEOUT`] (it blocks the signal).
pub fn on_every_thread(step: Step) -> io::Result<()> {
    let _one = BROADCAST.lock().unwrap_or_else(|e| e.into_inner());
    let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(MAX_CAP);
    let (code, keep) = match step {
        Step::KeepCaps => (STEP_KEEP_CAPS, 0),
        Step::Narrow { keep } => (STEP_NARROW, keep),
    };
    STEP.store(code, Ordering::Release);
    KEEP.store(keep, Ordering::Release);
    LAST_CAP.store(last_cap, Ordering::Release);
    FIRST_ERROR.store(0, Ordering::Release);
    let failed = |e: libc::c_int| io::Error::from_raw_os_error(e);
    run_step(code, keep, last_cap).map_err(failed)?;

    let sig = step_signal();
    // SAFETY: an all-zero sigaction is valid (empty mask, no flags) before it is filled in.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
    // Restart interrupted system calls, as glibc's own set*id broadcast does.
    action.sa_flags = libc::SA_RESTART;
    // SAFETY: an all-zero sigaction is a valid out-parameter.
    let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers; the handler only makes system calls and touches atomics.
    if unsafe { libc::sigaction(sig, &action, &mut previous) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let result = signal_the_others(sig);
    // SAFETY: puts back what was there.
    unsafe { libc::sigaction(sig, &previous, std::ptr::null_mut()) };
    result?;
    match FIRST_ERROR.load(Ordering::Acquire) {
        0 => Ok(()),
        e => Err(failed(e)),
    }
}

fn signal_the_others(sig: libc::c_int) -> io::Result<()> {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let mut done: HashSet<libc::pid_t> = HashSet::from([gettid()]);
    loop {
        let todo: Vec<libc::pid_t> = thread_ids()?.into_iter().filter(|t| !done.contains(t)).take(ACK_SLOTS).collect();
        if todo.is_empty() {
            return Ok(());
        }
        NEXT_ACK.store(0, Ordering::Release);
        for slot in &ACKS {
            slot.store(0, Ordering::Relaxed);
        }
        let mut sent = Vec::new();
        for &tid in &todo {
            done.insert(tid);
            // SAFETY: plain system call; tid is a thread of this process (or gone: ESRCH). Made
            // through syscall(2): musl's libc (the static release build) has no tgkill wrapper.
            if unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, sig) } == 0 {
                sent.push(tid);
            } else if errno() != libc::ESRCH {
                return Err(io::Error::last_os_error());
            }
        }
        let deadline = Instant::now() + THREAD_ANSWER_TIMEOUT;
        loop {
            let n = NEXT_ACK.load(Ordering::Acquire).min(ACK_SLOTS);
            let acked: HashSet<libc::pid_t> = ACKS[..n].iter().map(|s| s.load(Ordering::Acquire)).collect();
            let alive = |t: &libc::pid_t| std::path::Path::new(&format!("/proc/self/task/{t}")).exists();
            let waiting: Vec<libc::pid_t> = sent.iter().copied().filter(|t| !acked.contains(t) && alive(t)).collect();
            if waiting.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "thread(s) {waiting:?} did not run the credential change within {THREAD_ANSWER_TIMEOUT:?} \
                         (signal {sig} blocked?)"
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// What one thread holds, from `/proc/self/task/TID/status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ThreadCreds {
    /// Thread id.
    pub tid: i32,
    /// Real, effective, saved and filesystem user ids.
    pub uids: [u32; 4],
    /// Real, effective, saved and filesystem group ids.
    pub gids: [u32; 4],
    /// Supplementary groups, sorted.
    pub groups: Vec<u32>,
    /// Inheritable capabilities.
    pub inheritable: u64,
    /// Permitted capabilities.
    pub permitted: u64,
    /// Effective capabilities.
    pub effective: u64,
    /// The bounding set.
    pub bounding: u64,
    /// Ambient capabilities.
    pub ambient: u64,
    /// Whether no_new_privs is set.
    pub no_new_privs: bool,
}

impl ThreadCreds {
    /// Parses a `status` file's text (`None` if a field is missing or malformed).
    pub fn parse(tid: i32, status: &str) -> Option<ThreadCreds> {
        let field = |key: &str| status.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':')).map(str::trim);
        let ids = |key: &str| -> Option<[u32; 4]> {
            let v: Vec<u32> = field(key)?.split_whitespace().map(str::parse).collect::<Result<_, _>>().ok()?;
            v.try_into().ok()
        };
        let hex = |key: &str| u64::from_str_radix(field(key)?, 16).ok();
        let mut groups: Vec<u32> =
            field("Groups")?.split_whitespace().map(str::parse).collect::<Result<_, _>>().ok()?;
        groups.sort_unstable();
        Some(ThreadCreds {
            tid,
            uids: ids("Uid")?,
            gids: ids("Gid")?,
            groups,
            inheritable: hex("CapInh")?,
            permitted: hex("CapPrm")?,
            effective: hex("CapEff")?,
            bounding: hex("CapBnd")?,
            ambient: hex("CapAmb")?,
            no_new_privs: field("NoNewPrivs")? == "1",
        })
    }
}

/// What the calling thread holds now.
pub fn current() -> io::Result<ThreadCreds> {
    let text = std::fs::read_to_string("/proc/thread-self/status")?;
    ThreadCreds::parse(gettid(), &text)
        .ok_or_else(|| io::Error::other("/proc/thread-self/status: no readable credentials"))
}

/// What every thread of process `pid` (`None`: this one) holds now.
pub fn threads(pid: Option<u32>) -> io::Result<Vec<ThreadCreds>> {
    let dir = match pid {
        Some(p) => format!("/proc/{p}/task"),
        None => "/proc/self/task".to_string(),
    };
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir)? {
        let e = e?;
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse().ok()) else { continue };
        let text = match std::fs::read_to_string(e.path().join("status")) {
            Ok(t) => t,
            // Exited since the listing.
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => return Err(err),
        };
        let creds = ThreadCreds::parse(tid, &text)
            .ok_or_else(|| io::Error::other(format!("{dir}/{tid}/status: no readable credentials")))?;
        out.push(creds);
    }
    Ok(out)
}

/// The highest capability number this kernel knows.
pub fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(MAX_CAP)
        .min(MAX_CAP)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tntlm-splice\nUid:\t998\t998\t998\t998\nGid:\t997\t997\t997\t997\n\
        Groups:\t997 4 \nNoNewPrivs:\t1\nCapInh:\t0000000000000000\nCapPrm:\t0000000000001400\n\
        CapEff:\t0000000000001400\nCapBnd:\t0000000000001400\nCapAmb:\t0000000000000000\n";

    #[test]
    fn status_parses() {
        let c = ThreadCreds::parse(7, STATUS).unwrap();
        assert_eq!(c.uids, [998; 4]);
        assert_eq!(c.gids, [997; 4]);
        assert_eq!(c.groups, vec![4, 997]);
        assert_eq!(c.effective, bit(10) | bit(12));
        assert_eq!((c.permitted, c.bounding, c.inheritable, c.ambient), (c.effective, c.effective, 0, 0));
        assert!(c.no_new_privs);
        assert!(ThreadCreds::parse(7, "Uid:\t1\t1\t1\n").is_none(), "missing fields");
    }

    /// This process's own threads read back, each with the same ids as the process.
    #[test]
    fn own_threads_read_back() {
        let t = threads(None).unwrap();
        // SAFETY: getuid has no preconditions.
        let uid = unsafe { libc::getuid() };
        assert!(!t.is_empty());
        assert!(t.iter().all(|c| c.uids[0] == uid), "{t:?}");
    }

    /// A program started with [`pass_on_exec`] holds what was passed as ambient (and so
    /// permitted and effective), and nothing this process holds beyond it; this process's own
    /// ambient set is untouched.
    #[test]
    fn pass_on_exec_gives_the_new_program_those_capabilities_only() {
        use std::os::unix::process::CommandExt as _;
        let passed = crate::sys::caps::Cap::NetBindService.bit();
        let me = current().unwrap();
        if me.permitted & passed == 0 {
            eprintln!("SKIPPED pass_on_exec_gives_the_new_program_those_capabilities_only: needs cap_net_bind_service");
            return;
        }
        let mut cmd = std::process::Command::new("cat");
        cmd.arg("/proc/self/status");
        // SAFETY: pass_on_exec makes system calls only and allocates nothing.
        unsafe {
            cmd.pre_exec(move || pass_on_exec(passed).map_err(std::io::Error::from_raw_os_error));
        }
        let out = cmd.output().expect("cat /proc/self/status");
        assert!(out.status.success());
        let child = ThreadCreds::parse(0, &String::from_utf8_lossy(&out.stdout)).unwrap();
        assert_eq!(child.ambient, passed, "ambient: {child:?}");
        if me.uids[1] != 0 {
            // A root program gets its full sets from execve anyway.
            assert_eq!((child.permitted, child.effective), (passed, passed), "{child:?}");
        }
        assert_eq!(current().unwrap().ambient, me.ambient, "this process's own ambient set");
    }

    #[test]
    fn unknown_user_and_group_name_the_fix() {
        let e = lookup("ntlm-splice-no-such-user-xyz", None).unwrap_err();
        assert!(matches!(e, LookupError::NoUser(_)));
        assert!(e.to_string().contains("useradd"), "{e}");
        let e = lookup_group("ntlm-splice-no-such-group-xyz").unwrap_err();
        assert!(e.to_string().contains("groupadd"), "{e}");
        assert!(matches!(lookup("a\0b", None).unwrap_err(), LookupError::BadName(_)));
    }

    #[test]
    fn root_is_found() {
        let a = lookup("root", None).unwrap();
        assert_eq!((a.uid, a.gid), (0, 0));
        assert!(a.groups.contains(&0));
        assert_eq!(user_name(0).as_deref(), Some("root"));
    }
}
