//! Configurations as tests write them (`icr.toml`, docs/cli.md): authorities,
//! their hashed tokens, listeners, and a store directory holding one.
use std::{fmt, path::Path};

use crate::TempDir;

/// `met`, police for every question: the authority most tests ask as
/// ([`Authority::police`]`("met")`, as text for `format!`).
pub const POLICE: &str = "[[authority]]\nname = \"met\"\nkind = \"police\"\npurposes = [1, 2, 3]\n";

/// One `[[authority]]`.
#[derive(Clone, Debug)]
pub struct Authority {
    pub name: String,
    pub kind: String,
    pub purposes: Vec<u8>,
    pub token_hash: Option<String>,
}

impl Authority {
    pub fn new(name: &str, kind: &str, purposes: &[u8]) -> Self {
        Self { name: name.into(), kind: kind.into(), purposes: purposes.to_vec(), token_hash: None }
    }

    /// Police, for every question.
    pub fn police(name: &str) -> Self {
        Self::new(name, "police", &[1, 2, 3])
    }

    /// An operator (lists and sweeps, asks no question).
    pub fn operator(name: &str) -> Self {
        Self::new(name, "operator", &[])
    }

    /// An auditor (reads the audit log).
    pub fn auditor(name: &str) -> Self {
        Self::new(name, "auditor", &[])
    }

    /// With an API token's hash (`icr hash-token`'s).
    pub fn token_hash(mut self, hash: &str) -> Self {
        self.token_hash = Some(hash.into());
        self
    }

    /// With the hash of the API token `token`, hashed as the agent does.
    #[cfg(feature = "icr")]
    pub fn token(self, token: &str) -> Self {
        let hash = icr::serve::tokens::hash_token(token).expect("hashing a token");
        self.token_hash(&hash)
    }
}

impl fmt::Display for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let purposes: Vec<String> = self.purposes.iter().map(u8::to_string).collect();
        write!(
            f,
            "[[authority]]\nname = \"{}\"\nkind = \"{}\"\npurposes = [{}]\n",
            self.name,
            self.kind,
            purposes.join(", ")
        )?;
        if let Some(hash) = &self.token_hash {
            writeln!(f, "token_hash = \"{hash}\"")?;
        }
        Ok(())
    }
}

/// An `icr.toml` built up: top-level keys, authorities, then sections (TOML
/// wants the top-level keys before any table).
#[derive(Clone, Debug, Default)]
pub struct Config {
    top: String,
    authorities: Vec<Authority>,
    sections: String,
}

impl Config {
    pub fn new() -> Self {
        Self::default()
    }

    /// A top-level line, as `retention_days = 30`.
    pub fn key(mut self, line: &str) -> Self {
        self.top.push_str(line);
        self.top.push('\n');
        self
    }

    pub fn authority(mut self, authority: Authority) -> Self {
        self.authorities.push(authority);
        self
    }

    /// A table `[name]` and its lines as written.
    pub fn section(mut self, name: &str, body: &str) -> Self {
        self.sections.push_str(&format!("[{name}]\n{}\n", body.trim_end()));
        self
    }

    /// `[http]` listening on `listen` (more of the table in `more`).
    pub fn http(self, listen: &str, more: &str) -> Self {
        self.section("http", &format!("listen = \"{listen}\"\n{more}"))
    }

    /// `[metrics]` listening on `listen`.
    pub fn metrics(self, listen: &str) -> Self {
        self.section("metrics", &format!("listen = \"{listen}\""))
    }

    /// Writes it to `path`.
    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.to_string()).unwrap_or_else(|error| panic!("writing {}: {error}", path.display()));
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.top)?;
        for authority in &self.authorities {
            write!(f, "{authority}")?;
        }
        f.write_str(&self.sections)
    }
}

/// A store directory of its own with a configuration (`icr.toml`),
/// removed when dropped.
pub struct StoreDir(TempDir);

impl StoreDir {
    /// `config` (a [`Config`] or text) as the store's `icr.toml`.
    pub fn with_config(name: &str, config: impl fmt::Display) -> Self {
        let dir = TempDir::new(name);
        std::fs::write(dir.path().join("icr.toml"), config.to_string()).expect("writing icr.toml");
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// The entries of its audit log, parsed (there must be one).
    pub fn audit_entries(&self) -> Vec<serde_json::Value> {
        let log = std::fs::read_to_string(self.path().join("audit.log")).expect("the store's audit log");
        log.lines().map(|line| serde_json::from_str(line).expect("an audit entry is JSON")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn police_is_met_for_every_question() {
        assert_eq!(Authority::police("met").to_string(), POLICE);
    }

    #[test]
    fn top_level_keys_come_before_every_table() {
        let config = Config::new()
            .metrics("127.0.0.1:9464")
            .authority(Authority::operator("noc").token_hash("$argon2id$x"))
            .key("retention_days = 30");
        assert_eq!(
            config.to_string(),
            "retention_days = 30\n[[authority]]\nname = \"noc\"\nkind = \"operator\"\npurposes = []\n\
             token_hash = \"$argon2id$x\"\n[metrics]\nlisten = \"127.0.0.1:9464\"\n"
        );
    }
}
