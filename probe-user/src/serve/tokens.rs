//! API tokens: their argon2 hashes, checking a token against an
//! authority's, and slowing down a client that keeps failing. The HTTP API
//! (a bearer token per request) and the web console (a token at sign-in)
//! share them.
use std::{
    collections::HashMap as StdHashMap,
    net::IpAddr,
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use anyhow::Result;
use argon2::{Argon2, PasswordHash, PasswordHasher as _, PasswordVerifier as _, password_hash::SaltString};

use crate::{config::Config, serve::refusals::claimed};

/// The salted argon2 hash of a token, for an authority's `token_hash`.
pub fn hash_token(token: &str) -> Result<String> {
    if token.is_empty() {
        anyhow::bail!("the token is empty: give the token on standard input");
    }
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| anyhow::anyhow!("no randomness for a salt"))?;
    let salt = SaltString::encode_b64(&bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Argon2::default().hash_password(token.as_bytes(), &salt).map_err(|e| anyhow::anyhow!("{e}"))?.to_string())
}

/// Whether `token` is authority `name`'s: `Ok(name)`, or why not. One argon2
/// check whatever the number of authorities; an unknown name is checked
/// against a stand-in hash, so that it takes as long as a wrong token.
pub fn check(
    config: &Config,
    name: &str,
    token: &str,
    mut verify: impl FnMut(&str, &PasswordHash) -> bool,
) -> Result<String, String> {
    let configured = config.authority(name).and_then(|authority| authority.token_hash.as_deref());
    let hash = configured.and_then(|hash| PasswordHash::new(hash).ok());
    let verified = match &hash {
        Some(hash) => verify(token, hash),
        None => {
            if let Ok(stand_in) = PasswordHash::new(stand_in_hash()) {
                verify(token, &stand_in);
            }
            false
        }
    };
    if verified { Ok(name.to_string()) } else { Err(format!("no valid token for authority {:?}", claimed(name))) }
}

/// [`check`] with argon2.
pub fn verify(config: &Config, name: &str, token: &str) -> Result<String, String> {
    check(config, name, token, |token, hash| Argon2::default().verify_password(token.as_bytes(), hash).is_ok())
}

/// A hash no token matches, for names without one.
fn stand_in_hash() -> &'static str {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| hash_token("no authority has this token").unwrap_or_default())
}

/// Token checks: at most a few at once (each costs argon2's 19 MiB and a
/// core), and a slowdown for whoever keeps failing.
pub struct Gate {
    checks: Arc<Semaphore>,
    failures: Failures,
}

impl Gate {
    pub fn new(max_checks: usize) -> Self {
        Self { checks: Arc::new(Semaphore::new(max_checks)), failures: Failures::default() }
    }

    /// Takes a place to check a token, and waits out the slowdown earned by
    /// `client` and by the authority `name`. `None` when every place is
    /// taken as the request arrives: the caller answers 503 at once. The
    /// attempt counts as a failure from now (so parallel guesses see each
    /// other's) until [`Attempt::succeeded`]. The wait is decided once the
    /// place is taken, but waited without it, so that a guesser being
    /// slowed down never keeps others from signing in.
    pub async fn enter(&self, client: IpAddr, name: &str) -> Option<Attempt<'_>> {
        let mut place = self.checks.clone().try_acquire_owned().ok()?;
        let keys = Key::both(client, name);
        // Counted from here: a guess given up during its wait stays counted.
        let delay = self.failures.begin(&keys);
        if !delay.is_zero() {
            drop(place);
            tokio::time::sleep(delay).await;
            // The semaphore is never closed; the wait here is for the few
            // checks ahead, each well under a second.
            place = self.checks.clone().acquire_owned().await.ok()?;
        }
        Some(Attempt { failures: &self.failures, keys, _place: place, passed: false })
    }
}

/// One token check, counted as failed unless it is said to have passed.
pub struct Attempt<'a> {
    failures: &'a Failures,
    keys: [Key; 2],
    /// The place to check in, held until the attempt ends.
    _place: OwnedSemaphorePermit,
    passed: bool,
}

impl Attempt<'_> {
    /// The token was right: this attempt is not counted (earlier failures
    /// stay counted: one good guess does not buy more).
    pub fn succeeded(mut self) {
        self.passed = true;
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if self.passed {
            self.failures.forgive(&self.keys);
        }
    }
}

