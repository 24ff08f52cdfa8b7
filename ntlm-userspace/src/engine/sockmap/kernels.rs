//! Known sockmap defects of the Linux kernel, and which of them the running kernel has.
//!
//! A table ([`DEFECTS`]) of the kernel bugs that break a TCP splicer built on sockmap, each
//! with its fix commit, the stable releases that carry the fix and whether this engine's
//! use of sockmap can meet it. [`Host::read`] reads what the kernel says of its version;
//! [`base`] finds the upstream release it is built from (the release string, Debian's
//! `/proc/version`, Ubuntu's `/proc/version_signature`, or nothing: a distribution kernel
//! whose number does not tell its stable base); [`assess`] gives a [`Verdict`] per defect.
//! Everything here is a pure function of those strings, so that tests can run any kernel.
//!
//! The server refuses `engine = "sockmap"` on a kernel with a defect that the engine meets
//! ([`Assessment::refusal`]) unless `sockmap_allow_affected_kernel` is set; `doctor` prints
//! every verdict. The sources and how each fact was checked are in docs/sockmap.md ("Known
//! kernel defects").

use std::fmt;

/// Environment variable (test hook): a kernel release string (as `uname -r` prints it) used
/// instead of the running kernel's; `/proc/version` and `/proc/version_signature` are then
/// not read, so the string alone decides. Lets tests see the refusal on a kernel they do not
/// run. Never set it in production: the verdicts are then about another kernel.
pub const RELEASE_ENV: &str = "NTLM_SPLICE_TEST_KERNEL_RELEASE";

/// A kernel version, `major.minor.patch` (`patch` 0 for a mainline release).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    /// e.g. 6 of 6.1.142.
    pub major: u32,
    /// e.g. 1 of 6.1.142.
    pub minor: u32,
    /// e.g. 142 of 6.1.142; 0 for the mainline release of a line.
    pub patch: u32,
}

impl Version {
    /// `major.minor.patch`.
    pub const fn new(major: u32, minor: u32, patch: u32) -> Version {
        Version { major, minor, patch }
    }

    fn line(self) -> (u32, u32) {
        (self.major, self.minor)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// What the kernel says of its version: the three strings the verdicts are made from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Host {
    /// `uname -r` (`/proc/sys/kernel/osrelease`), e.g. `6.1.0-26-amd64`.
    pub release: String,
    /// `/proc/version`, where Debian writes its package version (`Debian 6.1.112-1`).
    pub proc_version: Option<String>,
    /// `/proc/version_signature` (Ubuntu only), e.g. `Ubuntu 5.15.0-91.101-generic 5.15.131`.
    pub signature: Option<String>,
}

impl Host {
    /// The running kernel's strings, or the release in [`RELEASE_ENV`] alone when it is set.
    pub fn read() -> Host {
        if let Ok(release) = std::env::var(RELEASE_ENV) {
            return Host { release, ..Host::default() };
        }
        let read = |p: &str| std::fs::read_to_string(p).ok().map(|s| s.trim().to_string());
        Host {
            release: read("/proc/sys/kernel/osrelease").unwrap_or_default(),
            proc_version: read("/proc/version"),
            signature: read("/proc/version_signature"),
        }
    }
}

/// The upstream release a kernel is built from, as far as its strings tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Base {
    /// The upstream version; `rc` for a release candidate of `version`'s line (then
    /// `version.patch` is 0).
    Known {
        /// The upstream (mainline or stable) version.
        version: Version,
        /// `Some(n)` for `-rcN`.
        rc: Option<u32>,
        /// Where it was read: "the release string", "/proc/version (Debian)", ...
        from: &'static str,
    },
    /// The strings do not tell; `why` says what kernel this is and what to check instead.
    Unknown {
        /// What kernel this is and what to check.
        why: String,
    },
}

impl fmt::Display for Base {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Base::Known { version, rc: Some(n), from } => {
                write!(f, "{}.{}-rc{n} from {from}", version.major, version.minor)
            }
            Base::Known { version, rc: None, from } => write!(f, "{version} from {from}"),
            Base::Unknown { why } => write!(f, "unknown: {why}"),
        }
    }
}

