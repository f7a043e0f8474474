//! From the first layout (icr before the compact one: each record three
//! times, in `records_local`, `records_by_device_local` and
//! `records_by_service_local`, with text ids and MACs) to [`super::schema`]'s.
//!
//! On each node: the older `records_local` is renamed
//! `records_v1_local`; its two copies and the views that fed them are
//! dropped (every row of theirs is in it); the new tables are made, so that
//! gateways ship again; then each day of the older table is copied into
//! the new ones and dropped from it, oldest first, one progress line a
//! day. Stopped halfway, `init` goes on from the first day not copied (a day
//! cut off mid-copy is copied again: its records are stored twice, and read
//! once). Rows no gateway could have written (an id that is no UUID, a MAC
//! that is none) are not copied, and counted.
use anyhow::{Context as _, Result};
use clickhouse::Client;

use super::{
    rows::RECORD_COLUMNS,
    schema::{BY_DEVICE, BY_NAME, DATABASE, INGEST, alter_statements, by_device_select, by_name_select},
};

/// The record columns of the first layout, in its order.
const V1_COLUMNS: &[(&str, &str)] = &[
    ("day", "Date"),
    ("id", "String"),
    ("probe", "String"),
    ("start_us", "Int64"),
    ("end_us", "Int64"),
    ("end_reason", "UInt8"),
    ("proto", "String"),
    ("device_mac", "String"),
    ("device_ip", "Nullable(FixedString(16))"),
    ("device_port", "Nullable(UInt16)"),
    ("vlan", "Array(UInt16)"),
    ("pppoe_session", "Nullable(UInt16)"),
    ("subscriber", "String"),
    ("public_ip", "FixedString(16)"),
    ("public_port", "UInt16"),
    ("remote_ip", "FixedString(16)"),
    ("remote_port", "UInt16"),
    ("service_name", "String"),
    ("service_source", "UInt8"),
    ("service_ech", "UInt8"),
    ("dns_qname", "String"),
    ("dns_qtype", "String"),
    ("dns_answers", "Array(String)"),
    ("packets_up", "UInt64"),
    ("packets_down", "UInt64"),
    ("bytes_up", "UInt64"),
    ("bytes_down", "UInt64"),
    ("incomplete", "UInt8"),
    ("dns_all_qname", "Array(String)"),
    ("dns_all_qtype", "Array(String)"),
    ("dns_all_answers", "Array(Array(String))"),
    ("local", "UInt8"),
    ("service_dns_at_us", "Int64"),
    ("service_resolver", "String"),
];

/// Where the first layout's records wait to be copied.
const V1: &str = "records_v1_local";

const UUID: &str = "'^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'";
const MAC: &str = "'^[0-9a-f]{2}(:[0-9a-f]{2}){5}$'";

/// A first-layout row that a gateway could have written.
fn v1_valid() -> String {
    format!("match(id, {UUID}) AND (device_mac = '' OR match(device_mac, {MAC}))")
}

/// The first-layout columns that change type or meaning: read as `v1_NAME`
/// (an alias may not take the name of a column it is made from).
const CONVERTED: [&str; 5] = ["id", "device_mac", "dns_all_qname", "dns_all_qtype", "dns_all_answers"];

/// Each column of [`RECORD_COLUMNS`] as an expression over a first-layout
/// row read with [`CONVERTED`] renamed.
fn from_v1(column: &str) -> String {
    // Rows shipped before dns_all existed carry their one exchange in dns_*.
    let only_first = "empty(v1_dns_all_qname) AND dns_qname != ''";
    match column {
        "id" => "toFixedString(UUIDStringToNum(v1_id), 16) AS id".into(),
        "device_mac" => "if(v1_device_mac = '', NULL, toFixedString(unhex(replaceAll(v1_device_mac, ':', '')), 6)) \
                         AS device_mac"
            .into(),
        "dns_all_qname" => format!("if({only_first}, [dns_qname], v1_dns_all_qname) AS dns_all_qname"),
        "dns_all_qtype" => format!("if({only_first}, [dns_qtype], v1_dns_all_qtype) AS dns_all_qtype"),
        "dns_all_answers" => format!("if({only_first}, [dns_answers], v1_dns_all_answers) AS dns_all_answers"),
        same => same.to_string(),
    }
}

/// The records of one first-layout day, as rows of the new layout.
fn converted(day: &str) -> String {
    let read = V1_COLUMNS
        .iter()
        .map(|(name, _)| match CONVERTED.contains(name) {
            true => format!("{name} AS v1_{name}"),
            false => name.to_string(),
        })
        .collect::<Vec<_>>()
        .join(", ");
    let select = RECORD_COLUMNS.iter().map(|(name, _)| from_v1(name)).collect::<Vec<_>>().join(", ");
    format!("(SELECT {select} FROM (SELECT {read} FROM {DATABASE}.{V1} WHERE day = '{day}' AND {}))", v1_valid())
}

