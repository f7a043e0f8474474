//! Sample records, one of each sort a test needs, as the store keeps them.
use icr::record::Icr;

/// One TCP record on public 203.0.113.1:20000 at 10:00:00-10:00:05 on
/// 2026-11-22, of device 192.168.50.11, to 198.51.100.10:443; no name.
pub const TCP_JSON: &str = r#"{"id":"01a203cd-70ec-7c71-8778-7639fb3fa483","probe":"gw-07","start":"2026-11-22T10:00:00.000000Z",
 "end":"2026-11-22T10:00:05.000000Z","end_reason":"fin","proto":"tcp",
 "device":{"mac":"02:00:00:00:00:01","ip":"192.168.50.11","port":48416,"vlan":[],"pppoe_session":null,"subscriber":null},
 "public":{"ip":"203.0.113.1","port":20000},"remote":{"ip":"198.51.100.10","port":443},
 "service":null,"dns":null,"dns_all":null,"packets_up":9,"packets_down":6,"bytes_up":1226,"bytes_down":1284,
 "incomplete":false,"local":false}"#;

/// [`TCP_JSON`] as a record.
pub fn tcp() -> Icr {
    serde_json::from_str(TCP_JSON).expect("the sample record parses")
}