/// `major.minor[.patch]` at the start of `s` (digits only), the rest of `s`, and whether a
/// patch number was written.
fn leading_version(s: &str) -> Option<(Version, bool, &str)> {
    fn number(s: &str) -> Option<(u32, &str)> {
        let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        Some((s[..end].parse().ok()?, &s[end..]))
    }
    let (major, rest) = number(s)?;
    let (minor, rest) = number(rest.strip_prefix('.')?)?;
    match rest.strip_prefix('.').and_then(number) {
        Some((patch, rest)) => Some((Version::new(major, minor, patch), true, rest)),
        None => Some((Version::new(major, minor, 0), false, rest)),
    }
}

/// The first full `x.y.z` of line `line` right after a `marker` in `text` (e.g. `Debian
/// 6.1.112-1` in `/proc/version`, which also names the compiler's `Debian 12.2.0-14`).
fn version_after(text: &str, marker: &str, line: (u32, u32)) -> Option<Version> {
    text.match_indices(marker).find_map(|(at, _)| match leading_version(&text[at + marker.len()..])? {
        (v, true, _) if v.line() == line => Some(v),
        _ => None,
    })
}

/// What to grep for in a distribution's changelog (named in verdicts on such kernels).
const CHANGELOG_HINT: &str = "search the kernel package's changelog for the fix commits that `ntlm-splice doctor` \
     lists (e.g. `rpm -q --changelog kernel`, or changelog.Debian.gz under /usr/share/doc/linux-image-*)";

/// The upstream release `host` is built from.
pub fn base(host: &Host) -> Base {
    let release = host.release.trim();
    let Some((version, has_patch, rest)) = leading_version(release) else {
        return Base::Unknown { why: format!("release {release:?} does not start with a version number") };
    };
    if let Some(n) = rest.strip_prefix("-rc").and_then(|r| {
        let digits = r.find(|c: char| !c.is_ascii_digit()).unwrap_or(r.len());
        r[..digits].parse().ok()
    }) {
        return Base::Known { version: Version { patch: 0, ..version }, rc: Some(n), from: "the release string" };
    }
    // Ubuntu: "Ubuntu 5.15.0-91.101-generic 5.15.131", the last word is the upstream base.
    if let Some(sig) = &host.signature
        && let Some(last) = sig.split_whitespace().last()
        && let Some((v, true, _)) = leading_version(last)
        && v.line() == version.line()
    {
        return Base::Known { version: v, rc: None, from: "/proc/version_signature (Ubuntu)" };
    }
    // Debian: "... Debian 6.1.112-1 (2024-09-30)" in /proc/version.
    if let Some(pv) = &host.proc_version
        && let Some(v) = version_after(pv, "Debian ", version.line())
    {
        return Base::Known { version: v, rc: None, from: "/proc/version (Debian)" };
    }
    let lower = rest.to_ascii_lowercase();
    let backports = [
        (".el", "a Red Hat family kernel (RHEL, CentOS, Alma, Rocky, Oracle)"),
        ("uek", "an Oracle UEK kernel"),
        ("-150", "a SUSE Linux Enterprise kernel"),
    ];
    for (marker, what) in backports {
        if lower.contains(marker) {
            return Base::Unknown {
                why: format!(
                    "release {release:?} is {what}: fixes are backported without changing its number, so the number \
                     does not say which are in; {CHANGELOG_HINT}"
                ),
            };
        }
    }
    // Debian and Ubuntu number their kernels x.y.0-ABI; without the files above the
    // number does not say which stable release they carry.
    if has_patch
        && version.patch == 0
        && rest.strip_prefix('-').is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
    {
        return Base::Unknown {
            why: format!(
                "release {release:?} numbers a distribution ABI (Debian and Ubuntu write x.y.0-N), not a stable \
                 release, and neither /proc/version (Debian) nor /proc/version_signature (Ubuntu) names one; \
                 {CHANGELOG_HINT}"
            ),
        };
    }
    Base::Known { version, rc: None, from: "the release string" }
}

/// A kernel commit: its abbreviated id and title.
#[derive(Clone, Copy, Debug)]
pub struct Commit {
    /// The first 12 hex digits of the upstream commit.
    pub id: &'static str,
    /// Its subject line.
    pub title: &'static str,
}

