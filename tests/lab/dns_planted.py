#!/usr/bin/python3
"""A capture of a gateway's LAN port where device A tries to plant names on
device B's records, and B looks names up itself. Writes one pcap (argument 1):

  t0       A -> B, from A's port 53: an answer B never asked for
           (illegal-content.example A 198.51.100.77, TTL one day)
  t0+0.1   A asks the gateway's resolver with B's address as its source
           (spoofed.example); the gateway answers B (198.51.100.78)
  t0+0.2   B asks the gateway's resolver for legit.example; the answer
           (198.51.100.79, TTL 300) comes from the gateway
  t0+0.3   B asks names holding '=', '+', '/', a space and octet 0xff
           (a DNS tunnel's); the gateway answers
  t0+1..3  B connects to .77, .78 and .79 on port 443 without SNI
  t0+3h    B connects to .77 again
"""
import sys

from scapy.all import DNS, DNSQR, DNSRR, IP, TCP, UDP, Ether, wrpcap

A_MAC, A_IP = "02:00:00:00:00:0a", "192.168.1.10"
B_MAC, B_IP = "02:00:00:00:00:0b", "192.168.1.12"
GATEWAY_MAC, GATEWAY_IP = "02:00:00:00:00:01", "192.168.1.1"
TUNNEL = [b"ab=cd+ef/gh.t.example.", b"odd label\xff.t.example."]


def answer(qid, qname, address, ttl):
    return DNS(id=qid, qr=1, aa=1, qd=DNSQR(qname=qname), an=DNSRR(rrname=qname, type="A", ttl=ttl, rdata=address))


def question(qid, qname):
    return DNS(id=qid, rd=1, qd=DNSQR(qname=qname))


def connection(sport, remote, t0):
    """B's TCP connection without payload: SYN, SYN-ACK, ACK, FINs."""
    out = Ether(src=B_MAC, dst=GATEWAY_MAC) / IP(src=B_IP, dst=remote)
    back = Ether(src=GATEWAY_MAC, dst=B_MAC) / IP(src=remote, dst=B_IP)
    packets = [
        out / TCP(sport=sport, dport=443, flags="S", seq=1000),
        back / TCP(sport=443, dport=sport, flags="SA", seq=5000, ack=1001),
        out / TCP(sport=sport, dport=443, flags="A", seq=1001, ack=5001),
        out / TCP(sport=sport, dport=443, flags="FA", seq=1001, ack=5001),
        back / TCP(sport=443, dport=sport, flags="FA", seq=5001, ack=1002),
        out / TCP(sport=sport, dport=443, flags="A", seq=1002, ack=5002),
    ]
    for i, p in enumerate(packets):
        p.time = t0 + i * 0.001
    return packets


def at(packet, time):
    packet.time = time
    return packet


def main(path):
    t0 = 1_700_000_000
    from_gateway = Ether(src=GATEWAY_MAC, dst=B_MAC) / IP(src=GATEWAY_IP, dst=B_IP)
    packets = [
        # Unsolicited, from A's own port 53.
        at(Ether(src=A_MAC, dst=B_MAC) / IP(src=A_IP, dst=B_IP) / UDP(sport=53, dport=40000)
           / answer(0x1111, "illegal-content.example.", "198.51.100.77", 86400), t0),
        # A's question with B's address; the gateway answers B.
        at(Ether(src=A_MAC, dst=GATEWAY_MAC) / IP(src=B_IP, dst=GATEWAY_IP) / UDP(sport=40001, dport=53)
           / question(0x2222, "spoofed.example."), t0 + 0.1),
        at(from_gateway / UDP(sport=53, dport=40001) / answer(0x2222, "spoofed.example.", "198.51.100.78", 86400), t0 + 0.11),
        # B's own question.
        at(Ether(src=B_MAC, dst=GATEWAY_MAC) / IP(src=B_IP, dst=GATEWAY_IP) / UDP(sport=40002, dport=53)
           / question(0x3333, "legit.example."), t0 + 0.2),
        at(from_gateway / UDP(sport=53, dport=40002) / answer(0x3333, "legit.example.", "198.51.100.79", 300), t0 + 0.21),
    ]
    for i, name in enumerate(TUNNEL):
        qid = 0x4440 + i
        packets.append(at(Ether(src=B_MAC, dst=GATEWAY_MAC) / IP(src=B_IP, dst=GATEWAY_IP) / UDP(sport=40003, dport=53)
                          / question(qid, name), t0 + 0.3 + i * 0.01))
        packets.append(at(from_gateway / UDP(sport=53, dport=40003) / answer(qid, name, "192.0.2.1", 60), t0 + 0.305 + i * 0.01))
    packets += connection(50077, "198.51.100.77", t0 + 1)
    packets += connection(50078, "198.51.100.78", t0 + 2)
    packets += connection(50079, "198.51.100.79", t0 + 3)
    packets += connection(50177, "198.51.100.77", t0 + 3 * 3600)
    wrpcap(path, packets)


if __name__ == "__main__":
    main(sys.argv[1])
