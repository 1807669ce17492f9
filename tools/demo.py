#!/usr/bin/env python3
"""`make demo`: the main job of nephele, end to end, narrated for a newcomer.

1. a local two-node cloudlet (network namespaces edge-a and edge-b, each with its own libvirtd and sshd,
   joined by a 20 Mbit/s link);
2. the test guest's base image `tiny` and a snapshot `web`, captured at a pause as an operator would
   (here the pause is `virsh suspend`, scripted);
3. `nephele apply` of examples/cloudlet.yaml: web-1 starts on edge-a, its port 8080 answers HTTP;
4. the same manifest with web-1 placed on edge-b: `nephele apply` performs a live handoff, with progress
   and the stats table; the HTTP answer then comes from edge-b with the guest's counter continued.

Re-running it starts over with a fresh cloudlet. Everything lives under .demo/ and the cloudlet's
workdir; `nephele cloudlet down --name demo` removes it all.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from nephele.cloudlet import Cloudlet
from nephele.cloudlet.guest import ensure_guest
from nephele.errors import CloudletError

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
DEMO = ROOT / ".demo"
NAME = "demo"
RATE = "20mbit"


def say(step: str, text: str) -> None:
    print(f"\n\033[1m==> {step}\033[0m {text}", flush=True)


def run(*argv: str, check: bool = True, quiet: bool = False) -> subprocess.CompletedProcess[str]:
    shown = " ".join(a if " " not in a else repr(a) for a in argv)
    print(f"$ {shown.replace(str(BIN) + '/', '').replace(str(ROOT) + '/', '')}", flush=True)
    proc = subprocess.run(argv, text=True, capture_output=quiet, check=False)
    if check and proc.returncode not in (0, 2):
        if quiet:
            sys.stdout.write(proc.stdout)
            sys.stderr.write(proc.stderr)
        raise SystemExit(f"demo: `{shown}` failed (exit {proc.returncode})")
    return proc


def wait_for(what: str, pred: Any, timeout: float, step: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(step)
    raise SystemExit(f"demo: timed out after {timeout:.0f} s waiting for {what}")


def http(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return str(resp.read().decode().strip())
    except OSError:
        return None


def counter(body: str) -> int:
    return int(dict(kv.split("=", 1) for kv in body.split() if "=" in kv)["counter"])


def virsh(node: dict[str, Any], *args: str) -> str:
    out = subprocess.run(
        ["virsh", "-q", "-c", node["libvirt_uri"], *args], text=True, capture_output=True, check=False
    )
    return out.stdout


def pause_when_ready(
    node: dict[str, Any], prefix: str, builder: subprocess.Popen[str], settle: float, booting: bool
) -> None:
    """What the operator does in virt-manager: wait for the VM nephele booted, use it, pause it."""

    def domain() -> str | None:
        if builder.poll() is not None:
            raise SystemExit(f"demo: the build ended early (exit {builder.returncode})")
        names = [n for n in virsh(node, "list", "--name").split() if n.startswith(prefix)]
        return names[0] if names else None

    dom = wait_for(f"the {prefix} VM", domain, 180)
    serial = re.search(r"<source path='([^']+)'", virsh(node, "dumpxml", dom))
    if booting and serial:  # the node's /var/nephele is visible on the host under its host_root
        log = Path(node["host_root"]) / Path(serial.group(1)).relative_to(node["root"])
        wait_for(
            "the guest to boot (NEPHELE-READY)",
            lambda: log.is_file() and b"NEPHELE-READY" in log.read_bytes(),
            300,
        )
    time.sleep(settle)
    print(f"$ virsh suspend {dom}        # the pause tells nephele to capture the VM", flush=True)
    virsh(node, "suspend", dom)
    if builder.wait(600) != 0:
        raise SystemExit(f"demo: capture failed (exit {builder.returncode})")


def main() -> int:
    if os.geteuid() != 0:
        raise SystemExit("demo: run as root (it creates network namespaces and runs libvirtd and sshd)")
    nephele, client = str(BIN / "nephele"), str(BIN / "nephele-client")

    say("1/6", "A local cloudlet of two nodes, edge-a and edge-b (like `kind` for Kubernetes).")
    print("Each node is a network namespace with its own libvirtd, sshd and /var/nephele;")
    print(f"they are joined by a link shaped to {RATE}, a typical WAN uplink between edge sites.")
    try:
        Cloudlet.load(NAME)
        print("(a cloudlet named demo exists from an earlier run: starting over)")
        run(nephele, "cloudlet", "down", "--name", NAME)
    except CloudletError:
        pass
    run(nephele, "cloudlet", "up", "--name", NAME, "--nodes", "2", "--rate", RATE, "--guest")
    cloudlet = Cloudlet.load(NAME)
    a, b = cloudlet.node("edge-a").to_dict(), cloudlet.node("edge-b").to_dict()
    g = ensure_guest()
    guest = {"disk": str(g.disk), "kernel": str(g.kernel), "initrd": str(g.initrd)}

    say("2/6", "The base image `tiny`: boot the test guest on edge-a, pause it, nephele captures it.")
    print("The guest is a tiny Linux built from Debian packages; it serves HTTP with a live counter.")
    inbox = Path(a["host_root"]) / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    desc = {
        "disk": guest["disk"],
        "kernel": guest["kernel"],
        "initrd": guest["initrd"],
        "cmdline": "console=ttyS0 quiet panic=-1 nephele.fill=16 nephele.fillkind=random "
        "nephele.dirty=1 nephele.diskw=16 nephele.period=1",
        "memory_kib": 262144,
        "name": "tiny",
    }
    (inbox / "tiny.json").write_text(json.dumps(desc))
    build = subprocess.Popen(
        [
            client,
            "--cloudlet",
            NAME,
            "edge-a",
            "image",
            "build",
            "-t",
            "tiny",
            f"{a['root']}/inbox/tiny.json",
        ],
        text=True,
    )
    print("$ nephele-client --cloudlet demo edge-a image build -t tiny /var/nephele/inbox/tiny.json &")
    pause_when_ready(a, "nephele-build-", build, settle=1, booting=True)
    run(client, "--cloudlet", NAME, "edge-a", "images")

    say("3/6", "The snapshot `web`: resume the image, let it run a little, pause again.")
    print("A snapshot is stored as a delta (memory and disk) against its image: only what changed.")
    snap = subprocess.Popen(
        [client, "--cloudlet", NAME, "edge-a", "snapshot", "build", "tiny", "web"], text=True
    )
    print("$ nephele-client --cloudlet demo edge-a snapshot build tiny web &")
    pause_when_ready(a, "nephele-snap-", snap, settle=3, booting=False)
    run(client, "--cloudlet", NAME, "edge-a", "snapshots")

    print("\nExporting both so the manifest can name them as sources (edge-b gets them from there):")
    artifacts = DEMO / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    run(client, "--cloudlet", NAME, "edge-a", "image", "export", "tiny", f"{a['root']}/inbox/tiny-image.zip")
    run(client, "--cloudlet", NAME, "edge-a", "snapshot", "export", "web", f"{a['root']}/inbox/web.zip")
    shutil.copy(inbox / "tiny-image.zip", artifacts / "tiny-image.zip")
    shutil.copy(inbox / "web.zip", artifacts / "web.zip")

    say("4/6", "nephele apply: the manifest examples/cloudlet.yaml, pointed at this cloudlet's nodes.")
    manifest = DEMO / "cloudlet.yaml"
    text = (ROOT / "examples" / "cloudlet.yaml").read_text()
    nodes_yaml = cloudlet.manifest_nodes()
    text = re.sub(r"(?ms)^nodes:\n.*?(?=^\S)", nodes_yaml + "\n", text)
    manifest.write_text(text)
    print(
        f"({manifest.relative_to(ROOT)} is examples/cloudlet.yaml with the local nodes' addresses and keys)"
    )
    run(nephele, "validate", "-f", str(manifest))
    run(nephele, "apply", "-f", str(manifest), "--auto-approve")
    url_a = f"http://{a['address']}:8080/cgi-bin/state"
    before = wait_for("web-1 to answer HTTP on edge-a", lambda: http(url_a), 120)
    print(f"$ curl {url_a}\n{before}")
    time.sleep(3)
    before = http(url_a) or before
    print(f"$ curl {url_a}\n{before}")

    say("5/6", "Move web-1 to edge-b in the manifest and apply again: a live handoff over the WAN.")
    manifest.write_text(
        re.sub(r"(web-1:\n(?:\s+#.*\n)*?\s+snapshot: web[^\n]*\n\s+node: )edge-a", r"\1edge-b", text)
    )
    print("$ sed -i 's/node: edge-a/node: edge-b/' .demo/cloudlet.yaml   # web-1 only")
    run(nephele, "plan", "-f", str(manifest))
    run(nephele, "apply", "-f", str(manifest), "--auto-approve")

    say("6/6", "The VM now runs on edge-b; its state came along.")
    url_b = f"http://{b['address']}:8080/cgi-bin/state"
    after = wait_for("web-1 to answer HTTP on edge-b", lambda: http(url_b), 120)
    print(f"$ curl {url_b}\n{after}")
    gone = http(url_a)
    print(f"$ curl {url_a}\n{gone if gone else '(no answer: edge-a no longer runs web-1)'}")
    if counter(after) <= counter(before):
        raise SystemExit(f"demo: the counter did not continue ({counter(before)} -> {counter(after)})")
    print(f"The guest's counter continued: {counter(before)} on edge-a -> {counter(after)} on edge-b.")
    run(client, "--cloudlet", NAME, "edge-b", "ps")
    stats = sorted((Path(b["host_root"]) / "logs").glob("handoff_from_*.stats"))
    if stats:
        print(f"\nThe destination's record, {b['root']}/logs/{stats[-1].name}:")
        print(stats[-1].read_text())
    run(nephele, "handoffs", "--cloudlet", NAME)
    run(nephele, "status", "-f", str(manifest))

    print("\n\033[1mDone.\033[0m Try more: edit .demo/cloudlet.yaml and run")
    print("  .venv/bin/nephele plan -f .demo/cloudlet.yaml && .venv/bin/nephele apply -f .demo/cloudlet.yaml")
    print(
        f"Clean up everything the demo made:\n  .venv/bin/nephele cloudlet down --name {NAME} && rm -rf .demo"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