/// Where the bug starts within one stable line.
#[derive(Clone, Copy, Debug)]
pub enum From {
    /// Every release of the line (it was in the line's mainline release).
    Start,
    /// From this patch release on (the cause was backported).
    Patch(u32),
    /// Not known which release of the line first had it: every release before the fix is
    /// taken as affected.
    Unverified,
}

/// Whether and where one stable line got the fix.
#[derive(Clone, Copy, Debug)]
pub enum Fix {
    /// In this patch release and later.
    Patch(u32),
    /// The line ended (end of life) without it.
    Never,
    /// Not known.
    Unknown,
}

/// One stable line in a defect's table.
#[derive(Clone, Copy, Debug)]
pub struct Line {
    /// `(major, minor)`.
    pub line: (u32, u32),
    /// Where the bug starts in it.
    pub from: From,
    /// Where it is fixed in it.
    pub fix: Fix,
}

/// Whether this engine's use of sockmap can meet a defect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    /// Always: the engine is refused on an affected kernel.
    Always,
    /// Only with the measurement-only stream parser (`NTLM_SPLICE_SOCKMAP_PARSER=1`).
    WithParser,
    /// Never: reported by `doctor`, never a reason to refuse.
    Never,
}

/// One known defect.
#[derive(Debug)]
pub struct Defect {
    /// Short id (`doctor` prints `kernel_defect_<id>`).
    pub id: &'static str,
    /// What breaks, one line.
    pub breaks: &'static str,
    /// The upstream fix.
    pub fix: Commit,
    /// The commit that brought the bug in.
    pub cause: Commit,
    /// First mainline release with the cause.
    pub mainline_from: (u32, u32),
    /// First mainline release with the fix; `None`: not known.
    pub mainline_fix: Option<(u32, u32)>,
    /// Stable lines that got the cause or the fix by backport. A line not listed is
    /// affected from `mainline_from` up to `mainline_fix` (it ended without the fix) and
    /// not affected before.
    pub lines: &'static [Line],
    /// Whether the engine's use meets it.
    pub engine_use: Use,
    /// Why `engine_use` is what it is.
    pub use_why: &'static str,
}

/// The known defects. Sources, and how each fact was checked, in docs/sockmap.md.
pub const DEFECTS: &[Defect] = &[
    Defect {
        id: "dup_tx",
        breaks: "a redirected buffer that the destination socket took only in part is sent again from its start: \
                 the peer receives duplicated bytes",
        fix: Commit { id: "3b4f14b79428", title: "bpf, sockmap: fix duplicated data transmission" },
        cause: Commit { id: "405df89dd52c", title: "bpf, sockmap: Improved check for empty queue" },
        mainline_from: (6, 4),
        mainline_fix: Some((6, 16)),
        lines: &[
            Line { line: (5, 15), from: From::Unverified, fix: Fix::Patch(186) },
            Line { line: (6, 1), from: From::Patch(32), fix: Fix::Patch(142) },
            Line { line: (6, 3), from: From::Patch(6), fix: Fix::Never },
            Line { line: (6, 6), from: From::Start, fix: Fix::Patch(94) },
            Line { line: (6, 12), from: From::Start, fix: Fix::Patch(34) },
            Line { line: (6, 15), from: From::Start, fix: Fix::Patch(3) },
        ],
        engine_use: Use::Always,
        use_why: "every byte the engine forwards goes through sk_psock_backlog() to the peer's egress",
    },
    Defect {
        id: "copied_seq",
        breaks: "with a stream parser, bytes a verdict passes (SK_PASS) move copied_seq twice: recv() on the \
                 socket then returns wrong data or none",
        fix: Commit { id: "36b62df5683c", title: "bpf: Fix wrong copied_seq calculation" },
        cause: Commit { id: "e5c6de5fa025", title: "bpf, sockmap: Incorrectly handling copied_seq" },
        mainline_from: (6, 4),
        mainline_fix: Some((6, 14)),
        lines: &[
            Line { line: (5, 15), from: From::Unverified, fix: Fix::Unknown },
            Line { line: (6, 1), from: From::Patch(32), fix: Fix::Patch(130) },
            Line { line: (6, 3), from: From::Patch(6), fix: Fix::Never },
            Line { line: (6, 6), from: From::Start, fix: Fix::Patch(80) },
            Line { line: (6, 12), from: From::Start, fix: Fix::Patch(17) },
            Line { line: (6, 13), from: From::Start, fix: Fix::Unknown },
        ],
        engine_use: Use::WithParser,
        use_why: "only strparser's read path (tcp_read_sock) has it; the engine attaches no stream parser unless \
                  NTLM_SPLICE_SOCKMAP_PARSER=1 (measurement only), and then it does pass bytes (pause, cap)",
    },
    Defect {
        id: "fionread",
        breaks: "FIONREAD (SIOCINQ) on a socket in a sockmap without a verdict program reports 0 instead of \
                 the bytes queued: readers that size reads by it stall",
        fix: Commit {
            id: "04af4efde58a",
            title: "bpf, sockmap: Account for receive queue in FIONREAD without a verdict program",
        },
        cause: Commit { id: "929e30f93125", title: "bpf, sockmap: Fix FIONREAD for sockmap" },
        mainline_from: (7, 0),
        mainline_fix: None,
        lines: &[
            Line { line: (6, 6), from: From::Patch(128), fix: Fix::Unknown },
            Line { line: (6, 12), from: From::Patch(75), fix: Fix::Unknown },
            Line { line: (6, 18), from: From::Patch(14), fix: Fix::Unknown },
            Line { line: (6, 19), from: From::Patch(4), fix: Fix::Unknown },
        ],
        engine_use: Use::Never,
        use_why: "the engine reads SIOCINQ only before a socket enters a map; the load self-test probes it on \
                  the engine's own PEER map (no verdict attached), see fionread_probe",
    },
];

