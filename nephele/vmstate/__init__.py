"""QEMU 7.2 migration stream and libvirt save image: parse pages out, rebuild valid streams.

stream    incremental parser (events) and writer, byte-identical round trip
image     a stream as prefix + flat RAM per block + device tail; canonical rebuild and its verification
savefile  libvirt save image header/XML, split, extract_ram, write_save_image, replace_xml
"""

from nephele.vmstate.image import (
    FlatRam,
    SplitResult,
    StreamParts,
    block_filename,
    split_stream,
    strip_ignore_shared,
    verify_canonical,
    write_canonical_stream,
)
from nephele.vmstate.savefile import (
    SaveHeader,
    SaveImageParts,
    extract_ram,
    read_save_header,
    replace_xml,
    split_save_image,
    write_save_image,
)
from nephele.vmstate.stream import (
    PAGE_SIZE,
    Command,
    Config,
    DeviceTail,
    Event,
    MigrationStreamParser,
    MigrationStreamWriter,
    Opaque,
    Page,
    RamBlocks,
    SectionEnd,
    SectionStart,
    StreamEnd,
    VmStreamError,
    ZeroPage,
    event_bytes,
    events_to_bytes,
    iter_events,
)

__all__ = [
    "PAGE_SIZE",
    "Command",
    "Config",
    "DeviceTail",
    "Event",
    "FlatRam",
    "MigrationStreamParser",
    "MigrationStreamWriter",
    "Opaque",
    "Page",
    "RamBlocks",
    "SaveHeader",
    "SaveImageParts",
    "SectionEnd",
    "SectionStart",
    "SplitResult",
    "StreamEnd",
    "StreamParts",
    "VmStreamError",
    "ZeroPage",
    "block_filename",
    "event_bytes",
    "events_to_bytes",
    "extract_ram",
    "iter_events",
    "read_save_header",
    "replace_xml",
    "split_save_image",
    "split_stream",
    "strip_ignore_shared",
    "verify_canonical",
    "write_canonical_stream",
    "write_save_image",
]
