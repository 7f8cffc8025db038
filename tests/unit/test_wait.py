"""`dmrepl wait NAME` against a daemon's control socket that plays a resync (unit tier): the
lines a log gets, the final answer, and the timeout's error."""

import argparse
import json
import os
import sys
import types

import pytest

from dmrepl.cli import resource
from dmrepl.daemon import control
from dmrepl.errors import DmreplError

DEGRADED = {"state": "degraded", "reason": "the secondary is away", "checkpoint": 4}


def _resync(phase, **bytes_):
    base = {"phase": phase, "candidate_bytes": 100, "compared_bytes": 0, "copy_bytes": 40, "copied_bytes": 0}
    return {"state": "resyncing", "reason": "resync: written since checkpoint 4", "checkpoint": 4,
            "resync": {**base, **bytes_}}


@pytest.fixture
def daemon(tmp_path, monkeypatch):
    """A control socket answering `status` with the next of `plays` (the last one stays)."""
    plays = []

    def handle(req):
        assert req["op"] == "status"
        return plays.pop(0) if len(plays) > 1 else plays[0]

    cfg = types.SimpleNamespace(name="vm1", resource_state_dir=str(tmp_path / "vm1"))
    srv = control.ControlServer(control.socket_path(cfg.resource_state_dir), handle, lambda _line: None)
    monkeypatch.setattr(resource.time, "sleep", lambda _s: None)
    yield cfg, plays
    srv.close()


def _args(**kw):
    return argparse.Namespace(**{"json": False, "timeout": None, **kw})


def test_a_log_gets_the_state_then_a_line_each_ten_percent_and_stdout_the_end(daemon, capsys):
    cfg, plays = daemon
    plays += [DEGRADED, DEGRADED, _resync("comparing"), _resync("comparing", compared_bytes=55),
              _resync("comparing", compared_bytes=58), _resync("copying", compared_bytes=100, copied_bytes=20),
              {"state": "replicating", "reason": "resync done", "checkpoint": 5}]
    assert resource._p_wait(cfg, _args()) == 0
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert lines[0] == "vm1: degraded (the secondary is away)"
    # label and percent of each progress line: 55 % and 58 % are one step, said once
    assert [(ln.split()[1], ln.split("]")[1].split("%")[0].strip()) for ln in lines[1:]] == [
        ("compare", "0"), ("compare", "55"), ("copy", "50")]
    assert out.startswith("vm1: replicating at checkpoint 5 (waited ")


def test_json_answers_on_stdout_only(daemon, capsys):
    cfg, plays = daemon
    plays += [{"state": "replicating", "reason": "", "checkpoint": 7}]
    assert resource._p_wait(cfg, _args(json=True)) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["name"] == "vm1" and out["state"] == "replicating" and out["checkpoint"] == 7
    assert captured.err == ""


def test_a_terminal_gets_one_line_redrawn_and_cleared(daemon, capsys, monkeypatch):
    cfg, plays = daemon
    plays += [DEGRADED, _resync("comparing", compared_bytes=55), _resync("copying", compared_bytes=100, copied_bytes=4),
              {"state": "replicating", "reason": "", "checkpoint": 5}]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert resource._p_wait(cfg, _args()) == 0
    err = capsys.readouterr().err
    first, bar = err.split("\n")[:2]
    assert first == "vm1: degraded (the secondary is away)"
    draws = bar.split("\r")[1:]
    assert [d.split()[0] for d in draws] == ["compare", "copy"] and all(d.endswith("\033[K") for d in draws)
    assert err.endswith("\033[K\n")          # the bar's line ended before the answer


def test_the_bar_line_ends_when_the_daemon_goes(daemon, capsys, monkeypatch):
    cfg, plays = daemon
    plays += [_resync("comparing", compared_bytes=10)]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setattr(resource.time, "sleep", lambda _s: daemon_gone())

    def daemon_gone():
        os.unlink(resource._sock(cfg))

    with pytest.raises(control.DaemonNotRunning):
        resource._p_wait(cfg, _args())
    assert capsys.readouterr().err.endswith("\033[K\n")


@pytest.mark.parametrize("play, tail", [(DEGRADED, ""), (_resync("comparing", compared_bytes=50), "; compare at 50%")])
def test_the_timeout_says_what_still_runs(daemon, play, tail):
    cfg, plays = daemon
    plays.append(play)
    with pytest.raises(DmreplError) as e:
        resource._p_wait(cfg, _args(timeout=0.05))
    assert str(e.value) == f"vm1 is not replicating after 0.05 s: {play['state']} ({play['reason']}){tail}"
    assert "dmrepl status vm1" in e.value.hint


def test_a_timeout_of_naught_is_refused(daemon):
    cfg, _ = daemon
    with pytest.raises(DmreplError, match="--timeout must be more than 0 seconds, got 0"):
        resource._p_wait(cfg, _args(timeout=0))


def test_no_daemon_is_a_clear_error(tmp_path):
    cfg = types.SimpleNamespace(name="vm1", resource_state_dir=str(tmp_path / "none"))
    with pytest.raises(control.DaemonNotRunning, match="no daemon answers on"):
        resource._p_wait(cfg, _args())