/// A defect's state on one kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The kernel has the bug.
    Affected {
        /// The release of the kernel's line with the fix; `None`: the line ended without it.
        fixed_in: Option<Version>,
        /// Set when the first affected release of the line is not known (taken as affected).
        unverified_start: bool,
    },
    /// The kernel has the fix.
    Fixed,
    /// The kernel predates the bug.
    NotAffected,
    /// Not known; what to check.
    Unknown {
        /// Why, and what to check.
        why: String,
    },
}

impl Defect {
    fn line(&self, line: (u32, u32)) -> Option<&Line> {
        self.lines.iter().find(|l| l.line == line)
    }

    /// This defect's state on a kernel built from `base`.
    pub fn verdict(&self, base: &Base) -> Verdict {
        let (version, rc) = match base {
            Base::Known { version, rc, .. } => (*version, *rc),
            Base::Unknown { why } => return Verdict::Unknown { why: why.clone() },
        };
        let series = version.line();
        if let Some(fix) = self.mainline_fix {
            if series > fix || (series == fix && rc.is_none()) {
                return Verdict::Fixed;
            }
            if series == fix {
                return Verdict::Unknown {
                    why: format!(
                        "the fix entered mainline during {}.{}'s release candidates; run {}.{} or later",
                        fix.0, fix.1, fix.0, fix.1
                    ),
                };
            }
        }
        if rc.is_some() {
            return if series < self.mainline_from { Verdict::NotAffected } else { self.unlisted_affected() };
        }
        let Some(line) = self.line(series) else {
            return if series < self.mainline_from { Verdict::NotAffected } else { self.unlisted_affected() };
        };
        if let From::Patch(p) = line.from
            && version.patch < p
        {
            return Verdict::NotAffected;
        }
        let unverified_start = matches!(line.from, From::Unverified);
        match line.fix {
            Fix::Patch(p) if version.patch >= p => Verdict::Fixed,
            Fix::Patch(p) => {
                Verdict::Affected { fixed_in: Some(Version::new(series.0, series.1, p)), unverified_start }
            }
            Fix::Never => Verdict::Affected { fixed_in: None, unverified_start },
            Fix::Unknown => Verdict::Unknown {
                why: format!(
                    "{version} has the cause ({} \"{}\") but which {}.{} release carries the fix ({} \"{}\") \
                     was not found; check the stable changelog",
                    self.cause.id, self.cause.title, series.0, series.1, self.fix.id, self.fix.title
                ),
            },
        }
    }

