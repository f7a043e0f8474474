//! Where the desk finds records: a backend returns the candidate records of
//! a question in its window; the desk ranks and filters them the same way
//! whichever backend found them. The gateway's own store is one backend.
use anyhow::Result;
use chrono::{DateTime, NaiveDate, Utc};

use crate::{
    query::{
        questions::{DeviceSelector, ServiceSelector},
        request::LocalFilter,
    },
    record::Icr,
    store::{Lookup, Store, gaps::Gap, index::IndexKey, rollup::Services},
};

/// The records a desk answers from.
pub trait Backend: Send + Sync {
    /// From now on, return nothing older than `days` (the governing
    /// configuration's retention): a record past it is not disclosed even
    /// before a sweep removes it.
    fn keep_days(&self, days: u32);
    /// Records overlapping `from..=to` whose public end is `ip` (and `port`).
    fn by_public(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        ip: std::net::IpAddr,
        port: Option<u16>,
    ) -> Result<Vec<Icr>>;
    /// What `device` used in `from..to`, per service.
    fn services(&self, from: DateTime<Utc>, to: DateTime<Utc>, device: &DeviceSelector) -> Result<Services>;
    /// Records in `from..to` that may match any of `services`, and `local`
    /// (a superset: the desk keeps those that do).
    fn by_services(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        services: &[ServiceSelector],
        local: LocalFilter,
    ) -> Result<Vec<Icr>>;
    /// Every record that started in `from..to`.
    fn all(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> Result<Vec<Icr>>;
    /// The capture gaps that touch `from..to`.
    fn gaps(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> Result<Vec<Gap>>;
    /// Drops every day more than `retention_days` before `now`'s, for good:
    /// only the desk calls it, for a sweep it has authorised and audits.
    fn sweep(&self, retention_days: u32, now: DateTime<Utc>) -> Result<Swept>;
}

/// What a sweep dropped, and where.
#[derive(Debug, Default)]
pub struct Swept {
    pub dropped: Vec<NaiveDate>,
    /// The cluster's URL as the audit log names it (no credentials); none
    /// for the gateway's store, which the audit log sits beside.
    pub clickhouse: Option<String>,
}

impl Backend for Store {
    fn keep_days(&self, days: u32) {
        self.set_retention_days(days);
    }

    fn by_public(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        ip: std::net::IpAddr,
        port: Option<u16>,
    ) -> Result<Vec<Icr>> {
        let key = match port {
            Some(port) => IndexKey::PublicPort(ip, port),
            None => IndexKey::PublicAddr(ip),
        };
        self.find(from, to, Lookup::Any(&[key]))
    }

    fn services(&self, from: DateTime<Utc>, to: DateTime<Utc>, device: &DeviceSelector) -> Result<Services> {
        Store::services(self, from, to, &device.index_key())
    }

    /// `local` is left to the desk: the index has no key for it, and local
    /// records are few.
    fn by_services(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        services: &[ServiceSelector],
        _local: LocalFilter,
    ) -> Result<Vec<Icr>> {
        // Networks too wide to enumerate in the index scan the window.
        let keys: Option<Vec<IndexKey>> =
            services.iter().map(ServiceSelector::index_keys).collect::<Option<Vec<_>>>().map(|k| k.concat());
        self.find(from, to, keys.as_deref().map_or(Lookup::All, Lookup::Any))
    }

    fn all(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> Result<Vec<Icr>> {
        self.scan(from, to)
    }

    fn gaps(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> Result<Vec<Gap>> {
        Store::gaps(self, from, to)
    }

    fn sweep(&self, retention_days: u32, now: DateTime<Utc>) -> Result<Swept> {
        Ok(Swept { dropped: Store::sweep(self, retention_days, now)?, clickhouse: None })
    }
}
