"""Two hosts on one machine: two network namespaces joined by a veth pair (pyroute2).

    with Lab("demo") as lab:          # dmrepl-demo-p (10.77.0.1) <-> dmrepl-demo-s (10.77.0.2)
        lab.run("p", ["dmrepl", ...])

Used by `dmrepl demo` and the two-host tests.  Everything the lab creates is
named dmrepl-TAG-*, and is removed on exit whatever happened; faults are
injected on the link with `link_down` (and tc netem by the tests).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from dataclasses import dataclass

from pyroute2 import IPRoute, NetNS, netns

from dmrepl import private
from dmrepl.link import x25519

PREFIX = 24
TUNNEL = {"p": "10.99.0.1", "s": "10.99.0.2"}      # the hosts inside a WireGuard tunnel (wireguard_tables)
WG_PORT = 51820


@dataclass(frozen=True)
class Host:
    netns: str
    ifname: str
    address: str


class Lab:
    def __init__(self, tag: str, subnet: str = "10.77.0"):
        self.tag, self.subnet = tag, subnet
        self.hosts = {
            "p": Host(f"dmrepl-{tag}-p", f"dmr{tag[:6]}p", f"{subnet}.1"),
            "s": Host(f"dmrepl-{tag}-s", f"dmr{tag[:6]}s", f"{subnet}.2"),
        }

    def __enter__(self) -> "Lab":
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> None:
        p, s = self.hosts["p"], self.hosts["s"]
        for h in (p, s):
            if h.netns in netns.listnetns():
                raise RuntimeError(f"network namespace {h.netns} exists already: another run of this lab? "
                                   f"remove it with `ip netns delete {h.netns}` if nothing uses it")
            netns.create(h.netns)
        with IPRoute() as ipr:
            ipr.link("add", ifname=p.ifname, kind="veth", peer={"ifname": s.ifname, "net_ns_fd": s.netns})
            ipr.link("set", index=ipr.link_lookup(ifname=p.ifname)[0], net_ns_fd=p.netns)
        for h in (p, s):
            with NetNS(h.netns) as ns:
                ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
                idx = ns.link_lookup(ifname=h.ifname)[0]
                ns.addr("add", index=idx, address=h.address, prefixlen=PREFIX)
                ns.link("set", index=idx, state="up")

    def add_intruder(self) -> Host:
        """A third host on the same link: namespace dmrepl-TAG-x (SUBNET.3), its veth on a bridge in
        p's namespace that now carries p's address, so that x reaches s as p does (tests of what
        the secondary lets in)."""
        p = self.hosts["p"]
        x = Host(f"dmrepl-{self.tag}-x", f"dmr{self.tag[:6]}x", f"{self.subnet}.3")
        netns.create(x.netns)
        self.hosts["x"] = x                    # down() removes it with the others
        port = x.ifname + "b"
        with IPRoute() as ipr:
            ipr.link("add", ifname=x.ifname, kind="veth", peer={"ifname": port, "net_ns_fd": p.netns})
            ipr.link("set", index=ipr.link_lookup(ifname=x.ifname)[0], net_ns_fd=x.netns)
        with NetNS(p.netns) as ns:
            ns.link("add", ifname="br0", kind="bridge")
            br, pidx = ns.link_lookup(ifname="br0")[0], ns.link_lookup(ifname=p.ifname)[0]
            ns.addr("del", index=pidx, address=p.address, prefixlen=PREFIX)
            ns.link("set", index=pidx, master=br)
            ns.link("set", index=ns.link_lookup(ifname=port)[0], master=br, state="up")
            ns.addr("add", index=br, address=p.address, prefixlen=PREFIX)
            ns.link("set", index=br, state="up")
        with NetNS(x.netns) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            idx = ns.link_lookup(ifname=x.ifname)[0]
            ns.addr("add", index=idx, address=x.address, prefixlen=PREFIX)
            ns.link("set", index=idx, state="up")
        return x

    def wireguard_tables(self, key_dir: str, wrong_key_for_p: bool = False) -> dict[str, str]:
        """The [link] table of each host for a WireGuard tunnel between p and s (TUNNEL's
        addresses) over the lab's veth, with a new key pair written to KEY_DIR/HOST.wg (0600).
        `wrong_key_for_p`: p's table expects another public key of s than s holds."""
        keys = {h: x25519.new_private() for h in ("p", "s")}
        public = {h: x25519.encode(x25519.public(k)) for h, k in keys.items()}
        if wrong_key_for_p:
            public["s"] = x25519.encode(x25519.public(x25519.new_private()))
        tables = {}
        for h, other in (("p", "s"), ("s", "p")):
            path = os.path.join(key_dir, f"{h}.wg")
            private.write_secret(path, x25519.encode(keys[h]) + "\n")
            tables[h] = (f'[link]\nencrypt = "wireguard"\nprivate_key_file = "{path}"\n'
                         f'peer_public_key = "{public[other]}"\naddress = "{TUNNEL[h]}"\n'
                         f'peer_address = "{TUNNEL[other]}"\npeer_endpoint = "{self.hosts[other].address}:{WG_PORT}"\n'
                         f'listen_port = {WG_PORT}\n')
        return tables

    def down(self) -> None:
        present = set(netns.listnetns())
        for h in self.hosts.values():
            if h.netns in present:
                netns.remove(h.netns)  # the veth pair goes with its namespaces

    def link_down(self, host: str = "s") -> None:
        h = self.hosts[host]
        with NetNS(h.netns) as ns:
            ns.link("set", index=ns.link_lookup(ifname=h.ifname)[0], state="down")

    def link_up(self, host: str = "s") -> None:
        h = self.hosts[host]
        with NetNS(h.netns) as ns:
            ns.link("set", index=ns.link_lookup(ifname=h.ifname)[0], state="up")

    def loss(self, host: str = "s", percent: int = 100) -> None:
        """Drop `percent` % of the packets `host` sends (tc netem); 0 removes the rule."""
        h = self.hosts[host]
        argv = (["tc", "qdisc", "replace", "dev", h.ifname, "root", "netem", "loss", f"{percent}%"] if percent
                else ["tc", "qdisc", "del", "dev", h.ifname, "root"])
        subprocess.run(self.argv(host, argv), check=True, capture_output=True)

    @contextlib.contextmanager
    def inside(self, host: str):
        """Sockets this thread makes inside are `host`'s (setns on the calling thread); the kernel
        NBD client and the listeners keep using them afterwards."""
        netns.pushns(self.hosts[host].netns)
        try:
            yield
        finally:
            netns.popns()

    def argv(self, host: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[host].netns, *argv]

    def run(self, host: str, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(host, argv), **kw)

    def popen(self, host: str, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(host, argv), **kw)