/// Whom failures are counted against.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Address(IpAddr),
    /// The authority a guess named (its first bytes: memory stays bounded).
    Authority(String),
}

/// The bytes of an authority's name that count as its key.
const MAX_NAME_KEY: usize = 128;

impl Key {
    fn both(client: IpAddr, name: &str) -> [Key; 2] {
        let mut end = name.len().min(MAX_NAME_KEY);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        [Key::Address(client), Key::Authority(name[..end].to_string())]
    }
}

/// Failed token checks per client address and per authority name: after a
/// few, each check waits, longer each time, so that tokens cannot be
/// guessed at speed, from one address or from many. An attempt counts from
/// when it starts (so parallel guesses see each other); forgotten after a
/// quiet spell.
#[derive(Default)]
struct Failures(Mutex<StdHashMap<Key, (u32, Instant)>>);

/// Failures allowed before answers slow down.
const FREE_FAILURES: u32 = 3;
/// The first wait, doubled at each further failure, up to `MAX_FAILURE_DELAY`.
const FIRST_FAILURE_DELAY: Duration = Duration::from_millis(250);
const MAX_FAILURE_DELAY: Duration = Duration::from_secs(8);
/// A key quiet this long starts afresh.
const FAILURE_MEMORY: Duration = Duration::from_secs(15 * 60);
/// Keys remembered at most (the oldest are forgotten first).
const MAX_FAILING_KEYS: usize = 10_000;

impl Failures {
    fn lock(&self) -> std::sync::MutexGuard<'_, StdHashMap<Key, (u32, Instant)>> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The wait `keys` have earned, before this attempt; counts it.
    fn begin(&self, keys: &[Key]) -> Duration {
        let mut map = self.lock();
        let mut delay = Duration::ZERO;
        for key in keys {
            if map.len() >= MAX_FAILING_KEYS && !map.contains_key(key) {
                map.retain(|_, (_, last)| last.elapsed() < FAILURE_MEMORY);
                if map.len() >= MAX_FAILING_KEYS
                    && let Some(oldest) = map.iter().min_by_key(|(_, (_, last))| *last).map(|(key, _)| key.clone())
                {
                    map.remove(&oldest);
                }
            }
            let entry = map.entry(key.clone()).or_insert((0, Instant::now()));
            if entry.1.elapsed() >= FAILURE_MEMORY {
                entry.0 = 0;
            }
            if entry.0 >= FREE_FAILURES {
                let doublings = (entry.0 - FREE_FAILURES).min(16);
                delay = delay.max((FIRST_FAILURE_DELAY * 2u32.pow(doublings)).min(MAX_FAILURE_DELAY));
            }
            *entry = (entry.0.saturating_add(1), Instant::now());
        }
        delay
    }

    /// Takes back one attempt's count.
    fn forgive(&self, keys: &[Key]) {
        let mut map = self.lock();
        for key in keys {
            if let Some(entry) = map.get_mut(key) {
                entry.0 = entry.0.saturating_sub(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_counted_per_address_and_per_name_and_a_success_resets_neither() {
        let failures = Failures::default();
        let (client, other): (IpAddr, IpAddr) = ("192.0.2.7".parse().unwrap(), "192.0.2.8".parse().unwrap());
        for _ in 0..FREE_FAILURES {
            assert_eq!(failures.begin(&Key::both(client, "met")), Duration::ZERO);
        }
        assert_eq!(failures.begin(&Key::both(client, "met")), FIRST_FAILURE_DELAY);
        assert_eq!(failures.begin(&Key::both(client, "nca")), FIRST_FAILURE_DELAY * 2, "per address");
        assert_eq!(failures.begin(&Key::both(other, "met")), FIRST_FAILURE_DELAY * 2, "per name");
        assert_eq!(failures.begin(&Key::both(other, "nca")), Duration::ZERO, "neither");
        // A success takes back its own count, not the earlier ones.
        let keys = Key::both(client, "met");
        let before = failures.begin(&keys);
        failures.forgive(&keys);
        assert_eq!(failures.begin(&keys), before);
        for _ in 0..40 {
            failures.begin(&keys);
        }
        assert_eq!(failures.begin(&keys), MAX_FAILURE_DELAY);
        let long = "x".repeat(1 << 20);
        assert!(
            matches!(&Key::both(client, &long)[1], Key::Authority(name) if name.len() == MAX_NAME_KEY),
            "a bounded key"
        );
    }
}
