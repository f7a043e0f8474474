#!/usr/bin/python3
"""Crafted captures for encapsulations the lab's veths do not carry.

Writes one pcap (argument 1) of TLS ClientHellos, each in its own flow:
  vlan.example.test   802.1Q tag 100, IPv4
  qinq.example.test   802.1ad 300 + 802.1Q 20, IPv4
  pppoe6.example.test PPPoE session 0x1234, IPv6
  ext6.example.test   IPv6 with hop-by-hop, routing and destination options
  split.example.test  a ClientHello over two TCP segments, sent out of order
"""
import sys

from scapy.all import (
    IP, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting, PPP, PPPoE, TCP, Dot1AD, Dot1Q,
    Ether, wrpcap, raw,
)
from scapy.layers.tls.all import TLS, TLSClientHello, TLS_Ext_ServerName, ServerName

CLIENT_MAC = "02:00:00:00:00:17"
GATEWAY_MAC = "02:00:00:00:00:01"


def hello(name):
    ext = [TLS_Ext_ServerName(servernames=[ServerName(servername=name.encode())])]
    return raw(TLS(msg=[TLSClientHello(ciphers=[0x1301], ext=ext)]))


def flow(l2, l3, back, sport, payloads, t0):
    """SYN, the payload segments (seq given), the client's FIN, then the
    server's FIN (`back` is the reverse IP header); returns packets."""
    isn = 1000
    packets = [l2 / l3 / TCP(sport=sport, dport=443, flags="S", seq=isn)]
    for offset, data in payloads:
        packets.append(l2 / l3 / TCP(sport=sport, dport=443, flags="PA", seq=isn + 1 + offset, ack=1) / data)
    end = isn + 1 + sum(len(d) for _, d in payloads)
    packets.append(l2 / l3 / TCP(sport=sport, dport=443, flags="FA", seq=end, ack=1))
    server = Ether(src=GATEWAY_MAC, dst=CLIENT_MAC)
    packets.append(server / back / TCP(sport=443, dport=sport, flags="FA", seq=1, ack=end + 1))
    for i, p in enumerate(packets):
        p.time = t0 + i * 0.001
    return packets


def main(path):
    ether = Ether(src=CLIENT_MAC, dst=GATEWAY_MAC)
    v4 = IP(src="192.168.1.23", dst="192.0.2.10")
    v4_back = IP(src="192.0.2.10", dst="192.168.1.23")
    v6 = IPv6(src="2001:db8::23", dst="2001:db8::443")
    v6_back = IPv6(src="2001:db8::443", dst="2001:db8::23")
    packets = []
    packets += flow(ether / Dot1Q(vlan=100), v4, v4_back, 40001, [(0, hello("vlan.example.test"))], 1_700_000_000)
    packets += flow(ether / Dot1AD(vlan=300) / Dot1Q(vlan=20), v4, v4_back, 40002, [(0, hello("qinq.example.test"))], 1_700_000_001)
    packets += flow(Ether(src=CLIENT_MAC, dst=GATEWAY_MAC, type=0x8864) / PPPoE(sessionid=0x1234) / PPP(proto=0x0057),
                    v6, v6_back, 40003, [(0, hello("pppoe6.example.test"))], 1_700_000_002)
    ext6 = v6 / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting(addresses=[]) / IPv6ExtHdrDestOpt()
    packets += flow(ether, ext6, v6_back, 40004, [(0, hello("ext6.example.test"))], 1_700_000_003)
    split = hello("split.example.test")
    half = len(split) // 2
    packets += flow(ether, v4, v4_back, 40005, [(half, split[half:]), (0, split[:half])], 1_700_000_004)
    wrpcap(path, packets)


if __name__ == "__main__":
    main(sys.argv[1])
