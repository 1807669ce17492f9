"""The local cloudlet: several nephele nodes on one machine, like `kind` for Kubernetes.

What `Cloudlet.up()` builds (see docs/cloudlet.md for the picture):

* a Linux bridge `nphl-<name>` in the host's network namespace with the host address `<subnet>.254`, so the
  host (the controller, tests, a browser) reaches every node directly, as it would reach real machines;
* per node i (named edge-a, edge-b, ...): a named network namespace `nphl-<name>-<i>` holding `eth0` with
  `<subnet>.<i>/24`, joined to the bridge by a veth pair. Both ends of each pair carry a `tbf` rate limit,
  so node->anything and anything->node are each shaped: node A -> node B crosses two shaped hops, like a
  WAN path between two access links. A bridge (not point-to-point veths between nodes) keeps it one flat
  L2 segment: any node reaches any other and the host without routes, and N nodes need N links, not N².
* per node a persistent private mount namespace (and UTS namespace: own hostname) bound to files under
  `<dir>/nphl-ns/`, in which the node's own directories are bind-mounted over /var/nephele, /run/libvirt,
  /var/lib/libvirt, /var/log/libvirt, /var/cache/libvirt, /etc/libvirt, /etc/hostname, /etc/hosts and
  (overlaid) /usr/local/bin, and /sys is the node's own sysfs. Everything started inside (libvirtd, sshd,
  SSH sessions, QEMU) sees the node as a machine of its own.
* per node a libvirtd (stdio_handler=file, no security driver, no cgroups, no default network) answering
  `qemu:///system` inside the node and `qemu:///system?socket=<node dir>/libvirt/run/libvirt-sock` on the
  host; and an sshd on `<address>:22` with its own host key, accepting the cloudlet's generated client key.
* `<dir>/cloudlet.json` (the inventory) and `<dir>/nodes.yaml` (a manifest `nodes:` snippet).

Delay is not in the kernel here (no netem): `start_delay_proxy()` runs `nephele.cloudlet.delayproxy` inside
a node for one TCP port pair. Only this module and its CLI create or remove these namespaces and daemons.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import pwd
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nephele.errors import CloudletError
from nephele.model import NodeSpec

NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,9}$")  # short: interface names are limited to 15 characters
MAX_NODES = 16
DEFAULT_SUBNET = "10.201.0.0/24"
REGISTRY = Path("/run/nephele/cloudlets")  # name -> inventory path of cloudlets that are up
NODE_ROOT = "/var/nephele"
INVENTORY_VERSION = 1
REQUIRED_TOOLS = ("ip", "tc", "nsenter", "unshare", "mount", "umount", "ssh-keygen", "virsh")
LIBVIRTD = "/usr/sbin/libvirtd"
SSHD = "/usr/sbin/sshd"


def default_workdir() -> Path:
    return Path(os.environ.get("NEPHELE_CLOUDLET_DIR", "/var/lib/nephele/cloudlets"))


def node_name(index: int) -> str:
    """edge-a, edge-b, ... (index is 1-based)."""
    return "edge-" + chr(ord("a") + index - 1)


# ---------------------------------------------------------------------------------------------- helpers


def _run(
    args: Sequence[str], *, check: bool = True, timeout: float = 60, **kw: Any
) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False, **kw)
    except FileNotFoundError as exc:
        raise CloudletError(f"{args[0]}: not found (run tools/bootstrap.sh)") from exc
    except subprocess.TimeoutExpired as exc:
        raise CloudletError(f"`{shlex.join(args)}` did not finish in {timeout:g} s") from exc
    if check and proc.returncode != 0:
        raise CloudletError(f"`{shlex.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()[-1000:]}")
    return proc


def _ns_id(path: Path | str) -> str | None:
    """The namespace a bound ns file (or /proc/PID/ns/X link) refers to, e.g. 'net:[4026532177]'."""
    try:
        return os.readlink(path)
    except OSError:
        pass
    try:
        st = os.stat(path)
    except OSError:
        return None
    kind = Path(path).suffix.lstrip(".") or "net"  # our files are <node>.mnt / <node>.uts; netns have none
    return f"{kind}:[{st.st_ino}]"


def _pids_in(namespaces: set[str]) -> list[int]:
    """Live processes whose net or mount namespace is one of `namespaces` (ids as from _ns_id)."""
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        for kind in ("net", "mnt"):
            try:
                if os.readlink(f"/proc/{entry}/ns/{kind}") in namespaces:
                    found.append(int(entry))
                    break
            except OSError:
                break  # gone, or a zombie (no namespaces left)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # daemons re-parented to a PID 1 that does not reap linger as zombies


def _kill_all(pids: Iterable[int], *, grace: float = 5.0) -> None:
    pids = [p for p in pids if _alive(p)]
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    for p in pids:
        if _alive(p):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)


def _mountpoints() -> list[str]:
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            raw = line.split()[4]
            points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), raw))
    return points


def _umount_all(path: str) -> None:
    """Unmount everything stacked on `path` (lazily if busy)."""
    for _ in range(8):
        if path not in _mountpoints():
            return
        if _run(["umount", path], check=False).returncode != 0:
            _run(["umount", "-l", path], check=False)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _netns_list() -> list[str]:
    proc = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def _link_exists(name: str) -> bool:
    return _run(["ip", "link", "show", "dev", name], check=False).returncode == 0


def parse_rate_mbit(text: str | float) -> float:
    """'20mbit' | '1gbit' | '500kbit' | '20' (Mbit/s) -> Mbit/s."""
    if isinstance(text, int | float):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(kbit|mbit|gbit|k|m|g)?\s*", str(text).lower())
        if not m:
            raise CloudletError(f"rate {text!r}: expected e.g. 20mbit, 500kbit, 1gbit")
        unit = (m.group(2) or "m")[0]
        value = float(m.group(1)) * {"k": 0.001, "m": 1.0, "g": 1000.0}[unit]
    if not 0.01 <= value <= 100_000:
        raise CloudletError(f"rate {text!r}: must be between 10kbit and 100gbit")
    return value


def parse_delay_ms(text: str | float) -> float:
    """'20ms' | '0.5s' | '20' (ms) -> milliseconds."""
    if isinstance(text, int | float):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s)?\s*", str(text).lower())
        if not m:
            raise CloudletError(f"delay {text!r}: expected e.g. 20ms or 0.1s")
        value = float(m.group(1)) * (1000.0 if m.group(2) == "s" else 1.0)
    if not 0 <= value <= 10_000:
        raise CloudletError(f"delay {text!r}: must be between 0 and 10s")
    return value


SHELL_RC = (".bashrc", ".bash_profile", ".bash_login", ".profile")


def _tbf_args(rate_mbit: float) -> list[str]:
    # burst must hold at least one timer tick of traffic at this rate; 32 KiB is enough up to ~25 Mbit/s.
    burst = max(32 * 1024, int(rate_mbit * 1e6 / 8 / 100))
    return ["tbf", "rate", f"{round(rate_mbit * 1000)}kbit", "burst", str(burst), "latency", "100ms"]


# ------------------------------------------------------------------------------------------------- nodes


@dataclass
class CloudletNode:
    """One node: a network namespace + private mount/UTS namespaces + libvirtd + sshd + a node root."""

    name: str
    index: int
    address: str
    netns: str
    host_dir: Path  # everything of this node on the host
    libvirt_uri: str  # as seen from the host
    ssh_key: Path
    known_hosts: Path
    mnt_ns: Path
    uts_ns: Path
    host_veth: str
    ssh_user: str = "root"
    ssh_port: int = 22
    root: str = NODE_ROOT  # the node root as seen on the node

    @property
    def host_root(self) -> Path:
        """The node's /var/nephele as seen from the host."""
        return self.host_dir / "root"

    @property
    def libvirt_tcp_uri(self) -> str:
        """The node's libvirtd over TCP (no auth), reachable from the host and the other nodes: the
        destination URI for peer-to-peer migration."""
        return f"qemu+tcp://{self.address}/system"

    @property
    def libvirt_dir(self) -> Path:
        return self.host_dir / "libvirt"

    @property
    def sshd_dir(self) -> Path:
        return self.host_dir / "sshd"

    @property
    def libvirtd_pidfile(self) -> Path:
        return self.libvirt_dir / "run" / "libvirtd.pid"

    @property
    def sshd_pidfile(self) -> Path:
        return self.sshd_dir / "sshd.pid"

    def nsenter(self) -> list[str]:
        """Command prefix that runs a program inside this node (its net, mount and UTS namespaces)."""
        return [
            "nsenter",
            f"--net=/run/netns/{self.netns}",
            f"--mount={self.mnt_ns}",
            f"--uts={self.uts_ns}",
            "--",
        ]

    def run(
        self,
        args: Sequence[str],
        *,
        check: bool = False,
        input: str | None = None,
        timeout: float | None = 120,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the node and capture its output (text)."""
        return subprocess.run(
            [*self.nsenter(), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            cwd="/",
            env=dict(env) if env is not None else None,
        )

    def popen(self, args: Sequence[str], **kw: Any) -> subprocess.Popen[str]:
        """Start a command inside the node in the background (text mode)."""
        kw.setdefault("text", True)
        kw.setdefault("cwd", "/")
        return subprocess.Popen([*self.nsenter(), *args], **kw)

    def ssh_command(self, command: str | Sequence[str] = ()) -> list[str]:
        """ssh argv that logs into this node with the cloudlet's key and pinned host key."""
        argv = [
            "ssh",
            "-i",
            str(self.ssh_key),
            "-p",
            str(self.ssh_port),
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "LogLevel=ERROR",
            f"{self.ssh_user}@{self.address}",
        ]
        if isinstance(command, str):
            return [*argv, command] if command else argv
        return [*argv, shlex.join(command)] if command else argv

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "index": self.index,
            "address": self.address,
            "netns": self.netns,
            "root": self.root,
            "host_root": str(self.host_root),
            "host_dir": str(self.host_dir),
            "libvirt_uri": self.libvirt_uri,
            "libvirt_uri_on_node": "qemu:///system",
            "libvirt_tcp_uri": self.libvirt_tcp_uri,
            "ssh_user": self.ssh_user,
            "ssh_port": self.ssh_port,
            "ssh_key": str(self.ssh_key),
            "known_hosts": str(self.known_hosts),
            "mnt_ns": str(self.mnt_ns),
            "uts_ns": str(self.uts_ns),
            "host_veth": self.host_veth,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CloudletNode:
        return cls(
            name=d["name"],
            index=int(d["index"]),
            address=d["address"],
            netns=d["netns"],
            host_dir=Path(d["host_dir"]),
            libvirt_uri=d["libvirt_uri"],
            ssh_key=Path(d["ssh_key"]),
            known_hosts=Path(d["known_hosts"]),
            mnt_ns=Path(d["mnt_ns"]),
            uts_ns=Path(d["uts_ns"]),
            host_veth=d["host_veth"],
            ssh_user=d.get("ssh_user", "root"),
            ssh_port=int(d.get("ssh_port", 22)),
            root=d.get("root", NODE_ROOT),
        )


@dataclass
class DelayProxy:
    """A running delay proxy (see nephele.cloudlet.delayproxy) inside a node."""

    node: str
    listen: tuple[str, int]
    target: tuple[str, int]
    delay_ms: float
    process: subprocess.Popen[str]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# ---------------------------------------------------------------------------------------------- cloudlet


@dataclass
class Cloudlet:
    name: str
    dir: Path
    subnet: str
    bridge: str
    bridge_address: str
    rate_mbit: float
    delay_ms: float
    nodes: list[CloudletNode]
    ssh_key: Path
    known_hosts: Path
    nephele_bin: str
    python: str
    owner_pid: int | None = None
    proxies: list[DelayProxy] = field(default_factory=list, repr=False)

    # -- lifecycle -------------------------------------------------------------------------------------

    @classmethod
    def up(
        cls,
        name: str = "demo",
        nodes: int = 2,
        *,
        rate_mbit: float | str = 20.0,
        delay_ms: float | str = 20.0,
        workdir: Path | str | None = None,
        subnet: str | None = None,
        owner_pid: int | None = None,
    ) -> Cloudlet:
        """Create the cloudlet `name` with `nodes` nodes (after removing stale leftovers of that name).
        `owner_pid`: the process the cloudlet belongs to (test sessions); once it is dead, `reap_orphans()`
        removes the cloudlet."""
        if not NAME_RE.match(name):
            raise CloudletError(
                f"cloudlet name {name!r}: 1-10 lowercase letters/digits, starting with a letter"
            )
        if not 1 <= nodes <= MAX_NODES:
            raise CloudletError(f"--nodes {nodes}: must be between 1 and {MAX_NODES}")
        rate = parse_rate_mbit(rate_mbit)
        delay = parse_delay_ms(delay_ms)
        check_prerequisites()
        base = Path(workdir) if workdir is not None else default_workdir()
        cdir = (base / name).resolve()
        sock = cdir / "nodes" / "edge-a" / "libvirt" / "run" / "libvirt-sock"
        if len(str(sock)) > 100:
            raise CloudletError(
                f"workdir {base}: too long a path for a unix socket ({sock}); use a shorter one"
            )
        # One `up` at a time on this machine: subnet choice and interface names must not race.
        REGISTRY.mkdir(parents=True, exist_ok=True)
        with open(REGISTRY / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            existing = _registered(name)
            if existing is not None:
                try:
                    running = cls.load(name).healthy()
                except CloudletError:
                    running = False
                if running:
                    raise CloudletError(
                        f"cloudlet {name!r} is already up ({existing}); "
                        f"`nephele cloudlet down --name {name}` first"
                    )
                if existing != cdir:
                    teardown(name, existing, remove_dir=True)
            teardown(name, cdir, remove_dir=True)
            net = _pick_subnet(subnet, name)
            self = cls._layout(name, cdir, net, nodes, rate, delay, owner_pid)
            try:
                self._build()
            except BaseException:
                teardown(name, cdir, remove_dir=False)  # keep logs for the post-mortem
                raise
        return self

    @classmethod
    def _layout(
        cls,
        name: str,
        cdir: Path,
        net: ipaddress.IPv4Network,
        n: int,
        rate: float,
        delay: float,
        owner_pid: int | None,
    ) -> Cloudlet:
        hosts = list(net.hosts())
        ssh_key = cdir / "ssh" / "id_ed25519"
        known = cdir / "ssh" / "known_hosts"
        nodes = []
        for i in range(1, n + 1):
            nn = node_name(i)
            hdir = cdir / "nodes" / nn
            nodes.append(
                CloudletNode(
                    name=nn,
                    index=i,
                    address=str(hosts[i - 1]),
                    netns=f"nphl-{name}-{i}",
                    host_dir=hdir,
                    libvirt_uri=f"qemu:///system?socket={hdir}/libvirt/run/libvirt-sock",
                    ssh_key=ssh_key,
                    known_hosts=known,
                    mnt_ns=cdir / "nphl-ns" / f"{nn}.mnt",
                    uts_ns=cdir / "nphl-ns" / f"{nn}.uts",
                    host_veth=f"nv{i}-{name}",
                )
            )
        venv_bin = Path(sys.executable).parent
        nephele_bin = venv_bin / "nephele"
        return cls(
            name=name,
            dir=cdir,
            subnet=str(net),
            bridge=f"nphl-{name}",
            bridge_address=str(hosts[-1]),
            rate_mbit=rate,
            delay_ms=delay,
            nodes=nodes,
            ssh_key=ssh_key,
            known_hosts=known,
            nephele_bin=str(nephele_bin),
            python=sys.executable,
            owner_pid=owner_pid,
        )

    def _build(self) -> None:
        (self.dir / "ssh").mkdir(parents=True, exist_ok=True)
        (self.dir / "ssh").chmod(0o700)
        comment = f"nephele-cloudlet-{self.name}"
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(self.ssh_key)])
        authorized = self.dir / "ssh" / "authorized_keys"
        shutil.copyfile(self.ssh_key.with_suffix(".pub"), authorized)
        authorized.chmod(0o600)
        # The mount namespace files must sit on a private mount, or binding them loops through propagation.
        nsdir = self.dir / "nphl-ns"
        nsdir.mkdir(exist_ok=True)
        _run(["mount", "--bind", str(nsdir), str(nsdir)])
        _run(["mount", "--make-private", str(nsdir)])
        plen = ipaddress.ip_network(self.subnet).prefixlen
        bridge_opts = ["type", "bridge", "forward_delay", "0", "stp_state", "0"]
        _run(["ip", "link", "add", "name", self.bridge, *bridge_opts])
        _run(["ip", "addr", "add", f"{self.bridge_address}/{plen}", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])
        hosts_file = "127.0.0.1\tlocalhost\n" + "".join(f"{n.address}\t{n.name}\n" for n in self.nodes)
        hosts_file += f"{self.bridge_address}\tnephele-host\n"
        for node in self.nodes:
            self._build_net(node, plen)
            self._build_mounts(node, hosts_file)
            self._write_libvirt_config(node)
            self.start_libvirtd(node)
            self._write_sshd_config(node, authorized)
            self.start_sshd(node)
        self.save()

    def _build_net(self, node: CloudletNode, plen: int) -> None:
        ns = node.netns
        _run(["ip", "netns", "add", ns])
        _run(["ip", "link", "add", node.host_veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
        _run(["ip", "link", "set", node.host_veth, "master", self.bridge, "up"])
        _run(["ip", "-n", ns, "addr", "add", f"{node.address}/{plen}", "dev", "eth0"])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        self._shape(node, self.rate_mbit)

    def _shape(self, node: CloudletNode, rate_mbit: float) -> None:
        # Recreated, not changed in place: a tbf changed to a smaller burst keeps the packets it holds,
        # and one larger than the new burst (a 64 KiB GSO packet queued at 200 Mbit/s, burst 250 kB,
        # then 20 Mbit/s, burst 32 KiB) can never leave: the link stays wedged for good (seen in the
        # fault matrix; reproduced with `tc qdisc replace`). Recreating drops the queue (TCP resends).
        for ns, dev in ((["-n", node.netns], "eth0"), ([], node.host_veth)):
            subprocess.run(["tc", *ns, "qdisc", "del", "dev", dev, "root"], capture_output=True, check=False)
            _run(["tc", *ns, "qdisc", "add", "dev", dev, "root", *_tbf_args(rate_mbit)])

    def _build_mounts(self, node: CloudletNode, hosts_file: str) -> None:
        d = node.host_dir
        for sub in (
            "root",
            "bin",
            "etc",
            "sshd",
            "libvirt/run",
            "libvirt/lib",
            "libvirt/log",
            "libvirt/cache",
        ):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "etc" / "hostname").write_text(node.name + "\n")
        (d / "etc" / "hosts").write_text(hosts_file)
        # nephele is on the node for free (same filesystem): put the venv's entry points on its PATH.
        venv_bin = Path(self.python).parent
        for exe in sorted(venv_bin.glob("nephele*")):
            link = d / "bin" / exe.name
            if not link.is_symlink():
                link.symlink_to(exe)
        if not (d / "bin" / "nephele").exists():
            wrapper = d / "bin" / "nephele"
            wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(self.python)} -m nephele "$@"\n')
            wrapper.chmod(0o755)
        node.mnt_ns.touch()
        node.uts_ns.touch()
        binds = [
            (d / "root", NODE_ROOT),
            (d / "libvirt" / "run", "/run/libvirt"),
            (d / "libvirt" / "lib", "/var/lib/libvirt"),
            (d / "libvirt" / "log", "/var/log/libvirt"),
            (d / "libvirt" / "cache", "/var/cache/libvirt"),
            (d / "libvirt" / "etc", "/etc/libvirt"),
            (d / "etc" / "hostname", "/etc/hostname"),
            (d / "etc" / "hosts", "/etc/hosts"),
        ]
        # The node is a machine of its own: the host user's shell start-up is not the node's (here root's
        # .bashrc runs `pyenv init`: ~0.1 s of CPU for every command sshd starts, a third of an observe).
        empty = d / "etc" / "empty"
        empty.write_text("")
        home = Path(pwd.getpwnam(node.ssh_user).pw_dir)
        binds += [(empty, str(home / rc)) for rc in SHELL_RC if (home / rc).is_file()]
        q = shlex.quote
        script = [
            "set -e",
            f"hostname {q(node.name)}",
            # the node's own sysfs (its network devices); no cgroup mounts in it, which libvirt then skips
            "{ umount -l /sys && mount -t sysfs sysfs /sys; } 2>/dev/null || true",
        ]
        if not (d / "libvirt" / "etc").exists():
            shutil.copytree("/etc/libvirt", d / "libvirt" / "etc", symlinks=True)
        for src, dst in binds:
            if src.is_dir():
                script.append(f"mkdir -p {q(dst)}")
            else:
                script.append(f"test -e {q(dst)} || touch {q(dst)}")
            script.append(f"mount --bind {q(str(src))} {q(dst)}")
        # /usr/local/bin: the node's entries over the host's (read-only overlay), or the node's alone
        script.append(
            f"mount -t overlay nphl-bin -o lowerdir={q(str(d / 'bin'))}:/usr/local/bin /usr/local/bin"
            f" 2>/dev/null || mount --bind {q(str(d / 'bin'))} /usr/local/bin"
        )
        _run(
            [
                "nsenter",
                f"--net=/run/netns/{node.netns}",
                "--",
                "unshare",
                f"--mount={node.mnt_ns}",
                f"--uts={node.uts_ns}",
                "--propagation",
                "private",
                "sh",
                "-c",
                "\n".join(script),
            ]
        )

    def _write_libvirt_config(self, node: CloudletNode) -> None:
        etc = node.libvirt_dir / "etc"
        for link in (etc / "qemu" / "networks" / "autostart").glob("*.xml"):
            link.unlink()  # no default NAT network: it needs dnsmasq and iptables
        with open(etc / "qemu.conf", "a") as f:
            f.write(
                "\n# nephele cloudlet node\n"
                'stdio_handler = "file"\nuser = "root"\ngroup = "root"\ndynamic_ownership = 0\n'
                'security_driver = "none"\ncgroup_controllers = [ ]\n'
            )
        with open(etc / "libvirtd.conf", "a") as f:
            f.write(
                "\n# nephele cloudlet node\n"
                'unix_sock_group = "root"\nunix_sock_rw_perms = "0770"\n'
                'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n'
                # plain TCP on the node address, for peer-to-peer migration between nodes (a test
                # network only the host and the nodes reach)
                f'listen_tls = 0\nlisten_tcp = 1\nlisten_addr = "{node.address}"\nauth_tcp = "none"\n'
            )

    def _write_sshd_config(self, node: CloudletNode, authorized: Path) -> None:
        sd = node.sshd_dir
        sd.chmod(0o700)
        key = sd / "host_ed25519"
        if not key.exists():
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{node.name}", "-f", str(key)])
        (sd / "sshd_config").write_text(
            f"ListenAddress {node.address}\nPort {node.ssh_port}\nHostKey {key}\n"
            f"AuthorizedKeysFile {authorized}\nPidFile {node.sshd_pidfile}\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
            "StrictModes no\nUsePAM no\nMaxSessions 64\nMaxStartups 64:30:128\nSubsystem sftp internal-sftp\n"
            f"SetEnv NEPHELE_NODE={node.name} NEPHELE_ROOT={node.root}\nLogLevel ERROR\n"
        )
        host_pub = key.with_suffix(".pub").read_text().split()
        entry = node.address if node.ssh_port == 22 else f"[{node.address}]:{node.ssh_port}"
        old = self.known_hosts.read_text().splitlines() if self.known_hosts.exists() else []
        lines = [ln for ln in old if ln.split(" ", 1)[0] != entry]
        lines.append(f"{entry} {host_pub[0]} {host_pub[1]}")
        self.known_hosts.write_text("\n".join(lines) + "\n")

    # -- daemons ---------------------------------------------------------------------------------------

    def node(self, which: str | int | CloudletNode) -> CloudletNode:
        if isinstance(which, CloudletNode):
            return which
        for n in self.nodes:
            if which in (n.name, n.index, n.address, n.netns):
                return n
        raise CloudletError(
            f"cloudlet {self.name}: no node {which!r} (nodes: {', '.join(n.name for n in self.nodes)})"
        )

    def start_libvirtd(self, which: str | int | CloudletNode) -> int:
        node = self.node(which)
        sock = node.libvirt_dir / "run" / "libvirt-sock"
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        proc = node.run([LIBVIRTD, "-d", "-l", "-p", "/run/libvirt/libvirtd.pid"], timeout=30)
        if proc.returncode != 0:
            raise CloudletError(f"node {node.name}: libvirtd failed to start: {proc.stderr.strip()}")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            pid = _read_pid(node.libvirtd_pidfile)
            if sock.is_socket() and pid and _alive(pid):
                return pid
            time.sleep(0.05)
        raise CloudletError(
            f"node {node.name}: libvirtd did not open {sock} in 20 s "
            f"(log: {node.libvirt_dir}/log/libvirtd.log)"
        )

    def start_sshd(self, which: str | int | CloudletNode) -> int:
        node = self.node(which)
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
        with contextlib.suppress(FileNotFoundError):
            node.sshd_pidfile.unlink()
        sd = node.sshd_dir
        proc = node.run([SSHD, "-f", str(sd / "sshd_config"), "-E", str(sd / "sshd.log")], timeout=30)
        if proc.returncode != 0:
            raise CloudletError(
                f"node {node.name}: sshd failed to start: {proc.stderr.strip()} (log {sd}/sshd.log)"
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pid = _read_pid(node.sshd_pidfile)
            if pid and _alive(pid):
                return pid
            time.sleep(0.05)
        raise CloudletError(f"node {node.name}: sshd wrote no pid file in 10 s (log {sd}/sshd.log)")

    def stop_sshd(self, which: str | int | CloudletNode) -> None:
        """Stop the node's sshd (its listener; open sessions end too): the node becomes unreachable by SSH."""
        node = self.node(which)
        pid = _read_pid(node.sshd_pidfile)
        ns = _ns_id(f"/run/netns/{node.netns}")
        sessions = [p for p in _pids_in({ns} if ns else set()) if _is_sshd(p)]
        _kill_all([p for p in {pid, *sessions} if p])
        with contextlib.suppress(FileNotFoundError):
            node.sshd_pidfile.unlink()

    def stop_libvirtd(self, which: str | int | CloudletNode) -> None:
        node = self.node(which)
        pid = _read_pid(node.libvirtd_pidfile)
        if pid:
            _kill_all([pid])

    # -- links -----------------------------------------------------------------------------------------

    def set_link(self, rate_mbit: float | str, node: str | int | CloudletNode | None = None) -> None:
        """Change the tbf rate of one node's link (both directions) or of every node's."""
        rate = parse_rate_mbit(rate_mbit)
        for n in [self.node(node)] if node is not None else self.nodes:
            self._shape(n, rate)
        if node is None:
            self.rate_mbit = rate
            self.save()

    def cut_link(self, node: str | int | CloudletNode | None = None) -> None:
        """Take one node's link (or every node's) down: the node keeps running but nothing reaches it."""
        for n in [self.node(node)] if node is not None else self.nodes:
            _run(["ip", "link", "set", n.host_veth, "down"])

    def restore_link(self, node: str | int | CloudletNode | None = None) -> None:
        for n in [self.node(node)] if node is not None else self.nodes:
            _run(["ip", "link", "set", n.host_veth, "up"])

    def qdisc(self, which: str | int | CloudletNode) -> tuple[str, str]:
        """`tc qdisc show` of the node side and of the host side of the node's link."""
        node = self.node(which)
        a = _run(["tc", "-n", node.netns, "qdisc", "show", "dev", "eth0"]).stdout
        b = _run(["tc", "qdisc", "show", "dev", node.host_veth]).stdout
        return a, b

    def start_delay_proxy(
        self,
        which: str | int | CloudletNode,
        listen_port: int,
        target: tuple[str, int],
        *,
        delay_ms: float | None = None,
        listen_host: str | None = None,
        max_buffer: int = 4 << 20,
    ) -> DelayProxy:
        """Run a TCP delay proxy inside node `which`: it accepts on listen_host (default: the node's
        address):listen_port and forwards to `target`, adding `delay_ms` (default: the cloudlet's delay)
        each way. It is stopped by `.stop()` on the result, or by `down()`."""
        node = self.node(which)
        delay = self.delay_ms if delay_ms is None else parse_delay_ms(delay_ms)
        host = listen_host or node.address
        cmd = [
            self.python,
            "-m",
            "nephele.cloudlet.delayproxy",
            f"{host}:{listen_port}",
            f"{target[0]}:{target[1]}",
            "--delay-ms",
            f"{delay:g}",
            "--max-buffer",
            str(max_buffer),
        ]
        proc = node.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        line = ""
        if sel.select(timeout=15):
            line = proc.stdout.readline()
        sel.close()
        m = re.match(r"LISTENING (.+):(\d+)", line)
        if not m:
            proc.kill()
            err = proc.stderr.read() if proc.stderr else ""
            raise CloudletError(
                f"node {node.name}: delay proxy on {host}:{listen_port} did not start: {err.strip()}"
            )
        dp = DelayProxy(node.name, (m.group(1), int(m.group(2))), target, delay, proc)
        self.proxies.append(dp)
        return dp

    # -- state -----------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": INVENTORY_VERSION,
            "name": self.name,
            "dir": str(self.dir),
            "subnet": self.subnet,
            "bridge": self.bridge,
            "bridge_address": self.bridge_address,
            "rate_mbit": self.rate_mbit,
            "delay_ms": self.delay_ms,
            "ssh_key": str(self.ssh_key),
            "known_hosts": str(self.known_hosts),
            "nephele_bin": self.nephele_bin,
            "python": self.python,
            "owner_pid": self.owner_pid,
            "nodes": [n.to_dict() for n in self.nodes],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Cloudlet:
        return cls(
            name=d["name"],
            dir=Path(d["dir"]),
            subnet=d["subnet"],
            bridge=d["bridge"],
            bridge_address=d["bridge_address"],
            rate_mbit=float(d["rate_mbit"]),
            delay_ms=float(d["delay_ms"]),
            nodes=[CloudletNode.from_dict(n) for n in d["nodes"]],
            ssh_key=Path(d["ssh_key"]),
            known_hosts=Path(d["known_hosts"]),
            nephele_bin=d["nephele_bin"],
            python=d["python"],
            owner_pid=d.get("owner_pid"),
        )

    @property
    def inventory_path(self) -> Path:
        return self.dir / "cloudlet.json"

    def node_specs(self) -> list[NodeSpec]:
        """The nodes as the shared model describes them (what a manifest's `nodes:` would give)."""
        return [
            NodeSpec(
                name=n.name,
                address=n.address,
                ssh_user=n.ssh_user,
                ssh_port=n.ssh_port,
                ssh_key=str(n.ssh_key),
                root=n.root,
                link_mbit=self.rate_mbit,
            )
            for n in self.nodes
        ]

    def manifest_nodes(self) -> str:
        """The `nodes:` section of a manifest for this cloudlet (YAML text)."""
        out = ["nodes:"]
        for n in self.nodes:
            out.append(
                f"  {n.name}: {{address: {n.address}, ssh: {{user: {n.ssh_user}, port: {n.ssh_port}, "
                f"key: {json.dumps(str(n.ssh_key))}}}, root: {n.root}, linkMbit: {self.rate_mbit:g}}}"
            )
        return "\n".join(out) + "\n"

    def save(self) -> None:
        tmp = self.inventory_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(self.inventory_path)
        (self.dir / "nodes.yaml").write_text(self.manifest_nodes())
        REGISTRY.mkdir(parents=True, exist_ok=True)
        (REGISTRY / f"{self.name}.json").write_text(
            json.dumps({"inventory": str(self.inventory_path)}) + "\n"
        )

    @classmethod
    def load(cls, name: str = "demo", workdir: Path | str | None = None) -> Cloudlet:
        """The cloudlet `name`: from `workdir` if given, else from the registry of cloudlets that are up,
        else from the default workdir."""
        if workdir is not None:
            path = Path(workdir) / name / "cloudlet.json"
        else:
            reg = _registered(name)
            path = (reg / "cloudlet.json") if reg is not None else default_workdir() / name / "cloudlet.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CloudletError(
                f"no cloudlet named {name!r} ({path} not found); `nephele cloudlet up --name {name}`"
            ) from None
        except (OSError, ValueError) as exc:
            raise CloudletError(f"{path}: unreadable cloudlet inventory: {exc}") from exc
        return cls.from_dict(data)

    def status(self) -> list[dict[str, Any]]:
        """Per node: netns present, libvirtd / sshd pid if alive, running VMs (None if libvirtd is down)."""
        present = set(_netns_list())
        rows = []
        for n in self.nodes:
            lpid = _read_pid(n.libvirtd_pidfile)
            spid = _read_pid(n.sshd_pidfile)
            lpid = lpid if lpid and _alive(lpid) else None
            spid = spid if spid and _alive(spid) else None
            vms: list[str] | None = None
            if lpid:
                proc = _run(
                    ["virsh", "-c", n.libvirt_uri, "list", "--name", "--state-running"],
                    check=False,
                    timeout=15,
                )
                if proc.returncode == 0:
                    vms = [v for v in proc.stdout.split() if v]
            rows.append(
                {
                    "node": n.name,
                    "address": n.address,
                    "netns": n.netns,
                    "netns_present": n.netns in present,
                    "libvirtd_pid": lpid,
                    "sshd_pid": spid,
                    "vms_running": vms,
                    "libvirt_uri": n.libvirt_uri,
                }
            )
        return rows

    def healthy(self) -> bool:
        return all(r["netns_present"] and r["libvirtd_pid"] and r["sshd_pid"] for r in self.status())

    def down(self, *, keep: bool = False) -> None:
        """Remove everything `up` made: daemons and any VM or process left in the nodes, mounts, namespaces,
        the bridge, and (unless keep) the cloudlet directory."""
        for p in self.proxies:
            p.stop()
        teardown(self.name, self.dir, remove_dir=not keep)


