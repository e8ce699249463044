"""A bandwidth-limited link of our own, for benchmarks and tests: a fresh network namespace whose
loopback is shaped with ``tc qdisc ... tbf``.

Every process of a job runs inside the namespace (``ip netns exec``) and talks to the others over
127.0.0.1, so all traffic stays on a loopback device that this module created and removes again.
Both directions share the one loopback queue: the link behaves like a shared (half-duplex) medium
of the given rate, and a pipeline's forward activations and backward gradients compete for it.

Needs root (CI and the machines here run as root), ``ip`` and ``tc`` (iproute2) and the kernel's
``tbf`` qdisc; ``available()`` says why not where any is missing, so tests can skip with a reason.

Shaping choices, each against a trap that would fake a speedup for compression:
* the loopback MTU stays at 65536: a lower MTU slows large (uncompressed) messages far more than
  small ones;
* the token bucket (``burst``) holds at least two full-size packets, or every 64 KB segment would
  be dropped and gloo would time out;
* the queue is deep (``queue_s`` seconds at the rate, at least 4 MB): a shallow queue drops the
  bursts of large messages and TCP backs off, starving the uncompressed run. ``qdisc_stats()``
  reports drops so a run can show it had none.

    with ShapedNamespace(rate_mbit=100) as ns:
        print(ns.measure_rate() / 1e6, "Mbit/s")
        ns.run([sys.executable, "job.py"], timeout=600)
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

LO_MTU = 65536
_names = itertools.count()


class LinkUnavailable(RuntimeError):
    """This machine cannot create or shape a network namespace (the message says why)."""


def available() -> tuple[bool, str]:
    """(True, "") where namespaces can be created and shaped, else (False, the reason)."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return False, "network namespaces need Linux"
    if os.geteuid() != 0:
        return False, "creating a network namespace needs root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"`{tool}` (iproute2) is not installed"
    try:
        with ShapedNamespace(rate_mbit=100):
            pass
    except LinkUnavailable as e:
        return False, str(e)
    return True, ""


