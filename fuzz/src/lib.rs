//! Fuzzing of the parsers of outside input for a bounded time, on the stable toolchain.
//!
//! A fuzz target is one parser's set of properties: each a proptest strategy that makes inputs
//! and a check that must hold for every one of them (no panic, bounded output, round trips).
//! They are the strategies and checks of the parser's own property tests, which run a fixed
//! number of cases in every `cargo test`; a [`Target`] instead runs fresh cases, taking the
//! properties in turn, until its time budget ([`SECS_VAR`], default [`DEFAULT_SECS`] seconds)
//! is spent. The targets are `#[ignore]`d tests named `fuzz_*`, which `cargo xtask test` runs
//! in release mode after the unit tests.
//!
//! There is no coverage feedback (that would take libFuzzer or AFL and a nightly toolchain):
//! reaching deep into a parser is left to the strategies, which build valid inputs, and to
//! [`havoc`], which damages them the way coverage-guided fuzzers do (bit flips, boundary
//! values in length fields, inserted, deleted and repeated runs).
//!
//! A failing case is shrunk, then reported with its input in hex, its seed and its number in
//! the run; the same seed ([`SEED_VAR`]) makes the same cases. A case that runs longer than
//! [`HANG_LIMIT`] ends the process with its seed and number; [`SHOW_VAR`] then prints that
//! case's input before running it.

pub mod havoc;
pub mod leak;

use std::{
    cell::RefCell,
    collections::hash_map::RandomState,
    fmt,
    hash::BuildHasher,
    panic,
    sync::{
        Once,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime},
};

pub use havoc::{havoc, with_cut};
use proptest::{
    strategy::{Strategy, ValueTree},
    test_runner::{Config, RngAlgorithm, TestCaseResult, TestError, TestRng, TestRunner},
};

/// The environment variable giving each target's time budget in whole seconds (0 skips).
pub const SECS_VAR: &str = "NTLM_SPLICE_FUZZ_SECS";

/// Each target's time budget when [`SECS_VAR`] is not set: with seven targets, under six
/// minutes of CI time in all.
pub const DEFAULT_SECS: u64 = 45;

/// The environment variable fixing the seed of a run (hex with `0x`, or decimal); otherwise
/// every run takes a new one and prints it.
pub const SEED_VAR: &str = "NTLM_SPLICE_FUZZ_SEED";

/// The environment variable naming a case number whose input is printed before it runs: the
/// way to see the input of a case that hung or crashed the process, with [`SEED_VAR`].
pub const SHOW_VAR: &str = "NTLM_SPLICE_FUZZ_SHOW";

/// The longest one call of a check may take before the run is ended as hung. Every check is a
/// parse of at most a few KiB, which takes microseconds, or milliseconds in a debug build.
pub const HANG_LIMIT: Duration = Duration::from_secs(10);

/// How often the hang watchdog looks.
const WATCH_EVERY: Duration = Duration::from_millis(200);

/// The longest the shrinking of a failing case may take; then the smallest failing case found
/// so far is reported.
const SHRINK_TIME: Duration = Duration::from_secs(30);

/// One parser's fuzz target: a name and its properties.
pub struct Target {
    name: &'static str,
    properties: Vec<Box<dyn Property>>,
}

/// What one run of a target did.
#[derive(Debug)]
pub struct Summary {
    /// The target's name.
    pub target: &'static str,
    /// The seed of the run.
    pub seed: u64,
    /// How long it ran.
    pub elapsed: Duration,
    /// Each property's name and how many cases it passed.
    pub cases: Vec<(&'static str, u64)>,
}

/// A case that failed a check, shrunk.
#[derive(Debug)]
pub struct Failure {
    /// The target's name.
    pub target: &'static str,
    /// The property whose check failed.
    pub property: &'static str,
    /// The seed of the run.
    pub seed: u64,
    /// The number of the case in the run, from 0.
    pub case: u64,
    /// What the check said, or the panic's message and place.
    pub reason: String,
    /// The bytes the parser was given.
    pub input: Vec<u8>,
    /// The generated value, as `Debug` prints it.
    pub value: String,
}

impl Target {
    /// A target with no properties yet.
    pub fn new(name: &'static str) -> Self {
        Self { name, properties: Vec::new() }
    }

