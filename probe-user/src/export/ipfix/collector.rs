//! A collector's address as the configuration and `icr export ipfix` write
//! it: `udp://HOST:PORT` or `tcp://HOST:PORT`.
use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Collector {
    pub transport: Transport,
    /// A name or an address (an IPv6 one without its brackets).
    pub host: String,
    pub port: u16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the IPFIX collector {0:?} is not udp://HOST:PORT or tcp://HOST:PORT")]
pub struct BadCollector(pub String);

impl FromStr for Collector {
    type Err = BadCollector;

    fn from_str(text: &str) -> Result<Self, BadCollector> {
        let bad = || BadCollector(text.to_string());
        let url = url::Url::parse(text).map_err(|_| bad())?;
        let transport = match url.scheme() {
            "udp" => Transport::Udp,
            "tcp" => Transport::Tcp,
            _ => return Err(bad()),
        };
        // HOST:PORT and nothing else: a path, query or user would be ignored silently.
        if !url.username().is_empty()
            || url.password().is_some()
            || !url.path().is_empty()
            || url.query().is_some()
            || url.fragment().is_some()
        {
            return Err(bad());
        }
        let host = url.host_str().filter(|host| !host.is_empty()).ok_or_else(bad)?;
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host).to_string();
        let port = url.port().filter(|&port| port != 0).ok_or_else(bad)?;
        Ok(Self { transport, host, port })
    }
}

impl fmt::Display for Collector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.transport {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

impl Serialize for Collector {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Collector {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collectors_are_udp_or_tcp_host_and_port() {
        let udp: Collector = "udp://10.0.0.9:4739".parse().unwrap();
        assert_eq!((udp.transport, udp.host.as_str(), udp.port), (Transport::Udp, "10.0.0.9", 4739));
        let tcp: Collector = "tcp://[2001:db8::9]:4739".parse().unwrap();
        assert_eq!((tcp.transport, tcp.host.as_str()), (Transport::Tcp, "2001:db8::9"));
        assert_eq!(tcp.to_string(), "tcp://[2001:db8::9]:4739");
        assert_eq!("udp://collector.example:2055".parse::<Collector>().unwrap().host, "collector.example");
        for bad in [
            "10.0.0.9:4739",
            "http://10.0.0.9:4739",
            "udp://10.0.0.9",
            "udp://10.0.0.9:0",
            "udp://10.0.0.9:4739/path",
            "udp://user@10.0.0.9:4739",
            "udp://10.0.0.9:4739?x=1",
            "udp://:4739",
            "sctp://10.0.0.9:4739",
        ] {
            assert_eq!(bad.parse::<Collector>(), Err(BadCollector(bad.into())), "{bad}");
        }
    }
}
