//! Follows the kernel's connection tracking over netlink (ctnetlink): a dump
//! of the table at start, then NEW and DESTROY events, each with the original
//! tuple (as the device sent it) and the reply tuple (as the internet answers
//! it, i.e. to the public address and port NAT chose).
use std::{net::IpAddr, time::Duration};

use anyhow::{Context as _, Result, bail};
use chrono::Utc;
use log::{debug, warn};
use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
    conntrack::{ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Tuple as CtTuple},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use tokio::{io::unix::AsyncFd, sync::mpsc};

use super::{Mapping, NatEvent};
use crate::capture::tuple::Tuple;

/// Multicast groups of ctnetlink (linux/netfilter/nfnetlink.h).
const NFNLGRP_CONNTRACK_NEW: u32 = 1;
const NFNLGRP_CONNTRACK_DESTROY: u32 = 3;
/// Room for bursts of new connections before the kernel reports ENOBUFS.
const RECEIVE_BUFFER_BYTES: usize = 8 << 20;

/// Starts following conntrack: sends the current table, then every change.
pub fn spawn(tx: mpsc::Sender<NatEvent>) -> Result<()> {
    let events = subscribe().context("subscribing to conntrack events (is nf_conntrack loaded?)")?;
    // Dump after subscribing, so nothing falls between the two.
    let existing = dump().context("dumping the conntrack table")?;
    let tx_dump = tx.clone();
    tokio::spawn(async move {
        for mapping in existing {
            if tx_dump.send(NatEvent::New(mapping)).await.is_err() {
                return;
            }
        }
    });
    tokio::spawn(follow(events, tx));
    Ok(())
}

fn subscribe() -> Result<AsyncFd<Socket>> {
    let mut socket = Socket::new(NETLINK_NETFILTER)?;
    socket.bind_auto()?;
    socket.add_membership(NFNLGRP_CONNTRACK_NEW)?;
    socket.add_membership(NFNLGRP_CONNTRACK_DESTROY)?;
    if let Err(error) = socket.set_rx_buf_sz(RECEIVE_BUFFER_BYTES) {
        warn!("could not enlarge the conntrack receive buffer: {error}");
    }
    socket.set_non_blocking(true)?;
    // SAFETY: the socket owns its fd for as long as the AsyncFd owns the socket.
    Ok(unsafe { AsyncFd::register(socket)? })
}

/// How often an idle follower looks at its socket: an overrun is dated
/// from the last time the socket was found empty, so a quiet socket is
/// looked at, not only a readable one.
const DRAINED_CHECK: Duration = Duration::from_secs(1);

async fn follow(socket: AsyncFd<Socket>, tx: mpsc::Sender<NatEvent>) {
    let mut buffer = vec![0u8; 1 << 16];
    // An overrun can only begin after the socket was last found empty.
    let mut drained_at = Utc::now();
    loop {
        let read = match tokio::time::timeout(DRAINED_CHECK, socket.readable()).await {
            Ok(Ok(mut guard)) => match guard.try_io(|socket| socket.get_ref().recv(&mut &mut buffer[..], 0)) {
                Ok(read) => read,
                Err(_would_block) => Err(std::io::ErrorKind::WouldBlock.into()),
            },
            Ok(Err(error)) => {
                warn!("conntrack socket failed: {error}");
                return;
            }
            // Quiet for a second: read anyway (the socket does not block), so
            // that an overrun pending since then is not dated after it.
            Err(_elapsed) => socket.get_ref().recv(&mut &mut buffer[..], 0),
        };
        let received = match read {
            Ok(n) => n,
            Err(error) if error.raw_os_error() == Some(libc::ENOBUFS) => {
                warn!("conntrack events overran the receive buffer; resynchronising from a dump");
                if tx.send(NatEvent::Overrun { since: drained_at }).await.is_err() {
                    return;
                }
                // What the overrun lost is still in the table (unless already
                // destroyed): read it all again.
                match tokio::task::spawn_blocking(dump).await {
                    Ok(Ok(mappings)) => {
                        for mapping in mappings {
                            if tx.send(NatEvent::New(mapping)).await.is_err() {
                                return;
                            }
                        }
                        // The mappings the dump did not name ended during the
                        // overrun: released, not held for ever.
                        if tx.send(NatEvent::Resynced).await.is_err() {
                            return;
                        }
                    }
                    Ok(Err(error)) => warn!("resynchronising conntrack: {error:#}"),
                    Err(error) => warn!("resynchronising conntrack: {error}"),
                }
                continue;
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                drained_at = Utc::now();
                continue;
            }
            Err(error) => {
                warn!("reading conntrack events: {error}");
                return;
            }
        };
        for event in parse_datagram(&buffer[..received]) {
            if tx.send(event).await.is_err() {
                return;
            }
        }
    }
}

