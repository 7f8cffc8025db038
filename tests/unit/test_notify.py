"""systemd's notifications (dmrepl/daemon/notify.py) and the unit file that relies on them (unit tier)."""

import os
import shutil
import socket
import subprocess

import pytest

from dmrepl.daemon.machine import Event, Machine
from dmrepl.daemon.notify import Notifier
from dmrepl.daemon.progress import Progress

UNIT = os.path.join(os.path.dirname(__file__), "..", "..", "systemd", "dmrepl@.service")


@pytest.fixture
def listener(tmp_path):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        s.settimeout(5)
        yield path, s


def messages(s: socket.socket) -> list[str]:
    out = []
    s.setblocking(False)
    try:
        while True:
            out.append(s.recv(4096).decode())
    except BlockingIOError:
        return out
    finally:
        s.setblocking(True)


def test_ready_status_stopping_reach_the_socket(listener):
    path, s = listener
    n = Notifier(path)
    assert n.ready("primary, replicating (synced), checkpoint 1")
    assert n.status("primary, replicating (synced), checkpoint 2")
    assert not n.status("primary, replicating (synced), checkpoint 2")     # unchanged: not sent again
    assert n.extend_start(120, "primary, initial sync: copy 40%")
    assert n.stopping()
    n.close()
    assert messages(s) == ["READY=1\nSTATUS=primary, replicating (synced), checkpoint 1",
                           "STATUS=primary, replicating (synced), checkpoint 2",
                           "EXTEND_TIMEOUT_USEC=120000000\nSTATUS=primary, initial sync: copy 40%",
                           "STOPPING=1"]


def test_the_abstract_namespace(tmp_path):
    name = f"dmrepl-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        n = Notifier("@" + name)
        assert n.ready("secondary, checkpoint 3, primary connected (10.77.0.1:40000)")
        assert s.recv(4096) == b"READY=1\nSTATUS=secondary, checkpoint 3, primary connected (10.77.0.1:40000)"
        n.close()


def test_not_under_systemd_nothing_is_sent_and_children_do_not_inherit(monkeypatch, tmp_path):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier.from_environment()
    assert not n.active and not n.ready("x") and not n.stopping()
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    n = Notifier.from_environment()
    assert n.active and "NOTIFY_SOCKET" not in os.environ      # nbdkit and other children: not theirs
    assert not n.ready("x")                                     # nobody listens: False, no exception
    n.close()


def test_the_sync_progress_has_a_rate_an_eta_a_status_value_and_steps(capsys):
    steps = []
    p = Progress(on_step=steps.append)
    total = 100 << 20
    for done in range(0, total + 1, 1 << 20):
        p("copy", done, total)
    assert [s["done_bytes"] * 100 // total for s in steps] == list(range(0, 101, 10))
    assert p.latest["work"] == "initial sync" and p.latest["done_bytes"] == total and p.latest["eta_s"] == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "initial sync:" in line]
    assert len(lines) == 11 and lines[-1].endswith("initial sync: copy 100% (100 of 100 MiB, "
                                                   + lines[-1].split(", ")[1] + ", ETA 00:00)")
    from dmrepl.daemon.progress import eta_text
    assert (eta_text(None), eta_text(59.6), eta_text(61), eta_text(3725)) == ("--:--", "01:00", "01:01", "1:02:05")


def test_a_progress_bar_line_for_the_sync_and_the_verify():
    from dmrepl.daemon.progress import bar_text
    assert bar_text("verify", 40 << 20, 100 << 20, 12.34e6, 12.2) == (
        "verify [##########               ]  40%     12.3 MB/s  ETA 00:12")
    assert bar_text("copy", 0, 0, 0.0, None) == "copy   [                         ]   0%      0.0 MB/s  ETA --:--"


def test_every_state_move_and_the_sync_progress_update_the_status(listener):
    path, s = listener
    n = Notifier(path)
    m = Machine()
    m.on_move = lambda m, _previous, _event: n.status(f"primary, {m.state} ({m.reason})")
    m.fire(Event.CONNECTED, "first start: S gets a full copy of P")
    m.fire(Event.SYNCED, "initial sync verified")
    p = Progress(notifier=n)
    for done in (0, 1 << 20, 2 << 20, 2 << 20):
        p("copy", done, 4 << 20)
    got = messages(s)
    assert got[:2] == ["STATUS=primary, syncing (first start: S gets a full copy of P)",
                       "STATUS=primary, replicating (initial sync verified)"]
    # One extension a percent step (the repeated 50 % is not sent again); the rate varies.
    assert [g.split(" (")[0] for g in got[2:]] == [
        f"EXTEND_TIMEOUT_USEC=120000000\nSTATUS=primary, initial sync: copy {pct}%" for pct in (0, 25, 50)]
    n.close()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_the_unit_file_verifies(tmp_path):
    unit = tmp_path / "dmrepl@vm1.service"
    shutil.copy(UNIT, unit)
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                       timeout=60)
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    text = unit.read_text()
    assert "\nType=notify\n" in text and "\nNotifyAccess=main\n" in text


def test_running_work_names_the_job_a_status_shows():
    from dmrepl.daemon.progress import running_work

    assert running_work({"state": "replicating", "sync": None, "resync": None, "verify": None}) is None
    sync = {"work": "initial sync", "phase": "copy", "done_bytes": 5, "total_bytes": 10, "rate_bytes_s": 1, "eta_s": 5}
    assert running_work({"sync": sync}) == ("copy", 5, 10)
    resync = {"phase": "comparing", "compared_bytes": 4096, "candidate_bytes": 8192,
              "copied_bytes": 0, "copy_bytes": 0}
    assert running_work({"sync": None, "resync": resync}) == ("compare", 4096, 8192)
    assert running_work({"resync": {**resync, "phase": "copying", "copied_bytes": 3, "copy_bytes": 7}}) == ("copy", 3, 7)
    assert running_work({"verify": {"done_bytes": 1, "total_bytes": 2}}) == ("verify", 1, 2)


def test_rate_starts_over_with_each_phase():
    from dmrepl.daemon.progress import Rate

    rate = Rate()
    assert rate("compare", 100, 1100, now=10.0) == (0.0, None)         # one sample: no rate yet
    assert rate("compare", 600, 1100, now=11.0) == (500.0, 1.0)        # 500 B/s, 500 B left
    assert rate("copy", 0, 2000, now=12.0) == (0.0, None)              # the next phase: from naught
    assert rate("copy", 1000, 2000, now=14.0) == (500.0, 2.0)
