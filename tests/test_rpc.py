"""Measuring through a TVM RPC tracker and server started on 127.0.0.1."""

import ipaddress
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import psutil
import pytest
import torch
from torch import nn

from autocomp.core.errors import AutocompError
from autocomp.hardware.measure.rpc import RPCMeasurer, start_local_server, start_local_tracker
from autocomp.hardware.profiles import RpcSettings, load_profile

SHAPE = (1, 1, 28, 28)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


def rpc_profile(tracker_port: int, key: str, timeout_s: float = 30, retries: int = 1, repeat: int = 5,
                min_repeat_ms: int = 20):
    host = load_profile("host")
    latency = replace(host.latency, method="rpc", tuning="untuned", repeat=repeat,
                      min_repeat_ms=min_repeat_ms,
                      rpc=RpcSettings("127.0.0.1", tracker_port, key, timeout_s, retries))
    return replace(host, name="host-rpc", latency=latency)


@pytest.fixture(scope="module")
def tracker():
    with start_local_tracker() as service:
        yield service


@pytest.fixture(scope="module")
def servers(tracker):
    """One server under key "loop" and two under "flaky", started side by side (each takes seconds)."""
    keys = ["loop", "flaky", "flaky"]
    with ThreadPoolExecutor(len(keys)) as pool:
        started = list(pool.map(lambda key: start_local_server(tracker.host, tracker.port, key, threads=1),
                                keys))
    yield started
    for service in started:
        service.close()


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


def listening_addresses(pids: list[int]) -> set[str]:
    addresses = set()
    for pid in pids:
        try:
            connections = psutil.Process(pid).net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        addresses |= {c.laddr.ip for c in connections if c.status == psutil.CONN_LISTEN}
    return addresses


def test_services_bind_to_loopback_only(tracker, servers) -> None:
    addresses = listening_addresses(tracker.group_pids() + [p for s in servers for p in s.group_pids()])
    assert addresses, "the tracker and server listen somewhere"
    assert all(ipaddress.ip_address(a).is_loopback for a in addresses), addresses


def test_rpc_latency_is_measured_on_the_device_and_says_so(tracker, server) -> None:
    # How it compares with another figure is checked in one session, A/B against the
    # reference (next test): two figures taken at different times on a shared machine are not.
    remote = RPCMeasurer(rpc_profile(tracker.port, "loop")).measure(small_net(), SHAPE)
    assert remote.kind == "measured" and remote.samples == 5
    assert 0 < remote.p10_s <= remote.median_s <= remote.p90_s
    assert f"via RPC tracker 127.0.0.1:{tracker.port} key loop" in remote.provenance


def test_rpc_measurement_alternates_with_the_reference_on_the_device(tracker, server) -> None:
    """The reference is uploaded with the candidate and timed in the same session, A B A B."""
    measurer = RPCMeasurer(rpc_profile(tracker.port, "loop"))
    try:
        baseline = measurer.set_reference(small_net(), SHAPE)
        same = measurer.measure(small_net(), SHAPE)
    finally:
        measurer.close()
    assert "reference against itself, reference-relative" in baseline.provenance
    assert baseline.reference["baseline_s"] == baseline.reference["level_s"]  # a fresh run's own level
    assert "via RPC tracker" in same.provenance and "reference-relative" in same.provenance
    assert same.samples == 5 and 0.5 < same.reference["ratio"] < 2, same
    assert same.noisy is None or "the device's load is not visible through RPC" in same.noisy


def test_key_without_server_fails_after_retries(tracker) -> None:
    measurer = RPCMeasurer(rpc_profile(tracker.port, "nobody", timeout_s=2, retries=1))
    with pytest.raises(AutocompError, match=r"'nobody'.*failed 2 times.*lists 0 such servers"):
        measurer.measure(small_net(), SHAPE)
    assert len(measurer.failures) == 2


def test_device_dropping_mid_measurement_is_retried(tracker, servers) -> None:
    """Two servers share a key; the one that gets the session is killed while timing, and the
    retry gets a fresh session on the other."""
    key = "flaky"
    servers = servers[1:]
    killed = []

    def drop_the_busy_one() -> None:
        # A server forks a process per session: kill the group of the first one that does.
        baseline = [len(server.group_pids()) for server in servers]
        deadline = time.monotonic() + 60
        while not killed and time.monotonic() < deadline:
            for server, count in zip(servers, baseline, strict=True):
                if len(server.group_pids()) > count:
                    time.sleep(1.0)  # well inside the 4 s of timing
                    if len(server.group_pids()) <= count:
                        continue  # a short connection (a tracker's check), not the session
                    server.kill()
                    killed.append(server)
                    break
            time.sleep(0.05)

    killer = threading.Thread(target=drop_the_busy_one)
    measurer = RPCMeasurer(rpc_profile(tracker.port, key, timeout_s=30, retries=2, repeat=40,
                                       min_repeat_ms=100))
    killer.start()
    try:
        latency = measurer.measure(small_net(), SHAPE)
    finally:
        killer.join()
    assert len(killed) == 1 and killed[0].group_pids() == []
    assert len(measurer.failures) == 1, measurer.failures
    # 1 s after the session starts it is timing on a quiet machine; on a loaded one it may still
    # be loading the module: a failure at any stage must be retried on the other device.
    assert measurer.failures[0].startswith("device failed while "), measurer.failures
    assert latency.samples == 40


def test_close_ends_the_whole_process_group() -> None:
    service = start_local_tracker()
    pids = service.group_pids()
    assert len(pids) >= 2, "the worker and TVM's own tracker process"
    service.close()
    assert service.group_pids() == []