    /// A line with the cause that the table does not list: affected up to the mainline fix.
    fn unlisted_affected(&self) -> Verdict {
        match self.mainline_fix {
            Some(_) => Verdict::Affected { fixed_in: None, unverified_start: false },
            None => Verdict::Unknown {
                why: format!(
                    "has the cause ({} \"{}\"); the release with the fix ({} \"{}\") was not found",
                    self.cause.id, self.cause.title, self.fix.id, self.fix.title
                ),
            },
        }
    }

    /// Releases with the fix, for messages: "5.15.186, 6.1.142, ..., 6.16+".
    pub fn fixed_releases(&self) -> String {
        let mut out: Vec<String> = self
            .lines
            .iter()
            .filter_map(|l| match l.fix {
                Fix::Patch(p) => Some(format!("{}.{}.{p}", l.line.0, l.line.1)),
                _ => None,
            })
            .collect();
        match self.mainline_fix {
            Some((a, b)) => out.push(format!("{a}.{b}+")),
            None => out.push("no release known".into()),
        }
        out.join(", ")
    }
}

/// Every defect's verdict on one kernel.
#[derive(Clone, Debug)]
pub struct Assessment {
    /// The kernel's release string.
    pub release: String,
    /// Its upstream base.
    pub base: Base,
    /// [`DEFECTS`] in order, each with its verdict.
    pub verdicts: Vec<(&'static Defect, Verdict)>,
}

/// Every defect's verdict on `host`.
pub fn assess(host: &Host) -> Assessment {
    let base = base(host);
    let verdicts = DEFECTS.iter().map(|d| (d, d.verdict(&base))).collect();
    Assessment { release: host.release.trim().to_string(), base, verdicts }
}

/// Names the `[global]` key and the flag that run the engine on an affected kernel anyway.
pub const FORCE_HINT: &str = "sockmap_allow_affected_kernel = true in [global] (or --sockmap-allow-affected-kernel)";

/// The sockmap engine refused: the kernel has a defect the engine meets.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "kernel {release} (base {base}) has the sockmap defect {id}: {breaks}. Fix: \"{fix_title}\" ({fix_id}), {where_fixed}. \
     Upgrade the kernel, use the splice engine, or, if this kernel carries the fix (a distribution backport), \
     set {FORCE_HINT}"
)]
pub struct Refusal {
    /// The kernel's release string.
    pub release: String,
    /// Its base, as [`Base`] displays it.
    pub base: String,
    /// The defect's id.
    pub id: &'static str,
    /// What breaks.
    pub breaks: &'static str,
    /// The fix commit.
    pub fix_id: &'static str,
    /// Its title.
    pub fix_title: &'static str,
    /// Where it is fixed, for this kernel's line.
    pub where_fixed: String,
}

impl Assessment {
    /// Whether the engine, with or without the stream parser, meets `d`.
    fn meets(d: &Defect, parser: bool) -> bool {
        match d.engine_use {
            Use::Always => true,
            Use::WithParser => parser,
            Use::Never => false,
        }
    }

    /// The first defect the engine meets on this kernel, as the refusal.
    pub fn refusal(&self, parser: bool) -> Option<Refusal> {
        self.verdicts.iter().filter(|(d, _)| Self::meets(d, parser)).find_map(|(d, v)| {
            let Verdict::Affected { fixed_in, unverified_start } = v else { return None };
            let line = match &self.base {
                Base::Known { version, .. } => format!("{}.{}", version.major, version.minor),
                Base::Unknown { .. } => "this".into(),
            };
            let mut where_fixed = match fixed_in {
                Some(v) => format!("fixed in {v} for the {line} line (also in {})", d.fixed_releases()),
                None => format!("the {line} line ended without it; it is in {}", d.fixed_releases()),
            };
            if *unverified_start {
                where_fixed.push_str(&format!(
                    " (the first {line} release with the bug was not verified: every {line} release before the fix \
                     is taken as affected)"
                ));
            }
            Some(Refusal {
                release: self.release.clone(),
                base: self.base.to_string(),
                id: d.id,
                breaks: d.breaks,
                fix_id: d.fix.id,
                fix_title: d.fix.title,
                where_fixed,
            })
        })
    }

