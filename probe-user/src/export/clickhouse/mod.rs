//! The provider-wide store: a ClickHouse cluster (or one server) that every
//! gateway ships its records and gap entries to, and that the desk asks
//! across all gateways (`query::backend`).
//!
//! Only what ClickHouse 18.16 (Debian bookworm) and current releases both
//! have: the HTTP interface, MergeTree with `PARTITION BY` day, `Distributed`,
//! materialized views, RowBinary. The official `clickhouse` crate speaks
//! RowBinary with its schema validation off (18.16 lacks
//! RowBinaryWithNamesAndTypes). Without ZooKeeper there is no `ON CLUSTER`
//! DDL, so tables are created, and day partitions dropped, node by node: the
//! nodes are the cluster's `system.clusters` hosts, reached on the HTTP port
//! of the URL given (every node serves HTTP on the same port).
//!
//! Tables, in database `icr`, each a `_local` MergeTree on every node and a
//! `Distributed` table over them:
//! - `records`: ordered for question 1 (public address, port, time);
//!   sharded by public address, so one address's records are on one shard.
//! - `records_by_device` (question 2) and `records_by_service` (question 3):
//!   the same rows in their own order, filled by materialized views.
//! - `public_holders`: which gateway held which public address on which day.
//! - `gaps`: every gateway's gap entries.
//!
//! Gateways write into database `icr_ingest` alone: `Null` tables whose
//! materialized views put each row into every `icr` table. So a gateway's
//! ClickHouse user needs no right on `icr`: 18.16 has no GRANT, and a user
//! that may write a database may read it too, and drop its tables (18.16
//! takes `allow_ddl=1` from any HTTP request); one that may write only
//! `icr_ingest` reads nothing there (a `Null` table holds nothing), and
//! cannot reach `icr` (docs/cluster.md, "ClickHouse users").
//! 18.16 fires no view of a view's target table, so each `icr` table has a
//! view of its own from `icr_ingest` (the views on `records_local` stay for
//! rows inserted there directly).
//!
//! A record shipped twice (an agent killed between an insert and noting it)
//! is stored twice until a merge; readers keep one row per record id.
pub mod access;
pub mod rows;
pub mod ship;

use std::path::Path;

use anyhow::{Context as _, Result, bail};
use chrono::NaiveDate;
use clickhouse::Client;

use crate::config::ClickHouseSection;
use access::Access;
use rows::{GAP_COLUMNS, GapRow, RECORD_COLUMNS, RecordRow};

pub const DATABASE: &str = "icr";
/// Where gateways insert: `Null` tables that feed every `icr` table.
pub const INGEST: &str = "icr_ingest";

/// The tables a query reads (Distributed ones on a cluster).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    Records,
    ByDevice,
    ByService,
    Gaps,
}

impl Table {
    fn base(self) -> &'static str {
        match self {
            Self::Records => "records",
            Self::ByDevice => "records_by_device",
            Self::ByService => "records_by_service",
            Self::Gaps => "gaps",
        }
    }
}

/// The local tables, each with its ordering; all are partitioned by day.
const LOCAL_TABLES: &[(&str, &str)] = &[
    ("records", "(public_ip, public_port, start_us)"),
    ("records_by_device", "(device_mac, start_us)"),
    ("records_by_service", "(service_name, remote_ip, start_us)"),
];

/// A cluster (or one server), as the configuration names it.
#[derive(Clone)]
pub struct ClickHouse {
    /// `scheme://host:port`: never credentials (refused), so it may be
    /// logged and audited.
    url: String,
    cluster: Option<String>,
    access: Access,
    /// The node at `url`; clones share its connections.
    client: Client,
}

impl ClickHouse {
    /// The cluster of `section`; its password file must be outside
    /// `store_dir` (the store, or the central directory, it serves).
    pub fn new(section: &ClickHouseSection, store_dir: Option<&Path>) -> Result<Self> {
        section.validate()?;
        let url = crate::remote::shown(&section.url);
        let access = Access::of(section, store_dir)?;
        Ok(Self { client: access.client(&url), url, cluster: section.cluster.clone(), access })
    }

    /// The same cluster with connections of its own: a connection serves
    /// only the runtime that opened it, and stalls on another.
    pub fn with_own_connections(&self) -> Self {
        Self { client: self.access.client(&self.url), ..self.clone() }
    }

    /// Its URL, as it may be logged and audited.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The table a query reads, in database `icr`.
    pub fn table(&self, table: Table) -> String {
        format!("{DATABASE}.{}", self.table_name(table))
    }

    /// Its name alone (an insert names its database apart): in `icr`, or
    /// in `icr_ingest` for an insert.
    fn table_name(&self, table: Table) -> String {
        match self.cluster {
            Some(_) => table.base().to_string(),
            None => format!("{}_local", table.base()),
        }
    }

