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
//! Tables, in database `icr` ([`schema`]), each a `_local` MergeTree on
//! every node, and a `Distributed` table over the ones read across nodes:
//! - `records`: each record once, ordered for question 1 (public address,
//!   port, time); sharded by public address, so one address's records are
//!   on one shard, and a resolve reads that shard alone.
//! - `by_device_local` (question 2) and `by_name_local` (question 3): a
//!   key and the `(public_ip, public_port)` of the records that have it,
//!   on the shard of those records; a question reads the keys, then the
//!   records at them, on every shard at once.
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
//!
//! A record shipped twice (an agent killed between an insert and noting it)
//! is stored twice; readers keep one row per record id.
pub mod access;
pub mod migrate;
pub mod rows;
pub mod schema;
pub mod shards;
pub mod ship;

use std::path::Path;

use anyhow::{Context as _, Result, bail};
use chrono::NaiveDate;
use clickhouse::Client;

use crate::config::ClickHouseSection;
use access::Access;
use rows::{GapRow, RECORD_COLUMNS, RecordRow, SERVICE_USE_COLUMNS, ServiceUseRow};

pub use schema::{DATABASE, INGEST};

/// The tables a query reads (Distributed ones on a cluster).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    Records,
    Gaps,
}

impl Table {
    fn base(self) -> &'static str {
        match self {
            Self::Records => "records",
            Self::Gaps => "gaps",
        }
    }
}

/// A narrow table of keys, read on each shard inside a question to the
/// records (`database.table` of the node itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Index {
    ByDevice,
    ByName,
}

impl Index {
    pub fn local(self) -> String {
        let table = match self {
            Self::ByDevice => schema::BY_DEVICE,
            Self::ByName => schema::BY_NAME,
        };
        format!("{DATABASE}.{table}")
    }
}

