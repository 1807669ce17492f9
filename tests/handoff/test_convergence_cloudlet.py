"""A guest that dirties memory faster than the link carries it, handed off between two cloudlet nodes:
without auto-converge its dirty set never shrinks below what the downtime budget allows, so the
handoff is given up at its timeout and the VM keeps running on the source; with auto-converge (the
default) QEMU slows the guest's vCPUs until the rest fits in the budget, and the same handoff completes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from nephele.cloudlet import Cloudlet
from nephele.cloudlet.guest import GuestFiles
from nephele.errors import HandoffError
from nephele.handoff import perform
from tests.handoff.cloudlet_setup import agent, build_image, domains, running_instance, spec, wait_guest

pytestmark = pytest.mark.integration
PORT = 18083
LINK_MBIT = 4  # 0.5 MB/s against a guest that rewrites 2 MiB of random data every second
DIRTY_MIB = 2
GIVE_UP_S = 45.0


@pytest.fixture(scope="module")
def image(cloudlet: Cloudlet, guest: GuestFiles) -> str:
    return build_image(cloudlet, guest, fill=4, dirty=DIRTY_MIB)


@pytest.fixture
def instance(cloudlet: Cloudlet, image: str) -> Iterator[dict[str, Any]]:
    with running_instance(cloudlet, image, "busy-1", PORT) as r:
        yield r


def test_a_guest_outpacing_the_link_is_given_up_then_converges_with_auto_converge(
    cloudlet: Cloudlet, instance: dict[str, Any]
) -> None:
    a, b = cloudlet.nodes[:2]
    uuid = instance["uuid"]
    before = wait_guest(a, PORT)
    cloudlet.set_link(LINK_MBIT)
    try:
        events: list[dict[str, Any]] = []
        t0 = time.monotonic()
        with pytest.raises(HandoffError) as err:
            perform(
                agent(a),
                agent(b),
                "busy-1",
                spec(b),
                events.append,
                source_address=a.address,
                timeout_s=GIVE_UP_S,
                auto_converge=False,
            )
        took = time.monotonic() - t0
        msg = str(err.value)
        print(f"given up after {took:.1f} s: {msg}")
        assert f"not converged within the handoff timeout of {GIVE_UP_S:g} s" in msg, msg
        assert (
            "MiB still to send" in msg
            and "auto-converge off" in msg
            and "the instance is running on the source" in msg
        )
        assert GIVE_UP_S <= took < GIVE_UP_S + 120
        progress = [e for e in events if e.get("event") == "progress" and e.get("side") == "source"]
        assert progress and not any(e["throttle_pct"] for e in progress)  # nothing slowed the guest
        # the VM keeps running on the source, unmarked; nothing of it on the destination
        (on_a,) = [i for i in agent(a).call("instance.ls") if i["uuid"] == uuid]
        assert on_a["state"] == "running" and on_a["handoff_url"] is None
        assert uuid not in domains(b) and not (b.host_root / "instances" / uuid).exists()
        now = wait_guest(a, PORT)
        assert now["fill_md5"] == before["fill_md5"] and int(now["counter"]) > int(before["counter"])

        # the same handoff with auto-converge (the default)
        events.clear()
        res = perform(
            agent(a), agent(b), "busy-1", spec(b), events.append, source_address=a.address, timeout_s=600
        )
        slowed = [
            e["throttle_pct"] for e in events if e.get("event") == "progress" and e.get("side") == "source"
        ]
        print(
            f"converged in {res.elapsed_s:.1f} s, downtime {res.downtime_s} s, "
            f"throttle seen {sorted(set(slowed))}"
        )
        mem = res.source["memory"]
        print(
            f"downtime limits (t, ms): {res.source['downtime_limits_ms'][-6:]}; stream {mem['stream_bytes']} "
            f"wire {mem['wan_out']}; RAM check corrected {mem.get('corrected')}"
        )
        assert res.source["throttle_max_pct"] > 0 and max(slowed) > 0
        assert res.downtime_s is not None and res.downtime_s < 10
    finally:
        cloudlet.set_link(20)
    after = wait_guest(b, PORT, timeout=120)
    assert after["fill_md5"] == before["fill_md5"] and int(after["counter"]) > int(now["counter"])
    assert uuid not in domains(a) and not (a.host_root / "instances" / uuid).exists()