# ------------------------------------------------------------------------------------- discovery/cleanup


def check_prerequisites() -> None:
    problems = []
    if os.geteuid() != 0:
        problems.append("must run as root (network namespaces, mounts, libvirtd, sshd)")
    problems += [f"'{t}' not found" for t in REQUIRED_TOOLS if shutil.which(t) is None]
    problems += [f"{p} not found" for p in (LIBVIRTD, SSHD) if not os.access(p, os.X_OK)]
    if problems:
        raise CloudletError(
            "cannot build a cloudlet here: " + "; ".join(problems) + " (see tools/bootstrap.sh)"
        )


def _is_sshd(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "sshd"
    except OSError:
        return False


def _registered(name: str) -> Path | None:
    try:
        data = json.loads((REGISTRY / f"{name}.json").read_text())
        return Path(data["inventory"]).parent
    except (OSError, ValueError, KeyError, TypeError):
        return None


def registered_names() -> list[str]:
    return sorted(p.stem for p in REGISTRY.glob("*.json")) if REGISTRY.is_dir() else []


def _pick_subnet(subnet: str | None, name: str) -> ipaddress.IPv4Network:
    used = []
    for line in _run(["ip", "-o", "-4", "addr", "show"]).stdout.splitlines():
        parts = line.split()
        with contextlib.suppress(ValueError, IndexError):
            used.append((parts[1], ipaddress.ip_interface(parts[3]).network))
    if subnet is not None:
        try:
            net = ipaddress.IPv4Network(subnet, strict=False)
        except ValueError as exc:
            raise CloudletError(f"subnet {subnet!r}: {exc}") from exc
        if net.prefixlen > 27:
            raise CloudletError(f"subnet {subnet}: too small (at most /27)")
        clash = [dev for dev, n in used if n.overlaps(net)]
        if clash:
            raise CloudletError(
                f"subnet {net} is already used by interface {clash[0]} (another cloudlet? --subnet)"
            )
        return net
    for third in range(256):
        net = ipaddress.IPv4Network(f"10.201.{third}.0/24")
        if not any(n.overlaps(net) for _, n in used):
            return net
    raise CloudletError("no free 10.201.X.0/24 subnet for a cloudlet; pass --subnet")


def teardown(name: str, cdir: Path | None, *, remove_dir: bool = True) -> list[str]:
    """Remove every trace of cloudlet `name` found on the system (whether or not its inventory survived):
    processes in its namespaces (libvirtd, sshd, QEMU, sessions, proxies), mount and UTS namespace files,
    network namespaces, the bridge, the registry entry, and `cdir` if remove_dir. Returns what it removed."""
    removed: list[str] = []
    netns = [ns for ns in _netns_list() if re.fullmatch(rf"nphl-{re.escape(name)}-\d+", ns)]
    marker = re.compile(rf"/{re.escape(name)}/nphl-ns(/[^/]+)?$")
    mounts = [m for m in _mountpoints() if marker.search(m)]
    if cdir is not None:
        nsdir = str(Path(cdir) / "nphl-ns")
        mounts += [m for m in _mountpoints() if (m == nsdir or m.startswith(nsdir + "/")) and m not in mounts]
    ns_files = [m for m in mounts if not m.endswith("/nphl-ns")]
    ids = {i for i in (_ns_id(f"/run/netns/{ns}") for ns in netns) if i}
    ids |= {i for i in (_ns_id(m) for m in ns_files) if i}
    victims = _pids_in(ids)
    if victims:
        removed.append(f"{len(victims)} processes")
    _kill_all(victims)
    for m in sorted(set(mounts), key=len, reverse=True):  # ns files before the directory they sit in
        _umount_all(m)
        removed.append(m)
    for ns in netns:
        _run(["ip", "netns", "del", ns], check=False)
        removed.append(f"netns {ns}")
    bridge = f"nphl-{name}"
    if _link_exists(bridge):
        _run(["ip", "link", "del", bridge], check=False)
        removed.append(f"bridge {bridge}")
    reg = REGISTRY / f"{name}.json"
    if reg.exists() and (cdir is None or _registered(name) in (None, Path(cdir))):
        reg.unlink()
    if cdir is not None and remove_dir and Path(cdir).exists():
        if any(m.startswith(str(cdir) + "/") for m in _mountpoints()):
            raise CloudletError(f"{cdir}: still has mounts after teardown; not removing it")
        shutil.rmtree(cdir)
        removed.append(str(cdir))
    return removed


def reap_orphans(workdir: Path | str | None = None) -> list[str]:
    """Tear down cloudlets whose owner process (a test session) is gone: those registered as up, and those
    with an inventory under `workdir` (left by a run the machine did not survive). Returns their names."""
    found: dict[str, Cloudlet] = {}
    for name in registered_names():
        with contextlib.suppress(CloudletError):
            found[name] = Cloudlet.load(name)
    if workdir is not None and Path(workdir).is_dir():
        for inv in sorted(Path(workdir).glob("*/cloudlet.json")):
            with contextlib.suppress(CloudletError):
                found.setdefault(inv.parent.name, Cloudlet.load(inv.parent.name, workdir))
    reaped = []
    for name, c in sorted(found.items()):
        if c.owner_pid is not None and not _alive(c.owner_pid):
            teardown(name, c.dir, remove_dir=True)
            reaped.append(name)
    return reaped