    /// Adds a property: `strategy` makes cases, `input` gives the bytes a case hands the parser
    /// (what a failure reports in hex), `check` must pass for every case.
    pub fn property<S, I, C>(mut self, name: &'static str, strategy: S, input: I, check: C) -> Self
    where
        S: Strategy + 'static,
        I: Fn(&S::Value) -> Vec<u8> + 'static,
        C: Fn(S::Value) -> TestCaseResult + 'static,
    {
        self.properties.push(Box::new(Prop { name, strategy, input, check }));
        self
    }

    /// Runs the target for the budget of [`SECS_VAR`] with the seed of [`SEED_VAR`] (or a new
    /// one), prints what it did, and panics with the report of a failing case.
    pub fn run(self) {
        let secs = secs_from_env();
        if secs == 0 {
            println!("fuzz {}: skipped ({SECS_VAR}=0)", self.name);
            return;
        }
        let seed = seed_from_env().unwrap_or_else(new_seed);
        println!("fuzz {}: {secs} s ({SECS_VAR}), seed {seed:#018x} ({SEED_VAR} replays it)", self.name);
        match self.run_for(Duration::from_secs(secs), seed) {
            Ok(summary) => println!("{summary}"),
            Err(failure) => panic!("{failure}"),
        }
    }

    /// Runs fresh cases, the properties in turn, until `budget` is spent or a check fails.
    ///
    /// # Errors
    ///
    /// The first failing case, shrunk.
    pub fn run_for(&self, budget: Duration, seed: u64) -> Result<Summary, Failure> {
        assert!(!self.properties.is_empty(), "fuzz target {} has no property", self.name);
        let config = Config {
            failure_persistence: None,
            max_shrink_time: u32::try_from(SHRINK_TIME.as_millis()).expect("shrink time fits u32"),
            // u32::MAX would mean four times `cases`, which means nothing here: time bounds it.
            max_shrink_iters: u32::MAX - 1,
            // Strategies that filter are fine however often they filter: time bounds the run.
            max_global_rejects: u32::MAX,
            max_local_rejects: u32::MAX,
            ..Config::default()
        };
        let mut runner = TestRunner::new_with_rng(config, rng(seed));
        let show = show_from_env();
        let watch = Watch::default();
        let mut passed = vec![0u64; self.properties.len()];
        let start = Instant::now();
        let outcome = with_quiet_panics(|last_panic| {
            thread::scope(|scope| {
                let watchdog = scope.spawn(|| watch.guard(self.name, seed));
                let mut case = 0u64;
                let outcome = loop {
                    if start.elapsed() >= budget {
                        break Ok(());
                    }
                    let which = usize::try_from(case % self.properties.len() as u64).expect("index fits usize");
                    let property = &self.properties[which];
                    watch.case.store(case, Ordering::Relaxed);
                    if let Err(found) = property.run_case(&mut runner, show == Some(case), &watch.calls) {
                        let reason = match last_panic() {
                            Some(place) => format!("{} (panicked at {place})", found.reason),
                            None => found.reason,
                        };
                        break Err(Failure {
                            target: self.name,
                            property: property.name(),
                            seed,
                            case,
                            reason,
                            input: found.input,
                            value: found.value,
                        });
                    }
                    passed[which] += 1;
                    case += 1;
                };
                watch.done.store(true, Ordering::Relaxed);
                watchdog.thread().unpark();
                outcome
            })
        });
        outcome.map(|()| Summary {
            target: self.name,
            seed,
            elapsed: start.elapsed(),
            cases: self.properties.iter().map(|p| p.name()).zip(passed).collect(),
        })
    }
}

/// A shrunk failing case, before the target adds where it was found.
struct Found {
    reason: String,
    input: Vec<u8>,
    value: String,
}

/// A property with its types erased, so that one target holds several.
trait Property {
    fn name(&self) -> &'static str;

    /// Makes one case and checks it, shrinking it if it fails. `calls` counts check calls for
    /// the hang watchdog; `show` prints the case's input first.
    fn run_case(&self, runner: &mut TestRunner, show: bool, calls: &AtomicU64) -> Result<(), Found>;
}

struct Prop<S, I, C> {
    name: &'static str,
    strategy: S,
    input: I,
    check: C,
}

impl<S, I, C> Property for Prop<S, I, C>
where
    S: Strategy,
    I: Fn(&S::Value) -> Vec<u8>,
    C: Fn(S::Value) -> TestCaseResult,
{
    fn name(&self) -> &'static str {
        self.name
    }

