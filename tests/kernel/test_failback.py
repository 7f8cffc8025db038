"""Failover, split brain, then failback without a full copy (kernel tier, e2e).

Host A (namespace p, resource name r5) replicates to host B (namespace s,
name r5b: the two "hosts" share one kernel, so their dm names must differ;
the resource id is the same).  Both have both roles' sections.  After
checkpoint 2, A writes W2 (it reaches B), the link is cut, A writes W3 alone;
B fails over (W2 rolled back to checkpoint 2) and its consumer writes W4.  B
comes up as primary while A still is: the link back, both see SPLIT BRAIN and
neither copies anything.  A gives its writes up (`resolve --discard-my-data`)
and comes back as B's secondary.  The resync must compare only the union of
A's writes since checkpoint 2, the chunks the failover rolled back and B's
writes since the takeover, copy exactly the pieces that differ, and leave both
disks equal to B's data byte for byte.
"""

from __future__ import annotations

import subprocess
import sys

from daemons_lab import DISK, LINK_PORT, NAME, START_TIMEOUT, TOP, KiB, image

from dmrepl import poll
from dmrepl.daemon import control
from dmrepl.daemon.export import port_accepts
from dmrepl.kernel import blockdev
from dmrepl.names import StackNames
from dmrepl.state import StateStore

B4 = 4 * KiB
B_NAME = "r5b"
A_ACTIVE = StackNames(NAME).mapper_path("active")
B_ACTIVE, B_TOP = StackNames(B_NAME).mapper_path("active"), StackNames(B_NAME).mapper_path_top()


def _block(tag: str, i: int) -> bytes:
    return f"{tag}:{i}:".encode().ljust(B4, tag[-1].encode())


def _configs(hosts) -> None:
    """p.toml and s.toml get the other role's section: A's hidden stores, B's era metadata."""
    d, lab = hosts.dir, hosts.lab
    p_addr = lab.hosts["p"].address
    for name in ("ph0.img", "ph1.img"):
        image(d / name, DISK // 2, None)
    image(d / "s-era.img", 4 * (1 << 20), None)
    hosts.nbd_timeout_s = 5
    hosts.write_configs(primary="reconnect_interval_s = 1\n")
    p = (d / "p.toml").read_text().replace(f'name = "{NAME}"\n', f'name = "{NAME}"\nstart_as = "primary"\n', 1)
    (d / "p.toml").write_text(
        p + f'[secondary]\ndisk = "{d}/p.img"\nhidden_stores = ["{d}/ph0.img", "{d}/ph1.img"]\n'
        f'listen = "{p_addr}:10809"\nlink_listen = "{p_addr}:{LINK_PORT}"\nkey_file = "{hosts.key}"\n')
    s = (d / "s.toml").read_text().replace(f'name = "{NAME}"\n', f'name = "{B_NAME}"\nstart_as = "secondary"\n', 1)
    (d / "s.toml").write_text(
        s + f'[primary]\ndisk = "{d}/s.img"\nera_metadata = "{d}/s-era.img"\nkey_file = "{hosts.key}"\n'
        f'era_block_kib = 64\ncheckpoint_interval_s = 0\nheartbeat_interval_s = 0.2\nnbd_connections = 2\n'
        f'nbd_timeout_s = 5\nreconnect_interval_s = 1\nnetns = "{lab.hosts["s"].netns}"\n'
        f'[[primary.secondaries]]\nnbd = "{p_addr}:10809"\nlink = "{p_addr}:{LINK_PORT}"\n')


def _name(host: str) -> str:
    return NAME if host == "p" else B_NAME


def _cli(hosts, host: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dmrepl.cli", argv[0], _name(host), "--config",
                           hosts.config(host), *argv[1:]], capture_output=True, text=True, timeout=180)


def _ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, (r.stdout, r.stderr)
    return r.stdout


def _status(hosts, host: str) -> dict | None:
    try:
        return control.request(control.socket_path(str(hosts.dir / f"{host}-state" / _name(host))), "status",
                               timeout=10)
    except control.DaemonNotRunning:
        return None


def _state(hosts, host: str):
    return StateStore(str(hosts.dir / f"{host}-state" / _name(host))).load()


def _up(hosts, host: str, role: str, *extra: str) -> None:
    """A secondary runs inside its namespace; a primary starts outside and enters it (config netns)."""
    log = open(f"{hosts.logs}/{host}-{role}.log", "ab")
    argv = [sys.executable, "-m", "dmrepl.cli", "up", _name(host), "--config", hosts.config(host), *extra]
    hosts.procs[host] = (hosts.lab.popen(host, argv, stdout=log, stderr=log) if role == "secondary"
                         else subprocess.Popen(argv, stdout=log, stderr=log))
    log.close()


def test_split_brain_is_refused_then_failback_copies_only_the_union(hosts):
    try:
        _split_brain_then_failback(hosts)
    finally:
        _cli(hosts, "s", "down", "--force")    # B's stack, whichever role (the fixture knows only A's name)


