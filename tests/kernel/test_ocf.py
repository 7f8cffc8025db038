"""The Pacemaker agent ocf/dmrepl: ocf-tester green, then a planned switchover both ways, a
demote without the secondary and the outdated mark of [fencing], all through the agent (kernel
tier, e2e).

Two "hosts" in one VM (daemons_lab: namespaces p and s, resources r5 and r5b with both roles'
sections; each [secondary] serves from its host's namespace).  The agent is installed where
Pacemaker looks for ocf:dmrepl:dmrepl and run as Pacemaker runs it: the action as its argument,
parameters as OCF_RESKEY_*, on node p or s (OCF_RESKEY_CRM_meta_on_node).  No cluster runs: the
agent's and ocf/crm-fencing's Pacemaker tools work on a CIB file (CIB_file) with the nodes p and
s, where the promotion scores and outdated marks land and are read back.  A CIB file has no
daemon to order its writers (each tool rewrites the whole file), so the tools are reached through
wrappers that take a lock on it first, as the CIB daemon would serialise them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from daemons_lab import B_NAME, NAME, START_TIMEOUT, TOP, both_roles, cli_of, name_of, status_of

from dmrepl import poll
from dmrepl.kernel import blockdev, dm
from dmrepl.names import StackNames

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(2400, method="signal")]

SOURCE = os.path.join(os.path.dirname(__file__), "..", "..", "ocf", "dmrepl")
AGENT = "/usr/lib/ocf/resource.d/dmrepl/dmrepl"
OCF_SUCCESS, OCF_ERR_GENERIC, OCF_NOT_RUNNING, OCF_RUNNING_PROMOTED = 0, 1, 7, 8
B_TOP, B_ACTIVE = StackNames(B_NAME).mapper_path_top(), StackNames(B_NAME).mapper_path("active")
MiB = 1 << 20
CRM_FENCING = os.path.join(os.path.dirname(__file__), "..", "..", "ocf", "crm-fencing")
MARK = "dmrepl-r5-id-outdated"          # both hosts' resource id: r5-id


def cib_env(hosts, host: str) -> dict:
    shims = str(hosts.dir / "crm-bin")
    return {"CIB_file": str(hosts.dir / "cib.xml"), "OCF_RESKEY_CRM_meta_on_node": host,
            "PATH": f"{shims}:{os.environ['PATH']}", "HA_SBIN_DIR": shims}


def make_cib(hosts) -> None:
    shims = hosts.dir / "crm-bin"
    shims.mkdir()
    for tool, run in (("crm_attribute", 'flock "$CIB_file.lock" /usr/sbin/crm_attribute'),
                      ("cibadmin", 'flock "$CIB_file.lock" /usr/sbin/cibadmin'),
                      ("crm_master", "/usr/sbin/crm_master")):     # it runs crm_attribute from PATH
        (shims / tool).write_text(f'#!/bin/sh\nexec {run} "$@"\n')
        (shims / tool).chmod(0o755)
    path = hosts.dir / "cib.xml"
    path.write_text(subprocess.run(["cibadmin", "--empty"], capture_output=True, text=True, check=True).stdout)
    for i, host in enumerate(("p", "s"), 1):
        for scope, xml in (("nodes", f'<node id="{i}" uname="{host}"/>'),
                           ("status", f'<node_state id="{i}" uname="{host}"/>')):
            subprocess.run(["cibadmin", "--create", "-o", scope, "-X", xml], check=True,
                           env={**os.environ, "CIB_file": str(path)})


def crm_attr(hosts, node: str, attr: str, lifetime: str = "forever", value: str | None = None,
             delete: bool = False) -> str | None:
    """A node attribute in the CIB file: read (None: not set), set or deleted."""
    argv = ["crm_attribute", "-N", node, "-n", attr, "-l", lifetime]
    argv += ["-D"] if delete else ["-v", value] if value is not None else ["-G", "-q"]
    r = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **cib_env(hosts, node)})
    if r.returncode == 105 and value is None and not delete:
        return None
    assert r.returncode == 0, (argv, r.stderr)
    return r.stdout.strip() if value is None and not delete else None


def cib_score(hosts, host: str) -> str | None:
    """The promotion score the agent stored for `host` (transient, like Pacemaker's)."""
    return crm_attr(hosts, host, f"master-dmrepl-{host}", lifetime="reboot")


def mark(hosts, host: str) -> str | None:
    return crm_attr(hosts, host, MARK)


def fencing_reaches(hosts, host: str, state: str, what: str) -> dict:
    """The primary on `host` once its [fencing] (status) is in `state`."""
    return poll.wait_for(lambda: (status_of(hosts, host) or {}).get("fencing") or {}, what,
                         ok=lambda f: f.get("state") == state, timeout=30)


def agent(hosts, host: str, action: str, expect: int = OCF_SUCCESS) -> str:
    env = {**os.environ, "OCF_ROOT": "/usr/lib/ocf", "OCF_RESOURCE_INSTANCE": f"dmrepl-{host}",
           "OCF_RESKEY_name": name_of(host), "OCF_RESKEY_config": hosts.config(host),
           "OCF_RESKEY_CRM_meta_timeout": "600000", "HA_LOGFILE": os.path.join(hosts.logs, f"agent-{host}.log"),
           # A monitor here is Pacemaker's recurring one (interval 0 would be a probe: no score set).
           "OCF_RESKEY_CRM_meta_interval": "20000" if action == "monitor" else "0",
           **cib_env(hosts, host)}
    r = subprocess.run([AGENT, action], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == expect, (host, action, r.returncode, r.stdout, r.stderr, _tail(hosts, host))
    return r.stdout + r.stderr


def _tail(hosts, host: str) -> str:
    path = os.path.join(hosts.logs, f"agent-{host}.log")
    with open(path, errors="replace") if os.path.exists(path) else open(os.devnull) as f:
        return "".join(f.readlines()[-30:])


def role(hosts, host: str) -> dict:
    r = cli_of(hosts, host, "role", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _ours_left() -> list[str]:
    with dm.Control() as ctl:
        return [d.name for d in ctl.list_devices() if d.name.startswith((f"dmrepl-{NAME}", f"dmrepl-{B_NAME}"))]


def _pattern(tag: bytes, size: int) -> bytes:
    return b"".join(tag + i.to_bytes(4, "big") + b"." * (4096 - len(tag) - 4) for i in range(size // 4096))


def test_ocf_tester_then_switchover_both_ways_a_demote_without_the_secondary_and_outdated_marks(hosts):
    both_roles(hosts)
    for host in ("p", "s"):                 # each host's secondary serves from its namespace
        path = hosts.config(host)
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(text.replace("[secondary]\n", f'[secondary]\nnetns = "{hosts.lab.hosts[host].netns}"\n', 1)
                    + f'[fencing]\ncommand = "{os.path.abspath(CRM_FENCING)}"\nretry_interval_s = 1\n')
    make_cib(hosts)
    os.makedirs(os.path.dirname(AGENT), exist_ok=True)
    shutil.copy(SOURCE, AGENT)
    os.chmod(AGENT, 0o755)
    try:
        _run(hosts)
    finally:
        for host in ("p", "s"):
            if _ours_left():
                cli_of(hosts, host, "down", "--force")
        os.unlink(AGENT)


def _run(hosts):
    up_mark = hosts.dir / "p-state" / NAME / "primary-up"      # roles/primary: from up to down
    # s starts unpromoted (start_as secondary): its secondary serves, and with no checkpoint yet
    # it must not be promoted.
    agent(hosts, "s", "start")
    agent(hosts, "s", "monitor", OCF_SUCCESS)
    r = role(hosts, "s")
    assert (r["run"], r["role"], r["score"], r["both_roles"]) == ("unpromoted", "secondary", None, True), r

    # ocf-tester drives p (start_as primary) through every action, s being its real secondary:
    # start (standby), promote (the primary, initial sync to s), demote (a last checkpoint, then
    # p becomes s's fellow secondary), promote again (failover on p, up as primary, delta resync)...
    t = subprocess.run(["ocf-tester", "-n", NAME, "-o", f"name={NAME}", "-o", f"config={hosts.config('p')}",
                        "-o", "CRM_meta_timeout=600000", "-o", "CRM_meta_on_node=p", AGENT],
                       capture_output=True, text=True, timeout=1200,
                       env={**os.environ, "HA_LOGFILE": os.path.join(hosts.logs, "agent-p.log"),
                            **{k: v for k, v in cib_env(hosts, "p").items() if k != "OCF_RESKEY_CRM_meta_on_node"}})
    assert t.returncode == 0, (t.stdout, t.stderr, _tail(hosts, "p"))
    assert t.stdout.splitlines() == [f"Beginning tests for {AGENT}...",
                                     "* Your agent does not support the reload action (optional)",
                                     f"{AGENT} passed all tests"], t.stdout
    p, s = role(hosts, "p"), role(hosts, "s")
    # Its last demote handed over: both hosts are secondaries at the same checkpoint.
    assert (p["run"], p["role"]) == ("stopped", "secondary"), p
    assert (s["run"], s["score"]) == ("unpromoted", 1000) and s["checkpoint"] == p["checkpoint"] >= 2, (p, s)

    agent(hosts, "s", "monitor", OCF_SUCCESS)      # the recurring monitor stores the score
    assert (cib_score(hosts, "s"), mark(hosts, "p"), mark(hosts, "s")) == ("1000", None, None)

    # s is promoted: a failover at that checkpoint, then the primary, degraded while p is stopped:
    # its [fencing] marks p outdated (p's view lacks s's writes from now on).
    agent(hosts, "s", "promote")
    agent(hosts, "s", "monitor", OCF_RUNNING_PROMOTED)
    assert status_of(hosts, "s")["state"] == "degraded"
    assert cib_score(hosts, "s") == "10000"
    fenced = fencing_reaches(hosts, "s", "outdated", "s to mark p outdated")
    assert fenced["checkpoint"] == s["checkpoint"] and mark(hosts, "p") == str(s["checkpoint"])
    agent(hosts, "p", "start")                                  # p comes back as s's secondary
    agent(hosts, "p", "monitor", OCF_SUCCESS)
    poll.wait_for(lambda: status_of(hosts, "s"), "s to resync p and replicate",
                  ok=lambda st: st and st["state"] == "replicating", timeout=START_TIMEOUT)
    # The checkpoint that ended the resync joined the hosts: the mark is gone, p may be promoted.
    fencing_reaches(hosts, "s", "cleared", "s to clear p's mark")
    assert mark(hosts, "p") is None
    agent(hosts, "p", "monitor", OCF_SUCCESS)
    assert cib_score(hosts, "p") == "1000"
    data = _pattern(b"s-wrote", MiB)
    blockdev.write_at(B_TOP, 0, data)                           # s's consumer
    assert (role(hosts, "s")["score"], role(hosts, "p")["run"]) == (10000, "unpromoted")

    # A planned switchover to p (the consumer is stopped): no write lost, roles swapped.
    agent(hosts, "s", "demote")
    agent(hosts, "s", "monitor", OCF_SUCCESS)
    agent(hosts, "p", "promote")
    agent(hosts, "p", "monitor", OCF_RUNNING_PROMOTED)
    assert up_mark.exists()              # a crash from here on would leave it: no score then
    poll.wait_for(lambda: status_of(hosts, "p"), "p to replicate to s",
                  ok=lambda st: st and st["state"] == "replicating", timeout=START_TIMEOUT)
    assert blockdev.read_at(TOP, 0, MiB) == data
    assert blockdev.read_at(TOP, MiB, 4096) == b"\x11" * 4096
    more = _pattern(b"p-wrote", MiB)
    blockdev.write_at(TOP, MiB, more)
    r = cli_of(hosts, "p", "checkpoint")
    assert r.returncode == 0, r.stderr
    assert blockdev.read_at(B_ACTIVE, 0, 2 * MiB) == data + more     # s's standby view
    assert (role(hosts, "p")["score"], role(hosts, "s")["score"]) == (10000, 1000)
    n = status_of(hosts, "p")["checkpoint"]

    # Without its secondary, a demoted primary stands by with its writes (never given up), and s,
    # marked outdated the moment p went on alone, is not promoted when it comes back.
    agent(hosts, "s", "stop")
    agent(hosts, "s", "monitor", OCF_NOT_RUNNING)
    poll.wait_for(lambda: status_of(hosts, "p"), "p to lose s", ok=lambda st: st and st["state"] == "degraded",
                  timeout=60)
    fencing_reaches(hosts, "p", "outdated", "p to mark s outdated")
    assert mark(hosts, "s") == str(n)
    last = _pattern(b"p-alone", 4096)
    blockdev.write_at(TOP, 2 * MiB, last)
    agent(hosts, "p", "demote")
    agent(hosts, "p", "monitor", OCF_SUCCESS)
    r = role(hosts, "p")
    assert (r["run"], r["role"], r["score"]) == ("standby", "primary", 5000), r
    assert cib_score(hosts, "p") == "5000"
    assert not up_mark.exists()          # stopped with `down`: clean
    assert not os.path.exists(TOP)
    agent(hosts, "s", "start")           # its view: checkpoint n, without "p-alone"
    agent(hosts, "s", "monitor", OCF_SUCCESS)
    assert (role(hosts, "s")["score"], role(hosts, "s")["checkpoint"], cib_score(hosts, "s")) == (1000, n, None)
    said = agent(hosts, "s", "promote", OCF_ERR_GENERIC)
    assert (f"must not be promoted here: outdated: another host's primary wrote without this one after "
            f"checkpoint {n} (node attribute {MARK}={n} on s)") in said, said
    assert role(hosts, "s")["run"] == "unpromoted"

    # A host standing by with the primary's role is not promoted either once another host's
    # primary marked it (as s's would have, had it been promoted meanwhile).
    crm_attr(hosts, "p", MARK, value="99")
    agent(hosts, "p", "monitor", OCF_SUCCESS)
    assert cib_score(hosts, "p") is None
    assert "after checkpoint 99" in agent(hosts, "p", "promote", OCF_ERR_GENERIC)
    crm_attr(hosts, "p", MARK, delete=True)

    agent(hosts, "p", "promote")         # up again as primary: s gets the delta, the mark goes
    agent(hosts, "p", "monitor", OCF_RUNNING_PROMOTED)
    assert blockdev.read_at(TOP, 0, 2 * MiB + 4096) == data + more + last
    poll.wait_for(lambda: status_of(hosts, "p"), "p to resync s and replicate",
                  ok=lambda st: st and st["state"] == "replicating", timeout=START_TIMEOUT)
    fencing_reaches(hosts, "p", "cleared", "p to clear s's mark")
    assert mark(hosts, "s") is None
    agent(hosts, "s", "monitor", OCF_SUCCESS)
    assert (cib_score(hosts, "p"), cib_score(hosts, "s")) == ("10000", "1000")
    assert blockdev.read_at(B_ACTIVE, 0, 2 * MiB + 4096) == data + more + last
    agent(hosts, "p", "stop")
    agent(hosts, "p", "monitor", OCF_NOT_RUNNING)
    agent(hosts, "s", "stop")
    assert _ours_left() == []