    fn run_case(&self, runner: &mut TestRunner, show: bool, calls: &AtomicU64) -> Result<(), Found> {
        let tree = self.strategy.new_tree(runner).map_err(|why| Found {
            reason: format!("the strategy made no case: {why}"),
            input: Vec::new(),
            value: String::new(),
        })?;
        if show {
            let value = tree.current();
            println!("{}", Shown { input: &(self.input)(&value), value: &format!("{value:?}") });
        }
        let check = |value| {
            calls.fetch_add(1, Ordering::Relaxed);
            (self.check)(value)
        };
        match runner.run_one(tree, check) {
            Ok(_) => Ok(()),
            Err(TestError::Fail(why, value)) => {
                Err(Found { reason: why.to_string(), input: (self.input)(&value), value: format!("{value:?}") })
            }
            Err(TestError::Abort(why)) => {
                Err(Found { reason: format!("proptest gave up: {why}"), input: Vec::new(), value: String::new() })
            }
        }
    }
}

/// What the hang watchdog watches.
#[derive(Default)]
struct Watch {
    /// Check calls started so far.
    calls: AtomicU64,
    /// The number of the case being run.
    case: AtomicU64,
    /// Set when the run is over.
    done: AtomicBool,
}

impl Watch {
    /// Ends the process when no new check call starts for [`HANG_LIMIT`]: a hung parser would
    /// otherwise hold CI until its own time limit, without saying which input did it.
    fn guard(&self, target: &str, seed: u64) {
        let mut seen = (self.calls.load(Ordering::Relaxed), Instant::now());
        while !self.done.load(Ordering::Relaxed) {
            thread::park_timeout(WATCH_EVERY);
            let calls = self.calls.load(Ordering::Relaxed);
            if calls != seen.0 {
                seen = (calls, Instant::now());
            } else if seen.1.elapsed() > HANG_LIMIT && !self.done.load(Ordering::Relaxed) {
                let case = self.case.load(Ordering::Relaxed);
                eprintln!(
                    "fuzz {target}: case {case} has run for over {} s: a hang. Rerun with {SEED_VAR}={seed:#x} \
                     {SHOW_VAR}={case} to print its input",
                    HANG_LIMIT.as_secs()
                );
                std::process::exit(101);
            }
        }
    }
}

thread_local! {
    /// Where the panics of a thread running [`with_quiet_panics`] are recorded; `None` on the
    /// other threads, whose panics are printed as usual.
    static LAST_PANIC: RefCell<Option<Option<String>>> = const { RefCell::new(None) };
}

/// Runs `body` with the panics on this thread recorded (the place of the last one, for the
/// report) instead of printed: a failing case panics again at every step of its shrinking.
/// `body` gets a function that takes the record.
fn with_quiet_panics<R>(body: impl FnOnce(&dyn Fn() -> Option<String>) -> R) -> R {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            let quiet = LAST_PANIC.with_borrow_mut(|last| match last {
                Some(place) => {
                    *place = Some(info.location().map_or_else(|| "an unknown place".to_owned(), ToString::to_string));
                    true
                }
                None => false,
            });
            if !quiet {
                previous(info);
            }
        }));
    });
    LAST_PANIC.set(Some(None));
    let take = || LAST_PANIC.with_borrow_mut(|last| last.as_mut().and_then(Option::take));
    let result = body(&take);
    LAST_PANIC.set(None);
    result
}