/// Reads the whole conntrack table (blocking; used once at start).
fn dump() -> Result<Vec<Mapping>> {
    let mut socket = Socket::new(NETLINK_NETFILTER)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let request =
        NetfilterMessage::new(NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, 0), ConntrackMessage::Get(vec![]));
    let mut message = NetlinkMessage::new(header, NetlinkPayload::from(request));
    message.finalize();
    let mut bytes = vec![0u8; message.buffer_len()];
    message.serialize(&mut bytes);
    socket.send(&bytes, 0)?;

    let mut mappings = Vec::new();
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let received = socket.recv(&mut &mut buffer[..], 0)?;
        let mut offset = 0;
        while offset < received {
            let message = NetlinkMessage::<NetfilterMessage>::deserialize(&buffer[offset..received])
                .context("decoding the conntrack dump")?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::Done(_) => return Ok(mappings),
                NetlinkPayload::Error(error) => bail!("the kernel refused the dump: {error:?}"),
                NetlinkPayload::InnerMessage(inner) => {
                    if let Some(NatEvent::New(mapping)) = event_of(inner) {
                        mappings.push(mapping);
                    }
                }
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += align4(length);
        }
    }
}

/// Every conntrack event in one datagram (a datagram may hold several).
pub fn parse_datagram(mut bytes: &[u8]) -> Vec<NatEvent> {
    let mut events = Vec::new();
    while !bytes.is_empty() {
        let message = match NetlinkMessage::<NetfilterMessage>::deserialize(bytes) {
            Ok(message) => message,
            Err(error) => {
                debug!("skipping an undecodable conntrack message: {error}");
                break;
            }
        };
        let length = align4(message.header.length as usize);
        if let NetlinkPayload::InnerMessage(inner) = message.payload {
            events.extend(event_of(inner));
        }
        if length == 0 || length > bytes.len() {
            break;
        }
        bytes = &bytes[length..];
    }
    events
}

fn event_of(message: NetfilterMessage) -> Option<NatEvent> {
    let NetfilterMessageInner::Conntrack(message) = message.inner else { return None };
    let (attributes, new) = match message {
        ConntrackMessage::New(attributes) => (attributes, true),
        ConntrackMessage::Delete(attributes) => (attributes, false),
        _ => return None,
    };
    let mut original = None;
    let mut reply = None;
    for attribute in attributes {
        match attribute {
            ConntrackAttribute::CtaTupleOrig(parts) => original = tuple_of(&parts),
            ConntrackAttribute::CtaTupleReply(parts) => reply = tuple_of(&parts),
            _ => {}
        }
    }
    let mapping = Mapping { original: original?, reply: reply? };
    Some(if new { NatEvent::New(mapping) } else { NatEvent::Destroy(mapping) })
}

fn tuple_of(parts: &[CtTuple]) -> Option<Tuple> {
    let (mut src, mut dst) = (None::<IpAddr>, None::<IpAddr>);
    let (mut src_port, mut dst_port, mut proto) = (0u16, 0u16, None::<u8>);
    for part in parts {
        match part {
            CtTuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(address) => src = Some(*address),
                        IPTuple::DestinationAddress(address) => dst = Some(*address),
                        _ => {}
                    }
                }
            }
            CtTuple::Proto(fields) => {
                for field in fields {
                    match field {
                        ProtoTuple::Protocol(p) => proto = Some(u8::from(*p)),
                        ProtoTuple::SourcePort(port) => src_port = *port,
                        ProtoTuple::DestinationPort(port) => dst_port = *port,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(Tuple { src: src?, src_port, dst: dst?, dst_port, proto: proto?.into() })
}

fn align4(length: usize) -> usize {
    (length + 3) & !3
}
