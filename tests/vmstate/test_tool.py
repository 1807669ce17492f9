"""python -m nephele.vmstate: info, split, rebuild."""

from __future__ import annotations

from pathlib import Path

import pytest

from nephele.vmstate import savefile as sf
from nephele.vmstate.__main__ import main
from tests.vmstate import streams as b
from tests.vmstate.test_savefile import XML, image_bytes


def test_info_split_rebuild(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, final = b.complete_stream(commands=True)
    img = tmp_path / "x.save"
    img.write_bytes(image_bytes(data))
    assert main(["info", str(img)]) == 0
    out = capsys.readouterr().out
    assert "libvirt save image: version 2" in out
    assert "command OPEN_RETURN_PATH" in out and "command PING 00000001" in out
    assert "RAM blocks: pc.ram 64 KiB, pc.bios 16 KiB, /rom@etc/acpi/rsdp 4 KiB" in out
    assert "sections: {'START': 1, 'PART': 2, 'END': 1}; iterations 3" in out
    assert "page records 18 (17 distinct pages, 1 re-sent), zero records 7" in out
    assert "VMDESCRIPTION yes" in out

    assert main(["split", str(img), str(tmp_path / "parts")]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"pc.ram\t{tmp_path / 'parts' / 'pc.ram'}"
    xml = tmp_path / "new.xml"
    xml.write_text(XML.replace("tiny", "other"))
    assert (
        main(["rebuild", str(tmp_path / "parts"), str(tmp_path / "y.save"), "--xml", str(xml), "--paused"])
        == 0
    )
    h = sf.read_save_header(tmp_path / "y.save")
    assert "other" in h.xml and not h.was_running
    parts = sf.split_save_image(tmp_path / "y.save", tmp_path / "again")
    for name, content in final.items():
        assert parts.ram[name].read_bytes() == content

    img.write_bytes(image_bytes(data[:-30]))
    assert main(["info", str(img)]) == 0  # info reports what it can of a cut stream
    assert main(["split", str(img), str(tmp_path / "cut")]) == 1
    assert "error:" in capsys.readouterr().err