/// The generator for `seed`: ChaCha, keyed by the seed spread over its 32 bytes.
fn rng(seed: u64) -> TestRng {
    let mut key = [0u8; 32];
    for (i, chunk) in key.chunks_exact_mut(8).enumerate() {
        let word = seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    TestRng::from_seed(RngAlgorithm::ChaCha, &key)
}

/// A seed nobody chose: the process's random hash keys mixed with the time.
fn new_seed() -> u64 {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    RandomState::new().hash_one(now)
}

fn secs_from_env() -> u64 {
    match std::env::var(SECS_VAR) {
        Err(_) => DEFAULT_SECS,
        Ok(text) => text.trim().parse().unwrap_or_else(|_| {
            panic!("{SECS_VAR}={text:?} is not a whole number of seconds: set it to, say, {DEFAULT_SECS}, or 0 to skip")
        }),
    }
}

fn seed_from_env() -> Option<u64> {
    let text = std::env::var(SEED_VAR).ok()?;
    let text = text.trim();
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    Some(parsed.unwrap_or_else(|_| {
        panic!("{SEED_VAR}={text:?} is not a seed: give the one a run printed, like 0x1f2e3d4c5b6a7988")
    }))
}

fn show_from_env() -> Option<u64> {
    let text = std::env::var(SHOW_VAR).ok()?;
    Some(text.trim().parse().unwrap_or_else(|_| panic!("{SHOW_VAR}={text:?} is not a case number")))
}

/// `bytes` as lowercase hex, no separators.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A case's input and value, as a report shows them.
struct Shown<'a> {
    input: &'a [u8],
    value: &'a str,
}

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "input ({} bytes), hex: {}", self.input.len(), hex(self.input))?;
        writeln!(f, "input as text: \"{}\"", self.input.escape_ascii())?;
        write!(f, "case as generated: {}", self.value)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "fuzz {}: property \"{}\" failed at case {} of seed {:#018x} ({SEED_VAR}={:#x} replays the run)",
            self.target, self.property, self.case, self.seed, self.seed
        )?;
        writeln!(f, "why: {}", self.reason)?;
        write!(f, "{}", Shown { input: &self.input, value: &self.value })
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total: u64 = self.cases.iter().map(|(_, n)| n).sum();
        write!(
            f,
            "fuzz {}: {total} cases passed in {:.1} s (seed {:#018x}):",
            self.target,
            self.elapsed.as_secs_f64(),
            self.seed
        )?;
        for (i, (name, n)) in self.cases.iter().enumerate() {
            write!(f, "{} {name} {n}", if i == 0 { "" } else { "," })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A message whose 32-bit little-endian length field at offset 8 must stay below 2^31.
    const MESSAGE: &[u8] = b"HEADER\0\0\x10\0\0\0payload.";

    /// The planted bug: a "parser" that panics on a length field with its top bit set.
    fn planted(bytes: &[u8]) -> TestCaseResult {
        if let Some(field) = bytes.get(8..12) {
            let len = u32::from_le_bytes(field.try_into().expect("4 bytes"));
            assert!(len < 1 << 31, "length {len:#x} overflows");
        }
        Ok(())
    }

    fn buggy_target() -> Target {
        Target::new("planted").property("havoc", havoc(Just(MESSAGE.to_vec())), Clone::clone, |b| planted(&b))
    }

    #[test]
    fn finds_a_planted_panic_reports_its_input_and_replays_it() {
        let failure = buggy_target().run_for(Duration::from_secs(20), 7).expect_err("the planted bug is found");
        assert_eq!((failure.target, failure.property, failure.seed), ("planted", "havoc", 7));
        let field = failure.input.get(8..12).expect("the failing input keeps the field");
        assert!(field[3] >= 0x80, "{failure}");
        assert!(failure.reason.contains("overflows") && failure.reason.contains("lib.rs"), "{failure}");
        let report = failure.to_string();
        assert!(report.contains(&hex(&failure.input)) && report.contains("0x7"), "{report}");

        let again = buggy_target().run_for(Duration::from_secs(20), 7).expect_err("the same seed finds it again");
        assert_eq!((again.case, again.input), (failure.case, failure.input), "the seed replays the run");
    }

    #[test]
    fn a_passing_target_runs_out_its_budget_taking_properties_in_turn() {
        let budget = Duration::from_millis(300);
        let summary = Target::new("clean")
            .property("bytes", prop::collection::vec(any::<u8>(), 0..32), Clone::clone, |_| Ok(()))
            .property("havoc", havoc(Just(MESSAGE.to_vec())), Clone::clone, |_| Ok(()))
            .run_for(budget, 1)
            .expect("nothing to find");
        assert!(summary.elapsed >= budget, "{summary}");
        let [(_, a), (_, b)] = summary.cases[..] else { panic!("two properties: {summary}") };
        assert!(a > 0 && a.abs_diff(b) <= 1, "{summary}");
    }

    #[test]
    fn a_failing_check_is_reported_without_a_panic() {
        let failure = Target::new("check")
            .property("bytes", prop::collection::vec(any::<u8>(), 0..64), Clone::clone, |b| {
                prop_assert!(!b.contains(&0xff), "a 0xff byte");
                Ok(())
            })
            .run_for(Duration::from_secs(20), 3)
            .expect_err("0xff bytes are common");
        assert_eq!(failure.input, [0xff], "shrunk to the smallest failing input");
        assert!(failure.reason.contains("a 0xff byte") && !failure.reason.contains("panicked"), "{failure}");
    }
}
