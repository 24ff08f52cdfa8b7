//! The failed-login guard (`[route.guard]`): after `max_failures` denied NTLM logins within
//! `window` from one client address, or for one user name from anywhere, that address (or
//! that user) is blocked for `block_for`: new connections from the address are closed before
//! a backend connection is made, and a login carrying the user is closed before its
//! AUTHENTICATE message reaches the backend (so before the domain controller counts another
//! bad password towards the account's lockout).
//!
//! The client address is the one the connection stage knows: the PROXY header's source when
//! one was accepted. State lives as long as the route's name does, across reloads.
//!
//! Memory is bounded: each table holds at most [`MAX_ENTRIES`] keys; when full, expired
//! entries are dropped first, then the oldest, so a spray from many addresses cannot grow it
//! without bound (it can only make the guard forget the oldest).

use std::{
    collections::HashMap,
    hash::Hash,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

/// Most keys (addresses, or user names) one table keeps.
pub const MAX_ENTRIES: usize = 65_536;

/// The guard's settings (`[route.guard]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardSpec {
    /// Denied logins within `window` that block (≥ 1).
    pub max_failures: u32,
    /// The window failures are counted in (> 0).
    pub window: Duration,
    /// How long a block lasts (> 0).
    pub block_for: Duration,
}

/// What is blocked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blocked {
    /// The client's address.
    Address(IpAddr),
    /// A user name (`DOMAIN\user`, as the client wrote it).
    User(String),
}

impl Blocked {
    /// The metrics and log label: `address` or `user`.
    pub fn reason(&self) -> &'static str {
        match self {
            Blocked::Address(_) => "address",
            Blocked::User(_) => "user",
        }
    }
}

/// One key's failures.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Start of the current counting window.
    since: Instant,
    /// Failures in it.
    failures: u32,
    /// Blocked until then, if blocked.
    until: Option<Instant>,
}

/// Failures by key, bounded.
#[derive(Debug)]
struct Table<K> {
    entries: HashMap<K, Entry>,
}

impl<K: Hash + Eq + Clone> Table<K> {
    fn new() -> Self {
        Table { entries: HashMap::new() }
    }

    /// Whether `key` is blocked at `now`.
    fn blocked(&self, key: &K, now: Instant) -> bool {
        self.entries.get(key).and_then(|e| e.until).is_some_and(|u| now < u)
    }

    /// Counts a failure of `key` at `now`; true when it is blocked by this one.
    fn fail(&mut self, key: &K, now: Instant, spec: &GuardSpec) -> bool {
        if !self.entries.contains_key(key) && self.entries.len() >= MAX_ENTRIES {
            self.make_room(now, spec);
        }
        let e = self.entries.entry(key.clone()).or_insert(Entry { since: now, failures: 0, until: None });
        if e.until.is_some_and(|u| now < u) {
            // Already blocked: failures during the block do not extend it.
            return false;
        }
        if now.duration_since(e.since) >= spec.window || e.until.is_some() {
            *e = Entry { since: now, failures: 0, until: None };
        }
        e.failures += 1;
        if e.failures >= spec.max_failures.max(1) {
            e.until = Some(now + spec.block_for);
            return true;
        }
        false
    }

    /// Drops entries that no longer matter (window over and not blocked), then, if still
    /// full, the one with the oldest window.
    fn make_room(&mut self, now: Instant, spec: &GuardSpec) {
        self.entries.retain(|_, e| match e.until {
            Some(u) => now < u,
            None => now.duration_since(e.since) < spec.window,
        });
        if self.entries.len() >= MAX_ENTRIES
            && let Some(oldest) = self.entries.iter().min_by_key(|(_, e)| e.since).map(|(k, _)| k.clone())
        {
            self.entries.remove(&oldest);
        }
    }
}

/// The guard of one route.
#[derive(Debug)]
pub struct Guard {
    spec: Mutex<GuardSpec>,
    addresses: Mutex<Table<IpAddr>>,
    users: Mutex<Table<String>>,
}

impl Guard {
    /// A guard with nothing counted yet.
    pub fn new(spec: GuardSpec) -> Guard {
        Guard { spec: Mutex::new(spec), addresses: Mutex::new(Table::new()), users: Mutex::new(Table::new()) }
    }

    /// Takes the settings of a reloaded route; what was counted stays.
    pub fn set_spec(&self, spec: GuardSpec) {
        *lock(&self.spec) = spec;
    }

    /// Whether new connections from `client` are refused now.
    pub fn address_blocked(&self, client: IpAddr, now: Instant) -> Option<Blocked> {
        lock(&self.addresses).blocked(&client, now).then_some(Blocked::Address(client))
    }

    /// Whether a login as `user` (`DOMAIN\user`) is refused now.
    pub fn user_blocked(&self, user: &str, now: Instant) -> Option<Blocked> {
        let key = user_key(user);
        lock(&self.users).blocked(&key, now).then(|| Blocked::User(user.to_owned()))
    }

    /// Counts a denied login of `user` from `client`; returns what it blocked, if anything.
    pub fn denied(&self, client: IpAddr, user: Option<&str>, now: Instant) -> Vec<Blocked> {
        let spec = *lock(&self.spec);
        let mut out = Vec::new();
        if lock(&self.addresses).fail(&client, now, &spec) {
            out.push(Blocked::Address(client));
        }
        if let Some(u) = user.filter(|u| !u.is_empty())
            && lock(&self.users).fail(&user_key(u), now, &spec)
        {
            out.push(Blocked::User(u.to_owned()));
        }
        out
    }

