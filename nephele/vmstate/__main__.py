"""python -m nephele.vmstate: look inside migration streams and libvirt save images.

info FILE               layout of a save image or a raw migration stream
split FILE DIR          flat RAM per block + the small parts (a save image's are stored for rebuild)
rebuild DIR OUT         a verified canonical save image from DIR [--xml FILE] [--running|--paused]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from nephele.errors import NepheleError
from nephele.vmstate.image import split_stream
from nephele.vmstate.savefile import (
    PARTIAL_MAGIC,
    SAVE_MAGIC,
    SaveHeader,
    read_save_header,
    rebuild_save_image,
    split_save_image,
    store_parts,
)
from nephele.vmstate.stream import (
    SECTION_NAMES,
    Command,
    Config,
    DeviceTail,
    MigrationStreamParser,
    Page,
    RamBlocks,
    SectionStart,
    StreamEnd,
    ZeroPage,
)


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n:,} B"


def _is_save_image(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(16) in (SAVE_MAGIC, PARTIAL_MAGIC)


def info(path: Path) -> None:
    offset = 0
    if _is_save_image(path):
        h: SaveHeader = read_save_header(path)
        print(
            f"libvirt save image: version {h.version}, data_len {h.data_len:,}, "
            f"was_running {int(h.was_running)}, cookie {'yes' if h.cookie is not None else 'no'}; "
            f"XML {len(h.xml):,} chars"
        )
        offset = h.stream_offset
    parser = MigrationStreamParser(require_vmdesc=False)
    kinds: Counter[str] = Counter()
    sent: Counter[tuple[str, int]] = Counter()
    zeros = 0
    tail_first: str | None = None
    vmdesc = False
    with open(path, "rb") as f:
        f.seek(offset)
        print(f"QEMU stream at byte {offset:,}")
        while True:
            data = f.read(1 << 20)
            events = parser.feed(data) if data else parser.close()
            for ev in events:
                if isinstance(ev, Page):
                    sent[(ev.block, ev.offset)] += 1
                elif isinstance(ev, ZeroPage):
                    zeros += 1
                elif isinstance(ev, Config):
                    caps = ", ".join(ev.capabilities) or "-"
                    print(f"machine {ev.machine}; validated capabilities: {caps}")
                elif isinstance(ev, Command):
                    print(f"command {ev.name} {ev.data.hex()}".rstrip())
                elif isinstance(ev, RamBlocks):
                    print("RAM blocks: " + ", ".join(f"{n} {_size(ln)}" for n, ln in ev.blocks))
                elif isinstance(ev, SectionStart):
                    kinds[SECTION_NAMES[ev.kind]] += 1
                elif isinstance(ev, DeviceTail):
                    tail_first = ev.first_device
                elif isinstance(ev, StreamEnd):
                    vmdesc = ev.vmdesc
            if not data or parser.done:
                break
    resent = sum(sent.values()) - len(sent)
    print(f"sections: {dict(kinds)}; iterations {parser.iteration}")
    print(
        f"page records {sum(sent.values()):,} ({len(sent):,} distinct pages, {resent:,} re-sent), "
        f"zero records {zeros:,}"
    )
    tail = len(parser.tail)
    print(
        f"device tail {tail:,} B from byte {parser.tail_offset:,} (first device {tail_first}); "
        f"VMDESCRIPTION {'yes' if vmdesc else 'no'}; stream {parser.offset:,} B"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nephele.vmstate", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("info", help="layout of a save image or a migration stream")
    p.add_argument("file", type=Path)
    p = sub.add_parser("split", help="flat RAM per block and the small parts")
    p.add_argument("file", type=Path)
    p.add_argument("dir", type=Path)
    p = sub.add_parser("rebuild", help="a canonical save image from a split one")
    p.add_argument("dir", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--xml", type=Path, help="domain XML to put in the header")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--running", dest="running", action="store_true", default=None)
    g.add_argument("--paused", dest="running", action="store_false")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "info":
            info(a.file)
        elif a.cmd == "split":
            if _is_save_image(a.file):
                parts = split_save_image(a.file, a.dir)
                store_parts(parts, a.dir)
                ram = parts.ram
            else:
                with open(a.file, "rb") as f:
                    ram = split_stream(f, a.dir, allow_missing=True).ram
            for name, path in ram.items():
                print(f"{name}\t{path}")
        else:
            xml = a.xml.read_text() if a.xml else None
            print(rebuild_save_image(a.dir, a.out, xml=xml, was_running=a.running))
    except (NepheleError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