    /// The HTTP URL of every node: the cluster's hosts, on the port of the
    /// URL given; without a cluster, that URL alone.
    pub async fn nodes(&self) -> Result<Vec<String>> {
        let Some(cluster) = &self.cluster else { return Ok(vec![self.url.clone()]) };
        let hosts: Vec<String> = self
            .client
            .query("SELECT DISTINCT host_address FROM system.clusters WHERE cluster = ? ORDER BY host_address")
            .bind(cluster.as_str())
            .fetch_all()
            .await
            .with_context(|| format!("asking {} for the hosts of cluster {cluster}", self.url))?;
        if hosts.is_empty() {
            bail!("{} has no cluster {cluster:?} in its remote_servers", self.url);
        }
        let url = crate::remote::checked_url(&self.url)?;
        let port = url.port_or_known_default().context("a URL with a port")?;
        Ok(hosts
            .into_iter()
            .map(|host| {
                let host = if host.contains(':') { format!("[{host}]") } else { host };
                format!("{}://{host}:{port}", url.scheme())
            })
            .collect())
    }

    /// Creates the database and tables on every node (again: nothing changes),
    /// and adds the record columns that tables made by an older icr lack.
    /// Returns the nodes.
    pub async fn init(&self) -> Result<Vec<String>> {
        let nodes = self.nodes().await?;
        for node in &nodes {
            let client = self.access.client(node);
            for statement in self.schema() {
                client.query(&statement).execute().await.with_context(|| format!("on {node}: {statement}"))?;
            }
            for statement in
                self.missing_columns(&client).await.with_context(|| format!("reading the columns on {node}"))?
            {
                client.query(&statement).execute().await.with_context(|| format!("on {node}: {statement}"))?;
            }
        }
        Ok(nodes)
    }

    /// `ALTER TABLE .. ADD COLUMN` for each record column a table lacks, in
    /// the order of [`RECORD_COLUMNS`] (an added column goes last, so the
    /// tables keep one column order, which `SELECT *` copies rely on).
    /// 18.16 has no `ADD COLUMN IF NOT EXISTS`: `system.columns` says what
    /// is there. The tables the materialized views fill come before
    /// `records_local`, so a row inserted meanwhile finds its columns there;
    /// the Distributed tables last.
    async fn missing_columns(&self, client: &Client) -> Result<Vec<String>> {
        let mut tables: Vec<String> = ["records_by_device_local", "records_by_service_local", "records_local"]
            .map(|table| format!("{DATABASE}.{table}"))
            .into();
        if self.cluster.is_some() {
            tables.extend(
                ["records", "records_by_device", "records_by_service"].map(|table| format!("{DATABASE}.{table}")),
            );
        }
        // The ingest table last: its views find every column in their targets.
        tables.push(format!("{INGEST}.records_local"));
        if self.cluster.is_some() {
            tables.push(format!("{INGEST}.records"));
        }
        let present: Vec<(String, String)> = client
            .query("SELECT concat(database, '.', table), name FROM system.columns WHERE database IN (?, ?)")
            .bind(DATABASE)
            .bind(INGEST)
            .fetch_all()
            .await?;
        Ok(alter_statements(&tables, &present))
    }

