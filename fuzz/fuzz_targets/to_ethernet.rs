//! Link layers to the Ethernet frame the XDP program parses. The first byte
//! picks the link type, the rest is the packet.
#![no_main]
use icr::capture::replay::to_ethernet;
use libfuzzer_sys::fuzz_target;
use pcap_file::DataLink;

const LINKS: [DataLink; 9] = [
    DataLink::ETHERNET,
    DataLink::LINUX_SLL,
    DataLink::LINUX_SLL2,
    DataLink::RAW,
    DataLink::IPV4,
    DataLink::IPV6,
    DataLink::NULL,
    DataLink::LOOP,
    DataLink::PPP,
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, packet)) = data.split_first() else { return };
    let link = LINKS[usize::from(pick) % LINKS.len()];
    if let Some(frame) = to_ethernet(link, packet) {
        assert!(frame.len() >= 14, "{link:?}: a frame shorter than an Ethernet header");
    }
});
