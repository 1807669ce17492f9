"""Durations and sizes: the parser and the schema pattern agree, and the typed policy gets seconds/bytes."""

from __future__ import annotations

import re

import pytest

import nephele.manifest as manifest
from nephele.errors import NepheleError
from nephele.manifest import parse_duration, parse_size
from nephele.model import Policy

DURATIONS = [
    ("5s", 5.0),
    ("500ms", 0.5),
    ("2m", 120.0),
    ("1h", 3600.0),
    ("1m30s", 90.0),
    ("1.5s", 1.5),
    (".25s", 0.25),
    ("0s", 0.0),
    (3, 3.0),
    (0.2, 0.2),
]
BAD_DURATIONS = ["", "5", "5 s", "5sec", "s", "-1s", "1m 30s", "5S", "1d"]

SIZES = [
    ("2GiB", 2 * 1024**3),
    ("500MB", 500 * 1000**2),
    ("64KiB", 65536),
    ("64kB", 64000),
    ("1000B", 1000),
    ("1.5GiB", 3 * 1024**3 // 2),
    ("1 TiB", 1024**4),
    (4096, 4096),
]
BAD_SIZES = ["", "2", "2gb", "2GB ", "2 GiB/s", "GiB", "-1GiB", "1e3MB", "2Gi"]


@pytest.mark.parametrize(("text", "seconds"), DURATIONS)
def test_durations(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", BAD_DURATIONS)
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(("text", "size"), SIZES)
def test_sizes(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", BAD_SIZES)
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_schema_patterns_accept_exactly_what_the_parsers_parse() -> None:
    defs = manifest.schema_document()["$defs"]
    assert isinstance(defs, dict)
    duration, size = re.compile(defs["duration"]["pattern"]), re.compile(defs["size"]["pattern"])
    for text, _ in DURATIONS:
        assert not isinstance(text, str) or duration.search(text), text
    for text in BAD_DURATIONS:
        assert not duration.search(text), text
    for text, _ in SIZES:
        assert not isinstance(text, str) or size.search(text), text
    for text in BAD_SIZES:
        assert not size.search(text), text


HEAD = "apiVersion: nephele.dev/v1\nkind: Cloudlet\nmetadata: {name: demo}\nnodes: {edge-a: {address: a}}\n"


def test_policy_defaults() -> None:
    assert manifest.loads(HEAD).policy == Policy()


def test_policy_values_become_seconds_and_bytes() -> None:
    text = HEAD + (
        "policy: {prune: true, parallelism: 8, maxParallelHandoffs: 2, maxHandoffsPerNode: 3,\n"
        "         downtimeBudget: 500ms, transferBudget: 2GiB, linkMbit: 100,\n"
        "         handoffTimeout: 10m, autoConverge: false}\n"
    )
    assert manifest.loads(text).policy == Policy(
        prune=True,
        parallelism=8,
        max_parallel_handoffs=2,
        max_handoffs_per_node=3,
        downtime_budget_s=0.5,
        transfer_budget_bytes=2 * 1024**3,
        link_mbit=100.0,
        handoff_timeout_s=600.0,
        auto_converge=False,
    )


def test_a_handoff_timeout_of_zero_means_no_limit() -> None:
    assert manifest.loads(HEAD + "policy: {handoffTimeout: 0}\n").policy.handoff_timeout_s is None
    assert Policy().handoff_timeout_s is None and Policy().auto_converge


def test_numbers_are_seconds_and_bytes() -> None:
    policy = manifest.loads(HEAD + "policy: {downtimeBudget: 2.5, transferBudget: 1000000}\n").policy
    assert (policy.downtime_budget_s, policy.transfer_budget_bytes) == (2.5, 1_000_000)


def test_bandwidth_caps_lowest_of_policy_and_both_ends() -> None:
    from nephele.model import bandwidth_cap

    d = manifest.loads(
        "apiVersion: nephele.dev/v1\nkind: Cloudlet\nmetadata: {name: demo}\n"
        "nodes: {a: {address: a, maxBandwidthMbit: 12}, b: {address: b},\n"
        "        c: {address: c, maxBandwidthMbit: 50}}\n"
        "policy: {maxBandwidthMbit: 30}\n"
    )
    a, b, c = d.nodes["a"], d.nodes["b"], d.nodes["c"]
    assert (a.max_bandwidth_mbit, b.max_bandwidth_mbit, d.policy.max_bandwidth_mbit) == (12.0, None, 30.0)
    assert bandwidth_cap(d.policy, a, b) == 12.0  # a's own cap is the lowest
    assert bandwidth_cap(d.policy, b, c) == 30.0  # the policy's is lower than c's
    assert bandwidth_cap(Policy(), b, b) is None  # nobody set one: uncapped


def test_bandwidth_cap_must_be_positive() -> None:
    with pytest.raises(NepheleError) as err:
        manifest.loads(HEAD.replace("{address: a}", "{address: a, maxBandwidthMbit: 0}"), "m.yaml")
    assert "m.yaml:4:" in str(err.value) and "nodes.edge-a.maxBandwidthMbit: 0" in str(err.value)
