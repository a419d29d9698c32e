#!/usr/bin/env python3
"""Writes seed inputs for the fuzz targets: valid streams and images, so the
fuzzer starts past the checksums. Usage: make_seeds.py OUT_FRAME_DIR OUT_IMAGE_DIR"""
import os, struct, sys

def crc32c(data, crc=0):
    poly = 0x82F63B78
    crc ^= 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (poly if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF

def digest(mem):
    """The memory digest (protocol v2): CRC32C of the per-page CRC32Cs, little-endian."""
    return crc32c(b"".join(struct.pack("<I", crc32c(mem[i:i + PS])) for i in range(0, len(mem), PS)))

def frame(kind, a=0, b=0, c=0, payload=b"", codec=0):
    h = struct.pack("<BBHIQQI", kind, codec, 0, len(payload), a, b, c)
    return h + struct.pack("<I", crc32c(h + payload)) + payload

PS = 4096
BASE = 0x10000
HELLO, RB, PAGES, ZERO, RE, FIN, INDEX, TRAILER = 1, 5, 6, 7, 8, 9, 12, 13

def stream():
    mem = bytearray(0x6000)  # layout: 0x10000+0x4000, 0x20000+0x2000
    s = frame(RB, 0)
    s += frame(PAGES, BASE, PS, payload=b"\x11" * PS)
    mem[0:PS] = b"\x11" * PS
    s += frame(ZERO, BASE + PS, PS)
    s += frame(PAGES, 0x20000, PS, payload=b"\x22" * PS)
    mem[0x4000:0x5000] = b"\x22" * PS
    s += frame(RE, 0, 2, payload=struct.pack("<Q", 1))
    s += frame(FIN, 1, 0, digest(bytes(mem)))
    return s

def image():
    regions = [(BASE, 4 * PS)]
    hello = struct.pack("<QII16sII", PS, 0, 1, b"\0" * 16, len(regions), 0)
    for st, ln in regions:
        hello += struct.pack("<QQ", st, ln)
    out = b"PRCPIMG\0" + struct.pack("<II", 2, 0)
    out += frame(HELLO, payload=hello)
    out += frame(RB, 0)
    data_off = len(out) + 32
    out += frame(PAGES, BASE, PS, payload=b"\x33" * PS)
    out += frame(ZERO, BASE + PS, PS)
    out += frame(RE, 0, 1, payload=struct.pack("<Q", 1))
    mem = b"\x33" * PS + b"\0" * 3 * PS
    ck = digest(mem)
    out += frame(FIN, 1, 0, ck)
    index_off = len(out)
    out += frame(INDEX, payload=struct.pack("<QQQ", BASE, PS, data_off) + struct.pack("<QQQ", BASE + PS, PS, 2**64 - 1))
    out += frame(TRAILER, index_off, len(out), ck)
    return out

fd, idir = sys.argv[1], sys.argv[2]
os.makedirs(fd, exist_ok=True)
os.makedirs(idir, exist_ok=True)
open(os.path.join(fd, "seed-valid-stream"), "wb").write(b"\0" + stream())
open(os.path.join(idir, "seed-valid-image"), "wb").write(image())
