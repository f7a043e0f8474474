//! Which shard holds a public address's records. ClickHouse 18.16 asks every
//! shard of a `Distributed` table, whatever the condition; the records are
//! sharded by `cityHash64(public_ip)`, so a resolve can ask the one shard
//! that key picks, as the `Distributed` table picked it at insert time.
//!
//! That holds only for records inserted under the cluster's present shards
//! and weights: `init` notes each layout it finds, and when, in
//! `icr.shard_layout_local` on every node; a resolve reads one shard only
//! when the present layout was noted before the first day it reads (else
//! every shard, as before).
use anyhow::{Context as _, Result};
use clickhouse::Client;

/// ClickHouse's `cityHash64` (CityHash64 1.0.2) of a `FixedString(16)`.
pub fn city_hash64(bytes: &[u8; 16]) -> u64 {
    const K_MUL: u64 = 0x9ddf_ea08_eb38_2d69;
    let hash_128_to_64 = |low: u64, high: u64| {
        let mut a = (low ^ high).wrapping_mul(K_MUL);
        a ^= a >> 47;
        let mut b = (high ^ a).wrapping_mul(K_MUL);
        b ^= b >> 47;
        b.wrapping_mul(K_MUL)
    };
    // HashLen0to16 for 8 < len <= 16.
    let len = bytes.len() as u64;
    let (first, last) = bytes.split_at(8);
    let a = u64::from_le_bytes(first.try_into().expect("8 bytes"));
    let b = u64::from_le_bytes(last.try_into().expect("8 bytes"));
    hash_128_to_64(a, b.wrapping_add(len).rotate_right(len as u32)) ^ b
}

/// One shard of the cluster: its number, weight and hosts (replicas).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    pub number: u32,
    pub weight: u32,
    pub hosts: Vec<String>,
}

/// The shards of a `remote_servers` cluster, in shard order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout(pub Vec<Shard>);

impl Layout {
    /// The cluster's layout as the node `client` reads it.
    pub async fn of(client: &Client, cluster: &str) -> Result<Self> {
        let rows: Vec<(u32, u32, String)> = client
            .query(
                "SELECT shard_num, shard_weight, host_address FROM system.clusters WHERE cluster = ? \
                 ORDER BY shard_num, replica_num",
            )
            .bind(cluster)
            .fetch_all()
            .await
            .context("reading the cluster's shards")?;
        let mut shards: Vec<Shard> = Vec::new();
        for (number, weight, host) in rows {
            match shards.last_mut() {
                Some(shard) if shard.number == number => shard.hosts.push(host),
                _ => shards.push(Shard { number, weight, hosts: vec![host] }),
            }
        }
        Ok(Self(shards))
    }

    /// What decides where a row goes: the shards' numbers and weights.
    pub fn fingerprint(&self) -> String {
        self.0.iter().map(|s| format!("{}*{}", s.number, s.weight)).collect::<Vec<_>>().join(" ")
    }

    /// The shard a `Distributed` table with sharding key `cityHash64(public_ip)`
    /// sends `public_ip`'s rows to: the key modulo the total weight, each
    /// shard taking as many slots as its weight, in order.
    pub fn shard_of(&self, public_ip: &[u8; 16]) -> Option<&Shard> {
        let total: u64 = self.0.iter().map(|s| u64::from(s.weight)).sum();
        let mut slot = city_hash64(public_ip).checked_rem(total)?;
        for shard in &self.0 {
            if slot < u64::from(shard.weight) {
                return Some(shard);
            }
            slot -= u64::from(shard.weight);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(hex: &str) -> [u8; 16] {
        hex::decode(hex).unwrap().try_into().unwrap()
    }

    #[test]
    fn the_hash_is_clickhouse_s() {
        // `SELECT cityHash64(toFixedString(unhex('…'), 16))` on 18.16.1.
        for (hex, hash) in [
            ("00000000000000000000ffffc6120005", 12_907_605_671_090_356_734u64),
            ("000102030405060708090a0b0c0d0e0f", 3_436_483_321_192_130_403),
            ("20010db8000000000000000000000001", 14_607_601_174_881_418_106),
        ] {
            assert_eq!(city_hash64(&bytes(hex)), hash, "{hex}");
        }
    }

    #[test]
    fn a_shard_takes_as_many_slots_as_its_weight() {
        let shard = |number, weight| Shard { number, weight, hosts: vec![format!("10.0.0.{number}")] };
        // Hash % 3 == 2 and % 2 == 0.
        let ip = bytes("20010db8000000000000000000000001");
        let layout = Layout(vec![shard(1, 1), shard(2, 2)]);
        assert_eq!(layout.shard_of(&ip).unwrap().number, 2, "slots 1 and 2 are shard 2's");
        let layout = Layout(vec![shard(1, 1), shard(2, 1)]);
        assert_eq!(layout.shard_of(&ip).unwrap().number, 1);
        // Hash % 2 == 1.
        assert_eq!(layout.shard_of(&bytes("000102030405060708090a0b0c0d0e0f")).unwrap().number, 2);
        assert_eq!(layout.fingerprint(), "1*1 2*1");
        assert!(Layout(vec![shard(1, 0)]).shard_of(&ip).is_none(), "no weight: no shard, not a panic");
    }
}
