"""[fencing]: the table, and the primary's worker that runs its command (dmrepl/daemon/fencing.py)
with real commands: what they are given, that no caller waits for them, failures retried, a hung
command killed, the wish kept across daemons (unit tier: no kernel)."""

import json
import os
import subprocess
import time

import pytest

from dmrepl import poll
from dmrepl.config import ConfigError, parse
from dmrepl.config.fencing import Fencing, check_runnable
from dmrepl.daemon.fencing import WISH_FILE, PeerFencing

PRIMARY = ('[primary]\ndisk = "/d"\nera_metadata = "/m"\nkey_file = "/k"\n'
           '[[primary.secondaries]]\nnbd = "10.0.0.2:10809"\nlink = "10.0.0.2:10810"\n')


def test_the_fencing_table():
    cfg = parse(PRIMARY + '[fencing]\ncommand = "/usr/lib/dmrepl/crm-fencing --verbose"\n',
                source="vm1.toml", default_name="vm1")
    assert cfg.fencing == Fencing(("/usr/lib/dmrepl/crm-fencing", "--verbose"), 10.0, 30.0)
    assert parse(PRIMARY, source="vm1.toml", default_name="vm1").fencing is None


@pytest.mark.parametrize("table,message", [
    ("", "missing required key 'command'"),
    ('command = "crm-fencing"\n', "must start with an absolute path"),
    ('command = ""\n', "must start with an absolute path"),
    ('command = "/bin/x \'unclosed"\n', "cannot be split into words"),
    ('command = "/bin/true"\ntimeout_s = 0\n', "'timeout_s' must be from 0.1 to 600"),
    ('command = "/bin/true"\nretry = 5\n', "unknown key 'retry'"),
])
def test_fencing_table_mistakes(table, message):
    with pytest.raises(ConfigError) as e:
        parse(PRIMARY + "[fencing]\n" + table, source="vm1.toml", default_name="vm1")
    assert message in str(e.value) and "vm1.toml [fencing]" in str(e.value)


def test_a_command_that_cannot_run_is_named(tmp_path):
    script = tmp_path / "fence"
    assert check_runnable(Fencing((str(script),))) == f"[fencing] command {script}: no such file"
    script.write_text("#!/bin/sh\n")
    assert "not executable (chmod 0755)" in check_runnable(Fencing((str(script),)))
    script.chmod(0o755)
    assert check_runnable(Fencing((str(script),))) is None and check_runnable(None) is None


class Lab:
    """A PeerFencing whose command appends what it was given to a file, then does what `behave` says."""

    def __init__(self, tmp_path, behave: str = "exit 0", timeout_s: float = 5.0, retry_s: float = 30.0):
        self.calls = tmp_path / "calls"
        self.script = tmp_path / "fence"
        self.script.write_text("#!/bin/sh\n"
                               f'echo "$1 $DMREPL_RESOURCE $DMREPL_RESOURCE_ID $DMREPL_MARK_NAME $DMREPL_CHECKPOINT '
                               f'$DMREPL_REASON" >> {self.calls}\n'
                               f"{behave}\n")
        self.script.chmod(0o755)
        state = tmp_path / "state"
        cfg = parse(f'state_dir = "{state}"\nresource_id = "vm1 id/2"\n' + PRIMARY +
                    f'[fencing]\ncommand = "{self.script} --x"\ntimeout_s = {timeout_s}\n'
                    f'retry_interval_s = {retry_s}\n', source="vm1.toml", default_name="vm1")
        os.makedirs(cfg.resource_state_dir)
        self.cfg, self.logged, self.events = cfg, [], []
        self.wish = os.path.join(cfg.resource_state_dir, WISH_FILE)
        self.fencing = self.new()

    def new(self) -> PeerFencing:
        return PeerFencing(self.cfg, self.logged.append, lambda ev, **f: self.events.append((ev, f)))

    def lines(self) -> list[str]:
        return self.calls.read_text().splitlines() if self.calls.exists() else []

    def settled(self, state: str, fencing: PeerFencing | None = None) -> dict:
        f = fencing or self.fencing
        return poll.wait_for(f.status, f"fencing {state}", ok=lambda s: s["state"] == state, timeout=10)


