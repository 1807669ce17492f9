"""The local cloudlet on the real thing: namespaces, per-node libvirtd and sshd, shaped links, a guest VM
in a node answering from the host, and a teardown that leaves nothing behind."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest
import yaml

from nephele.cloudlet import Cloudlet, CloudletNode
from nephele.cloudlet.core import _mountpoints, _netns_list
from nephele.cloudlet.guest import GuestFiles, cmdline

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

# A TCP sink: accepts one connection, reads to EOF, answers the byte count.
SINK = (
    "import socket,sys\n"
    "s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind((sys.argv[1],int(sys.argv[2])))\n"
    "s.listen(1);print('ready',flush=True);s.settimeout(60);c,_=s.accept();n=0\n"
    "while True:\n d=c.recv(1<<16)\n if not d:break\n n+=len(d)\n"
    "c.sendall(str(n).encode());c.close()\n"
)
# An echo server for round trips: answers every chunk with the same bytes, until EOF; serves 5 clients.
ECHO = (
    "import socket,sys\n"
    "s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind((sys.argv[1],int(sys.argv[2])))\n"
    "s.listen(4);print('ready',flush=True);s.settimeout(60)\n"
    "for _ in range(5):\n c,_=s.accept()\n while True:\n  d=c.recv(4096)\n  if not d:break\n"
    "  c.sendall(d)\n c.close()\n"
)


def _start_server(node: CloudletNode, code: str, port: int) -> subprocess.Popen[str]:
    p = node.popen([sys.executable, "-c", code, node.address, str(port)], stdout=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


def _ssh(node: CloudletNode, cmd: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(node.ssh_command(cmd), capture_output=True, text=True, timeout=timeout, check=False)


def _can_connect(addr: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((addr, port), timeout=timeout):
            return True
    except OSError:
        return False


def test_inventory_and_manifest_snippet(cloudlet: Cloudlet) -> None:
    inv = json.loads(cloudlet.inventory_path.read_text())
    assert [n["name"] for n in inv["nodes"]] == ["edge-a", "edge-b"]
    assert len({n["address"] for n in inv["nodes"]}) == 2
    for n in inv["nodes"]:
        assert n["libvirt_uri"].startswith("qemu:///system?socket=")
        assert Path(n["ssh_key"]).is_file() and Path(n["host_root"]).is_dir()
    assert Cloudlet.load(cloudlet.name).to_dict() == inv  # found through the registry
    # The nodes.yaml snippet is valid against the manifest schema's node definition.
    schema = json.loads((ROOT / "schemas" / "cloudlet.schema.json").read_text())
    nodes = yaml.safe_load((cloudlet.dir / "nodes.yaml").read_text())["nodes"]
    assert set(nodes) == {"edge-a", "edge-b"}
    node_schema = {"$defs": schema["$defs"], **schema["$defs"]["node"]}
    for spec in nodes.values():
        jsonschema.validate(spec, node_schema)


def test_each_node_has_its_own_libvirtd(cloudlet: Cloudlet, guest: GuestFiles) -> None:
    import libvirt  # tests may import libvirt; inside the package only nephele.node does

    a, b = cloudlet.nodes
    xml = (
        "<domain type='qemu'><name>probe</name><memory unit='MiB'>64</memory>"
        f"<os><type arch='x86_64'>hvm</type><kernel>{guest.kernel}</kernel></os></domain>"
    )
    conn_a = libvirt.open(a.libvirt_uri)
    conn_b = libvirt.open(b.libvirt_uri)
    try:
        dom = conn_a.defineXML(xml)
        try:
            assert "probe" in [d.name() for d in conn_a.listAllDomains()]
            assert "probe" not in [d.name() for d in conn_b.listAllDomains()]
            # Inside the node, plain qemu:///system is that node's libvirtd.
            inside = a.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"], check=True)
            assert "probe" in inside.stdout.split()
            inside_b = b.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"], check=True)
            assert "probe" not in inside_b.stdout.split()
            # Its definition is stored in the node's own /var/lib/libvirt.
            assert (a.libvirt_dir / "etc" / "qemu" / "probe.xml").exists()
        finally:
            dom.undefine()
    finally:
        conn_a.close()
        conn_b.close()


def test_ssh_login_sees_the_node(cloudlet: Cloudlet) -> None:
    for n in cloudlet.nodes:
        (n.host_root / f"marker-{n.name}").write_text(n.name)
    for n in cloudlet.nodes:
        r = _ssh(
            n, "hostname; cat /etc/hostname; echo $NEPHELE_NODE; ls /var/nephele; ip -4 -o addr show eth0"
        )
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[:3] == [n.name, n.name, n.name]
        others = [m.name for m in cloudlet.nodes if m is not n]
        assert f"marker-{n.name}" in lines and not any(f"marker-{o}" in lines for o in others)
        assert f"inet {n.address}/" in r.stdout
        # nephele is installed on the node, on the PATH of an SSH session, and sees libvirt there.
        r = _ssh(n, "nephele --version && virsh -c qemu:///system list --name >/dev/null && echo lv-ok")
        assert r.returncode == 0 and "nephele " in r.stdout and "lv-ok" in r.stdout, r.stdout + r.stderr


def test_node_reaches_the_other_node_by_ssh(cloudlet: Cloudlet) -> None:
    a, b = cloudlet.nodes
    r = a.run(b.ssh_command("hostname"), timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == b.name, r.stderr


def test_links_are_shaped_with_tbf(cloudlet: Cloudlet) -> None:
    a, b = cloudlet.nodes
    for n in cloudlet.nodes:
        for side in cloudlet.qdisc(n):
            assert re.search(r"qdisc tbf .*rate 20Mbit", side), side
    # 4 MiB from A to B at 20 Mbit/s is about 1.7 s; the bound is loose (shared 2-core machine).
    sink = _start_server(b, SINK, 5001)
    sender = (
        "import socket,sys,time\n"
        "c=socket.create_connection((sys.argv[1],5001),timeout=30);t=time.monotonic();buf=b'x'*65536\n"
        "for _ in range(64): c.sendall(buf)\n"
        "c.shutdown(socket.SHUT_WR);n=int(c.recv(64));print(n,time.monotonic()-t)\n"
    )
    r = a.run([sys.executable, "-c", sender, b.address], check=True, timeout=60)
    sink.wait(10)
    n, secs = r.stdout.split()
    assert int(n) == 4 << 20
    mbit = (4 << 20) * 8 / float(secs) / 1e6
    assert 8 < mbit < 24, f"4 MiB took {float(secs):.2f} s = {mbit:.1f} Mbit/s on a 20 Mbit/s link"
    cloudlet.set_link(5, a)
    try:
        assert "rate 5Mbit" in cloudlet.qdisc(a)[0] and "rate 5Mbit" in cloudlet.qdisc(a)[1]
        assert "rate 20Mbit" in cloudlet.qdisc(b)[0]
    finally:
        cloudlet.set_link(20, a)


def test_slowing_a_busy_link_does_not_wedge_it(cloudlet: Cloudlet) -> None:
    """A tbf changed in place to a smaller burst kept the packets it held, and one larger than the new
    burst (a 64 KiB GSO packet queued at 200 Mbit/s) could never leave: the link stayed dead for good
    (it stopped the fault matrix). set_link recreates the qdisc instead; 3 rounds of 200 -> 20 Mbit/s
    under a bulk transfer, each must finish and leave the link usable."""
    a, b = cloudlet.nodes
    sender = (
        "import socket,sys,time\n"
        "c=socket.create_connection((sys.argv[1],5002),timeout=30);t=time.monotonic();buf=b'x'*65536\n"
        "while time.monotonic()-t<3: c.sendall(buf)\n"
        "c.shutdown(socket.SHUT_WR);print(int(c.recv(64)))\n"
    )
    try:
        for _ in range(3):
            cloudlet.set_link(200)
            sink = _start_server(b, SINK, 5002)
            run = a.popen([sys.executable, "-c", sender, b.address], stdout=subprocess.PIPE)
            time.sleep(1.5)  # a queue full of 200 Mbit/s traffic
            cloudlet.set_link(20)
            out, _ = run.communicate(timeout=60)
            sink.wait(10)
            assert run.returncode == 0 and int(out) > 0
            assert _ssh(a, "true", timeout=20).returncode == 0
    finally:
        cloudlet.set_link(20)


def test_cut_and_restore_link(cloudlet: Cloudlet) -> None:
    a = cloudlet.nodes[0]
    assert _can_connect(a.address, 22)
    cloudlet.cut_link(a)
    try:
        assert not _can_connect(a.address, 22, timeout=1.5)
    finally:
        cloudlet.restore_link(a)
    deadline = time.monotonic() + 10
    while not _can_connect(a.address, 22) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _ssh(a, "true").returncode == 0


def test_stop_and_start_sshd(cloudlet: Cloudlet) -> None:
    b = cloudlet.nodes[1]
    cloudlet.stop_sshd(b)
    try:
        assert not _can_connect(b.address, 22)
        assert _ssh(b, "true", timeout=20).returncode != 0
        assert cloudlet.status()[1]["sshd_pid"] is None
    finally:
        cloudlet.start_sshd(b)
    assert _ssh(b, "hostname").stdout.strip() == b.name


def test_delay_proxy_adds_round_trip_delay(cloudlet: Cloudlet) -> None:
    a, b = cloudlet.nodes
    echo = _start_server(b, ECHO, 5002)
    proxy = cloudlet.start_delay_proxy(a, 5003, (b.address, 5002), delay_ms=40)
    try:
        assert proxy.listen == (a.address, 5003)

        def rtt(host: str, port: int) -> float:
            with socket.create_connection((host, port), timeout=10) as s:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                best = 10.0
                for i in range(3):
                    t = time.monotonic()
                    s.sendall(b"ping%d" % i)
                    assert s.recv(64) == b"ping%d" % i
                    best = min(best, time.monotonic() - t)
                return best

        direct = rtt(b.address, 5002)
        proxied = rtt(a.address, 5003)
        assert direct < 0.05, direct
        assert 0.075 < proxied < 0.6, f"RTT through a 40 ms proxy: {proxied * 1000:.0f} ms"
    finally:
        proxy.stop()
        echo.kill()
        echo.wait()


def _domain_xml(name: str, g: GuestFiles, disk: str, serial: str, port: int) -> str:
    return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name><memory unit='MiB'>160</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{g.kernel}</kernel><initrd>{g.initrd}</initrd>
    <cmdline>{cmdline(fill_mib=4, dirty_mib=1, disk_kib=8)}</cmdline></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{disk}'/>
      <target dev='vda' bus='virtio'/></disk>
    <serial type='file'><source path='{serial}'/><target port='0'/></serial>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-netdev'/><qemu:arg value='user,id=n0,hostfwd=tcp:0.0.0.0:{port}-:80'/>
    <qemu:arg value='-device'/><qemu:arg value='virtio-net-pci,netdev=n0,romfile=,addr=0x10'/>
  </qemu:commandline>
</domain>"""


