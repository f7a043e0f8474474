//! Refusals of requests that never authenticated (no token, a wrong one)
//! are audited, but an unauthenticated client must not be able to grow the
//! audit log at will: each entry keeps a bounded prefix of what the request
//! claimed, and past a few refusals from one address in a window the rest
//! are counted and written as one summary entry when the window is over.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
    sync::Mutex,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};

/// Characters of a claimed name an audit entry keeps.
const CLAIMED_CHARS: usize = 64;
/// How long a window of refusals per address lasts.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Refusals from one address written one by one in a window.
const WRITTEN_PER_WINDOW: u32 = 5;
/// Refusals written one by one in a window, from all addresses together
/// (many addresses, e.g. an IPv6 network's, are one flood too).
const WRITTEN_IN_ALL: u32 = 50;
/// Addresses followed at most; past it, new addresses share one count.
const MAX_ADDRESSES: usize = 10_000;
/// Where refusals from addresses past [`MAX_ADDRESSES`] are counted.
const OVERFLOW: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);

/// What a refused request claimed (an authority's name), at a bounded size.
pub fn claimed(text: &str) -> String {
    let chars = text.chars().count();
    if chars <= CLAIMED_CHARS {
        return text.to_string();
    }
    format!("{}... ({} bytes)", text.chars().take(CLAIMED_CHARS).collect::<String>(), text.len())
}

/// Refusals not written one by one, to be audited as one entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    /// The address (`::` for addresses past the ones followed).
    pub client: IpAddr,
    pub refused: u64,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

struct Window {
    started: Instant,
    written: u32,
    unwritten: u64,
    first_unwritten: DateTime<Utc>,
    last_unwritten: DateTime<Utc>,
}

/// Refusals per address in the current window, and how many were written
/// in all since `all_since`.
#[derive(Default)]
struct State {
    windows: HashMap<IpAddr, Window>,
    all_since: Option<Instant>,
    written_in_all: u32,
}

/// Refusals per address in the current window.
#[derive(Default)]
pub struct Refusals(Mutex<State>);

impl Refusals {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether a refusal from `client` is audited on its own; if not, it is
    /// counted for its window's summary.
    pub fn admit(&self, client: IpAddr) -> bool {
        let mut state = self.lock();
        if state.all_since.is_none_or(|since| since.elapsed() >= WINDOW) {
            (state.all_since, state.written_in_all) = (Some(Instant::now()), 0);
        }
        let crowded = state.written_in_all >= WRITTEN_IN_ALL;
        let windows = &mut state.windows;
        let key = if crowded || (windows.len() >= MAX_ADDRESSES && !windows.contains_key(&client)) {
            OVERFLOW
        } else {
            client
        };
        let now = Utc::now();
        let window = windows.entry(key).or_insert_with(|| Window {
            started: Instant::now(),
            written: 0,
            unwritten: 0,
            first_unwritten: now,
            last_unwritten: now,
        });
        if key != OVERFLOW && window.written < WRITTEN_PER_WINDOW {
            window.written += 1;
            state.written_in_all += 1;
            return true;
        }
        if window.unwritten == 0 {
            window.first_unwritten = now;
        }
        window.unwritten += 1;
        window.last_unwritten = now;
        false
    }

    /// The summaries of windows that are over (all of them when `all`),
    /// taken out; windows over with nothing unwritten are forgotten.
    pub fn due(&self, all: bool) -> Vec<Summary> {
        let mut state = self.lock();
        let mut due = Vec::new();
        state.windows.retain(|client, window| {
            if !all && window.started.elapsed() < WINDOW {
                return true;
            }
            if window.unwritten > 0 {
                due.push(Summary {
                    client: *client,
                    refused: window.unwritten,
                    from: window.first_unwritten,
                    to: window.last_unwritten,
                });
            }
            false
        });
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_from_one_address_is_counted_not_written() {
        let refusals = Refusals::default();
        let (flood, other): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let admitted = (0..100).filter(|_| refusals.admit(flood)).count();
        assert_eq!(admitted, WRITTEN_PER_WINDOW as usize);
        assert!(refusals.admit(other), "another address has its own window");
        assert!(refusals.due(false).is_empty(), "the window is not over");
        let due = refusals.due(true);
        assert_eq!(due.len(), 1, "{due:?}");
        assert_eq!((due[0].client, due[0].refused), (flood, 100 - u64::from(WRITTEN_PER_WINDOW)));
        assert!(refusals.admit(flood), "a new window");
    }

    #[test]
    fn a_flood_from_many_addresses_is_counted_too() {
        let refusals = Refusals::default();
        let admitted = (0..1000u32)
            .filter(|i| refusals.admit(IpAddr::V6(Ipv6Addr::from(0x2001_0db8_u128 << 96 | u128::from(*i)))))
            .count();
        assert_eq!(admitted, WRITTEN_IN_ALL as usize);
        let due = refusals.due(true);
        assert_eq!(due.iter().map(|s| s.refused).sum::<u64>(), 1000 - u64::from(WRITTEN_IN_ALL), "{due:?}");
        assert!(due.iter().any(|s| s.client == OVERFLOW));
    }

    #[test]
    fn claimed_names_are_bounded() {
        assert_eq!(claimed("met-police"), "met-police");
        let long = claimed(&"é".repeat(1 << 20));
        assert!(long.len() < 200 && long.ends_with("(2097152 bytes)"), "{long}");
    }
}
