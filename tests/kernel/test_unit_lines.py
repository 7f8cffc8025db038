"""systemd/dmrepl@.service's command lines as systemd would run them, without systemd (kernel tier).

The guest runs no systemd: the test plays its part.  It reads the unit's Type, ExecStart and
ExecStop, puts each host's config where the unit looks (/etc/dmrepl/%i.toml: the guest's /etc is
a throwaway overlay), runs ExecStart with $NOTIFY_SOCKET on a socket of its own, and checks what
systemd relies on: READY=1 only once the role's work can start (the secondary's control link
listens; the primary's consumer device exists), STATUS= lines that say the role, the state and
the checkpoint, EXTEND_TIMEOUT_USEC while the initial sync copies, then ExecStop ends the main
process with status 0 and STOPPING=1, and removes every device.
"""

from __future__ import annotations

import configparser
import json
import os
import queue
import shlex
import socket
import subprocess
import threading
import time
import urllib.request

import jsonschema
import pytest
from daemons_lab import B_NAME, LINK_PORT, NAME, START_TIMEOUT, TOP, both_roles
from prometheus_client.parser import text_string_to_metric_families

from dmrepl.daemon.export import port_accepts
from dmrepl.kernel import blockdev, dm

pytestmark = pytest.mark.kernel

UNIT = os.path.join(os.path.dirname(__file__), "..", "..", "systemd", "dmrepl@.service")
SCHEMA = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "status-schema.json")