def test_guest_in_node_answers_http_on_node_address(cloudlet: Cloudlet, guest: GuestFiles) -> None:
    a = cloudlet.nodes[0]
    shutil.copyfile(guest.disk, a.host_root / "probe-disk.raw")
    # Paths as the node sees them: its libvirtd and QEMU live in its mount namespace.
    xml = _domain_xml("web", guest, "/var/nephele/probe-disk.raw", "/var/nephele/probe-serial.log", 18080)
    (a.host_root / "web.xml").write_text(xml)
    r = subprocess.run(
        ["virsh", "-c", a.libvirt_uri, "create", str(a.host_root / "web.xml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    try:
        serial = a.host_root / "probe-serial.log"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if serial.exists() and "NEPHELE-READY" in serial.read_text(errors="replace"):
                break
            time.sleep(0.3)
        else:
            pytest.fail("guest in node A never printed NEPHELE-READY")
        assert cloudlet.status()[0]["vms_running"] == ["web"]
        with urllib.request.urlopen(f"http://{a.address}:18080/cgi-bin/state", timeout=10) as resp:
            body = resp.read().decode()
        assert re.fullmatch(r"counter=\d+ uptime=[\d.]+ disk_counter=\d*\n", body), body
        assert not _can_connect(cloudlet.nodes[1].address, 18080)  # the forward is node A's only
    finally:
        subprocess.run(["virsh", "-c", a.libvirt_uri, "destroy", "web"], capture_output=True, check=False)


def _traces(c: Cloudlet) -> list[str]:
    """Everything of cloudlet c still present on the system."""
    left = [ns for ns in _netns_list() if ns.startswith(f"nphl-{c.name}-")]
    left += [m for m in _mountpoints() if m.startswith(str(c.dir))]
    if subprocess.run(["ip", "link", "show", c.bridge], capture_output=True, check=False).returncode == 0:
        left.append(c.bridge)
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    left += re.findall(rf"^\d+: (nv\d+-{c.name})[@:]", links, flags=re.M)  # host ends of node links
    if c.dir.exists():
        left.append(str(c.dir))
    return left


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def test_down_leaves_nothing_and_up_cleans_stale(
    cloudlet_factory: Callable[..., Cloudlet], guest: GuestFiles
) -> None:
    c = cloudlet_factory(1, rate_mbit=100)
    node = c.nodes[0]
    pids = [c.status()[0]["libvirtd_pid"], c.status()[0]["sshd_pid"]]
    stray = node.popen(["sleep", "600"])  # a process left inside the node
    # A QEMU left running by the node's libvirtd.
    shutil.copyfile(guest.disk, node.host_root / "d.raw")
    (node.host_root / "vm.xml").write_text(
        _domain_xml("left", guest, "/var/nephele/d.raw", "/var/nephele/s.log", 18081)
    )
    subprocess.run(
        ["virsh", "-c", node.libvirt_uri, "create", str(node.host_root / "vm.xml")],
        check=True,
        capture_output=True,
    )
    qemu = int((node.libvirt_dir / "run" / "qemu" / "left.pid").read_text())
    assert _alive(qemu)
    # A crashed run: the inventory is gone but everything else is still there. up cleans it first.
    c.inventory_path.unlink()
    again = Cloudlet.up(c.name, 1, workdir=c.dir.parent, owner_pid=os.getpid())
    assert stray.wait(10) is not None and not _alive(qemu) and not any(_alive(p) for p in pids)
    assert again.healthy()
    daemons = [again.status()[0]["libvirtd_pid"], again.status()[0]["sshd_pid"]]
    again.down()
    assert _traces(again) == []
    assert not any(_alive(p) for p in daemons)
    with pytest.raises(Exception, match="no cloudlet named"):
        Cloudlet.load(c.name)


def test_cli_up_status_down(tmp_path: Path) -> None:
    from support import cloudlet_workdir

    name = f"pc{os.getpid() % 100000}"
    nephele = [sys.executable, "-m", "nephele", "cloudlet"]
    wd = ["--name", name, "--workdir", str(cloudlet_workdir())]
    try:
        up = subprocess.run(
            [*nephele, "up", *wd, "--nodes", "1", "--rate", "50mbit"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert up.returncode == 0, up.stderr
        assert "edge-a" in up.stdout and "ssh -i" in up.stdout
        st = subprocess.run(
            [*nephele, "status", *wd, "-o", "json"], capture_output=True, text=True, check=False
        )
        assert st.returncode == 0, st.stderr
        data = json.loads(st.stdout)
        assert data["healthy"] and data["rate_mbit"] == 50 and data["status"][0]["vms_running"] == []
        again = subprocess.run([*nephele, "up", *wd], capture_output=True, text=True, check=False)
        assert again.returncode == 1 and "already up" in again.stderr
    finally:
        down = subprocess.run(
            [*nephele, "down", *wd], capture_output=True, text=True, timeout=120, check=False
        )
    assert down.returncode == 0, down.stderr
    assert not (cloudlet_workdir() / name).exists()
    assert not [ns for ns in _netns_list() if ns.startswith(f"nphl-{name}-")]
    st = subprocess.run([*nephele, "status", *wd], capture_output=True, text=True, check=False)
    assert st.returncode == 1 and "no cloudlet named" in st.stderr


def test_libvirt_peer_to_peer_migration_between_nodes(cloudlet: Cloudlet, guest: GuestFiles) -> None:
    """The nodes' libvirtds reach each other (qemu+tcp), so libvirt's own live migration works between
    nodes: the VM keeps its RAM and its port forward answers on node B afterwards."""
    import libvirt

    a, b = cloudlet.nodes
    xml = _domain_xml("mig", guest, "", "/var/nephele/mig-serial.log", 18082)
    xml = re.sub(r"<disk .*?</disk>", "", xml, flags=re.S)  # RAM only: the disk path is node-local
    conn_a, conn_b = libvirt.open(a.libvirt_uri), libvirt.open(b.libvirt_uri)
    cloudlet.set_link(1000)  # speed, not shaping, is under test here
    try:
        dom = conn_a.createXML(xml)
        serial = a.host_root / "mig-serial.log"
        deadline = time.monotonic() + 120
        while not (serial.exists() and "NEPHELE-READY" in serial.read_text(errors="replace")):
            assert time.monotonic() < deadline, "guest never printed NEPHELE-READY"
            time.sleep(0.3)
        before = urllib.request.urlopen(f"http://{a.address}:18082/cgi-bin/md5", timeout=10).read().decode()
        params = {libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://{b.address}:49152"}
        dom.migrateToURI3(b.libvirt_tcp_uri, params, libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER)
        assert "mig" not in [d.name() for d in conn_a.listAllDomains()]
        assert conn_b.lookupByName("mig").isActive()
        after = urllib.request.urlopen(f"http://{b.address}:18082/cgi-bin/md5", timeout=10).read().decode()
        assert before.split()[0] == after.split()[0]  # same fill_md5: guest RAM crossed over
        assert int(after.split("counter=")[1]) >= int(before.split("counter=")[1])
    finally:
        for conn in (conn_a, conn_b):
            with contextlib.suppress(libvirt.libvirtError):
                conn.lookupByName("mig").destroy()
            conn.close()
        cloudlet.set_link(20)


def test_reap_orphans_removes_cloudlets_of_dead_sessions(cloudlet_factory: Callable[..., Cloudlet]) -> None:
    from nephele.cloudlet import reap_orphans

    gone = subprocess.Popen(["true"])
    gone.wait()
    orphan = cloudlet_factory(1, owner_pid=gone.pid)
    mine = cloudlet_factory(1)
    assert orphan.healthy() and mine.healthy()
    reaped = reap_orphans(orphan.dir.parent)
    assert orphan.name in reaped and mine.name not in reaped
    assert _traces(orphan) == []
    assert mine.healthy()


def test_down_keep_leaves_only_the_state_directory(cloudlet_factory: Callable[..., Cloudlet]) -> None:
    c = cloudlet_factory(1)
    log = c.nodes[0].libvirt_dir / "log" / "libvirtd.log"
    (c.nodes[0].host_root / "kept").write_text("x")
    c.down(keep=True)
    assert _traces(c) == [str(c.dir)]  # no namespace, mount or bridge left; the files stay for reading
    assert (c.nodes[0].host_root / "kept").read_text() == "x" and log.exists()
    shutil.rmtree(c.dir)


def test_up_refuses_a_subnet_in_use_and_makes_nothing(
    cloudlet: Cloudlet, cloudlet_factory: Callable[..., Cloudlet]
) -> None:
    from support import cloudlet_workdir

    with pytest.raises(Exception, match=rf"subnet {re.escape(cloudlet.subnet)} is already used by interface"):
        cloudlet_factory(1, name="clash", subnet=cloudlet.subnet)
    assert not (cloudlet_workdir() / "clash").exists()
    assert not [ns for ns in _netns_list() if ns.startswith("nphl-clash-")]
