//! The tables of one node, and the SELECTs that fill the narrow ones (the
//! ingest views use them, and so does the copy of an older layout).
//!
//! One full copy of each record, `records_local`, ordered for question 1
//! (public address, port, time). Questions 2 and 3 have narrow tables that
//! hold their key and the record's `(public_ip, public_port)` alone: a
//! question reads the keys there, then the records at those keys through
//! `records_local`'s primary index, and tests its condition again on the
//! records themselves (a key names every record at that address and port on
//! that day, not only the one indexed). They are `ReplacingMergeTree`s: a
//! device's many connections through one port on one day are one row after
//! a merge.
use super::rows::{GAP_COLUMNS, RECORD_COLUMNS};

/// The database of the records and gaps.
pub const DATABASE: &str = "icr";
/// Where gateways insert: `Null` tables that feed every `icr` table.
pub const INGEST: &str = "icr_ingest";

/// Question 2's table: a device's MAC, by day.
pub const BY_DEVICE: &str = "by_device_local";
/// Question 3's table: every name a record carries (its service name and
/// each DNS exchange's), by day.
pub const BY_NAME: &str = "by_name_local";
/// Which gateway held which public address on which day.
pub const HOLDERS: &str = "public_holders_local";
/// Each shard layout `init` found, and when ([`super::shards`]).
pub const LAYOUTS: &str = "shard_layout_local";

/// `name type, …` of a column list.
pub fn columns(list: &[(&str, &str)]) -> String {
    list.iter().map(|(name, kind)| format!("{name} {kind}")).collect::<Vec<_>>().join(", ")
}

/// The rows of [`BY_DEVICE`] made from records read from `source` (a table,
/// or a subquery in parentheses).
pub fn by_device_select(source: &str) -> String {
    format!(
        "SELECT day, assumeNotNull(device_mac) AS device_mac, public_ip, public_port FROM {source} \
         WHERE isNotNull(device_mac)"
    )
}

/// The rows of [`BY_NAME`] made from records read from `source`.
pub fn by_name_select(source: &str) -> String {
    format!(
        "SELECT day, name, public_ip, public_port FROM {source} \
         ARRAY JOIN arrayDistinct(arrayFilter(n -> n != '', arrayPushFront(dns_all_qname, service_name))) AS name"
    )
}

fn holders_select(source: &str) -> String {
    format!(
        "SELECT day, public_ip, probe, min(start_us) AS first_us, max(end_us) AS last_us, count() AS records \
         FROM {source} WHERE public_ip != toFixedString('', 16) GROUP BY day, public_ip, probe"
    )
}

/// The sharding key of the records (and of what is made from them): one
/// address's records are on one shard, which a resolve alone reads.
pub const RECORDS_SHARDING: &str = "cityHash64(public_ip)";

/// The DDL of one node; `cluster` names the `remote_servers` cluster of the
/// Distributed tables (none: one server).
pub fn ddl(cluster: Option<&str>) -> Vec<String> {
    let records = columns(RECORD_COLUMNS);
    let gaps = columns(GAP_COLUMNS);
    let mut ddl = vec![
        format!("CREATE DATABASE IF NOT EXISTS {DATABASE}"),
        format!(
            "CREATE TABLE IF NOT EXISTS {DATABASE}.records_local ({records}) ENGINE = MergeTree \
             PARTITION BY day ORDER BY (public_ip, public_port, start_us)"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {DATABASE}.{BY_DEVICE} (day Date, device_mac FixedString(6), \
             public_ip FixedString(16), public_port UInt16) ENGINE = ReplacingMergeTree \
             PARTITION BY day ORDER BY (device_mac, public_ip, public_port)"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {DATABASE}.{BY_NAME} (day Date, name String, \
             public_ip FixedString(16), public_port UInt16) ENGINE = ReplacingMergeTree \
             PARTITION BY day ORDER BY (name, public_ip, public_port)"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {DATABASE}.{HOLDERS} (day Date, public_ip FixedString(16), probe String, \
             first_us Int64, last_us Int64, records UInt64) ENGINE = MergeTree PARTITION BY day ORDER BY (public_ip, day, probe)"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {DATABASE}.gaps_local ({gaps}) ENGINE = MergeTree PARTITION BY day \
             ORDER BY (from_us, probe, kind)"
        ),
    ];
    if let Some(cluster) = cluster {
        ddl.push(format!(
            "CREATE TABLE IF NOT EXISTS {DATABASE}.{LAYOUTS} (since DateTime, layout String) ENGINE = MergeTree \
             ORDER BY since"
        ));
        for (table, sharding) in
            [("records", RECORDS_SHARDING), ("public_holders", RECORDS_SHARDING), ("gaps", "rand()")]
        {
            ddl.push(format!(
                "CREATE TABLE IF NOT EXISTS {DATABASE}.{table} AS {DATABASE}.{table}_local \
                 ENGINE = Distributed({cluster}, {DATABASE}, {table}_local, {sharding})"
            ));
        }
    }
    // Where gateways write: each row goes through a view to every `icr`
    // table on its shard; the `Null` tables keep nothing.
    let source = format!("{INGEST}.records_local");
    ddl.extend([
        format!("CREATE DATABASE IF NOT EXISTS {INGEST}"),
        format!("CREATE TABLE IF NOT EXISTS {INGEST}.records_local ({records}) ENGINE = Null"),
        format!("CREATE TABLE IF NOT EXISTS {INGEST}.gaps_local ({gaps}) ENGINE = Null"),
        format!("CREATE MATERIALIZED VIEW IF NOT EXISTS {INGEST}.records_mv TO {DATABASE}.records_local AS SELECT * FROM {source}"),
        format!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {INGEST}.by_device_mv TO {DATABASE}.{BY_DEVICE} AS {}",
            by_device_select(&source)
        ),
        format!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {INGEST}.by_name_mv TO {DATABASE}.{BY_NAME} AS {}",
            by_name_select(&source)
        ),
        format!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {INGEST}.public_holders_mv TO {DATABASE}.{HOLDERS} AS {}",
            holders_select(&source)
        ),
        format!("CREATE MATERIALIZED VIEW IF NOT EXISTS {INGEST}.gaps_mv TO {DATABASE}.gaps_local AS SELECT * FROM {INGEST}.gaps_local"),
    ]);
    if let Some(cluster) = cluster {
        for (table, sharding) in [("records", RECORDS_SHARDING), ("gaps", "rand()")] {
            ddl.push(format!(
                "CREATE TABLE IF NOT EXISTS {INGEST}.{table} AS {INGEST}.{table}_local \
                 ENGINE = Distributed({cluster}, {INGEST}, {table}_local, {sharding})"
            ));
        }
    }
    ddl
}

/// The statements that add to each of `tables` (`database.table`) the
/// columns of `wanted` that `present` (table, column, type) does not list
/// for it, in `wanted`'s order (an added column goes last; 18.16 has no
/// `ADD COLUMN IF NOT EXISTS`).
pub(super) fn alter_statements(
    tables: &[String],
    present: &[(String, String, String)],
    wanted: &[(&str, &str)],
) -> Vec<String> {
    let mut statements = Vec::new();
    for table in tables {
        for (name, kind) in wanted {
            if !present.iter().any(|(t, n, _)| t == table && n == name) {
                statements.push(format!("ALTER TABLE {table} ADD COLUMN {name} {kind}"));
            }
        }
    }
    statements
}
