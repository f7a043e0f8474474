//! The console's sessions: who signed in (by a random id in an HttpOnly,
//! Secure, SameSite=Strict cookie), their anti-forgery token, and the answers
//! each keeps for its pages and downloads, within the limits of `[http]`.
use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::http::{HeaderMap, header};
use chrono::{DateTime, Utc};

use crate::{
    config::AuthorityKind,
    record::Icr,
    store::{gaps::Gap, rollup::ServiceRow},
};

/// The session cookie's name.
pub(super) const COOKIE: &str = "icr_console";
/// Answers a session keeps for its downloads; older ones are dropped.
const MAX_ANSWERS: usize = 16;

/// The three questions, as the console names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Resolve,
    Services,
    Accessed,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Resolve, Kind::Services, Kind::Accessed];

    pub(super) fn from_path(path: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.path() == path)
    }

    pub fn path(self) -> &'static str {
        match self {
            Kind::Resolve => "resolve",
            Kind::Services => "services",
            Kind::Accessed => "accessed",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Kind::Resolve => "1. Which device sent this?",
            Kind::Services => "2. Which services did a device use?",
            Kind::Accessed => "3. Which devices used these services?",
        }
    }
}

/// An answer's rows.
pub enum Rows {
    Records(Vec<Icr>),
    Services(Vec<ServiceRow>),
}

impl Rows {
    pub fn len(&self) -> usize {
        match self {
            Rows::Records(records) => records.len(),
            Rows::Services(rows) => rows.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An answered question, kept in its session for the page and downloads.
pub struct Answered {
    pub id: u64,
    pub kind: Kind,
    pub summary: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub rows: Rows,
    /// False when the answer was too large to keep in the console: `rows`
    /// is then empty and the downloads have it.
    pub shown: bool,
    pub gaps: Vec<Gap>,
    pub audit_seq: u64,
    /// The disclosure bundle the desk wrote.
    pub bundle: PathBuf,
    /// What it costs its session: the bytes of its rows as read.
    pub bytes: usize,
}

/// Who is signed in, as a page shows it.
pub struct Signed<'a> {
    pub authority: &'a str,
    pub csrf: &'a str,
    pub auditor: bool,
}

pub(super) struct Session {
    pub(super) authority: String,
    pub(super) kind: AuthorityKind,
    pub(super) csrf: String,
    pub(super) last_seen: Instant,
    pub(super) answers: Vec<Arc<Answered>>,
    pub(super) next_answer: u64,
}

impl Session {
    pub(super) fn signed(&self) -> Signed<'_> {
        Signed { authority: &self.authority, csrf: &self.csrf, auditor: self.kind == AuthorityKind::Auditor }
    }

    /// Removes the bundles of its answers, as it ends.
    pub(super) fn end(self) {
        for answer in &self.answers {
            let _ = std::fs::remove_dir_all(&answer.bundle);
        }
    }
}

/// The signed-in sessions, by id; one idle for `idle` is over. Each
/// authority has at most `per_authority`; each session keeps at most
/// `answer_bytes` of answers.
pub(super) struct Sessions {
    pub(super) idle: Duration,
    pub(super) per_authority: usize,
    pub(super) answer_bytes: usize,
    pub(super) map: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.map.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether session `id` is alive; marks it seen. One idle too long ends.
    pub(super) fn alive(&self, id: &str) -> bool {
        let mut sessions = self.lock();
        match sessions.get_mut(id) {
            Some(session) if session.last_seen.elapsed() < self.idle => {
                session.last_seen = Instant::now();
                true
            }
            Some(_) => {
                if let Some(ended) = sessions.remove(id) {
                    ended.end();
                }
                false
            }
            None => false,
        }
    }

    /// Adds a session, ending the idle ones and, past `per_authority`
    /// sessions of its own authority, that authority's idlest: one
    /// authority signing in again and again never ends another's. (The
    /// total is bounded by the configured authorities.)
    pub(super) fn start(&self, id: String, session: Session) {
        let mut sessions = self.lock();
        let over: Vec<String> =
            sessions.iter().filter(|(_, s)| s.last_seen.elapsed() >= self.idle).map(|(id, _)| id.clone()).collect();
        for id in &over {
            if let Some(ended) = sessions.remove(id) {
                ended.end();
            }
        }
        loop {
            let own = sessions.iter().filter(|(_, s)| s.authority == session.authority);
            if own.clone().count() < self.per_authority {
                break;
            }
            let Some(idlest) = own.min_by_key(|(_, s)| s.last_seen).map(|(id, _)| id.clone()) else { break };
            if let Some(ended) = sessions.remove(&idlest) {
                ended.end();
            }
        }
        sessions.insert(id, session);
    }

    /// Keeps `answer` in session `id`, dropping its oldest answers past
    /// [`MAX_ANSWERS`] or `answer_bytes` (never the new one). False if the
    /// session ended.
    pub(super) fn keep(&self, id: &str, answer: Arc<Answered>) -> bool {
        let mut sessions = self.lock();
        let Some(session) = sessions.get_mut(id) else { return false };
        session.answers.push(answer);
        while session.answers.len() > 1
            && (session.answers.len() > MAX_ANSWERS
                || session.answers.iter().map(|a| a.bytes).sum::<usize>() > self.answer_bytes)
        {
            let oldest = session.answers.remove(0);
            let _ = std::fs::remove_dir_all(&oldest.bundle);
        }
        true
    }
}

/// The session cookie's value.
pub(super) fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == COOKIE && value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| value.to_string())
        })
}