def test_outdate_then_clear_run_the_command_with_the_resource_and_checkpoint(tmp_path):
    lab = Lab(tmp_path)
    lab.fencing.outdate(8, "the mirror marked the NBD leg failed")
    st = lab.settled("outdated")
    assert (st["command"], st["checkpoint"]) == (f"{lab.script} --x", 8)
    # argv: the command, then the action; the mark's name from the shared resource id
    assert lab.lines() == ["--x vm1 vm1 id/2 dmrepl-vm1_id_2-outdated 8 the mirror marked the NBD leg failed"]
    with open(lab.wish) as f:
        assert json.load(f)["checkpoint"] == 8
    assert oct(os.stat(lab.wish).st_mode & 0o777) == "0o600"
    lab.fencing.clear(9)
    lab.settled("cleared")
    assert lab.lines()[1:] == ["--x vm1 vm1 id/2 dmrepl-vm1_id_2-outdated 9 checkpoint 9 joined the hosts"]
    assert not os.path.exists(lab.wish)
    lab.fencing.clear(10)                           # nothing marked: nothing runs
    time.sleep(0.3)
    assert len(lab.lines()) == 2
    assert [(e, f["action"], f["ok"]) for e, f in lab.events] == [("fencing", "outdate", True),
                                                                  ("fencing", "clear", True)]
    lab.fencing.close()


def test_the_action_is_the_last_argument(tmp_path):
    lab = Lab(tmp_path, behave='echo "action=$2" >> ' + str(tmp_path / "calls"))
    lab.fencing.outdate(3, "r")
    lab.settled("outdated")
    assert lab.lines()[1] == "action=outdate"
    lab.fencing.close()


def test_nobody_waits_for_a_hung_command_which_is_killed_and_retried(tmp_path):
    lab = Lab(tmp_path, behave="sleep 30", timeout_s=0.5, retry_s=0.5)
    t0 = time.monotonic()
    lab.fencing.outdate(4, "heartbeat missed")
    assert time.monotonic() - t0 < 0.1                  # the daemon's loop goes on at once
    st = lab.settled("outdate failed")
    assert st["error"] == "no answer within 0.5 s (killed)" and st["retry_in_s"] == 0.5
    poll.wait_for(lambda: len(lab.lines()) >= 2, "a second try", timeout=10)
    assert any("WARNING: fencing: `outdate` failed (no answer within 0.5 s (killed))" in m for m in lab.logged)
    lab.fencing.close()


def test_a_failing_command_says_why_and_is_retried_until_it_succeeds(tmp_path):
    flag = tmp_path / "works"
    lab = Lab(tmp_path, behave=f'[ -e {flag} ] || {{ echo "crm_attribute: Could not connect to the CIB"; exit 3; }}',
              retry_s=0.3)
    lab.fencing.outdate(5, "link-dead")
    st = lab.settled("outdate failed")
    assert st["error"] == "exit status 3: crm_attribute: Could not connect to the CIB"
    flag.touch()
    lab.settled("outdated")
    assert len(lab.lines()) >= 2
    assert ("fencing", {"action": "outdate", "ok": False, "checkpoint": 5,
                        "error": "exit status 3: crm_attribute: Could not connect to the CIB"}) in lab.events
    lab.fencing.close()


def test_the_newest_wish_wins_and_the_next_daemon_clears_an_earlier_mark(tmp_path):
    gate = tmp_path / "gate"
    lab = Lab(tmp_path, behave=f"while [ ! -e {gate} ]; do sleep 0.05; done")
    lab.fencing.outdate(6, "first loss")
    poll.wait_for(lambda: lab.lines(), "the first run to start", timeout=10)
    lab.fencing.clear(7)                # while `outdate` runs: the clear follows it
    lab.fencing.outdate(8, "second loss")   # ...and is overtaken before it ran
    gate.touch()
    st = lab.settled("outdated")
    assert st["checkpoint"] == 8
    assert [line.split()[5] for line in lab.lines()] == ["6", "8"]
    lab.fencing.close()

    later = lab.new()                   # a restart: the wish file is still there, marked again
    st = lab.settled("outdated", later)
    assert st["checkpoint"] == 8 and st["reason"] == "kept from an earlier daemon: second loss"
    assert lab.lines()[-1].split()[5] == "8"
    later.clear(12)
    lab.settled("cleared", later)
    assert lab.lines()[-1].split()[5] == "12" and not os.path.exists(lab.wish)
    later.close()


