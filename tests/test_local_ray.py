"""The local Ray a front starts (service.session.connect) is private: every server it starts listens on
loopback only, its token file has mode 600, and none of its processes outlives a SIGKILL of the driver."""
from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time

import pytest

from hawq_ray.service.ray_watchdog import session_processes

DRIVER = """
import os, sys, ray
from hawq_ray.service.session import connect
connect(num_cpus=2)

@ray.remote
class Echo:
    def pid(self):
        return os.getpid()

actor = Echo.remote()
ray.get(actor.pid.remote())
print("ready", flush=True)
sys.stdin.read()          # until the test kills this process
"""


def listening_sockets() -> dict:
    """{socket inode: (address, port)} of every listening TCP socket, from /proc/net/tcp and tcp6."""
    out = {}
    for name, width in (("tcp", 8), ("tcp6", 32)):
        for line in open(f"/proc/net/{name}").read().splitlines()[1:]:
            cols = line.split()
            if cols[3] != "0A":                       # LISTEN
                continue
            hex_addr, hex_port = cols[1].split(":")
            raw = bytes.fromhex(hex_addr)
            if width == 8:
                addr = ipaddress.IPv4Address(raw[::-1])
            else:                                     # four little-endian 32-bit words
                addr = ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
                addr = addr.ipv4_mapped or addr
            out[cols[9]] = (addr, int(hex_port, 16))
    return out


def sockets_of(pids) -> list:
    listening, found = listening_sockets(), []
    for pid in pids:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        for link in links:
            if link.startswith("socket:[") and link[8:-1] in listening:
                found.append((pid, *listening[link[8:-1]]))
    return found


def test_local_ray_is_loopback_only_private_and_dies_with_its_driver(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path)}                  # a fresh home: no token file yet
    for key in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_ADDRESS"):
        env.pop(key, None)
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert driver.stdout.readline().strip() == "ready"
        pids = session_processes(driver.pid, os.getpid()) | {driver.pid}
        assert len(pids) >= 5                                     # gcs, raylet, agents, a worker, the driver
        sockets = sockets_of(pids)
        assert len(sockets) >= 5
        outside = [s for s in sockets if not s[1].is_loopback]
        assert outside == [], outside
        token = tmp_path / ".ray" / "auth_token"
        assert token.stat().st_mode & 0o777 == 0o600 and len(token.read_text()) == 64
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    deadline = time.time() + 15
    while session_processes(driver.pid, os.getpid()) and time.time() < deadline:
        time.sleep(0.2)
    assert session_processes(driver.pid, os.getpid()) == set()


RAYLET_TIMED_OUT = Exception("The current node timed out during startup. This could happen because some of the "
                             "raylet failed to startup or the GCS has become overloaded.")
GCS_TIMED_OUT = RuntimeError("Timed out waiting for file /tmp/ray/session_2026-12-07_16-15-40_334460_5821/"
                             "gcs_server_port_5ab6e05a")     # Ray 2.60's message, seen in CI on 2026-12-07


@pytest.mark.parametrize("first_error", [RAYLET_TIMED_OUT, GCS_TIMED_OUT], ids=["raylet", "gcs-port-file"])
def test_a_local_start_that_times_out_is_cleaned_up_and_started_again(monkeypatch, first_error):
    """Ray waits a fixed time for the raylet and for the GCS's port file; on a loaded machine that start fails
    and leaves its processes running. start_local ends them (here: a stand-in child) and starts again; other
    errors pass at once."""
    import ray
    from hawq_ray.service import session
    calls, leftovers = [], []

    def init(**kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            leftovers.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]))
            raise first_error

    monkeypatch.setattr(ray, "init", init)
    with pytest.warns(RuntimeWarning, match="try 1 of 3"):
        session.start_local(num_cpus=2)
    assert len(calls) == 2 and calls[1]["address"] == "local" and calls[1]["num_cpus"] == 2
    assert leftovers[0].poll() is not None                          # killed, and reaped

    def never(**kwargs):
        calls.append(kwargs)
        raise first_error

    monkeypatch.setattr(ray, "init", never)
    calls.clear()
    with pytest.warns(RuntimeWarning), pytest.raises(type(first_error), match=str(first_error)[:20]):
        session.start_local()
    assert len(calls) == session.LOCAL_START_TRIES

    def refused(**kwargs):
        calls.append(kwargs)
        raise ValueError("num_cpus must not be provided")

    monkeypatch.setattr(ray, "init", refused)
    calls.clear()
    with pytest.raises(ValueError):
        session.start_local(num_cpus=2)
    assert len(calls) == 1
