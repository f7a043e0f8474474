//! The provider's cluster as a backend: the same questions as the gateway's
//! store answers, asked of every gateway's records in ClickHouse. Each
//! selector becomes a condition on the records; questions 2 and 3 first
//! narrow them to the `(public_ip, public_port)` keys their narrow table
//! lists (the records table's primary index then reads those alone), and
//! test the condition on the records themselves. A record shipped twice is
//! read once (one row per record id).
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context as _, Result};
use chrono::{DateTime, Days, NaiveDate, Utc};

use crate::{
    export::clickhouse::{Bind, ClickHouse, Index, rows::ip_bytes},
    query::{
        backend::{Backend, Swept},
        questions::{DeviceSelector, ServiceSelector},
        request::LocalFilter,
    },
    record::Icr,
    store::{LOOKBACK_DAYS, Store, gaps::Gap, rollup::Services},
};

pub struct Cluster {
    clickhouse: ClickHouse,
    /// Days kept (0: not set).
    retention_days: AtomicU32,
    /// Runs the client for the desk's blocking calls, from any thread; it
    /// keeps the client's connections open between questions.
    runtime: tokio::runtime::Runtime,
}

impl Cluster {
    pub fn new(clickhouse: ClickHouse) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("icr-clickhouse")
            .enable_all()
            .build()
            .context("a runtime for the ClickHouse client")?;
        // Connections opened on another runtime would stall on this one.
        Ok(Self { clickhouse: clickhouse.with_own_connections(), retention_days: AtomicU32::new(0), runtime })
    }

    /// The first day a read may return: the window's start less the
    /// lookback (a record started before it may still be alive in it), and
    /// not before retention.
    fn first_day(&self, from: DateTime<Utc>) -> NaiveDate {
        let lookback = from.date_naive().checked_sub_days(Days::new(LOOKBACK_DAYS)).unwrap_or(NaiveDate::MIN);
        match self.retention_days.load(Ordering::Relaxed) {
            0 => lookback,
            days => lookback
                .max(Utc::now().date_naive().checked_sub_days(Days::new(u64::from(days))).unwrap_or(NaiveDate::MIN)),
        }
    }

    /// Records alive in `from..=to` that satisfy `condition`; with `index`,
    /// only those at the keys the index lists for its own condition.
    fn overlapping(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        index: Option<(Index, &str, Vec<Bind>)>,
        condition: &str,
        binds: Vec<Bind>,
    ) -> Result<Vec<Icr>> {
        let (sql, binds) = self.window(from, to, index, condition, binds);
        let rows = self.runtime.block_on(self.clickhouse.records(&sql, &binds))?;
        rows.into_iter().map(|row| row.into_icr()).collect()
    }

    /// The services of the records [`Self::overlapping`] would read, from
    /// the columns question 2 needs alone.
    fn services_overlapping(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        index: Option<(Index, &str, Vec<Bind>)>,
        condition: &str,
        binds: Vec<Bind>,
    ) -> Result<Services> {
        let (sql, binds) = self.window(from, to, index, condition, binds);
        let rows = self.runtime.block_on(self.clickhouse.service_uses(&sql, &binds))?;
        let mut services = Services::default();
        for row in rows {
            let (key, used) = row.into_use()?;
            services.add(key, &used);
        }
        Ok(services)
    }

    /// The condition of [`Self::overlapping`], its binds in order.
    fn window(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        index: Option<(Index, &str, Vec<Bind>)>,
        condition: &str,
        binds: Vec<Bind>,
    ) -> (String, Vec<Bind>) {
        // A record's day is its start's: none after `to`'s day can be alive.
        let days = [Bind::Text(self.first_day(from).to_string()), Bind::Text(to.date_naive().to_string())];
        let (mut sql, mut all) = (String::new(), Vec::new());
        if let Some((index, keys, index_binds)) = index {
            sql = format!(
                "(public_ip, public_port) IN (SELECT public_ip, public_port FROM {} WHERE ({keys}) \
                 AND day >= toDate(?) AND day <= toDate(?)) AND ",
                index.local()
            );
            all.extend(index_binds);
            all.extend(days.clone());
        }
        sql.push_str(&format!(
            "({condition}) AND day >= toDate(?) AND day <= toDate(?) AND start_us <= ? AND end_us >= ?"
        ));
        all.extend(binds);
        all.extend(days);
        all.extend([Bind::Int(to.timestamp_micros()), Bind::Int(from.timestamp_micros())]);
        (sql, all)
    }
}

fn address(ip: std::net::IpAddr) -> Bind {
    Bind::Text(hex::encode(ip_bytes(ip)))
}

/// Question 3 for more names than this reads the records' name columns
/// rather than the name table: many names list keys in nearly every
/// granule of the records, and looking up so many keys cost more than the
/// scan (10M records, 1,000 names, 459k keys: 3.3x the scan's time; 10
/// names, 1,399 keys: 0.6x).
const NAMES_THROUGH_INDEX: usize = 100;

/// A 16-byte address column compared with a bound address.
const ADDRESS: &str = "toFixedString(unhex(?), 16)";
/// A MAC column compared with a bound MAC (its 12 hex digits).
const MAC: &str = "toFixedString(unhex(?), 6)";

impl Backend for Cluster {
    fn keep_days(&self, days: u32) {
        self.retention_days.store(days, Ordering::Relaxed);
    }

