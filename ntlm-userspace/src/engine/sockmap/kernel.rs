//! Loading the kernel programs and the map operations the engine needs.
//!
//! aya loads the object, creates the maps and attaches the programs. Element operations go
//! straight to the `bpf(2)` syscall on the map descriptors: aya's typed maps want `&mut` for
//! updates, but the kernel serialises map updates itself, and every connection task updates
//! its own keys concurrently.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, RawFd},
};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, MapData, PerCpuArray, RingBuf, SockHash},
    programs::SkSkb,
};
use ntlm_common::{
    CTL_MAP, ERR_COUNT, ERR_LINEARIZE, ERR_NO_CTL, ERR_NO_PEER_UNTRACKED, ERR_NO_STATS, ERR_SEQ_GAP, ERRORS_MAP, EVENTS_MAP,
    FWD_MAP, PARSER_PROG, PEER_MAP, SEQ_GUARD_GLOBAL, STATS_MAP, SeqGuard, SockStats, VERDICT_PROG,
};

use super::btf;

/// The eBPF object built by `build.rs` (empty when the build had no eBPF toolchain).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ntlm-ebpf"));

/// The name of each kernel error counter (`ERR_*` of ntlm-common), by its index: the label
/// metrics export them with.
pub const ERROR_NAMES: [&str; ERR_COUNT as usize] = {
    let mut names = [""; ERR_COUNT as usize];
    names[ERR_NO_STATS as usize] = "no_stats";
    names[ERR_NO_CTL as usize] = "no_ctl";
    names[ERR_NO_PEER_UNTRACKED as usize] = "no_peer_untracked";
    names[ERR_SEQ_GAP as usize] = "seq_gap";
    names[ERR_LINEARIZE as usize] = "linearize";
    names
};

/// Why this binary has no eBPF object, if it has none (set by `build.rs`).
pub(crate) const UNAVAILABLE: Option<&str> = option_env!("NTLM_EBPF_UNAVAILABLE");

/// The embedded object's size in bytes (0 when the build had no eBPF toolchain).
pub(crate) fn object_len() -> usize {
    OBJECT.len()
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
/// Update flag: fail with EEXIST if the key exists.
pub(crate) const BPF_NOEXIST: u64 = 1;
/// Update flag: create or replace.
pub(crate) const BPF_ANY: u64 = 0;

/// `union bpf_attr` as the element commands read it.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn elem_op(cmd: libc::c_long, fd: RawFd, key: *const u8, value: *const u8, flags: u64) -> io::Result<()> {
    let mut attr = ElemAttr { map_fd: fd as u32, _pad: 0, key: key as u64, value: value as u64, flags };
    // SAFETY: attr is a valid bpf_attr prefix for the element commands; key/value point to
    // buffers of the map's key/value size (the callers' types match the map definitions).
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, &raw mut attr, size_of::<ElemAttr>()) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// One map, by descriptor, with typed element operations.
#[derive(Clone, Copy)]
pub(crate) struct RawMap(RawFd);

