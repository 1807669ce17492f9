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

Live handoff (pages arrive over several pre-copy iterations; a later version of a block wins)::

    enc = Encoder({"base-mem": m0, "base-disk": d0}, sock_writer, "zstd")
    enc.begin_target("memory", "memory", size=ram_bytes, base="base-mem")
    enc.put_blocks("memory", page_numbers, pages)        # int64[n], uint8[n, 4096]; call as often as needed
    enc.finish()                                         # or finish({"memory": image_digest(...)})

    dec = Decoder({"base-mem": m0, "base-disk": d0}, {"memory": Sink(on_blocks=reemit)})
    dec.feed(chunk) ...                                  # each frame is applied as soon as it is complete
    dec.close()                                          # raises unless the END frame verified

A callback sink gets (block_numbers, data) for every block put, in stream order, including blocks the
receiver already had (KEEP), so a proxy can re-emit every page QEMU sent. One thread per Encoder/Decoder.
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