    /// Warnings for the defects the engine meets whose state is not known: what to check.
    pub fn unknowns(&self, parser: bool) -> Vec<String> {
        self.verdicts
            .iter()
            .filter(|(d, _)| Self::meets(d, parser))
            .filter_map(|(d, v)| match v {
                Verdict::Unknown { why } => Some(format!(
                    "sockmap defect {} ({}) not known on kernel {}: {why}; its fix is \"{}\" ({}), in {}",
                    d.id,
                    d.breaks,
                    self.release,
                    d.fix.title,
                    d.fix.id,
                    d.fixed_releases()
                )),
                _ => None,
            })
            .collect()
    }

    /// One phrase for the `auto` reason and logs: "kernel 6.18.44: dup_tx fixed, ...".
    pub fn summary(&self) -> String {
        let each: Vec<String> = self.verdicts.iter().map(|(d, v)| format!("{} {}", d.id, v.word())).collect();
        format!("kernel {}: known sockmap defects: {}", self.release, each.join(", "))
    }
}

impl Verdict {
    /// One word: affected, fixed, not_affected, unknown.
    pub fn word(&self) -> &'static str {
        match self {
            Verdict::Affected { .. } => "affected",
            Verdict::Fixed => "fixed",
            Verdict::NotAffected => "not_affected",
            Verdict::Unknown { .. } => "unknown",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Affected { fixed_in: Some(v), .. } => write!(f, "affected (fixed in {v})"),
            Verdict::Affected { fixed_in: None, .. } => write!(f, "affected (this line ended without the fix)"),
            Verdict::Unknown { why } => write!(f, "unknown: {why}"),
            other => f.write_str(other.word()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(release: &str) -> Host {
        Host { release: release.into(), ..Host::default() }
    }

    fn known(release: &str) -> Version {
        match base(&host(release)) {
            Base::Known { version, rc: None, .. } => version,
            other => panic!("{release}: {other:?}"),
        }
    }

    fn defect(id: &str) -> &'static Defect {
        DEFECTS.iter().find(|d| d.id == id).unwrap()
    }

    /// The verdict words of `id` on each release, in order.
    fn words(id: &str, releases: &[&str]) -> Vec<&'static str> {
        releases.iter().map(|r| defect(id).verdict(&base(&host(r))).word()).collect()
    }

    #[test]
    fn release_strings_give_their_upstream_base() {
        assert_eq!(known("6.18.44-fc-v1252"), Version::new(6, 18, 44));
        assert_eq!(known("6.1.142"), Version::new(6, 1, 142));
        assert_eq!(known("6.16"), Version::new(6, 16, 0));
        assert_eq!(known("6.8.9-arch1-1"), Version::new(6, 8, 9));
        assert_eq!(known("6.7.7-1-default"), Version::new(6, 7, 7));
        assert_eq!(known("6.9.4-200.fc40.x86_64"), Version::new(6, 9, 4));
        assert_eq!(known("5.10.210-201.852.amzn2.x86_64"), Version::new(5, 10, 210));
        assert_eq!(known("6.6.94+"), Version::new(6, 6, 94));
        assert_eq!(known("6.12.0"), Version::new(6, 12, 0));
        for (r, want) in [("6.15.0-rc3", (6, 15, 3)), ("6.14-rc7+", (6, 14, 7))] {
            match base(&host(r)) {
                Base::Known { version, rc: Some(n), .. } => {
                    assert_eq!((version.major, version.minor, n), want, "{r}");
                    assert_eq!(version.patch, 0, "{r}");
                }
                other => panic!("{r}: {other:?}"),
            }
        }
    }