def test_without_the_table_nothing_runs(tmp_path):
    cfg = parse(f'state_dir = "{tmp_path}"\n' + PRIMARY, source="vm1.toml", default_name="vm1")
    f = PeerFencing(cfg, print)
    f.outdate(3, "x")
    f.clear(4)
    assert f.status() is None and not os.path.exists(os.path.join(cfg.resource_state_dir, WISH_FILE))
    assert f._thread is None


def test_a_stop_lets_the_last_wish_run_but_does_not_wait_for_retries(tmp_path):
    lab = Lab(tmp_path, behave="sleep 0.5")
    lab.fencing.outdate(6, "loss")
    lab.fencing.close()                 # the daemon stops right after asking: the run completes
    assert lab.fencing.status()["state"] == "outdated" and len(lab.lines()) == 1

    (tmp_path / "f").mkdir()
    failing = Lab(tmp_path / "f", behave="exit 1", retry_s=60)
    failing.fencing.outdate(7, "loss")
    failing.settled("outdate failed")
    t0 = time.monotonic()
    failing.fencing.close()             # already tried: left for the next daemon (the wish file)
    assert time.monotonic() - t0 < 0.5 and os.path.exists(failing.wish)


@pytest.mark.skipif(os.geteuid() != 0, reason="a namespace of its own and nsenter need CAP_SYS_ADMIN (CI runs as root)")
def test_the_command_runs_in_the_namespace_it_was_given(tmp_path):
    """The daemon lives in the link's namespace and hands the host's over: the command runs there."""
    lab = Lab(tmp_path, behave=f"readlink /proc/self/ns/net >> {tmp_path / 'calls'}")
    other = subprocess.Popen(["unshare", "--net", "sleep", "60"])      # a namespace of its own
    try:
        path = f"/proc/{other.pid}/ns/net"
        poll.wait_for(lambda: os.readlink(path) != os.readlink("/proc/self/ns/net"), "unshare", timeout=10)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            f = PeerFencing(lab.cfg, lab.logged.append, host_netns_fd=fd)
            f.outdate(2, "x")
            lab.settled("outdated", f)
            assert lab.lines()[1] == os.readlink(path) != os.readlink("/proc/self/ns/net")
            f.close()
        finally:
            os.close(fd)
    finally:
        other.kill()
        other.wait()


def test_a_failing_clear_keeps_its_pace_whatever_the_checkpoints(tmp_path):
    lab = Lab(tmp_path, behave='[ "$2" = outdate ] || exit 4', retry_s=60)
    lab.fencing.outdate(3, "loss")
    lab.settled("outdated")
    lab.fencing.clear(4)
    lab.settled("clear failed")
    for n in range(5, 10):              # checkpoints every few seconds: no run each
        lab.fencing.clear(n)
    time.sleep(0.3)
    assert [line.split()[5] for line in lab.lines()] == ["3", "4"]     # the outdate, one clear
    assert lab.fencing.status()["checkpoint"] == 4 and os.path.exists(lab.wish)
    lab.fencing.close()


def test_a_killed_run_takes_its_children_along(tmp_path):
    late = tmp_path / "late"
    lab = Lab(tmp_path, behave=f"(sleep 1; touch {late}) & sleep 30", timeout_s=0.3, retry_s=60)
    lab.fencing.outdate(3, "loss")
    lab.settled("outdate failed")
    time.sleep(1.5)
    assert not late.exists()            # the background child died with the run
    lab.fencing.close()