    /// The DDL of one node.
    fn schema(&self) -> Vec<String> {
        let columns = |list: &[(&str, &str)]| {
            list.iter().map(|(name, kind)| format!("{name} {kind}")).collect::<Vec<_>>().join(", ")
        };
        let records = columns(RECORD_COLUMNS);
        let mut ddl = vec![format!("CREATE DATABASE IF NOT EXISTS {DATABASE}")];
        for (table, order) in LOCAL_TABLES {
            ddl.push(format!(
                "CREATE TABLE IF NOT EXISTS {DATABASE}.{table}_local ({records}) ENGINE = MergeTree PARTITION BY day ORDER BY {order}"
            ));
        }
        for table in ["records_by_device", "records_by_service"] {
            ddl.push(format!(
                "CREATE MATERIALIZED VIEW IF NOT EXISTS {DATABASE}.{table}_mv TO {DATABASE}.{table}_local AS SELECT * FROM {DATABASE}.records_local"
            ));
        }
        ddl.push(format!(
            "CREATE TABLE IF NOT EXISTS {DATABASE}.public_holders_local (day Date, public_ip FixedString(16), probe String, \
             first_us Int64, last_us Int64, records UInt64) ENGINE = MergeTree PARTITION BY day ORDER BY (public_ip, day, probe)"
        ));
        ddl.push(format!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {DATABASE}.public_holders_mv TO {DATABASE}.public_holders_local AS \
             SELECT day, public_ip, probe, min(start_us) AS first_us, max(end_us) AS last_us, count() AS records \
             FROM {DATABASE}.records_local WHERE public_ip != toFixedString('', 16) GROUP BY day, public_ip, probe"
        ));
        ddl.push(format!(
            "CREATE TABLE IF NOT EXISTS {DATABASE}.gaps_local ({}) ENGINE = MergeTree PARTITION BY day ORDER BY (from_us, probe, kind)",
            columns(GAP_COLUMNS)
        ));
        if let Some(cluster) = &self.cluster {
            for (table, sharding) in [
                ("records", "cityHash64(public_ip)"),
                ("records_by_device", "rand()"),
                ("records_by_service", "rand()"),
                ("public_holders", "cityHash64(public_ip)"),
                ("gaps", "rand()"),
            ] {
                ddl.push(format!(
                    "CREATE TABLE IF NOT EXISTS {DATABASE}.{table} AS {DATABASE}.{table}_local \
                     ENGINE = Distributed({cluster}, {DATABASE}, {table}_local, {sharding})"
                ));
            }
        }
        ddl.extend(self.ingest_schema(&records, &columns(GAP_COLUMNS)));
        ddl
    }

    /// `icr_ingest`: what gateways write. Each row goes through a view to
    /// every `icr` table on its shard; the `Null` tables keep nothing.
    fn ingest_schema(&self, records: &str, gaps: &str) -> Vec<String> {
        let mut ddl = vec![
            format!("CREATE DATABASE IF NOT EXISTS {INGEST}"),
            format!("CREATE TABLE IF NOT EXISTS {INGEST}.records_local ({records}) ENGINE = Null"),
            format!("CREATE TABLE IF NOT EXISTS {INGEST}.gaps_local ({gaps}) ENGINE = Null"),
        ];
        for (table, _) in LOCAL_TABLES {
            ddl.push(format!(
                "CREATE MATERIALIZED VIEW IF NOT EXISTS {INGEST}.{table}_mv TO {DATABASE}.{table}_local AS SELECT * FROM {INGEST}.records_local"
            ));
        }
        ddl.push(format!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {INGEST}.public_holders_mv TO {DATABASE}.public_holders_local AS \
             SELECT day, public_ip, probe, min(start_us) AS first_us, max(end_us) AS last_us, count() AS records \
             FROM {INGEST}.records_local WHERE public_ip != toFixedString('', 16) GROUP BY day, public_ip, probe"
        ));
        ddl.push(format!("CREATE MATERIALIZED VIEW IF NOT EXISTS {INGEST}.gaps_mv TO {DATABASE}.gaps_local AS SELECT * FROM {INGEST}.gaps_local"));
        if let Some(cluster) = &self.cluster {
            for (table, sharding) in [("records", "cityHash64(public_ip)"), ("gaps", "rand()")] {
                ddl.push(format!(
                    "CREATE TABLE IF NOT EXISTS {INGEST}.{table} AS {INGEST}.{table}_local ENGINE = Distributed({cluster}, {INGEST}, {table}_local, {sharding})"
                ));
            }
        }
        ddl
    }

    pub async fn insert_records(&self, rows: &[RecordRow]) -> Result<()> {
        self.insert(Table::Records, rows)
            .await
            .with_context(|| format!("inserting {} records into {}", rows.len(), self.url))
    }

    pub async fn insert_gaps(&self, rows: &[GapRow]) -> Result<()> {
        self.insert(Table::Gaps, rows)
            .await
            .with_context(|| format!("inserting {} gap entries into {}", rows.len(), self.url))
    }

    async fn insert<T>(&self, table: Table, rows: &[T]) -> Result<()>
    where
        T: for<'a> clickhouse::Row<Value<'a> = T> + serde::Serialize,
    {
        // An insert returns once every shard has its rows: the gateway
        // forgets a batch only when the cluster holds it. (On inserts
        // alone: a read-only user may not change settings.)
        let client = self.client.clone().with_database(INGEST).with_setting("insert_distributed_sync", "1");
        let mut insert = client.insert::<T>(&self.table_name(table)).await?;
        for row in rows {
            insert.write(row).await?;
        }
        insert.end().await?;
        Ok(())
    }

    /// Rows of `table` that satisfy `condition` (SQL whose `?` take `binds`),
    /// one per record id.
    pub async fn records(&self, table: Table, condition: &str, binds: &[Bind]) -> Result<Vec<RecordRow>> {
        let columns = RECORD_COLUMNS.iter().map(|(name, _)| *name).collect::<Vec<_>>().join(", ");
        let sql = format!("SELECT {columns} FROM {} WHERE {condition} LIMIT 1 BY id", self.table(table));
        let mut query = self.client.query(&sql);
        for bind in binds {
            query = match bind {
                Bind::Int(n) => query.bind(*n),
                Bind::Text(text) => query.bind(text.as_str()),
            };
        }
        query.fetch_all().await.with_context(|| format!("asking {}", self.url))
    }

    /// Gap entries overlapping `from_us..=to_us`, the longest of each episode.
    pub async fn gaps(&self, from_us: i64, to_us: i64) -> Result<Vec<GapRow>> {
        let sql = format!(
            "SELECT any(day) AS day, probe, from_us, max(to_us) AS to_us, kind, max(count) AS count FROM {} \
             WHERE from_us <= ? GROUP BY probe, from_us, kind HAVING to_us >= ? ORDER BY from_us, probe, kind",
            self.table(Table::Gaps)
        );
        self.client
            .query(&sql)
            .bind(to_us)
            .bind(from_us)
            .fetch_all()
            .await
            .with_context(|| format!("asking {}", self.url))
    }

    /// Drops every day partition before `oldest_kept` on every node; returns
    /// the days dropped.
    pub async fn drop_days_before(&self, oldest_kept: NaiveDate) -> Result<Vec<NaiveDate>> {
        let mut dropped = std::collections::BTreeSet::new();
        for node in self.nodes().await? {
            let client = self.access.client(&node);
            let parts: Vec<(String, String)> = client
                .query("SELECT DISTINCT table, partition FROM system.parts WHERE database = ? AND active AND table LIKE '%\\_local'")
                .bind(DATABASE)
                .fetch_all()
                .await
                .with_context(|| format!("listing the partitions on {node}"))?;
            for (table, partition) in parts {
                // `PARTITION BY day`: the partition is the day, as YYYY-MM-DD.
                let Ok(day) = NaiveDate::parse_from_str(partition.trim_matches('\''), "%Y-%m-%d") else { continue };
                if day < oldest_kept {
                    client
                        .query(&format!("ALTER TABLE {DATABASE}.{table} DROP PARTITION '{day}'"))
                        .execute()
                        .await
                        .with_context(|| format!("dropping {table} {day} on {node}"))?;
                    dropped.insert(day);
                }
            }
        }
        Ok(dropped.into_iter().collect())
    }
}

