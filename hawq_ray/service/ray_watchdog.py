"""Kill the local Ray a driver started when that driver dies, even by SIGKILL.

On Linux Ray ties gcs_server, the raylet and its Python daemons to the driver (PR_SET_PDEATHSIG), but not the
raylet's agents (DashboardAgent, RuntimeEnvAgent) nor running workers: after a SIGKILL of the driver these
stay alive for about a minute, still listening (measured on Ray 2.60). `start(pid)` starts this file as a small
detached process holding the read end of a pipe whose write end only the driver holds (not inherited by
children). When the driver dies the pipe closes, and the watchdog kills every process whose command line or
open files name the driver's Ray session folder (`session_<time>_<driver pid>`), with their descendants,
until none is left. Run as a script with `python -S` (no site packages needed): `ray_watchdog.py DRIVER_PID`.
"""
import os
import re
import signal
import subprocess
import sys
import time


def start(driver_pid: int) -> None:
    """Start the watchdog of `driver_pid` (this process) before it starts Ray."""
    read_end, write_end = os.pipe()            # not inheritable (PEP 446): Ray's children never hold it
    subprocess.Popen([sys.executable, "-S", os.path.abspath(__file__), str(driver_pid)], stdin=read_end,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    os.close(read_end)
    # write_end stays open, unreferenced, until this process ends: its closing is the signal


def session_processes(driver_pid: int, me: int) -> set:
    """Pids whose command line or an open file is in the driver's Ray session folder, and their descendants."""
    pattern = re.compile(r"/session_[0-9_-]+_%d(/|$| )" % driver_pid)
    found, parent = set(), {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        try:
            parent[pid] = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
            command = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode("utf8", "replace")
            if pattern.search(command) or any(pattern.search(_link(f"/proc/{pid}/fd/{fd}"))
                                              for fd in os.listdir(f"/proc/{pid}/fd")):
                found.add(pid)
        except (OSError, IndexError, ValueError):
            continue                           # gone meanwhile, or not ours to read
    grew = True
    while grew:
        grown = {pid for pid, ppid in parent.items() if ppid in found} - found
        found |= grown
        grew = bool(grown)
    return found


def _link(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def watch(driver_pid: int) -> None:
    """Wait for the driver to end, then kill its session's processes."""
    try:
        while sys.stdin.buffer.read(65536):
            pass
    except OSError:
        pass
    quiet, deadline = 0, time.time() + 10.0
    while quiet < 3 and time.time() < deadline:       # until three sweeps in a row find nothing
        pids = session_processes(driver_pid, os.getpid())
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        quiet = 0 if pids else quiet + 1
        time.sleep(0.05)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
