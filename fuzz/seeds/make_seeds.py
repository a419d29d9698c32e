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
    """The memory digest (protocol v3): CRC32C of the per-page CRC32Cs, little-endian."""
    return crc32c(b"".join(struct.pack("<I", crc32c(mem[i:i + PS])) for i in range(0, len(mem), PS)))

def frame(kind, a=0, b=0, c=0, payload=b"", codec=0):
    h = struct.pack("<BBHIQQI", kind, codec, 0, len(payload), a, b, c)
    return h + struct.pack("<I", crc32c(h + payload)) + payload

PS = 4096
HELLO, RB, PAGES, ZERO, RE, FIN, INDEX, TRAILER, STATE = 1, 5, 6, 7, 8, 9, 12, 13, 14
STATE_BLOB = b"vcpu0 rip=0xfff0"

def state():
    return frame(STATE, len(STATE_BLOB), 0, crc32c(STATE_BLOB), STATE_BLOB)

def stream():
    # The fuzz target's layout: region 0 (0x4000 bytes), region 1 (0x2000 bytes).
    # PAGES and ZERO name (a = offset in region, c = region id).
    mem = bytearray(0x6000)
    s = frame(RB, 0)
    s += frame(PAGES, 0, PS, 0, payload=b"\x11" * PS)
    mem[0:PS] = b"\x11" * PS
    s += frame(ZERO, PS, PS, 0)
    s += frame(PAGES, 0, PS, 1, payload=b"\x22" * PS)
    mem[0x4000:0x5000] = b"\x22" * PS
    s += frame(RE, 0, 2, payload=struct.pack("<Q", 1))
    s += state()
    s += frame(FIN, 1, 0, digest(bytes(mem)))
    return s

def image():
    # (id, backing, flags, size, page size, guest address)
    regions = [(3, 1, 1, 4 * PS, PS, 0x100000)]
    hello = struct.pack("<II16sII", 0, 1, b"\0" * 16, len(regions), 0)
    for rid, backing, flags, size, ps, gpa in regions:
        hello += struct.pack("<IBBHQQQ", rid, backing, flags, 0, size, ps, gpa)
    out = b"PRCPIMG\0" + struct.pack("<II", 3, 0)
    out += frame(HELLO, payload=hello)
    out += frame(RB, 0)
    data_off = len(out) + 32
    out += frame(PAGES, 0, PS, 3, payload=b"\x33" * PS)
    out += frame(ZERO, PS, PS, 3)
    out += frame(RE, 0, 1, payload=struct.pack("<Q", 1))
    out += state()
    mem = b"\x33" * PS + b"\0" * 3 * PS
    ck = digest(mem)
    out += frame(FIN, 1, 0, ck)
    index_off = len(out)
    out += frame(INDEX, payload=struct.pack("<IIQQQ", 3, 0, 0, PS, data_off) + struct.pack("<IIQQQ", 3, 0, PS, PS, 2**64 - 1))
    out += frame(TRAILER, index_off, len(out), ck)
    return out

fd, idir = sys.argv[1], sys.argv[2]
os.makedirs(fd, exist_ok=True)
os.makedirs(idir, exist_ok=True)
open(os.path.join(fd, "seed-valid-stream"), "wb").write(b"\0" + stream())
open(os.path.join(idir, "seed-valid-image"), "wb").write(image())
