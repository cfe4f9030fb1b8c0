"""A standalone Milvus server (the ``milvus`` package) for the gallery tests and ``benchmarks/gallery_scale.py``:
free loopback ports, its data in a folder, kill -9 and restart on the same ports, nothing left running."""

import os
import random
import re
import signal
import socket
import subprocess
import time


def free_port(exclude=()) -> int:
    """A loopback port free now, below the kernel's ephemeral range, and not in ``exclude`` (the ports already
    picked for the same server: a port picked twice made the server's own second bind fail, "set
    data_coord_port=25221, but bind failed", on every retry). A port from bind(0) lies in that range, where the
    kernel hands local ports to outgoing connections: between the pick and a server's bind (or its restart
    after a kill) any connection on the machine may take it, and a Milvus start then failed for minutes with
    "index_coord_port=47861, but bind failed". Below the range only a listener can take it."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    if low > 2048:
        for port in random.sample(range(max(1024, low - 10000), low), 100):
            if port in exclude:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    while True:  # no such range known (or all taken): any free port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            if s.getsockname()[1] not in exclude:
                return s.getsockname()[1]


class MilvusServer:
    """A standalone Milvus server (the ``milvus`` package: Milvus 2.3 run as one process, talking gRPC as a
    cluster does) on free loopback ports, its data under ``root``. ``kill()`` is kill -9; ``start()`` again
    reopens the same data on the same ports."""

    def __init__(self, root, settings: dict | None = None):
        """``settings``: milvus.yaml keys by dotted path (``dataCoord.segment.sealProportion``) and their values,
        for a run that needs other than the package's template; a key the template lacks is refused (the package
        would drop it without a word)."""
        import milvus  # the package (visrec[dev]); callers that may lack it check first
        self.server = milvus.MilvusServer(data_dir=str(root))
        known = _template_keys(self.server.config.template_text)
        for key, value in (settings or {}).items():
            if key not in known:
                raise KeyError(f"milvus.yaml has no setting {key!r} (not in the milvus package's template)")
            self.server.config.set(key, value)
        self.server.config.try_bind_port = _try_bind  # the package's own check fails for a minute after a kill
        # every configurable port: free ones now, kept for restarts. The embedded etcd still listens on 2379 and
        # 2380 whatever etcd_port says, so one such server runs per machine at a time (a second one started
        # while another runs, say a benchmark's, never answers and times out)
        picked: set[int] = set()
        for key in [k for k in self.server.config.configurable_items if k.endswith("_port")]:
            port = free_port(exclude=picked)
            picked.add(port)
            self.server.config.update(**{key: port})
        self.port = int(self.server.config.configs["proxy_port"])
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self, timeout=420):
        """Start and wait until a client is served; a restart right after a kill retries while the kernel
        still holds the old ports (the package checks them with a plain bind)."""
        deadline = time.time() + timeout
        while True:
            try:
                self.server.wait_for_started = False  # waited for below, longer than the package's 180 s: a
                self.server.start()                     # restart on 2 busy cores replays its log first
                self.server.wait_started(timeout=1000 * max(1.0, deadline - time.time()))
                return self
            except RuntimeError as exc:
                self.server.config.cleanup_listen_ports()  # the sockets the failed check still holds
                self.stop()
                if "bind failed" not in str(exc) or time.time() > deadline:
                    raise
                time.sleep(1)

    @property
    def pid(self):
        return self.server.server_proc.pid if self.server.server_proc else None

    def kill(self):
        """kill -9 the server (and anything it started), as a crash would."""
        proc = self.server.server_proc
        if proc is not None:
            for pid in _children(proc.pid) + [proc.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait(timeout=30)
            self.server.server_proc = None
        self.stop()

    def stop(self, grace: float = 15.0):
        """Stop the server: SIGTERM, then kill -9 after ``grace`` seconds. A clean shutdown flushes (the package
        waits only 1 s before kill -9), and with a loaded collection it takes longer than 15 s: a caller that
        discards the data folder afterwards (the tests' session server) passes a short grace."""
        proc = self.server.server_proc
        children = _children(proc.pid) if proc is not None else []
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for pid in children:  # none is expected; none may outlive the test session
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.server.stop()


def _try_bind(port: int):
    """The port check the ``milvus`` package makes before a start, as the server itself binds (SO_REUSEADDR):
    a port whose last connections wait in TIME_WAIT after a kill is free to listen on."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        return sock
    except OSError:
        sock.close()
        return None


def _template_keys(text: str) -> set[str]:
    """Every dotted key of a YAML template written as the ``milvus`` package's is (two-space indents, one key
    per line), read the way the package matches its extra settings."""
    keys, path = set(), []
    for line in text.splitlines():
        m = re.match(r"^( *)([A-Za-z0-9_]+):", line)
        if m is None or line.strip().startswith("#"):
            continue
        path = path[:len(m.group(1)) // 2] + [m.group(2)]
        keys.add(".".join(path))
    return keys


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            kids = []
        found += kids
        todo += kids
    return found


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True