def status(name: str) -> dict:
    """`dmrepl status NAME --json`, checked against docs/status-schema.json."""
    r = subprocess.run(["dmrepl", "status", name, "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    with open(SCHEMA) as f:
        jsonschema.validate(out, json.load(f))
    return out


def scrape(url: str) -> dict:
    """{(name, frozenset(labels)): value} from a Prometheus endpoint."""
    text = urllib.request.urlopen(url, timeout=60).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


class Follower:
    """`dmrepl events NAME --history` running, its lines read on a thread (a bounded wait each)."""

    def __init__(self, name: str):
        self.proc = subprocess.Popen(["dmrepl", "events", name, "--history"], stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stdout], daemon=True).start()

    def next(self, timeout: float = 120.0) -> dict:
        try:
            return json.loads(self.lines.get(timeout=timeout))
        except queue.Empty:
            raise AssertionError(f"`dmrepl events` printed nothing in {timeout:.0f} s") from None

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def events(name: str) -> list[dict]:
    r = subprocess.run(["dmrepl", "events", name, "--no-follow"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def unit_lines(instance: str) -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.read(UNIT)
    service = parser["Service"]
    return {key: service[key].replace("%i", instance) for key in ("Type", "ExecStart", "ExecStop")}


class Notifications:
    """systemd's side of $NOTIFY_SOCKET for one service."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.got: list[dict[str, str]] = []

    def wait(self, what: str, ok, proc: subprocess.Popen, log: str, timeout: float = START_TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        for m in self.got:
            if ok(m):
                return m
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"ExecStart exited with {proc.returncode} before {what}:\n{_read(log)}"
            self.sock.settimeout(min(1.0, max(0.01, deadline - time.monotonic())))
            try:
                m = self._receive()
            except socket.timeout:
                continue
            if ok(m):
                return m
        raise AssertionError(f"no {what} within {timeout} s; notifications: {self.got}\n{_read(log)}")

    def _receive(self) -> dict[str, str]:
        m = dict(line.split("=", 1) for line in self.sock.recv(4096).decode().splitlines())
        self.got.append(m)
        return m

    def drain(self) -> None:
        """Take what was sent and not read yet (after the main process ended)."""
        self.sock.setblocking(False)
        try:
            while True:
                self._receive()
        except BlockingIOError:
            pass

    def statuses(self) -> list[str]:
        return [m["STATUS"] for m in self.got if "STATUS" in m]


def _read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def _ours_left() -> list[str]:
    with dm.Control() as ctl:
        return [d.name for d in ctl.list_devices() if d.name.startswith((f"dmrepl-{NAME}", f"dmrepl-{B_NAME}"))]


def test_the_units_lines_start_notify_and_stop_both_roles(hosts, tmp_path):
    both_roles(hosts)                       # distinct names (r5 on p, r5b on s): one /etc/dmrepl for both
    s_addr = hosts.lab.hosts["s"].address
    metrics_of = {"p": ("127.0.0.1:9650", tmp_path / "p.prom"), "s": (f"{s_addr}:9651", tmp_path / "s.prom")}
    for host, (listen, textfile) in metrics_of.items():
        with open(hosts.config(host), "a") as f:
            f.write(f'[metrics]\nlisten = "{listen}"\ntextfile = "{textfile}"\ntextfile_interval_s = 1\n')
    installed = []
    os.makedirs("/etc/dmrepl", exist_ok=True)
    for host, name in (("p", NAME), ("s", B_NAME)):
        path = f"/etc/dmrepl/{name}.toml"
        with open(hosts.config(host)) as src, open(path, "w") as dst:
            dst.write(src.read())
        os.chmod(path, 0o600)
        installed.append(path)
    procs: dict[str, subprocess.Popen] = {}
    try:
        s_unit, p_unit = unit_lines(B_NAME), unit_lines(NAME)
        assert s_unit["Type"] == p_unit["Type"] == "notify"
        s_note, p_note = Notifications(str(tmp_path / "s.notify")), Notifications(str(tmp_path / "p.notify"))
        s_log, p_log = os.path.join(hosts.logs, "s-unit.log"), os.path.join(hosts.logs, "p-unit.log")

        # The secondary (in its namespace): READY=1 once its control link listens, not before.
        with open(s_log, "ab") as log:
            procs["s"] = hosts.lab.popen("s", shlex.split(s_unit["ExecStart"]), stdout=log, stderr=log,
                                         env={**os.environ, "NOTIFY_SOCKET": s_note.path})
        ready = s_note.wait("the secondary's READY=1", lambda m: m.get("READY") == "1", procs["s"], s_log)
        with hosts.lab.inside("s"):
            assert port_accepts(hosts.lab.hosts["s"].address, LINK_PORT)
        assert ready["STATUS"] == "secondary, checkpoint 0, no primary yet", ready

        # The primary: the initial sync extends the start; READY=1 once the consumer's device exists.
        with open(p_log, "ab") as log:
            procs["p"] = subprocess.Popen(shlex.split(p_unit["ExecStart"]), stdout=log, stderr=log,
                                          env={**os.environ, "NOTIFY_SOCKET": p_note.path})
        ready = p_note.wait("the primary's READY=1", lambda m: m.get("READY") == "1", procs["p"], p_log)
        assert os.path.exists(TOP), ready
        extended = [m for m in p_note.got if "EXTEND_TIMEOUT_USEC" in m]
        assert extended and all(int(m["EXTEND_TIMEOUT_USEC"]) == 120_000_000 for m in extended)
        assert "primary, initial sync: copy 100%" in " ".join(m["STATUS"] for m in extended), extended
        p_note.wait("replicating at checkpoint 1", lambda m: m.get("STATUS", "").startswith(
            "primary, replicating (initial sync verified), checkpoint 1"), procs["p"], p_log)
        s_note.wait("the secondary's status at checkpoint 1", lambda m: m.get("STATUS", "").startswith(
            "secondary, checkpoint 1, primary connected ("), procs["s"], s_log)

        # `status --json` of both stacks follows the documented schema.
        p_status, s_status = status(NAME), status(B_NAME)
        assert (p_status["stack"], p_status["state"], p_status["checkpoint"]) == ("primary", "replicating", 1)
        assert (s_status["stack"], s_status["role"], s_status["checkpoint"], s_status["primary"]["primary"]) == (
            "secondary", "secondary", 1, "connected")

        blockdev.write_at(TOP, 0, b"\x55" * (1 << 20))       # the consumer writes 1 MiB

        # A checkpoint moves both hosts' STATUS, and a follower of the events sees it as it happens.
        follower = Follower(NAME)
        try:
            # Once it has printed the last recorded event it follows the file: what comes next is new.
            while (e := follower.next())["event"] != "state" or e["state"] != "replicating":
                pass
            r = subprocess.run(["dmrepl", "checkpoint", NAME], capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr
            live = follower.next()
        finally:
            follower.stop()
        assert (live["resource"], live["role"], live["event"], live["checkpoint"], live["why"]) == (
            NAME, "primary", "checkpoint", 2, "on demand"), live
        p_note.wait("checkpoint 2", lambda m: m.get("STATUS", "").endswith(", checkpoint 2"), procs["p"], p_log)
        s_note.wait("the secondary at checkpoint 2", lambda m: m.get("STATUS", "").startswith(
            "secondary, checkpoint 2, primary connected"), procs["s"], s_log)

        # Both hosts' metrics, scraped from their endpoints and read from their textfiles.
        r5, r5b = ("resource", NAME), ("resource", B_NAME)
        p_metrics = scrape("http://127.0.0.1:9650/metrics")
        assert p_metrics[("dmrepl_state", frozenset({r5, ("state", "replicating")}))] == 1
        assert p_metrics[("dmrepl_link_up", frozenset({r5}))] == 1
        assert p_metrics[("dmrepl_checkpoint", frozenset({r5}))] == 2
        assert p_metrics[("dmrepl_checkpoint_pause_seconds_count", frozenset({r5}))] == 2
        assert p_metrics[("dmrepl_written_bytes_total", frozenset({r5}))] >= 1 << 20
        assert p_metrics[("dmrepl_replicated_bytes_total", frozenset({r5}))] >= 1 << 20
        assert p_metrics[("dmrepl_metrics_error", frozenset({r5}))] == 0
        with hosts.lab.inside("s"):
            s_metrics = scrape(f"http://{s_addr}:9651/metrics")
        assert s_metrics[("dmrepl_role", frozenset({r5b, ("role", "secondary")}))] == 1
        assert s_metrics[("dmrepl_link_up", frozenset({r5b}))] == 1
        assert s_metrics[("dmrepl_checkpoint", frozenset({r5b}))] == 2
        store = status(B_NAME)["store"]           # emptied by the checkpoint: its header and exception area left
        assert s_metrics[("dmrepl_store_allocated_bytes", frozenset({r5b}))] == store["allocated_bytes"] <= 8192
        assert s_metrics[("dmrepl_store_fill_ratio", frozenset({r5b}))] == store["allocated_bytes"] / store["total_bytes"]
        assert s_metrics[("dmrepl_checkpoint_pause_seconds_count", frozenset({r5b}))] >= 3  # with the sync's 0s
        for host in ("p", "s"):
            textfile = metrics_of[host][1]
            poll_until = time.monotonic() + 30
            while "dmrepl_checkpoint{" not in (textfile.read_text() if textfile.exists() else ""):
                assert time.monotonic() < poll_until, f"no metrics in {textfile}"
                time.sleep(0.2)
            assert f'dmrepl_link_up{{resource="{NAME if host == "p" else B_NAME}"}} 1.0' in textfile.read_text()

        # ExecStop, primary first: the main process ends with 0, having said STOPPING=1.
        for host, unit, note, log in (("p", p_unit, p_note, p_log), ("s", s_unit, s_note, s_log)):
            r = subprocess.run(shlex.split(unit["ExecStop"]), capture_output=True, text=True, timeout=180)
            assert r.returncode == 0, r.stderr
            assert procs[host].wait(timeout=60) == 0, _read(log)
            note.drain()
            assert any(m.get("STOPPING") == "1" for m in note.got), note.got
        assert "primary, stopping (stop requested), checkpoint 2" in p_note.statuses()
        assert _ours_left() == []
        assert not metrics_of["p"][1].exists() and not metrics_of["s"][1].exists()   # no stale metrics
        assert status(NAME)["state"] == "down" and status(B_NAME)["up"] is False

        # Each host's events, in order: what a script following them would have seen.
        recorded = events(NAME)
        progress = [(e["phase"], e["done_bytes"] * 100 // e["total_bytes"]) for e in recorded if e["event"] == "progress"]
        for phase in ("copy", "verify"):              # every tenth of each phase, in order, to the end
            pcts = [pct for ph, pct in progress if ph == phase]
            assert pcts == sorted(pcts) and pcts[-1] == 100 and len(pcts) >= 10, progress
        p_events = [(e["event"], e.get("state") or e.get("checkpoint")) for e in recorded if e["event"] != "progress"]
        assert p_events == [("started", None), ("state", "syncing"), ("checkpoint", 1), ("state", "replicating"),
                            ("checkpoint", 2), ("state", "stopping"), ("stopped", None)], p_events
        s_events = [(e["event"], e.get("primary") or e.get("checkpoint")) for e in events(B_NAME)]
        # The initial sync empties the store between its segments with checkpoints numbered 0.
        s_events = [e for i, e in enumerate(s_events) if i == 0 or e != s_events[i - 1]]
        assert s_events == [("started", None), ("primary", "connected"), ("checkpoint", 0), ("checkpoint", 1),
                            ("checkpoint", 2), ("primary", "lost"), ("stopped", None)], s_events
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for host, name in (("p", NAME), ("s", B_NAME)):
            if _ours_left():
                subprocess.run(["dmrepl", "down", name, "--force"] if host == "s" else ["dmrepl", "down", name],
                               capture_output=True, timeout=180)
        for path in installed:
            os.unlink(path)

