//! API tokens: their argon2 hashes, checking a token against an
//! authority's, and slowing down a client that keeps failing. The HTTP API
//! (a bearer token per request) and the web console (a token at sign-in)
//! share them.
use std::{
    collections::HashMap as StdHashMap,
    net::IpAddr,
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

use anyhow::Result;
use argon2::{Argon2, PasswordHash, PasswordHasher as _, PasswordVerifier as _, password_hash::SaltString};

use crate::config::Config;

/// The salted argon2 hash of a token, for an authority's `token_hash`.
pub fn hash_token(token: &str) -> Result<String> {
    if token.is_empty() {
        anyhow::bail!("the token is empty: give the token on standard input");
    }
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).map_err(|_| anyhow::anyhow!("no randomness for a salt"))?;
    let salt = SaltString::encode_b64(&bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Argon2::default().hash_password(token.as_bytes(), &salt).map_err(|e| anyhow::anyhow!("{e}"))?.to_string())
}

/// Whether `token` is authority `name`'s: `Ok(name)`, or why not. One argon2
/// check whatever the number of authorities; an unknown name is checked
/// against a stand-in hash, so that it takes as long as a wrong token.
pub fn check(config: &Config, name: &str, token: &str, mut verify: impl FnMut(&str, &PasswordHash) -> bool) -> Result<String, String> {
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
    if verified { Ok(name.to_string()) } else { Err(format!("no valid token for authority {name:?}")) }
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

/// Failed authentications per client address: after a few, each answer to
/// that address waits, longer each time, so that tokens cannot be guessed at
/// speed. Forgotten after a quiet spell, and on success.
#[derive(Default)]
pub struct Failures(Mutex<StdHashMap<IpAddr, (u32, Instant)>>);

/// Failures allowed before answers slow down.
const FREE_FAILURES: u32 = 3;
/// The first wait, doubled at each further failure, up to `MAX_FAILURE_DELAY`.
const FIRST_FAILURE_DELAY: Duration = Duration::from_millis(250);
const MAX_FAILURE_DELAY: Duration = Duration::from_secs(8);
/// A client quiet this long starts afresh.
const FAILURE_MEMORY: Duration = Duration::from_secs(15 * 60);
/// Addresses remembered at most (the oldest are forgotten first).
const MAX_FAILING_CLIENTS: usize = 10_000;

impl Failures {
    pub fn delay(&self, client: IpAddr) -> Duration {
        let map = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match map.get(&client) {
            Some(&(count, last)) if count >= FREE_FAILURES && last.elapsed() < FAILURE_MEMORY => {
                let doublings = (count - FREE_FAILURES).min(16);
                (FIRST_FAILURE_DELAY * 2u32.pow(doublings)).min(MAX_FAILURE_DELAY)
            }
            _ => Duration::ZERO,
        }
    }

    pub fn failed(&self, client: IpAddr) {
        let mut map = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if map.len() >= MAX_FAILING_CLIENTS && !map.contains_key(&client) {
            map.retain(|_, (_, last)| last.elapsed() < FAILURE_MEMORY);
            if map.len() >= MAX_FAILING_CLIENTS
                && let Some(oldest) = map.iter().min_by_key(|(_, (_, last))| *last).map(|(ip, _)| *ip)
            {
                map.remove(&oldest);
            }
        }
        let entry = map.entry(client).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= FAILURE_MEMORY {
            entry.0 = 0;
        }
        *entry = (entry.0.saturating_add(1), Instant::now());
    }

    pub fn succeeded(&self, client: IpAddr) {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&client);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_failures_from_one_address_are_slowed_and_forgotten_on_success() {
        let failures = Failures::default();
        let (client, other): (IpAddr, IpAddr) = ("192.0.2.7".parse().unwrap(), "192.0.2.8".parse().unwrap());
        for _ in 0..FREE_FAILURES {
            assert_eq!(failures.delay(client), Duration::ZERO);
            failures.failed(client);
        }
        assert_eq!(failures.delay(client), FIRST_FAILURE_DELAY);
        failures.failed(client);
        assert_eq!(failures.delay(client), FIRST_FAILURE_DELAY * 2);
        for _ in 0..40 {
            failures.failed(client);
        }
        assert_eq!(failures.delay(client), MAX_FAILURE_DELAY);
        assert_eq!(failures.delay(other), Duration::ZERO, "per address");
        failures.succeeded(client);
        assert_eq!(failures.delay(client), Duration::ZERO);
    }
}
