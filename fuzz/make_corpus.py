#!/usr/bin/env python3
"""Builds the seed corpora (corpus/<target>/seed-*) from the real captures in
tests/captures of this repository (or the directory given), with tshark 4.x.

Each seed is named seed-<sha1 prefix>; libFuzzer's own finds (named by their
full sha1) stay out of git through .gitignore.
"""
import collections, hashlib, os, shutil, struct, subprocess, sys

HERE = os.path.dirname(os.path.abspath(__file__))
CAPTURES = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "tests", "captures")
CORPUS = os.path.join(HERE, "corpus")
MAX_CAPTURE = 40_000          # bytes: captures larger than this are skipped
PER_TARGET = {"quic_frames": 20, "tls_client_hello": 40, "http_host": 25, "dns_message": 80, "quic_initial": 25,
              "flow_hints": 60, "read_capture": 14, "to_ethernet": 60}
FIELDS = ["tcp.stream", "udp.stream", "tcp.srcport", "tcp.dstport", "udp.srcport", "udp.dstport",
          "tcp.seq_raw", "tcp.flags.syn", "tcp.payload", "udp.payload"]
# DataLink numbers, in the order fuzz_targets/to_ethernet.rs lists them.
LINKS = [1, 113, 276, 101, 228, 229, 0, 108, 9]
PORT_INDEX = {53: 0, 443: 1, 80: 2}

seeds = collections.defaultdict(dict)


def add(target, data, limit=None):
    if not data:
        return
    if limit:
        data = data[:limit]
    seeds[target].setdefault(hashlib.sha1(data).hexdigest(), data)


def captures():
    for root, _, files in os.walk(CAPTURES):
        for name in sorted(files):
            if name.endswith((".pcap", ".pcapng", ".cap")):
                path = os.path.join(root, name)
                if os.path.getsize(path) <= MAX_CAPTURE:
                    yield path


