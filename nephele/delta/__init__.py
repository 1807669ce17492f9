"""nephele.delta: the block delta engine. Bytes and blocks in, a compact verified stream out, and back.

Knows nothing of VMs. The sender holds new images (or receives their blocks incrementally during a live
handoff); the receiver holds reference images (base disk, base memory, other images), identified on both
ends by the same ids and checked by content digest. Per 4 KiB block the stream carries nothing (unchanged),
a ZERO marker, a reference to a block the receiver already has (any reference image, or a block sent
earlier in the stream), or the bytes (raw, or XOR against the base block at the same offset), compressed
in batches with lz4 (default) or zstd. See wire.py and docs/wire-format.md for the format.

    encode_files(refs, targets, out)        one stream (also the single-file export format)
    decode_files(inp, refs, outputs)        rebuild, verify, then publish each output file
    Encoder / Decoder                       the incremental forms used by the live handoff
"""

from nephele.delta.decoder import Decoder, Sink, decode_files
from nephele.delta.encoder import Encoder, Target, encode_files
from nephele.delta.index import BlockIndex, RefSet, image_digest
from nephele.delta.stats import KindStats, StreamStats

__all__ = [
    "BlockIndex",
    "Decoder",
    "Encoder",
    "KindStats",
    "RefSet",
    "Sink",
    "StreamStats",
    "Target",
    "decode_files",
    "encode_files",
    "image_digest",
]
