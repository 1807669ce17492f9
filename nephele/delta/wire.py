"""The nephele delta stream format, version 1 (docs/wire-format.md is the long form).

A stream is ``MAGIC`` followed by frames. Every integer is little-endian. A frame is::

    u8  type        HEADER=1, TARGET=2, BLOCKS=3, END=4
    u8  codec       NONE=0, LZ4=1 (lz4 block, no size prefix), ZSTD=2 (zstd frame)
    u16 target      target index for TARGET/BLOCKS, 0xFFFF otherwise
    u32 seq         frame number, 0, 1, 2, ... (a dropped, repeated or reordered frame breaks the sequence)
    u32 stored_len  payload bytes that follow (compressed), at most MAX_STORED
    u32 raw_len     payload bytes after decompression, at most MAX_RAW
    payload[stored_len]
    u64 check       xxh3_64 over the 16 header bytes and the stored payload

Frame 0 is the HEADER (JSON: format, block size, the reference images the receiver must hold as
``{id, size, digest}``), then TARGET frames (JSON: ``{name, kind, size, base}``, declared in index order,
any time before END), BLOCKS frames, and one END frame (JSON: per target its block count and digest).
Nothing may follow END.

A BLOCKS payload (after decompression) is::

    u32 n, u32 nval, u32 nargs, u32 reserved(0)
    i64 block_delta[n]     block numbers, each stored as the difference to the previous one (first: to 0)
    u8  op[n]              BASE=0 ZERO=1 RAW=2 XOR=3 REF=4 STREAM=5 KEEP=6 (see _kernels.py)
    i64 arg[nargs]         for each REF entry ref<<40|block, for each STREAM entry target<<40|block, in order
    u8  value[nval][4096]  for each RAW entry its bytes, for each XOR entry its bytes XOR the base block

A frame has 1 to MAX_ENTRIES (16384) entries, naming distinct blocks. A receiver applies every
non-STREAM entry of a frame, then the STREAM entries (copies of what it holds now), so a frame decodes as
soon as it has arrived.

The digest of an image (a reference's content id, and each target's verification hash in END) is
``index.image_digest``: SHA-256 over the image size and the nph128 hash of every block. Both ends keep the
per-block hashes as blocks are written, so the final check costs one SHA-256 over 1/256 of the image
instead of a second pass over it; per-block 128-bit hashes catch any accidental corruption, the
transport (SSH/TLS) is what guards against a malicious sender.
"""

from __future__ import annotations

import json
import struct
from typing import Any

MAGIC = b"\x89NPHDLT\n"
FORMAT = 1
BLOCK = 4096

HEADER = 1
TARGET = 2
BLOCKS = 3
END = 4
FRAME_TYPES = {HEADER: "HEADER", TARGET: "TARGET", BLOCKS: "BLOCKS", END: "END"}

NONE = 0
LZ4 = 1
ZSTD = 2
CODECS = {"none": NONE, "lz4": LZ4, "zstd": ZSTD}

NO_TARGET = 0xFFFF
MAX_TARGETS = 0xFFFE
MAX_RAW = 64 << 20
MAX_STORED = MAX_RAW + (1 << 20)  # lz4/zstd worst-case expansion of MAX_RAW fits
MAX_JSON = 1 << 20
MAX_ENTRIES = 16384  # entries per BLOCKS frame (the receiver rebuilds at most 64 MiB per frame)

FRAME_HEAD = struct.Struct("<BBHIII")
CHECK = struct.Struct("<Q")
BLOCKS_HEAD = struct.Struct("<IIII")
OVERHEAD = FRAME_HEAD.size + CHECK.size

KINDS = ("disk", "memory")


def json_payload(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def blocks_raw_len(n: int, nval: int, nargs: int) -> int:
    return BLOCKS_HEAD.size + 9 * n + 8 * nargs + BLOCK * nval
