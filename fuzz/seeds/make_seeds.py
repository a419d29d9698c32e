#!/usr/bin/env python3
"""Writes seed inputs for the fuzz targets: valid streams and images, so the
fuzzer starts past the checksums, and for every frame kind (1 HELLO .. 18 RESUME)
a stream and an image holding a well-formed frame of that kind where a round
could end, in raw and in described form (see fuzz_targets/frame_decoder.rs).
Usage: make_seeds.py OUT_FRAME_DIR OUT_IMAGE_DIR"""
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
(HELLO, CHALLENGE, AUTH, WELCOME, RB, PAGES, ZERO, RE, FIN, DONE, ERROR, INDEX, TRAILER, STATE,
 COMMIT, PING, PONG, RESUME) = range(1, 19)
KINDS = range(1, 19)
STATE_BLOB = b"vcpu0 rip=0xfff0"

def state():
    return frame(STATE, len(STATE_BLOB), 0, crc32c(STATE_BLOB), STATE_BLOB)

def hello_payload(regions):
    """stream 0 of 1, a zero nonce, then (id, backing, flags, size, page size, guest address)."""
    hello = struct.pack("<II16sII", 0, 1, b"\0" * 16, len(regions), 0)
    for rid, backing, flags, size, ps, gpa in regions:
        hello += struct.pack("<IBBHQQQ", rid, backing, flags, 0, size, ps, gpa)
    return hello

def fields_of(kind):
    """A well-formed frame of `kind` as (a, b, c, payload), for the fuzz target's layout."""
    return {
        HELLO: (7, 0, 0, hello_payload([(0, 1, 0, 0x4000, PS, 0), (1, 1, 0, 0x2000, PS, 0)])),
        CHALLENGE: (1, 0, 0, b"\x5a" * 16),
        AUTH: (0, 0, 0, b"\xa5" * 32),
        WELCOME: (0, 0, 0, b"\x3c" * 32),
        RB: (1, 0, 0, b""),
        PAGES: (PS, PS, 0, b"\x44" * PS),
        ZERO: (0, PS, 1, b""),
        RE: (1, 0, 0, struct.pack("<Q", 0)),
        FIN: (1, 0, 0, b""),
        DONE: (2, 0, 0, b""),
        ERROR: (0, 0, 1, b"the peer refused"),
        INDEX: (0, 0, 0, struct.pack("<IIQQQ", 0, 0, 0, PS, 2**64 - 1)),
        TRAILER: (64, 96, 0, b""),
        STATE: (len(STATE_BLOB), 0, crc32c(STATE_BLOB), STATE_BLOB),
        COMMIT: (0, 0, 0, b""),
        PING: (0x1234, 0, 0, b""),
        PONG: (0x1234, 0, 0, b""),
        RESUME: (1, 64, 0, struct.pack("<I", 0)),
    }[kind]

def stream(extra=b""):
    # The fuzz target's layout: region 0 (0x4000 bytes), region 1 (0x2000 bytes).
    # PAGES and ZERO name (a = offset in region, c = region id). `extra` goes
    # between the round and the state blob, where PING belongs.
    mem = bytearray(0x6000)
    s = frame(RB, 0)
    s += frame(PAGES, 0, PS, 0, payload=b"\x11" * PS)
    mem[0:PS] = b"\x11" * PS
    s += frame(ZERO, PS, PS, 0)
    s += frame(PAGES, 0, PS, 1, payload=b"\x22" * PS)
    mem[0x4000:0x5000] = b"\x22" * PS
    s += frame(RE, 0, 2, payload=struct.pack("<Q", 1))
    s += extra
    s += state()
    s += frame(FIN, 1, 0, digest(bytes(mem)))
    return s

def described(kind):
    """The target's described form (odd first byte): a ROUND_BEGIN, then one
    frame of `kind`; per frame kind, codec, flags, a, b, c, two length bytes."""
    def one(k, a, b, c, payload, wide=0):
        n = len(payload)
        return bytes([k, 0, wide, a & 0xFF, b & 0xFF, c & 0xFF, n // 64, n % 64]) + payload
    a, b, c, payload = fields_of(kind)
    # PAGES: raw length from `b` (flag 4); STATE: length and CRC32C fixed up (flag 16).
    wide = {PAGES: 4, STATE: 16}.get(kind, 0)
    b = {PAGES: 1, ZERO: 1}.get(kind, b)  # `b` (small form) counts 4 KiB pages
    return b"\x01" + one(RB, 0, 0, 0, b"") + one(kind, a // PS if kind in (PAGES, ZERO) else a, b, c, payload, wide)

def image(extra=b""):
    # (id, backing, flags, size, page size, guest address)
    out = b"PRCPIMG\0" + struct.pack("<II", 3, 0)
    out += frame(HELLO, payload=hello_payload([(3, 1, 1, 4 * PS, PS, 0x100000)]))
    out += frame(RB, 0)
    data_off = len(out) + 32
    out += frame(PAGES, 0, PS, 3, payload=b"\x33" * PS)
    out += frame(ZERO, PS, PS, 3)
    out += frame(RE, 0, 1, payload=struct.pack("<Q", 1))
    out += extra
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
for kind in KINDS:
    a, b, c, payload = fields_of(kind)
    f = frame(kind, a, b, c, payload)
    open(os.path.join(fd, f"seed-kind-{kind:02}"), "wb").write(b"\0" + stream(f))
    open(os.path.join(fd, f"seed-described-{kind:02}"), "wb").write(described(kind))
    open(os.path.join(idir, f"seed-kind-{kind:02}"), "wb").write(image(f))