def packets(path):
    out = subprocess.run(["tshark", "-r", path, "-T", "fields", "-E", "occurrence=l", "-E", "separator=\t"]
                         + sum((["-e", f] for f in FIELDS), []),
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        row = dict(zip(FIELDS, line.split("\t")))
        if row.get("tcp.stream"):
            yield ("tcp", int(row["tcp.stream"]), int(row["tcp.srcport"]), int(row["tcp.dstport"]),
                   int(row["tcp.seq_raw"] or 0), row["tcp.flags.syn"] in ("1", "True"),
                   bytes.fromhex(row.get("tcp.payload", "")))
        elif row.get("udp.stream") and row.get("udp.srcport"):
            yield ("udp", int(row["udp.stream"]), int(row["udp.srcport"]), int(row["udp.dstport"]),
                   0, False, bytes.fromhex(row.get("udp.payload", "")))


def stream(segments):
    """A TCP direction's bytes in sequence order, up to the first gap."""
    if not segments:
        return b""
    base = min(seq for seq, _ in segments)
    out = bytearray()
    for seq, data in sorted(segments):
        offset = seq - base
        if offset > len(out):
            break
        out += data[len(out) - offset:]
    return bytes(out)


def from_flows(path):
    flows = collections.defaultdict(list)
    for proto, sid, sport, dport, seq, syn, payload in packets(path):
        flows[(proto, sid)].append((sport, dport, seq, syn, payload))
    for (proto, _), pkts in flows.items():
        client = pkts[0][0], pkts[0][1]
        if client[0] in PORT_INDEX and client[1] not in PORT_INDEX:
            client = client[::-1]  # the capture starts with the server's side
        server_port = client[1]
        dirs = {0: [], 1: []}
        for sport, dport, seq, syn, payload in pkts:
            d = 0 if (sport, dport) == client else 1
            if payload:
                dirs[d].append((seq, payload))
        # flow_hints: the first packets of both directions, as the probe hands them over.
        records = bytearray([(1 if proto == "udp" else 0) | PORT_INDEX.get(server_port, 3) << 1])
        for sport, dport, seq, syn, payload in pkts[:16]:
            d = 0 if (sport, dport) == client else 1
            if syn:
                records += struct.pack(">BIH", d | 2, seq, 0)
            if payload:
                records += struct.pack(">BIH", d, seq, len(payload)) + payload
        add("flow_hints", bytes(records), 12_000)
        if proto == "tcp":
            up, down = stream(dirs[0]), stream(dirs[1])
            if up[:2] == b"\x16\x03" or b"\x16\x03" in up[:2048]:
                add("tls_client_hello", up, 8192)
            word = up.split(b" ", 1)[0]
            if word.isalpha() and word.isupper() and 3 <= len(word) <= 10:
                add("http_host", up, 4096)
            if 53 in client:
                add("dns_message", up, 4096)
                add("dns_message", down, 4096)
        else:
            if 53 in client or 5353 in client or 5355 in client:
                for _, _, _, _, payload in pkts:
                    add("dns_message", payload)
            first = dirs[0][0][1] if dirs[0] else b""
            if first[:1] and first[0] & 0xc0 == 0xc0 and first[1:5] in (b"\0\0\0\1", bytes.fromhex("6b3343cf")):
                add("quic_initial", b"".join(struct.pack(">H", len(p)) + p for _, p in dirs[0][:6]))


def handshake_message(stream):
    """The first handshake message of a client's TLS records."""
    message = bytearray()
    while len(stream) >= 5 and stream[0] == 0x16:
        length = struct.unpack(">H", stream[3:5])[0]
        message += stream[5:5 + length]
        stream = stream[5 + length:]
    if len(message) >= 4 and message[0] == 1:
        return bytes(message[:4 + int.from_bytes(message[1:4], "big")])
    return b""


def quic_frames_seeds():
    """Real ClientHellos as the plaintext of two Initials, the second half
    first (after an ACK), for quic_frames: flags, 2-byte length, frames."""
    def crypto(offset, data):
        return b"\x06" + struct.pack(">I", 0x8000_0000 | offset) + struct.pack(">I", 0x8000_0000 | len(data)) + data
    for n, stream in enumerate(sorted(seeds["tls_client_hello"].values(), key=len)):
        message = handshake_message(stream)
        if not message:
            continue
        half = len(message) // 2
        version = n & 1                       # v1 and v2
        to_server_cid = 2 if n % 3 == 0 else 0  # the second Initial to the server's id
        second = b"\x02\x00\x00\x00\x00" + crypto(half, message[half:])
        first = crypto(0, message[:half])
        add("quic_frames", struct.pack(">BH", version | to_server_cid | 1 << 3, len(second)) + second
            + struct.pack(">BH", version, len(first)) + first)


def classic_pcap_frames(path):
    """(linktype, frame) of a classic pcap file, for to_ethernet."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 24:
        return
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        return
    link = struct.unpack(endian + "I", data[20:24])[0] & 0x0fffffff
    at = 24
    while at + 16 <= len(data):
        incl = struct.unpack(endian + "I", data[at + 8:at + 12])[0]
        yield link, data[at + 16:at + 16 + incl]
        at += 16 + incl


def main():
    per_link = collections.Counter()
    link_captures = {}
    for path in captures():
        from_flows(path)
        for link, frame in classic_pcap_frames(path):
            # A few per link type (and per first nibble: IPv4/IPv6 for raw IP).
            kind = (link, frame[0] >> 4 if frame else 0)
            if link in LINKS and per_link[kind] < 4:
                per_link[kind] += 1
                add("to_ethernet", bytes([LINKS.index(link)]) + frame, 2048)
                # Link types no capture here uses, from the same packets:
                # raw IPv6 as DLT_IPV6, BSD null as OpenBSD loop.
                if link == 101 and frame[:1] and frame[0] >> 4 == 6:
                    add("to_ethernet", bytes([LINKS.index(229)]) + frame, 2048)
                if link == 0:
                    add("to_ethernet", bytes([LINKS.index(108)]) + frame, 2048)
                link_captures.setdefault(link, path)
    quic_frames_seeds()
    # read_capture: one small capture per link type, then the smallest others, and the pcapng files.
    chosen = list(link_captures.values())
    pcapng = [p for p in captures() if p.endswith(".pcapng")]
    chosen += [p for p in pcapng if p not in chosen]
    rest = sorted((p for p in captures() if p not in chosen and os.path.getsize(p) <= 6000), key=os.path.getsize)
    chosen += rest[: max(0, PER_TARGET["read_capture"] - len(chosen))]
    for path in chosen:
        with open(path, "rb") as f:
            add("read_capture", f.read())
    for target, by_hash in seeds.items():
        directory = os.path.join(CORPUS, target)
        os.makedirs(directory, exist_ok=True)
        for name in os.listdir(directory):
            if name.startswith("seed-"):
                os.remove(os.path.join(directory, name))
        # Up to the target's share, spread evenly over the sizes found.
        ordered = sorted(by_hash.items(), key=lambda kv: (len(kv[1]), kv[0]))
        share = min(len(ordered), PER_TARGET[target])
        picked = [ordered[i * len(ordered) // share] for i in range(share)]
        for digest, data in picked:
            with open(os.path.join(directory, f"seed-{digest[:16]}"), "wb") as f:
                f.write(data)
        print(f"{target}: {share} seeds of {len(ordered)}, {sum(len(d) for _, d in picked)} bytes")


if __name__ == "__main__":
    main()