def _split_brain_then_failback(hosts):
    _configs(hosts)
    image(hosts.dir / "s.img", DISK, b"\x11")           # S equal to P: --assume-clean
    _up(hosts, "s", "secondary")
    poll.wait_for(lambda: _linked(hosts, "s"), "B's control link", timeout=START_TIMEOUT)
    _up(hosts, "p", "primary", "--assume-clean")
    poll.wait_for(lambda: _status(hosts, "p"), "A to replicate", ok=lambda s: s and s["state"] == "replicating",
                  timeout=START_TIMEOUT)
    for i in range(0, 8):
        blockdev.write_at(TOP, i * B4, _block("w1", i))
    _ok(_cli(hosts, "p", "checkpoint"))                      # checkpoint 2: W1 in both views
    for i in range(8, 16):
        blockdev.write_at(TOP, i * B4, _block("w2", i))      # reaches B; rolled back by its failover
    hosts.lab.link_down("s")
    poll.wait_for(lambda: _status(hosts, "p"), "A to lose B", ok=lambda s: s and s["state"] == "degraded",
                  timeout=60)
    for i in range(16, 24):
        blockdev.write_at(TOP, i * B4, _block("w3", i))      # A alone

    # B takes over at checkpoint 2; its consumer writes W4.
    assert "merge complete" in _ok(_cli(hosts, "s", "failover"))
    st = _state(hosts, "s")
    assert st.role == "primary" and st.checkpoint == 2, st
    assert st.diverged["ranges"] == [[8 * B4, 8 * B4]], st.diverged     # exactly W2's chunks, rolled back
    checkpoint2 = b"".join(_block("w1", i) for i in range(8)) + b"\x11" * (DISK - 8 * B4)
    assert blockdev.read_at(B_ACTIVE, 0, DISK) == checkpoint2
    w4 = [4, 10, *range(24, 32)]
    for i in w4:
        blockdev.write_at(B_ACTIVE, i * B4, _block("w4", i))
    expected = bytearray(checkpoint2)
    for i in w4:
        expected[i * B4:(i + 1) * B4] = _block("w4", i)
    refused = _cli(hosts, "s", "up")
    assert refused.returncode == 1 and "took over on this host" in refused.stderr, refused.stderr

    # Split brain: B up as primary while A still is; the link back.  Both see it, neither copies.
    _ok(_cli(hosts, "s", "down"))
    _up(hosts, "s", "primary")
    poll.wait_for(lambda: _status(hosts, "s"), "B up as primary", ok=lambda s: s and s["state"] == "degraded",
                  timeout=START_TIMEOUT)
    hosts.lab.link_up("s")
    for host in ("p", "s"):
        s = poll.wait_for(lambda h=host: _status(hosts, h), f"{host} to see the split brain",
                          ok=lambda s: s and s.get("split_brain"), timeout=60)
        assert s["state"] == "degraded" and "SPLIT BRAIN" in s["split_brain"], s
        assert "resolve" in s["split_brain"], s
    assert blockdev.read_at(B_TOP, 0, DISK) == bytes(expected)
    assert blockdev.read_at(TOP, 16 * B4, B4) == _block("w3", 16)
    assert "SPLIT BRAIN" in _ok(_cli(hosts, "p", "status"))

    # A gives its writes up and follows B.
    refused = _cli(hosts, "p", "resolve")
    assert refused.returncode == 1 and "--discard-my-data" in refused.stderr, refused.stderr
    refused = _cli(hosts, "p", "resolve", "--discard-my-data")
    assert refused.returncode == 1 and "is up on this host" in refused.stderr, refused.stderr
    _ok(_cli(hosts, "p", "down"))
    hosts.procs["p"].wait(timeout=60)
    _ok(_cli(hosts, "p", "resolve", "--discard-my-data"))
    a = _state(hosts, "p")
    assert a.role == "secondary" and a.checkpoint == 2, a
    assert a.diverged["ranges"] == [[0, 128 * KiB]], a.diverged   # W1..W3: era blocks 0 and 1 (64 KiB)
    _up(hosts, "p", "secondary")
    s = poll.wait_for(lambda: _status(hosts, "s"), "B to resync A and replicate",
                      ok=lambda s: s and s["state"] == "replicating", timeout=START_TIMEOUT)
    assert s["split_brain"] is None, s
    r = s["last_resync"]
    assert r["phase"] == "copied", r
    assert r["candidate_bytes"] == 128 * KiB, r          # the union, not the disk (32 MiB)
    assert r["differing_bytes"] == 25 * B4, r            # W2, W3, W4 pieces; W1 was in both
    assert r["sent_bytes"] <= 1.05 * r["differing_bytes"], r
    assert blockdev.read_at(B_TOP, 0, DISK) == bytes(expected)
    with open(hosts.dir / "p.img", "rb") as f:
        assert f.read() == bytes(expected)
    _ok(_cli(hosts, "s", "checkpoint"))
    assert blockdev.read_at(A_ACTIVE, 0, DISK) == bytes(expected)    # A's standby view: B's data
    assert _state(hosts, "p").diverged is None and _state(hosts, "s").diverged is None
    print(f"\nfailback: compared {r['candidate_bytes'] >> 10} KiB of {DISK >> 20} MiB, "
          f"{r['differing_bytes'] >> 10} KiB differed, sent {r['sent_bytes'] >> 10} KiB "
          f"({r['sent_bytes'] / r['differing_bytes']:.3f}x)")
    _ok(_cli(hosts, "s", "down"))
    _ok(_cli(hosts, "p", "down", "--force"))


def _linked(hosts, host: str) -> bool:
    with hosts.lab.inside(host):
        return port_accepts(hosts.lab.hosts[host].address, LINK_PORT)