    #[test]
    fn debian_and_ubuntu_bases_come_from_their_files() {
        let debian = Host {
            release: "6.1.0-26-amd64".into(),
            proc_version: Some(
                "Linux version 6.1.0-26-amd64 (debian-kernel@lists.debian.org) (gcc-12 (Debian 12.2.0-14) 12.2.0, \
                 GNU ld (GNU Binutils for Debian) 2.40) #1 SMP PREEMPT_DYNAMIC Debian 6.1.112-1 (2024-09-30)"
                    .into(),
            ),
            signature: None,
        };
        assert_eq!(
            base(&debian),
            Base::Known { version: Version::new(6, 1, 112), rc: None, from: "/proc/version (Debian)" }
        );
        let ubuntu = Host {
            release: "5.15.0-91-generic".into(),
            proc_version: Some("Linux version 5.15.0-91-generic (buildd@lcy02-amd64-045) #101-Ubuntu SMP".into()),
            signature: Some("Ubuntu 5.15.0-91.101-generic 5.15.131".into()),
        };
        assert_eq!(
            base(&ubuntu),
            Base::Known { version: Version::new(5, 15, 131), rc: None, from: "/proc/version_signature (Ubuntu)" }
        );
        // The same numbers without the files say nothing of the stable base.
        for r in ["6.1.0-26-amd64", "5.15.0-91-generic", "6.8.0-31-generic"] {
            let Base::Unknown { why } = base(&host(r)) else { panic!("{r}") };
            assert!(why.contains("/proc/version_signature") && why.contains("changelog"), "{why}");
        }
        // A Debian backports kernel (bpo) keeps its base; a base of another line is ignored.
        let bpo = Host {
            proc_version: Some("... Debian 6.12.12-1~bpo12+1 (2025-02-23)".into()),
            ..host("6.12.12+bpo-amd64")
        };
        assert_eq!(known(&bpo.release), Version::new(6, 12, 12));
        let mismatched =
            Host { signature: Some("Ubuntu 6.8.0-31.31-generic 6.1.1".into()), ..host("6.8.0-31-generic") };
        assert!(matches!(base(&mismatched), Base::Unknown { .. }));
    }

    #[test]
    fn backporting_distributions_are_unknown_and_say_what_to_check() {
        for r in [
            "5.14.0-427.el9.x86_64",
            "4.18.0-553.5.1.el8_10.x86_64",
            "5.15.0-209.161.7.2.el9uek.x86_64",
            "5.14.21-150500.55.39-default",
        ] {
            let Base::Unknown { why } = base(&host(r)) else { panic!("{r}") };
            assert!(why.contains("backported") && why.contains("changelog"), "{r}: {why}");
        }
        assert!(matches!(base(&host("garbage")), Base::Unknown { .. }));
        assert!(matches!(base(&host("")), Base::Unknown { .. }));
    }

    #[test]
    fn duplicate_transmission_per_stable_line() {
        let cases = [
            ("5.4.290", "not_affected"),
            ("5.10.238", "not_affected"),
            ("5.15.185", "affected"),
            ("5.15.186", "fixed"),
            ("6.1.31", "not_affected"),
            ("6.1.32", "affected"),
            ("6.1.141", "affected"),
            ("6.1.142", "fixed"),
            ("6.2.16", "not_affected"),
            ("6.3.5", "not_affected"),
            ("6.3.13", "affected"),
            ("6.4.16", "affected"),
            ("6.6.93", "affected"),
            ("6.6.94", "fixed"),
            ("6.8.12", "affected"),
            ("6.11.11", "affected"),
            ("6.12.33", "affected"),
            ("6.12.34", "fixed"),
            ("6.13.12", "affected"),
            ("6.14.11", "affected"),
            ("6.15.2", "affected"),
            ("6.15.3", "fixed"),
            ("6.16", "fixed"),
            ("6.16-rc1", "unknown"),
            ("6.15-rc2", "affected"),
            ("6.18.44-fc-v1252", "fixed"),
            ("7.0.1", "fixed"),
        ];
        let releases: Vec<&str> = cases.iter().map(|c| c.0).collect();
        let want: Vec<&str> = cases.iter().map(|c| c.1).collect();
        assert_eq!(words("dup_tx", &releases), want);
        assert_eq!(
            defect("dup_tx").verdict(&base(&host("6.1.100"))),
            Verdict::Affected { fixed_in: Some(Version::new(6, 1, 142)), unverified_start: false }
        );
        assert_eq!(defect("dup_tx").fixed_releases(), "5.15.186, 6.1.142, 6.6.94, 6.12.34, 6.15.3, 6.16+");
    }