/// The statements that add to each of `tables` (`database.table`) the
/// record columns that `present` (table, column) does not list for it.
fn alter_statements(tables: &[String], present: &[(String, String)]) -> Vec<String> {
    let mut statements = Vec::new();
    for table in tables {
        for (name, kind) in RECORD_COLUMNS {
            if !present.iter().any(|(t, n)| t == table && n == name) {
                statements.push(format!("ALTER TABLE {table} ADD COLUMN {name} {kind}"));
            }
        }
    }
    statements
}

/// A value bound to a `?` of a condition.
#[derive(Clone, Debug)]
pub enum Bind {
    Int(i64),
    Text(String),
}

/// A ClickHouse for callers without a runtime (the command line, the desk's
/// blocking answers): each call runs on its own small runtime.
pub fn block_on<T>(work: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("a runtime for ClickHouse")?
        .block_on(work)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_of_an_older_icr_get_the_columns_they_lack_in_order() {
        let tables: Vec<String> = ["icr.records_by_service_local", "icr.records_local"].map(String::from).into();
        let older = RECORD_COLUMNS.len() - 6;
        let mut present: Vec<(String, String)> = RECORD_COLUMNS[..older]
            .iter()
            .map(|(name, _)| ("icr.records_local".to_string(), name.to_string()))
            .collect();
        present.extend(
            RECORD_COLUMNS.iter().map(|(name, _)| ("icr.records_by_service_local".to_string(), name.to_string())),
        );
        present.push(("elsewhere".into(), "local".into()));
        assert_eq!(
            alter_statements(&tables, &present),
            [
                "ALTER TABLE icr.records_local ADD COLUMN dns_all_qname Array(String)",
                "ALTER TABLE icr.records_local ADD COLUMN dns_all_qtype Array(String)",
                "ALTER TABLE icr.records_local ADD COLUMN dns_all_answers Array(Array(String))",
                "ALTER TABLE icr.records_local ADD COLUMN local UInt8",
                "ALTER TABLE icr.records_local ADD COLUMN service_dns_at_us Int64",
                "ALTER TABLE icr.records_local ADD COLUMN service_resolver String",
            ]
        );
        present.extend(
            RECORD_COLUMNS[older..].iter().map(|(name, _)| ("icr.records_local".to_string(), name.to_string())),
        );
        assert!(alter_statements(&tables, &present).is_empty(), "again: nothing to add");
    }
}
