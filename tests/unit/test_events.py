"""The event log both daemons append and `dmrepl events` follows (dmrepl/daemon/events.py; unit tier)."""

import json
import os
import stat

from dmrepl.daemon import events
from dmrepl.daemon.events import EventLog, Follower


def read(follower: Follower) -> list[dict]:
    return [json.loads(line) for line in follower.lines()]


def test_each_event_is_one_json_line_in_a_private_file(tmp_path):
    log = EventLog(str(tmp_path), "vm1", "primary")
    rec = log.emit("state", state="degraded", previous="replicating", cause="heartbeat-missed", reason="r")
    with open(tmp_path / "events.jsonl") as f:
        (line,) = f.readlines()
    assert json.loads(line) == rec
    assert {k: rec[k] for k in ("resource", "role", "event", "state", "previous", "cause")} == {
        "resource": "vm1", "role": "primary", "event": "state", "state": "degraded", "previous": "replicating",
        "cause": "heartbeat-missed"}
    assert stat.S_IMODE(os.stat(tmp_path / "events.jsonl").st_mode) == 0o600


def test_a_follower_sees_new_events_only_unless_history_is_asked(tmp_path):
    log = EventLog(str(tmp_path), "vm1", "secondary")
    log.emit("started", pid=1)
    new, old = Follower(str(tmp_path), history=False), Follower(str(tmp_path), history=True)
    assert read(new) == []
    log.emit("checkpoint", checkpoint=7)
    assert [e["event"] for e in read(new)] == ["checkpoint"]
    assert [e["event"] for e in read(old)] == ["started", "checkpoint"]
    assert read(new) == read(old) == []


def test_a_half_written_line_waits_for_its_end(tmp_path):
    f = Follower(str(tmp_path), history=True)
    assert read(f) == []                                   # no file yet: picked up once it exists
    with open(tmp_path / "events.jsonl", "w") as out:
        out.write('{"event": "a"}\n{"event": ')
    assert read(f) == [{"event": "a"}]
    with open(tmp_path / "events.jsonl", "a") as out:
        out.write('"b"}\n')
    assert read(f) == [{"event": "b"}]


def test_rotation_loses_and_repeats_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(events, "MAX_BYTES", 600)
    log = EventLog(str(tmp_path), "vm1", "primary")
    f = Follower(str(tmp_path), history=False)
    seen = []
    for n in range(40):
        log.emit("checkpoint", checkpoint=n)
        if n % 3 == 0:
            seen += read(f)
    seen += read(f)
    assert [e["checkpoint"] for e in seen] == list(range(40))
    assert os.path.getsize(tmp_path / "events.jsonl") <= 600 and os.path.exists(tmp_path / "events.jsonl.1")
    # --history: the kept generation, then the current file, in order.
    history = [e["checkpoint"] for e in read(Follower(str(tmp_path), history=True))]
    assert history == list(range(40 - len(history), 40))


def test_an_unwritable_log_never_stops_the_daemon(tmp_path):
    log = EventLog(str(tmp_path / "gone"), "vm1", "primary")
    assert log.emit("stopped", pid=1)["event"] == "stopped"