/// What the first layout left on a node, from `system.columns`
/// (`database.table`, column, type).
pub struct Found<'a> {
    present: &'a [(String, String, String)],
}

impl<'a> Found<'a> {
    pub fn new(present: &'a [(String, String, String)]) -> Self {
        Self { present }
    }

    /// `records_local` is the first layout's (its id is text).
    fn v1_in_place(&self) -> bool {
        let records = format!("{DATABASE}.records_local");
        self.present.iter().any(|(t, name, kind)| *t == records && name == "id" && kind == "String")
    }
}

/// Moves the first layout's tables aside on one node (before the new
/// tables are made); returns what it did, for the operator.
pub async fn set_aside(client: &Client, node: &str, found: &Found<'_>) -> Result<Vec<String>> {
    if !found.v1_in_place() {
        return Ok(Vec::new());
    }
    let records = format!("{DATABASE}.records_local");
    let mut statements = alter_statements(std::slice::from_ref(&records), found.present, V1_COLUMNS);
    // Views first: each would go on reading a table about to go.
    for view in ["records_by_device_mv", "records_by_service_mv", "public_holders_mv"] {
        statements.push(format!("DROP TABLE IF EXISTS {DATABASE}.{view}"));
    }
    for view in ["records_mv", "records_by_device_mv", "records_by_service_mv", "public_holders_mv"] {
        statements.push(format!("DROP TABLE IF EXISTS {INGEST}.{view}"));
    }
    // Ingest tables of the old columns: made again with the new ones.
    for table in ["records", "records_local"] {
        statements.push(format!("DROP TABLE IF EXISTS {INGEST}.{table}"));
    }
    let copies = ["records_by_device", "records_by_service"];
    for table in copies.iter().flat_map(|t| [t.to_string(), format!("{t}_local")]).chain(["records".into()]) {
        statements.push(format!("DROP TABLE IF EXISTS {DATABASE}.{table}"));
    }
    statements.push(format!("RENAME TABLE {records} TO {DATABASE}.{V1}"));
    for statement in &statements {
        client.query(statement).execute().await.with_context(|| format!("on {node}: {statement}"))?;
    }
    Ok(vec![format!(
        "{node}: the records of the older layout (each kept three times) are set aside as {DATABASE}.{V1}, to be \
         copied; dropped its copies {DATABASE}.records_by_device_local and {DATABASE}.records_by_service_local, and \
         the views and ingest tables of the older columns"
    )])
}

/// Copies every day still in [`V1`] into the new tables, oldest first,
/// calling `progress` once a day; drops [`V1`] when it is empty.
pub async fn copy_days(client: &Client, node: &str, progress: &mut dyn FnMut(String)) -> Result<()> {
    let exists: u64 = client
        .query("SELECT count() FROM system.tables WHERE database = ? AND name = ?")
        .bind(DATABASE)
        .bind(V1)
        .fetch_one()
        .await?;
    if exists == 0 {
        return Ok(());
    }
    let days: Vec<(String, u64)> = client
        .query(&format!("SELECT toString(day), count() FROM {DATABASE}.{V1} GROUP BY day ORDER BY day"))
        .fetch_all()
        .await
        .with_context(|| format!("listing the days of {DATABASE}.{V1} on {node}"))?;
    let total = days.len();
    for (done, (day, rows)) in days.into_iter().enumerate() {
        let source = converted(&day);
        let main = RECORD_COLUMNS.iter().map(|(name, _)| *name).collect::<Vec<_>>().join(", ");
        for statement in [
            format!("INSERT INTO {DATABASE}.records_local ({main}) SELECT * FROM {source}"),
            format!("INSERT INTO {DATABASE}.{BY_DEVICE} {}", by_device_select(&source)),
            format!("INSERT INTO {DATABASE}.{BY_NAME} {}", by_name_select(&source)),
        ] {
            client.query(&statement).execute().await.with_context(|| format!("copying day {day} on {node}"))?;
        }
        let copied: u64 = client
            .query(&format!("SELECT count() FROM {DATABASE}.{V1} WHERE day = ? AND {}", v1_valid()))
            .bind(day.as_str())
            .fetch_one()
            .await?;
        client
            .query(&format!("ALTER TABLE {DATABASE}.{V1} DROP PARTITION '{day}'"))
            .execute()
            .await
            .with_context(|| format!("dropping the copied day {day} of {DATABASE}.{V1} on {node}"))?;
        let left_out = match rows - copied {
            0 => String::new(),
            bad => format!("; {bad} row(s) no gateway could have written (an id or MAC that is none) left out"),
        };
        progress(format!("{node}: copied day {day} ({}/{total}): {copied} records{left_out}", done + 1));
    }
    client.query(&format!("DROP TABLE {DATABASE}.{V1}")).execute().await?;
    progress(format!("{node}: every record of the older layout is in the new tables; {DATABASE}.{V1} dropped"));
    Ok(())
}