impl RawMap {
    /// Looks up `key`; `Ok(None)` if absent.
    pub(crate) fn get<V: Copy + Default>(self, key: u64) -> io::Result<Option<V>> {
        let mut v = V::default();
        match elem_op(BPF_MAP_LOOKUP_ELEM, self.0, (&raw const key).cast(), (&raw mut v).cast(), 0) {
            Ok(()) => Ok(Some(v)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Inserts or replaces (`flags`: [`BPF_ANY`], [`BPF_NOEXIST`]).
    pub(crate) fn put<V: Copy>(self, key: u64, value: &V, flags: u64) -> io::Result<()> {
        elem_op(BPF_MAP_UPDATE_ELEM, self.0, (&raw const key).cast(), std::ptr::from_ref(value).cast(), flags)
    }

    /// Puts socket `sock` under `key` in a SockHash.
    pub(crate) fn put_sock(self, key: u64, sock: BorrowedFd<'_>) -> io::Result<()> {
        let fd = sock.as_raw_fd() as u32;
        self.put(key, &fd, BPF_ANY)
    }

    /// Deletes `key`; `Ok(false)` if it was absent.
    pub(crate) fn delete(self, key: u64) -> io::Result<bool> {
        match elem_op(BPF_MAP_DELETE_ELEM, self.0, (&raw const key).cast(), std::ptr::null(), 0) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Number of keys (walks the map; for tests and `doctor`).
    pub(crate) fn len(self) -> io::Result<usize> {
        let mut n = 0;
        let mut key = 0u64;
        let mut next = 0u64;
        let mut first = true;
        loop {
            let k: *const u8 = if first { std::ptr::null() } else { (&raw const key).cast() };
            match elem_op(BPF_MAP_GET_NEXT_KEY, self.0, k, (&raw mut next).cast(), 0) {
                Ok(()) => {
                    n += 1;
                    key = next;
                    first = false;
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(n),
                Err(e) => return Err(e),
            }
        }
    }
}

/// The loaded, attached programs and their maps. Dropping it detaches and unloads them.
pub(crate) struct Kernel {
    /// Keeps the programs (and their attachments) loaded.
    _ebpf: Ebpf,
    /// Keeps FWD's descriptor (the programs are attached to it).
    _fwd: SockHash<MapData, u64>,
    /// Keeps PEER's descriptor.
    _peer: SockHash<MapData, u64>,
    /// Keeps STATS' descriptor.
    _stats: MapData,
    /// Keeps CTL's descriptor.
    _ctl: MapData,
    errors: PerCpuArray<MapData, u64>,
    pub(crate) fwd: RawMap,
    pub(crate) peer: RawMap,
    pub(crate) stats: RawMap,
    pub(crate) ctl: RawMap,
    /// Why the overlap guard is off (`None`: on).
    pub(crate) guard_off: Option<String>,
}

/// What [`Kernel::load`] hands over besides the kernel itself.
pub(crate) struct Loaded {
    pub(crate) kernel: Kernel,
    pub(crate) events: RingBuf<MapData>,
}

fn take(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<Map> {
    ebpf.take_map(name).ok_or_else(|| anyhow!("the eBPF object has no map {name}"))
}

fn fd_of(map: &MapData) -> RawFd {
    map.fd().as_fd().as_raw_fd()
}

impl Kernel {
    /// Loads the embedded object, creates its maps and attaches the verdict (and, with
    /// `with_parser`, the stream parser) to FWD. `overlap_guard`: switch the verdict's
    /// retransmit overlap guard on where the kernel's BTF allows (false only in tests).
    /// `cut_fail_step`: 0, or a test's fault injection (`SeqGuard::test_cut_fail_step`).
    /// `linearize_max`: the verdict makes buffers up to this size linear before redirecting
    /// them (`ntlm_common::LINEARIZE_MAX`; 0 only in measurements and tests).
    pub(crate) fn load(
        with_parser: bool,
        overlap_guard: bool,
        cut_fail_step: u32,
        linearize_max: u32,
    ) -> anyhow::Result<Loaded> {
        if let Some(reason) = UNAVAILABLE {
            return Err(anyhow!("this binary was built without the eBPF object: {reason}"));
        }
        // The overlap guard is for the verdict-only path; a stream parser reads the socket with
        // tcp_read_sock(), which skips overlaps itself.
        let (guard, guard_off) = if with_parser {
            (SeqGuard::default(), Some("not needed with a stream parser".to_owned()))
        } else if !overlap_guard {
            (SeqGuard::default(), Some("switched off for testing".to_owned()))
        } else {
            match btf::running_kernel() {
                Ok(g) => (SeqGuard { test_cut_fail_step: cut_fail_step, ..g }, None),
                Err(e) => (SeqGuard::default(), Some(e.to_string())),
            }
        };
        match Self::load_with(with_parser, &guard, guard_off, linearize_max) {
            Err(e) if guard.enabled != 0 => {
                // The guard reads kernel memory (bpf_probe_read_kernel), which the verifier
                // allows only with CAP_PERFMON; with the guard off its code is dead and is not
                // checked, so CAP_BPF + CAP_NET_ADMIN suffice.
                let err = format!("{e:#}");
                log::debug!("sockmap: loading with the overlap guard failed: {err}");
                let err = err.split(" Verifier output").next().unwrap_or_default();
                let why = format!(
                    "the verifier refused it (it reads kernel memory, which needs CAP_PERFMON or root; \
                     RUST_LOG=debug shows the verifier's output): {err}"
                );
                Self::load_with(with_parser, &SeqGuard::default(), Some(why), linearize_max)
            }
            r => r,
        }
    }

    fn load_with(
        with_parser: bool,
        guard: &SeqGuard,
        guard_off: Option<String>,
        linearize_max: u32,
    ) -> anyhow::Result<Loaded> {
        let attached = u8::from(with_parser);
        let mut ebpf = EbpfLoader::new()
            .override_global("PARSER_ATTACHED", &attached, true)
            .override_global("LINEARIZE_MAX", &linearize_max, true)
            .override_global(SEQ_GUARD_GLOBAL, guard, true)
            .load(OBJECT)
            .context("loading the eBPF object (creating its maps) failed")?;
        let (fwd_fd, fwd) = match take(&mut ebpf, FWD_MAP)? {
            Map::SockHash(m) => (fd_of(&m), SockHash::<MapData, u64>::try_from(Map::SockHash(m))?),
            _ => return Err(anyhow!("{FWD_MAP} is not a SockHash")),
        };
        let (peer_fd, peer) = match take(&mut ebpf, PEER_MAP)? {
            Map::SockHash(m) => (fd_of(&m), SockHash::<MapData, u64>::try_from(Map::SockHash(m))?),
            _ => return Err(anyhow!("{PEER_MAP} is not a SockHash")),
        };
        let Map::HashMap(stats) = take(&mut ebpf, STATS_MAP)? else {
            return Err(anyhow!("{STATS_MAP} is not a HashMap"));
        };
        let Map::HashMap(ctl) = take(&mut ebpf, CTL_MAP)? else {
            return Err(anyhow!("{CTL_MAP} is not a HashMap"));
        };
        let errors = PerCpuArray::<MapData, u64>::try_from(take(&mut ebpf, ERRORS_MAP)?)?;
        let events = RingBuf::try_from(take(&mut ebpf, EVENTS_MAP)?)?;

        let fwd_attach = fwd.fd().try_clone().context("dup of the FWD map descriptor")?;
        let mut names = vec![VERDICT_PROG];
        if with_parser {
            names.push(PARSER_PROG);
        }
        for name in names {
            let prog: &mut SkSkb = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("the eBPF object has no program {name}"))?
                .try_into()
                .with_context(|| format!("{name} is not an sk_skb program"))?;
            prog.load().with_context(|| format!("the verifier rejected {name}"))?;
            prog.attach(&fwd_attach).with_context(|| format!("attaching {name} to the {FWD_MAP} sockhash failed"))?;
        }
        let kernel = Kernel {
            fwd: RawMap(fwd_fd),
            peer: RawMap(peer_fd),
            stats: RawMap(fd_of(&stats)),
            ctl: RawMap(fd_of(&ctl)),
            _ebpf: ebpf,
            _fwd: fwd,
            _peer: peer,
            _stats: stats,
            _ctl: ctl,
            errors,
            guard_off,
        };
        Ok(Loaded { kernel, events })
    }

    /// Stats of the socket with `cookie` (zeros if it has no entry).
    pub(crate) fn stats_of(&self, cookie: u64) -> io::Result<SockStats> {
        Ok(self.stats.get::<SockStats>(cookie)?.unwrap_or_default())
    }

    /// The kernel-wide error counters (`ERR_*`), summed over CPUs.
    pub(crate) fn errors(&self) -> [u64; ERR_COUNT as usize] {
        let mut out = [0; ERR_COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(values) = self.errors.get(&(i as u32), 0) {
                *slot = values.iter().sum();
            }
        }
        out
    }
}
