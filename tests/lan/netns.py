"""Simulated LAN hosts: network namespaces joined by bridges, built and torn down by a test.

Every namespace, bridge and veth lives in namespaces this module creates (the root namespace gets
nothing), addresses come from 198.18.0.0/15 (the benchmarking range, RFC 2544) and exist only inside
those namespaces, so no traffic can reach a real interface. Needs root and iproute2.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from dataclasses import dataclass, field

from tests.procs import READY, Child

#: The interface name of every simulated host (not eth0: nothing here is a real interface).
IFACE = "zfv0"


def lan_unavailable() -> str | None:
    """Why the LAN tier cannot run here, or None."""
    if os.geteuid() != 0:
        return "LAN tests build network namespaces and need root"
    if shutil.which("ip") is None:
        return "LAN tests need iproute2 ('ip'); apt-get install iproute2"
    probe = f"zfprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create network namespaces here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def ip(*args: str, ns: str | None = None) -> None:
    argv = ["ip", "netns", "exec", ns, "ip", *args] if ns else ["ip", *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


@dataclass
class Host:
    name: str
    ns: str
    address: str
    switch: str
    port: str  # the switch-side veth name
    children: list[Child] = field(default_factory=list)


class Lan:
    """Builds switches (bridges), hosts and routers; ``close()`` removes all of it."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:5]
        self.namespaces: list[str] = []
        self.hosts: dict[str, Host] = {}
        self._veths = 0

    def _ns(self, role: str) -> str:
        ns = f"zf{self.tag}{role}"
        ip("netns", "add", ns)
        self.namespaces.append(ns)
        ip("link", "set", "lo", "up", ns=ns)
        return ns

    def switch(self, name: str) -> str:
        ns = self._ns(f"s{name}")
        ip("link", "add", "br0", "type", "bridge", ns=ns)
        ip("link", "set", "br0", "up", ns=ns)
        return ns

    def _plug(self, ns: str, ifname: str, switch: str, cidr: str) -> str:
        self._veths += 1
        port = f"p{self._veths}"
        tmp = f"zft{self.tag}{self._veths}"
        ip("link", "add", tmp, "netns", ns, "type", "veth", "peer", "name", port, "netns", switch)
        ip("link", "set", tmp, "name", ifname, ns=ns)
        ip("addr", "add", cidr, "dev", ifname, ns=ns)
        ip("link", "set", ifname, "up", ns=ns)
        ip("link", "set", port, "master", "br0", ns=switch)
        ip("link", "set", port, "up", ns=switch)
        return port

    def host(self, name: str, switch: str, cidr: str, gateway: str | None = None) -> Host:
        ns = self._ns(f"h{name}")
        port = self._plug(ns, IFACE, switch, cidr)
        if gateway:
            ip("route", "add", "default", "via", gateway, ns=ns)
        host = Host(name, ns, cidr.split("/")[0], switch, port)
        self.hosts[name] = host
        return host

    def router(self, name: str, legs: list[tuple[str, str]]) -> str:
        """A namespace forwarding between switches; ``legs`` are (switch, cidr)."""
        ns = self._ns(f"r{name}")
        for i, (switch, cidr) in enumerate(legs):
            self._plug(ns, f"leg{i}", switch, cidr)
        subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
                       check=True, timeout=10)
        return ns

    def link(self, host: Host, up: bool) -> None:
        """Unplug (or plug back) a host's cable at the switch."""
        ip("link", "set", host.port, "up" if up else "down", ns=host.switch)

    def python(self, host: Host, code: str, *, ready: bool = True, timeout: float = 20.0,
               env: dict[str, str] | None = None) -> Child:
        """Run ``code`` on ``host`` with the fabric scoped to its interface."""
        full = {"ZMQFABRIC_INTERFACE": IFACE, **(env or {})}
        argv = ["ip", "netns", "exec", host.ns, sys.executable, "-c", textwrap.dedent(code)]
        child = Child(argv, full)
        host.children.append(child)
        if ready:
            child.expect(READY, timeout)
        return child

    def close(self) -> None:
        for host in self.hosts.values():
            for child in host.children:
                child.stop(timeout=3.0)
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        self.namespaces.clear()