    #[test]
    fn copied_seq_and_fionread_per_stable_line() {
        let cases = [
            ("5.10.238", "not_affected"),
            ("5.15.180", "unknown"),
            ("6.1.129", "affected"),
            ("6.1.130", "fixed"),
            ("6.6.79", "affected"),
            ("6.6.80", "fixed"),
            ("6.12.16", "affected"),
            ("6.12.17", "fixed"),
            ("6.13.5", "unknown"),
            ("6.14", "fixed"),
        ];
        let releases: Vec<&str> = cases.iter().map(|c| c.0).collect();
        let want: Vec<&str> = cases.iter().map(|c| c.1).collect();
        assert_eq!(words("copied_seq", &releases), want);

        let cases = [
            ("6.1.150", "not_affected"),
            ("6.6.127", "not_affected"),
            ("6.6.128", "unknown"),
            ("6.12.74", "not_affected"),
            ("6.12.75", "unknown"),
            ("6.18.13", "not_affected"),
            ("6.18.14", "unknown"),
            ("6.18.44-fc-v1252", "unknown"),
            ("6.19.3", "not_affected"),
            ("6.19.4", "unknown"),
            ("7.0", "unknown"),
        ];
        let releases: Vec<&str> = cases.iter().map(|c| c.0).collect();
        let want: Vec<&str> = cases.iter().map(|c| c.1).collect();
        assert_eq!(words("fionread", &releases), want);
    }

    #[test]
    fn the_refusal_names_the_defect_the_fix_and_the_switch() {
        let a = assess(&host("6.1.100"));
        let r = a.refusal(false).expect("6.1.100 has dup_tx").to_string();
        for part in ["6.1.100", "dup_tx", "3b4f14b79428", "fixed in 6.1.142", "sockmap_allow_affected_kernel", "splice"]
        {
            assert!(r.contains(part), "{part:?} missing from: {r}");
        }
        let r = assess(&host("6.8.12")).refusal(false).unwrap().to_string();
        assert!(r.contains("the 6.8 line ended without it") && r.contains("6.16+"), "{r}");
        let r = assess(&host("5.15.100")).refusal(false).unwrap().to_string();
        assert!(r.contains("fixed in 5.15.186") && r.contains("not verified"), "{r}");
        // Nothing the engine meets on this machine's kernel, nor on a fixed one.
        for ok in ["6.18.44-fc-v1252", "6.12.34", "5.10.100", "6.1.142"] {
            assert_eq!(assess(&host(ok)).refusal(false), None, "{ok}");
        }
        // copied_seq is met only with the stream parser.
        let a = assess(&host("6.13.1"));
        assert_eq!(a.refusal(false).map(|r| r.id), Some("dup_tx"));
        let a = assess(&host("6.12.40"));
        assert_eq!(a.refusal(true), None);
        let a = assess(&host("6.6.85"));
        assert_eq!(a.refusal(true).map(|r| r.id), Some("dup_tx"));
        let a = Assessment {
            verdicts: DEFECTS
                .iter()
                .map(|d| {
                    (
                        d,
                        if d.id == "copied_seq" {
                            Verdict::Affected { fixed_in: None, unverified_start: false }
                        } else {
                            Verdict::Fixed
                        },
                    )
                })
                .collect(),
            ..assess(&host("6.18.44"))
        };
        assert_eq!((a.refusal(false), a.refusal(true).map(|r| r.id)), (None, Some("copied_seq")));
        // fionread is never a reason to refuse.
        assert_eq!(assess(&host("6.19.4")).refusal(true), None);
    }

    #[test]
    fn unknown_kernels_warn_with_what_to_check_and_are_not_refused() {
        let a = assess(&host("5.14.0-427.el9.x86_64"));
        assert_eq!(a.refusal(true), None);
        let w = a.unknowns(false);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("dup_tx") && w[0].contains("3b4f14b79428") && w[0].contains("changelog"), "{w:?}");
        assert_eq!(a.unknowns(true).len(), 2);
        assert!(assess(&host("6.18.44-fc-v1252")).unknowns(true).is_empty());
        let s = assess(&host("6.18.44-fc-v1252")).summary();
        assert_eq!(
            s,
            "kernel 6.18.44-fc-v1252: known sockmap defects: dup_tx fixed, copied_seq fixed, fionread unknown"
        );
    }
}
