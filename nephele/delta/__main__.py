"""`python -m nephele.delta`: encode, decode, inspect and index delta streams from the shell.

    python -m nephele.delta encode --ref base-disk=D0.img --ref base-mem=M0.img \\
        --target disk:disk:D1.img:base-disk --target memory:memory:M1.img:base-mem -o snap.nphd
    python -m nephele.delta decode snap.nphd --ref base-disk=D0.img --ref base-mem=M0.img \\
        --out disk=D1.out --out memory=M1.out
    python -m nephele.delta info snap.nphd          # header, targets and per-frame totals, no refs needed
    python -m nephele.delta index D0.img M0.img     # build (or check) the .nxi block indexes
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from nephele.delta import wire as W
from nephele.delta.decoder import decode_files
from nephele.delta.encoder import Target, encode_files
from nephele.delta.index import BlockIndex
from nephele.errors import DeltaError, NepheleError


def _pairs(items: Sequence[str], what: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for item in items:
        key, sep, path = item.partition("=")
        if not sep or not key or not path:
            raise DeltaError(f"{what} must look like NAME=PATH, not {item!r}")
        out[key] = Path(path)
    return out


def _target(spec: str) -> Target:
    parts = spec.split(":")
    if len(parts) not in (3, 4) or parts[1] not in W.KINDS:
        raise DeltaError(f"--target must look like NAME:disk|memory:PATH[:BASE_REF], not {spec!r}")
    base = parts[3] if len(parts) == 4 and parts[3] else None
    return Target(parts[0], parts[1], Path(parts[2]), base)  # type: ignore[arg-type]


def _info(path: Path) -> dict[str, object]:
    """Walk the frames without decoding blocks: what a stream holds, for a quick look."""
    import xxhash

    data = path.read_bytes()
    if not data.startswith(W.MAGIC):
        raise DeltaError(f"{path}: not a nephele delta stream")
    pos, frames, header, targets, end = len(W.MAGIC), 0, None, [], None
    counts: dict[str, int] = {}
    while pos < len(data):
        if pos + W.FRAME_HEAD.size > len(data):
            raise DeltaError(f"{path}: truncated at byte {pos}")
        ftype, _codec, _target, _seq, slen, _rlen = W.FRAME_HEAD.unpack_from(data, pos)
        stop = pos + W.FRAME_HEAD.size + slen
        if stop + W.CHECK.size > len(data):
            raise DeltaError(f"{path}: truncated in frame {frames} at byte {pos}")
        if xxhash.xxh3_64_intdigest(data[pos:stop]) != W.CHECK.unpack_from(data, stop)[0]:
            raise DeltaError(f"{path}: checksum mismatch in frame {frames} at byte {pos}")
        body = data[pos + W.FRAME_HEAD.size : stop]
        name = W.FRAME_TYPES.get(ftype, str(ftype))
        counts[name] = counts.get(name, 0) + 1
        if ftype == W.HEADER:
            header = json.loads(body)
        elif ftype == W.TARGET:
            targets.append(json.loads(body))
        elif ftype == W.END:
            end = json.loads(body)
        pos = stop + W.CHECK.size
        frames += 1
    return {"bytes": len(data), "frames": counts, "header": header, "targets": targets, "end": end}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nephele.delta", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("encode", help="write one stream rebuilding the targets from the refs")
    e.add_argument("--ref", action="append", default=[], help="ID=PATH of an image the receiver holds")
    e.add_argument("--target", action="append", required=True, help="NAME:disk|memory:PATH[:BASE_REF]")
    e.add_argument("-o", "--output", type=Path, required=True)
    e.add_argument("--codec", default="lz4", choices=sorted(W.CODECS))
    e.add_argument("--level", type=int)
    e.add_argument("--sha256", action="store_true", help="also carry the SHA-256 of every whole image")
    d = sub.add_parser("decode", help="rebuild, verify, then write the targets")
    d.add_argument("stream", type=Path)
    d.add_argument("--ref", action="append", default=[], help="ID=PATH of an image this receiver holds")
    d.add_argument("--out", action="append", required=True, help="TARGET=PATH to write")
    i = sub.add_parser("info", help="show a stream's header, targets and trailer")
    i.add_argument("stream", type=Path)
    x = sub.add_parser("index", help="build or refresh the .nxi block index of images")
    x.add_argument("images", type=Path, nargs="+")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "encode":
            tmp = a.output.with_name(a.output.name + ".part")
            try:
                with open(tmp, "wb") as f:
                    st = encode_files(
                        _pairs(a.ref, "--ref"),
                        [_target(t) for t in a.target],
                        f,
                        codec=a.codec,
                        level=a.level,
                        sha256=a.sha256,
                    )
                tmp.replace(a.output)
            finally:
                tmp.unlink(missing_ok=True)
            print(st.table())
        elif a.cmd == "decode":
            with open(a.stream, "rb") as f:
                st = decode_files(f, _pairs(a.ref, "--ref"), _pairs(a.out, "--out"))
            print(st.table())
        elif a.cmd == "info":
            print(json.dumps(_info(a.stream), indent=2))
        else:
            for img in a.images:
                ix = BlockIndex.load_or_build(img)
                print(f"{img}: {ix.nblocks} blocks, digest {ix.digest.hex()}")
    except NepheleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