/// 32 random bytes in hex: session ids, anti-forgery tokens, bundle names.
pub(super) fn random_hex() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| anyhow::anyhow!("no randomness"))?;
    Ok(hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::serve::doorkeeper::headers;

    #[test]
    fn the_session_cookie_is_read_strictly() {
        let id = "ab".repeat(32);
        assert_eq!(cookie(&headers(&[("cookie", &format!("other=1; {COOKIE}={id}"))])), Some(id.clone()));
        assert_eq!(cookie(&headers(&[("cookie", "other=1"), ("cookie", &format!("{COOKIE}={id}"))])), Some(id));
        assert_eq!(cookie(&headers(&[("cookie", &format!("{COOKIE}=short"))])), None);
        assert_eq!(cookie(&headers(&[("cookie", &format!("{COOKIE}={}", "zz".repeat(32)))])), None, "hex only");
        assert_eq!(cookie(&HeaderMap::new()), None);
    }

    fn session(bundle: &Path) -> Session {
        let answer = Answered {
            id: 1,
            kind: Kind::Services,
            summary: String::new(),
            from: Utc::now(),
            to: Utc::now(),
            rows: Rows::Services(Vec::new()),
            shown: true,
            gaps: Vec::new(),
            audit_seq: 1,
            bundle: bundle.to_path_buf(),
            bytes: 1000,
        };
        Session {
            authority: "met-police".into(),
            kind: AuthorityKind::Police,
            csrf: "c".into(),
            last_seen: Instant::now(),
            answers: vec![Arc::new(answer)],
            next_answer: 2,
        }
    }

    #[test]
    fn an_idle_session_ends_with_its_bundles() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("b1");
        std::fs::create_dir(&bundle).unwrap();
        let sessions =
            Sessions { idle: Duration::from_secs(600), per_authority: 8, answer_bytes: 1 << 20, map: Mutex::default() };
        sessions.start("s1".into(), session(&bundle));
        assert!(sessions.alive("s1"));
        assert!(!sessions.alive("s2"), "an unknown session");
        // Seen last longer ago than the idle time allows.
        sessions.lock().get_mut("s1").unwrap().last_seen = Instant::now() - Duration::from_secs(601);
        assert!(!sessions.alive("s1"), "over");
        assert!(sessions.lock().is_empty(), "and forgotten");
        assert!(!bundle.exists(), "its bundles removed");
    }

    #[test]
    fn past_its_limit_an_authority_ends_its_own_idlest_session_never_anothers() {
        let dir = tempfile::tempdir().unwrap();
        let sessions =
            Sessions { idle: Duration::from_secs(600), per_authority: 4, answer_bytes: 1 << 20, map: Mutex::default() };
        let mut other = session(&dir.path().join("other"));
        other.authority = "nca".into();
        other.last_seen = Instant::now() - Duration::from_secs(590);
        sessions.start("other".into(), other);
        for index in 0..64 {
            let mut session = session(&dir.path().join(format!("b{index}")));
            session.last_seen = Instant::now() - Duration::from_secs(if index == 2 { 500 } else { 10 });
            sessions.start(format!("s{index}"), session);
        }
        let sessions = sessions.lock();
        assert_eq!(sessions.len(), 5, "four of met-police's, and nca's");
        assert!(sessions.contains_key("other"), "the idlest session of all is another authority's: kept");
        assert!(sessions.contains_key("s63") && !sessions.contains_key("s2"));
    }

    #[test]
    fn a_session_keeps_answers_up_to_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let sessions =
            Sessions { idle: Duration::from_secs(600), per_authority: 4, answer_bytes: 2500, map: Mutex::default() };
        let first = dir.path().join("first");
        std::fs::create_dir(&first).unwrap();
        sessions.start("s".into(), session(&first));
        let answer = |id, bytes| {
            let mut answered = Arc::into_inner(session(&dir.path().join(format!("a{id}"))).answers.remove(0)).unwrap();
            (answered.id, answered.bytes) = (id, bytes);
            Arc::new(answered)
        };
        assert!(sessions.keep("s", answer(2, 1000)));
        assert_eq!(sessions.lock()["s"].answers.len(), 2);
        assert!(sessions.keep("s", answer(3, 1000)));
        let ids: Vec<u64> = sessions.lock()["s"].answers.iter().map(|a| a.id).collect();
        assert_eq!(ids, [2, 3], "the oldest dropped past 2500 bytes");
        assert!(!first.exists(), "with its bundle");
        assert!(sessions.keep("s", answer(4, 10_000)));
        let ids: Vec<u64> = sessions.lock()["s"].answers.iter().map(|a| a.id).collect();
        assert_eq!(ids, [4], "the newest is kept, whatever its size");
        assert!(!sessions.keep("gone", answer(5, 1)));
    }
}