def _run(argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


class ShapedNamespace:
    """A network namespace with its loopback up and, for a finite ``rate_mbit``, shaped by tbf.

    ``rate_mbit=None`` leaves the loopback unshaped (the "unlimited" link: what the harness
    compares against to show it adds nothing by itself)."""

    def __init__(self, rate_mbit: float | None = None, *, burst_bytes: int | None = None,
                 queue_s: float = 2.0, name: str | None = None):
        if rate_mbit is not None and not rate_mbit > 0:
            raise ValueError(f"rate_mbit must be > 0 or None, got {rate_mbit!r}")
        self.rate_mbit = rate_mbit
        self.name = name or f"gwlink-{os.getpid()}-{next(_names)}"
        rate_bps = None if rate_mbit is None else rate_mbit * 1e6
        # Two full-size loopback packets at least; ~2 ms of traffic at high rates.
        self.burst_bytes = burst_bytes or (0 if rate_bps is None else max(2 * LO_MTU + 4096, int(rate_bps / 8 * 0.002)))
        if rate_bps is not None and self.burst_bytes <= LO_MTU:
            raise ValueError(f"burst_bytes must exceed the loopback MTU ({LO_MTU}), got {self.burst_bytes}: "
                             "every full-size packet would be dropped")
        self.limit_bytes = 0 if rate_bps is None else max(4 << 20, int(rate_bps / 8 * queue_s))
        self.created = False

    # ------------------------------------------------------------------ life cycle
    def __enter__(self) -> "ShapedNamespace":
        self.create()
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    def create(self) -> None:
        res = _run(["ip", "netns", "add", self.name])
        if res.returncode != 0:
            raise LinkUnavailable(f"`ip netns add {self.name}` failed: {res.stderr.strip()}")
        self.created = True
        try:
            self._ip("link", "set", "lo", "up")
            if self.rate_mbit is not None:
                self._tc("qdisc", "add", "dev", "lo", "root", "tbf", "rate", f"{self.rate_mbit}mbit",
                         "burst", str(self.burst_bytes), "limit", str(self.limit_bytes))
        except BaseException:
            self.destroy()
            raise

    def destroy(self) -> None:
        """Remove the namespace (and with it its loopback and qdisc). Idempotent."""
        if not self.created:
            return
        # Processes still inside would keep it alive; the caller's jobs have ended (run() waits).
        _run(["ip", "netns", "del", self.name])
        self.created = False

    def exists(self) -> bool:
        return self.name in _run(["ip", "netns", "list"]).stdout.split()

    def _ip(self, *args: str) -> str:
        res = _run(["ip", "-n", self.name, *args])
        if res.returncode != 0:
            raise LinkUnavailable(f"`ip -n {self.name} {' '.join(args)}` failed: {res.stderr.strip()}")
        return res.stdout

    def _tc(self, *args: str) -> str:
        res = _run(["tc", "-n", self.name, *args])
        if res.returncode != 0:
            raise LinkUnavailable(f"`tc -n {self.name} {' '.join(args)}` failed: {res.stderr.strip()} "
                                  "(is the kernel's tbf qdisc available?)")
        return res.stdout

    # ------------------------------------------------------------------ use
    def argv(self, argv: list[str]) -> list[str]:
        """``argv`` prefixed so that it runs inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: list[str], *, timeout: float, env: dict | None = None, cwd: str | None = None
            ) -> subprocess.CompletedProcess:
        """Run a command inside the namespace; on timeout its whole process group is killed."""
        proc = subprocess.Popen(self.argv(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, cwd=cwd, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            out, _ = proc.communicate()
            raise TimeoutError(f"{' '.join(argv[:4])}... ran past {timeout:.0f} s inside {self.name}:\n{out[-3000:]}")
        return subprocess.CompletedProcess(argv, proc.returncode, out, "")

    def counters(self) -> dict[str, int]:
        """Bytes and packets the loopback has carried (each packet counted once)."""
        info = json.loads(self._ip("-s", "-j", "link", "show", "lo"))[0]["stats64"]["tx"]
        return {"bytes": int(info["bytes"]), "packets": int(info["packets"])}

    def qdisc_stats(self) -> dict[str, int]:
        """tbf counters: bytes sent, packets dropped, overlimits (0s when unshaped)."""
        if self.rate_mbit is None:
            return {"bytes": 0, "drops": 0, "overlimits": 0}
        q = json.loads(self._tc("-s", "-j", "qdisc", "show", "dev", "lo"))[0]
        return {"bytes": int(q.get("bytes", 0)), "drops": int(q.get("drops", 0)),
                "overlimits": int(q.get("overlimits", 0))}

    def measure_rate(self, nbytes: int | None = None, timeout: float = 120) -> float:
        """Achieved bits per second of one TCP transfer over the namespace's loopback.

        ``nbytes`` defaults to about two seconds at the shaped rate (at least 20 token buckets,
        so the initial burst does not inflate the figure); 256 MB when unshaped."""
        if nbytes is None:
            nbytes = (256 << 20) if self.rate_mbit is None else int(max(20 * self.burst_bytes,
                                                                        self.rate_mbit * 1e6 / 8 * 2))
        res = self.run([sys.executable, "-m", "gradwire.testing.shaped_link", "--probe", str(nbytes)],
                       timeout=timeout, env=dict(os.environ, PYTHONPATH=_package_root()))
        if res.returncode != 0:
            raise RuntimeError(f"rate probe failed inside {self.name}:\n{res.stdout}")
        return float(res.stdout.strip().splitlines()[-1])


NET_COUNTER_ENV = "GRADWIRE_NET_COUNTER"


def tx_bytes_reader():
    """A function returning the bytes sent so far by the network device named in
    ``$GRADWIRE_NET_COUNTER`` (as this process's namespace sees it), or None when it is unset.

    Jobs that a link benchmark runs call it at the end of every step: inside a namespace of
    their own the loopback carries exactly the job's traffic, so the differences are the bytes
    each step put on the link, control messages and TCP/IP headers included."""
    dev = os.environ.get(NET_COUNTER_ENV)
    if not dev:
        return None
    path = f"/sys/class/net/{dev}/statistics/tx_bytes"

    def read() -> int:
        with open(path) as f:
            return int(f.read())

    read()  # fail now, not mid-run, if the device does not exist
    return read


def _package_root() -> str:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    extra = os.environ.get("PYTHONPATH")
    return root + (os.pathsep + extra if extra else "")


def probe(nbytes: int) -> float:
    """Send ``nbytes`` over TCP 127.0.0.1 in this process; bits per second until all arrived."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    done = threading.Event()
    got = [0, 0.0]

    def receive():
        conn, _ = srv.accept()
        with conn:
            while got[0] < nbytes:
                chunk = conn.recv(1 << 20)
                if not chunk:
                    break
                got[0] += len(chunk)
            got[1] = time.perf_counter()
        done.set()

    threading.Thread(target=receive, daemon=True).start()
    payload = b"\0" * (1 << 20)
    with socket.create_connection(("127.0.0.1", port)) as c:
        t0 = time.perf_counter()
        left = nbytes
        while left > 0:
            n = c.send(payload[: min(left, len(payload))])
            left -= n
        done.wait(600)
    srv.close()
    if got[0] < nbytes:
        raise RuntimeError(f"probe: received {got[0]} of {nbytes} bytes")
    return 8 * nbytes / (got[1] - t0)


if __name__ == "__main__":  # the rate probe, run inside a namespace by measure_rate()
    if len(sys.argv) == 3 and sys.argv[1] == "--probe":
        print(probe(int(sys.argv[2])))
    else:
        sys.exit("usage: python -m gradwire.testing.shaped_link --probe NBYTES")