    /// A login of `user` succeeded: its failures are forgotten unless it is blocked, as the
    /// directory resets an account's bad-password count on a good one. The address's count
    /// stays (one good account must not launder a spray from that address).
    pub fn succeeded(&self, user: &str, now: Instant) {
        let key = user_key(user);
        let mut users = lock(&self.users);
        if !users.blocked(&key, now) {
            users.entries.remove(&key);
        }
    }

    /// The settings now.
    pub fn spec(&self) -> GuardSpec {
        *lock(&self.spec)
    }
}

/// Windows user names are case-insensitive: `EXAMPLE\Alice` and `example\alice` are one
/// account.
fn user_key(user: &str) -> String {
    user.to_lowercase()
}

/// The guard's tables hold no invariant a panic could break half-way: a poisoned lock is
/// taken as it is.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> GuardSpec {
        GuardSpec { max_failures: 3, window: Duration::from_secs(60), block_for: Duration::from_secs(300) }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_good_login_forgets_the_users_failures_but_not_the_addresss() {
        let g = Guard::new(spec());
        let t0 = Instant::now();
        let a = ip("192.0.2.9");
        g.denied(a, Some("EX\\dave"), t0);
        g.denied(a, Some("EX\\dave"), t0);
        g.succeeded("ex\\DAVE", t0);
        // Two more for the user start from zero; the address reaches three.
        assert_eq!(g.denied(a, Some("EX\\dave"), t0), vec![Blocked::Address(a)]);
        assert!(g.denied(ip("192.0.2.10"), Some("EX\\dave"), t0).is_empty());
        assert_eq!(g.user_blocked("EX\\dave", t0), None);
        // A blocked user stays blocked after a good login.
        let b = ip("192.0.2.11");
        for _ in 0..3 {
            g.denied(b, Some("EX\\erin"), t0);
        }
        g.succeeded("EX\\erin", t0);
        assert!(g.user_blocked("EX\\erin", t0).is_some());
    }

    #[test]
    fn an_address_is_blocked_after_max_failures_in_the_window_and_freed_after_block_for() {
        let g = Guard::new(spec());
        let t0 = Instant::now();
        let a = ip("192.0.2.7");
        assert!(g.denied(a, Some("EX\\alice"), t0).is_empty());
        assert!(g.denied(a, Some("EX\\bob"), t0 + Duration::from_secs(10)).is_empty());
        assert_eq!(g.address_blocked(a, t0 + Duration::from_secs(11)), None);
        let b = g.denied(a, Some("EX\\carol"), t0 + Duration::from_secs(20));
        assert_eq!(b, vec![Blocked::Address(a)]);
        assert_eq!(g.address_blocked(a, t0 + Duration::from_secs(21)), Some(Blocked::Address(a)));
        // Another address is not affected.
        assert_eq!(g.address_blocked(ip("192.0.2.8"), t0 + Duration::from_secs(21)), None);
        // The block ends.
        assert_eq!(g.address_blocked(a, t0 + Duration::from_secs(321)), None);
    }

    #[test]
    fn failures_outside_the_window_start_over() {
        let g = Guard::new(spec());
        let t0 = Instant::now();
        let a = ip("2001:db8::7");
        g.denied(a, None, t0);
        g.denied(a, None, t0 + Duration::from_secs(30));
        // The window (60 s from the first failure) is over: this one starts a new count.
        assert!(g.denied(a, None, t0 + Duration::from_secs(61)).is_empty());
        assert!(g.denied(a, None, t0 + Duration::from_secs(62)).is_empty());
        assert_eq!(g.denied(a, None, t0 + Duration::from_secs(63)), vec![Blocked::Address(a)]);
    }

    #[test]
    fn a_user_is_blocked_whatever_the_address_and_case() {
        let g = Guard::new(spec());
        let t0 = Instant::now();
        g.denied(ip("192.0.2.1"), Some("EXAMPLE\\Alice"), t0);
        g.denied(ip("192.0.2.2"), Some("example\\alice"), t0);
        let b = g.denied(ip("192.0.2.3"), Some("EXAMPLE\\ALICE"), t0);
        assert_eq!(b, vec![Blocked::User("EXAMPLE\\ALICE".into())]);
        assert!(g.user_blocked("Example\\Alice", t0).is_some());
        assert!(g.user_blocked("EXAMPLE\\bob", t0).is_none());
        // No address reached three failures.
        assert!(g.address_blocked(ip("192.0.2.1"), t0).is_none());
    }

    #[test]
    fn the_tables_stay_bounded() {
        let g = Guard::new(GuardSpec { max_failures: 2, ..spec() });
        let t0 = Instant::now();
        for i in 0..(MAX_ENTRIES as u32 + 100) {
            let a = IpAddr::from(i.to_be_bytes());
            g.denied(a, None, t0 + Duration::from_micros(u64::from(i)));
        }
        assert!(lock(&g.addresses).entries.len() <= MAX_ENTRIES);
        // A blocked address survives the pressure of single failures from many others.
        let blocked = ip("198.51.100.1");
        g.denied(blocked, None, t0);
        g.denied(blocked, None, t0);
        for i in 0..1000u32 {
            g.denied(IpAddr::from((i + 1_000_000).to_be_bytes()), None, t0 + Duration::from_secs(61));
        }
        assert!(g.address_blocked(blocked, t0 + Duration::from_secs(62)).is_some());
    }
}