    /// Reads the one shard that holds the address, when the cluster's
    /// layout says which (`ClickHouse::records_at`).
    fn by_public(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        ip: std::net::IpAddr,
        port: Option<u16>,
    ) -> Result<Vec<Icr>> {
        let (condition, binds) = match port {
            Some(port) => {
                (format!("public_ip = {ADDRESS} AND public_port = ?"), vec![address(ip), Bind::Int(i64::from(port))])
            }
            None => (format!("public_ip = {ADDRESS}"), vec![address(ip)]),
        };
        let (sql, binds) = self.window(from, to, None, &condition, binds);
        let rows =
            self.runtime.block_on(self.clickhouse.records_at(ip_bytes(ip), self.first_day(from), &sql, &binds))?;
        rows.into_iter().map(|row| row.into_icr()).collect()
    }

    /// By MAC through the device table; by address or subscriber over the
    /// records themselves.
    fn services(&self, from: DateTime<Utc>, to: DateTime<Utc>, device: &DeviceSelector) -> Result<Services> {
        match device {
            DeviceSelector::Mac(mac) => {
                let mac = Bind::Text(hex::encode(mac.0));
                self.services_overlapping(
                    from,
                    to,
                    Some((Index::ByDevice, &format!("device_mac = {MAC}"), vec![mac.clone()])),
                    &format!("device_mac = {MAC}"),
                    vec![mac],
                )
            }
            DeviceSelector::Ip(ip) => {
                self.services_overlapping(from, to, None, &format!("device_ip = {ADDRESS}"), vec![address(*ip)])
            }
            DeviceSelector::Subscriber(name) => {
                self.services_overlapping(from, to, None, "subscriber = ?", vec![Bind::Text(name.clone())])
            }
        }
    }

    /// A name or suffix matches the service name or any DNS exchange's name
    /// (`dns_all_qname`, which holds the first exchange too); up to
    /// [`NAMES_THROUGH_INDEX`] names and suffixes go through the name table,
    /// more (or a network) read every record in the window.
    fn by_services(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        selectors: &[ServiceSelector],
        local: LocalFilter,
    ) -> Result<Vec<Icr>> {
        let (mut conditions, mut binds) = (Vec::new(), Vec::new());
        let (mut keys, mut key_binds) = (Vec::new(), Vec::new());
        let mut every_key = true;
        let names: Vec<&String> = selectors
            .iter()
            .filter_map(|s| if let ServiceSelector::Name(name) = s { Some(name) } else { None })
            .collect();
        if !names.is_empty() {
            let list = vec!["?"; names.len()].join(", ");
            // `hasAny` against a constant array compares each element with
            // every name (1,000 names: 1.8x the time of the whole question);
            // `IN` inside the lambda tests a set.
            conditions.push(format!("service_name IN ({list}) OR arrayExists(q -> q IN ({list}), dns_all_qname)"));
            for _ in 0..2 {
                binds.extend(names.iter().map(|name| Bind::Text((*name).clone())));
            }
            keys.push(format!("name IN ({list})"));
            key_binds.extend(names.iter().map(|name| Bind::Text((*name).clone())));
        }
        for selector in selectors {
            match selector {
                ServiceSelector::Name(_) => {}
                ServiceSelector::Suffix(suffix) => {
                    conditions.push(
                        "(service_name = ? OR endsWith(service_name, ?) OR arrayExists(q -> q = ? OR endsWith(q, ?), dns_all_qname))".into(),
                    );
                    let (exact, under) = (Bind::Text(suffix.clone()), Bind::Text(format!(".{suffix}")));
                    binds.extend([exact.clone(), under.clone(), exact.clone(), under.clone()]);
                    keys.push("(name = ? OR endsWith(name, ?))".into());
                    key_binds.extend([exact, under]);
                }
                ServiceSelector::Net(net) => {
                    conditions.push(format!("(remote_ip >= {ADDRESS} AND remote_ip <= {ADDRESS})"));
                    binds.extend([address(net.network()), address(net.broadcast())]);
                    every_key = false;
                }
            }
        }
        if conditions.is_empty() {
            return Ok(Vec::new());
        }
        let mut condition = format!("({})", conditions.join(" OR "));
        match local {
            LocalFilter::Include => {}
            LocalFilter::Exclude => condition.push_str(" AND local = 0"),
            LocalFilter::Only => condition.push_str(" AND local = 1"),
        }
        let keys = keys.join(" OR ");
        let index =
            (every_key && selectors.len() <= NAMES_THROUGH_INDEX).then_some((Index::ByName, keys.as_str(), key_binds));
        self.overlapping(from, to, index, &condition, binds)
    }

    fn all(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> Result<Vec<Icr>> {
        let mut records = self.overlapping(from, to, None, "1", Vec::new())?;
        // As the store lists: records that started in the window.
        records.retain(|r| r.start >= from && r.start <= to);
        records.sort_by(|a, b| (a.start, &a.id).cmp(&(b.start, &b.id)));
        Ok(records)
    }

    fn gaps(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> Result<Vec<Gap>> {
        let rows = self.runtime.block_on(self.clickhouse.gaps(from.timestamp_micros(), to.timestamp_micros()))?;
        rows.into_iter().map(|row| row.into_gap()).collect()
    }

    /// Drops the expired day partitions on every node.
    fn sweep(&self, retention_days: u32, now: DateTime<Utc>) -> Result<Swept> {
        let dropped =
            self.runtime.block_on(self.clickhouse.drop_days_before(Store::oldest_kept(retention_days, now)))?;
        Ok(Swept { dropped, clickhouse: Some(self.clickhouse.url().to_string()) })
    }
}