/// The level of an insert body's zstd: the fastest (the body is sent once;
/// the server stores it under its own compression).
const INSERT_ZSTD_LEVEL: i32 = 1;

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
        hosts.iter().map(|host| self.node_url(host)).collect()
    }

    /// The HTTP URL of a cluster host: on the port of the URL given.
    fn node_url(&self, host: &str) -> Result<String> {
        let url = crate::remote::checked_url(&self.url)?;
        let port = url.port_or_known_default().context("a URL with a port")?;
        let host = if host.contains(':') { format!("[{host}]") } else { host.to_string() };
        Ok(format!("{}://{host}:{port}", url.scheme()))
    }

    /// Creates the database and tables on every node (again: nothing
    /// changes); on a node with the first layout's tables, sets them aside,
    /// makes the new ones and copies the older records into them
    /// ([`migrate`]). Says what it changed, and each day copied, through
    /// `say`. Returns the nodes.
    pub async fn init(&self, say: &mut dyn FnMut(String)) -> Result<Vec<String>> {
        let nodes = self.nodes().await?;
        for node in &nodes {
            let client = self.access.client(node);
            let present = columns_of(&client).await.with_context(|| format!("reading the columns on {node}"))?;
            for line in migrate::set_aside(&client, node, &migrate::Found::new(&present)).await? {
                say(line);
            }
            let before = tables_of(&client).await.with_context(|| format!("reading the tables on {node}"))?;
            for statement in schema::ddl(self.cluster.as_deref()) {
                client.query(&statement).execute().await.with_context(|| format!("on {node}: {statement}"))?;
            }
            let made: Vec<String> = tables_of(&client).await?.into_iter().filter(|t| !before.contains(t)).collect();
            if !made.is_empty() {
                say(format!("{node}: made {}", made.join(" ")));
            }
            if let Some(cluster) = &self.cluster {
                let layout = shards::Layout::of(&client, cluster).await?.fingerprint();
                if noted_layout(&client).await?.is_none_or(|(_, noted)| noted != layout) {
                    client
                        .query(&format!("INSERT INTO {DATABASE}.{} VALUES (now(), ?)", schema::LAYOUTS))
                        .bind(layout.as_str())
                        .execute()
                        .await
                        .with_context(|| format!("noting the shard layout on {node}"))?;
                    say(format!(
                        "{node}: noted the shards (number*weight) {layout}: a resolve reads one shard for days after today"
                    ));
                }
            }
            migrate::copy_days(&client, node, say).await?;
        }
        Ok(nodes)
    }

    /// Records at `public_ip` that satisfy `condition`, read from no day
    /// before `first_day`: from the one shard that holds them when the
    /// present shard layout was noted before `first_day` began
    /// ([`shards`]), else from every shard.
    pub async fn records_at(
        &self,
        public_ip: [u8; 16],
        first_day: NaiveDate,
        condition: &str,
        binds: &[Bind],
    ) -> Result<Vec<RecordRow>> {
        let Some(cluster) = &self.cluster else { return self.records(condition, binds).await };
        let layout = shards::Layout::of(&self.client, cluster).await.with_context(|| format!("asking {}", self.url))?;
        let noted = noted_layout(&self.client).await.with_context(|| format!("asking {}", self.url))?;
        let began = first_day.and_hms_opt(0, 0, 0).map_or(i64::MIN, |t| t.and_utc().timestamp());
        let shard = match noted {
            Some((since, fingerprint)) if fingerprint == layout.fingerprint() && i64::from(since) <= began => {
                layout.shard_of(&public_ip)
            }
            _ => None,
        };
        let Some(host) = shard.and_then(|s| s.hosts.first()) else { return self.records(condition, binds).await };
        let node = self.node_url(host)?;
        let client = self.access.client(&node);
        self.records_from(&client, &format!("{DATABASE}.records_local"), condition, binds)
            .await
            .with_context(|| format!("asking {node}, the shard that holds the address"))
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
        let client = self
            .client
            .clone()
            .with_database(INGEST)
            .with_setting("insert_distributed_sync", "1")
            .with_compression(clickhouse::Compression::Zstd(INSERT_ZSTD_LEVEL));
        let mut insert = client.insert::<T>(&self.table_name(table)).await?;
        for row in rows {
            insert.write(row).await?;
        }
        insert.end().await?;
        Ok(())
    }

    /// Records that satisfy `condition` (SQL whose `?` take `binds`), one
    /// per record id, from every shard.
    pub async fn records(&self, condition: &str, binds: &[Bind]) -> Result<Vec<RecordRow>> {
        self.records_from(&self.client, &self.table(Table::Records), condition, binds).await
    }

    /// What question 2 reads of the records that satisfy `condition`, one
    /// per record id, from every shard.
    pub async fn service_uses(&self, condition: &str, binds: &[Bind]) -> Result<Vec<ServiceUseRow>> {
        self.rows_from(&self.client, &self.table(Table::Records), SERVICE_USE_COLUMNS, condition, binds).await
    }

    async fn records_from(
        &self,
        client: &Client,
        table: &str,
        condition: &str,
        binds: &[Bind],
    ) -> Result<Vec<RecordRow>> {
        let columns: Vec<&str> = RECORD_COLUMNS.iter().map(|(name, _)| *name).collect();
        self.rows_from(client, table, &columns, condition, binds).await
    }

    /// `columns` of the rows of `table` that satisfy `condition`, one per
    /// record id (a batch shipped twice is stored twice).
    async fn rows_from<T>(
        &self,
        client: &Client,
        table: &str,
        columns: &[&str],
        condition: &str,
        binds: &[Bind],
    ) -> Result<Vec<T>>
    where
        T: for<'a> clickhouse::Row<Value<'a> = T> + serde::de::DeserializeOwned + 'static,
    {
        let sql = format!("SELECT {} FROM {table} WHERE {condition} LIMIT 1 BY id", columns.join(", "));
        let mut query = client.query(&sql);
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

/// Every column of `icr` and `icr_ingest` on a node: (`database.table`,
/// column, type).
async fn columns_of(client: &Client) -> Result<Vec<(String, String, String)>> {
    Ok(client
        .query("SELECT concat(database, '.', table), name, type FROM system.columns WHERE database IN (?, ?)")
        .bind(DATABASE)
        .bind(INGEST)
        .fetch_all()
        .await?)
}

/// The shard layout `init` noted last on a node, and since when (Unix
/// seconds); none when it noted none.
async fn noted_layout(client: &Client) -> Result<Option<(u32, String)>> {
    let sql = format!("SELECT toUInt32(since), layout FROM {DATABASE}.{} ORDER BY since DESC LIMIT 1", schema::LAYOUTS);
    Ok(client.query(&sql).fetch_optional().await?)
}

/// Every table (and view) of `icr` and `icr_ingest` on a node, as `database.table`.
async fn tables_of(client: &Client) -> Result<Vec<String>> {
    Ok(client
        .query("SELECT concat(database, '.', name) FROM system.tables WHERE database IN (?, ?) ORDER BY database, name")
        .bind(DATABASE)
        .bind(INGEST)
        .fetch_all()
        .await?)
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
        let wanted = [("day", "Date"), ("dns_all_qname", "Array(String)"), ("local", "UInt8")];
        let tables: Vec<String> = ["icr.records_by_service_local", "icr.records_local"].map(String::from).into();
        let column = |table: &str, name: &str| (table.to_string(), name.to_string(), String::new());
        let mut present = vec![column("icr.records_local", "day"), column("elsewhere", "local")];
        present.extend(wanted.iter().map(|(name, _)| column("icr.records_by_service_local", name)));
        assert_eq!(
            schema::alter_statements(&tables, &present, &wanted),
            [
                "ALTER TABLE icr.records_local ADD COLUMN dns_all_qname Array(String)",
                "ALTER TABLE icr.records_local ADD COLUMN local UInt8",
            ]
        );
        present.extend(wanted.iter().map(|(name, _)| column("icr.records_local", name)));
        assert!(schema::alter_statements(&tables, &present, &wanted).is_empty(), "again: nothing to add");
    }
}
