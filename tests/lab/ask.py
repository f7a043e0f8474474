#!/usr/bin/env python3
"""DNS questions from one UDP socket, as a stub resolver asks them.

ask.py SERVER NAME:TYPE [NAME:TYPE ...]: sends every question (A or AAAA)
from one socket, waits for every answer, and prints one line per question:
its name, then the addresses answered, separated by spaces.
"""
import random
import socket
import struct
import sys

TYPES = {"A": 1, "AAAA": 28}


def question(txid, name, qtype):
    labels = b"".join(bytes([len(part)]) + part.encode() for part in name.split("."))
    return struct.pack("!HHHHHH", txid, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack("!HH", TYPES[qtype], 1)


def skip_name(message, at):
    while True:
        length = message[at]
        if length == 0:
            return at + 1
        if length & 0xC0 == 0xC0:
            return at + 2
        at += 1 + length


def addresses(message):
    count = struct.unpack("!H", message[6:8])[0]
    at = skip_name(message, 12) + 4
    found = []
    for _ in range(count):
        at = skip_name(message, at)
        rtype, _, _, length = struct.unpack("!HHIH", message[at:at + 10])
        data = message[at + 10:at + 10 + length]
        if rtype == 1:
            found.append(socket.inet_ntop(socket.AF_INET, data))
        elif rtype == 28:
            found.append(socket.inet_ntop(socket.AF_INET6, data))
        at += 10 + length
    return found


def main(server, asked):
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.settimeout(10)
    pending = {}
    for item in asked:
        name, qtype = item.split(":")
        txid = random.randrange(1, 65536)
        while txid in pending:
            txid = random.randrange(1, 65536)
        pending[txid] = name
        sock.sendto(question(txid, name, qtype), (server, 53))
    answers = {}
    while len(answers) < len(pending):
        message, _ = sock.recvfrom(4096)
        txid = struct.unpack("!H", message[:2])[0]
        if txid in pending:
            answers[txid] = addresses(message)
    for txid, name in pending.items():
        print(name, *answers[txid], flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
