"""The handoff history: .stats records written by the real record writer (nephele.handoff.records) read
back by nephele.node.history, through the agent op and the `nephele handoffs` command."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from nephele.cli.cmd_handoffs import render_text
from nephele.cli.main import main
from nephele.errors import InvalidInput
from nephele.handoff.records import HandoffRecord, Records
from nephele.node import history

MiB = 1 << 20


def write_record(
    logs: Path,
    *,
    source: str = "10.201.0.1",
    title: str = "web-1",
    started: float,
    status: str = "completed",
    downtime: float | None = 0.734,
    finish: bool = True,
) -> Records:
    rec = HandoffRecord(source, title, f"uuid-{title}", 256 * MiB, 64 * MiB, started=started)
    records = Records(logs, rec)
    rec.iteration, rec.frames = 7, 123
    rec.wire = {"memory": 3 * MiB + 12345, "disk": 1 * MiB, "control": 40000}
    rec.stream_bytes = 270 * MiB
    rec.memory = (65536, 2000, 30000, 33536)
    rec.disk = (300, 280, 0, 20)
    rec.status = status
    rec.downtime = downtime
    if finish:
        rec.finished = started + 42.125
        records.stop()
    else:
        records.write_stats()
    return records


def test_a_completed_record_reads_back(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    t0 = time.mktime(time.strptime("2026-11-26 10:00:05", "%Y-%m-%d %H:%M:%S")) - time.timezone
    records = write_record(logs, started=t0)
    (logs / records.log_path.name.replace("handoff_", "mem_").replace(".log", ".png")).write_bytes(b"x")
    out = history.history(logs, "edge-b")
    assert out["errors"] == []
    (e,) = out["handoffs"]
    rec = records.record
    assert e["when"] == "2026-11-26T10:00:05Z"
    assert (e["from"], e["to"], e["instance"], e["uuid"]) == ("10.201.0.1", "edge-b", "web-1", "uuid-web-1")
    assert e["duration_s"] == 42.12 or e["duration_s"] == 42.13  # the file has 2 decimals
    assert e["downtime_s"] == 0.734 and e["outcome"] == "completed"
    assert (e["iterations"], e["blobs"]) == (7, 123)
    total = sum(rec.wire.values())
    assert abs(e["wire_bytes"] - total) <= 0.005 * MiB and e["wire_mib"] == round(total / MiB, 2)
    assert e["wire_mib_by_channel"] == {k: round(v / MiB, 2) for k, v in rec.wire.items()}
    assert (e["memory_mib"], e["disk_mib"]) == (256.0, 64.0)
    assert e["table_mib"]["memory"] == {
        c: round(v * 4096 / MiB, 2) for c, v in zip(history.COLUMNS, rec.memory, strict=True)
    }
    assert e["table_mib"]["disk"] == {
        c: round(v * 4096 / MiB, 2) for c, v in zip(history.COLUMNS, rec.disk, strict=True)
    }
    assert list(e["images"]) == ["memory"] and e["log_file"] == str(records.log_path)


def test_outcomes_and_order(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    now = time.time()
    write_record(logs, title="b", started=now - 7200, status="failed: the memory stream failed: cut")
    write_record(logs, title="a", started=now - 10800, downtime=None)
    fresh = write_record(logs, title="c", started=now - 3, status="running", finish=False)
    stale = write_record(logs, title="d", started=now - 3600, status="running", finish=False)
    os.utime(stale.stats_path, (now - 600, now - 600))  # its receiver stopped refreshing it
    got = [(e["instance"], e["outcome"], e["downtime_s"]) for e in history.history(logs)["handoffs"]]
    assert got == [
        ("a", "completed", None),
        ("b", "failed: the memory stream failed: cut", 0.734),
        ("d", "interrupted", 0.734),
        ("c", "running", 0.734),
    ]
    assert fresh.stats_path.exists()
    assert [e["instance"] for e in history.history(logs, limit=2)["handoffs"]] == ["d", "c"]


@pytest.mark.parametrize(
    ("mangle", "words"),
    [
        (lambda t: "", "empty stats file"),
        (lambda t: "hello\n" + t, ":1: expected 'Handoff of TITLE"),
        (lambda t: t.replace("Iterations: 7", "Iterations: many"), "'Iterations: many' is not a number"),
        (lambda t: t.replace("Status: completed\n", ""), "no 'Status:' line"),
        (lambda t: t.split("\n\n")[0], "no MEMORY row"),
        (lambda t: t + "garbage here\n", "cannot read 'garbage here'"),
    ],
)
def test_unreadable_records_are_named_and_the_rest_still_listed(tmp_path: Path, mangle, words: str) -> None:  # type: ignore[no-untyped-def]
    logs = tmp_path / "logs"
    good = write_record(logs, title="good", started=time.time() - 100)
    bad = write_record(logs, title="bad", started=time.time() - 5000)
    bad.stats_path.write_text(mangle(bad.stats_path.read_text()))
    out = history.history(logs)
    assert [e["instance"] for e in out["handoffs"]] == ["good"]
    (err,) = out["errors"]
    assert (
        err["file"] == str(bad.stats_path) and str(bad.stats_path) in err["error"] and words in err["error"]
    )
    assert good.stats_path.exists()
    with pytest.raises(InvalidInput, match=words):
        history.read_entry(bad.stats_path)


def test_no_logs_directory_is_an_empty_history(tmp_path: Path) -> None:
    assert history.history(tmp_path / "nothing") == {"node": "", "handoffs": [], "errors": []}


def test_nephele_handoffs_on_the_local_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Through the real agent (a `nephele agent call` subprocess on this machine)."""
    root = tmp_path / "root"
    now = time.time()
    write_record(root / "logs", title="web-1", started=now - 500)
    write_record(root / "logs", title="web-2", source="10.201.0.2", started=now - 100, status="failed: x")
    monkeypatch.setenv("NEPHELE_ROOT", str(root))
    assert main(["handoffs", "-o", "json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert [(e["instance"], e["from"], e["to"], e["outcome"]) for e in entries] == [
        ("web-1", "10.201.0.1", "local", "completed"),
        ("web-2", "10.201.0.2", "local", "failed: x"),
    ]
    assert main(["handoffs", "--last", "1"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0].split() == ["WHEN", "FROM", "TO", "INSTANCE", "DURATION", "DOWNTIME", "BYTES", "OUTCOME"]
    assert len(text) == 2 and "web-2" in text[1] and "10.201.0.2" in text[1] and "failed: x" in text[1]
    assert "0.73s" in text[1] and "4.05 MiB" in text[1]
    assert main(["handoffs", "edge-z"]) == 1
    assert "give the manifest (-f) or the cloudlet (--cloudlet)" in capsys.readouterr().err


def test_text_names_known_source_nodes() -> None:
    e = {
        "when": "2026-11-26T10:00:05Z",
        "from": "10.201.0.1",
        "from_node": "edge-a",
        "to": "edge-b",
        "instance": "web-1",
        "duration_s": 42.5,
        "downtime_s": None,
        "wire_bytes": 5 * MiB,
        "outcome": "completed",
    }
    line = render_text([e]).splitlines()[1].split()
    want = "2026-11-26 10:00:05 edge-a (10.201.0.1) edge-b web-1 42.5s - 5.00 MiB completed"
    assert line == want.split()


def test_nephele_handoffs_over_the_nodes_of_a_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two `address: local` nodes with their own roots: each node's records come back under its name."""
    now = time.time()
    write_record(tmp_path / "a" / "logs", title="to-a", source="10.9.0.2", started=now - 300)
    write_record(tmp_path / "b" / "logs", title="to-b", source="10.9.0.1", started=now - 200)
    write_record(tmp_path / "b" / "logs", title="to-b-2", source="10.9.0.1", started=now - 100)
    m = tmp_path / "cloudlet.yaml"
    m.write_text(
        "apiVersion: nephele.dev/v1\nkind: Cloudlet\nmetadata: {name: t}\nnodes:\n"
        f"  edge-a: {{address: local, root: {tmp_path / 'a'}}}\n"
        f"  edge-b: {{address: local, root: {tmp_path / 'b'}}}\n"
    )
    assert main(["handoffs", "-f", str(m), "-o", "json"]) == 0
    got = [(e["instance"], e["to"]) for e in json.loads(capsys.readouterr().out)]
    assert got == [("to-a", "edge-a"), ("to-b", "edge-b"), ("to-b-2", "edge-b")]
    assert main(["handoffs", "edge-b", "-f", str(m), "-o", "json"]) == 0
    assert [e["instance"] for e in json.loads(capsys.readouterr().out)] == ["to-b", "to-b-2"]
    assert main(["handoffs", "edge-z", "-f", str(m)]) == 1
    assert "no node 'edge-z'" in capsys.readouterr().err
    (tmp_path / "b" / "logs" / "handoff_from_x_at_20260101T000000.stats").write_text("junk\n")
    assert main(["handoffs", "-f", str(m)]) == 1  # listed, but a record could not be read
    cap = capsys.readouterr()
    assert (
        "to-b-2" in cap.out
        and "edge-b: " in cap.err
        and "handoff_from_x_at_20260101T000000.stats:1" in cap.err
    )
