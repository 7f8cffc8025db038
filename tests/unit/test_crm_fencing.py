"""ocf/crm-fencing, the [fencing] command for Pacemaker, against a real CIB: Pacemaker's own tools
(pacemaker-cli-utils, which scripts/setup installs) working on a CIB file (CIB_file), three nodes."""

import os
import shutil
import subprocess

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "ocf", "crm-fencing")
ATTR = "dmrepl-vm1-2026-outdated"


@pytest.fixture
def cib(tmp_path):
    for tool in ("cibadmin", "crm_attribute"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: scripts/setup installs pacemaker-cli-utils")
    path = tmp_path / "cib.xml"
    env = {**os.environ, "CIB_file": str(path)}
    path.write_text(subprocess.run(["cibadmin", "--empty"], capture_output=True, text=True, check=True).stdout)
    for i, uname in enumerate(("alpha", "beta", "gamma"), 1):
        subprocess.run(["cibadmin", "--create", "-o", "nodes", "-X", f'<node id="{i}" uname="{uname}"/>'],
                       env=env, check=True)
    return env


def fencing(env, action, node="alpha", checkpoint="8"):
    return subprocess.run([SCRIPT, action], capture_output=True, text=True, timeout=30,
                          env={**env, "DMREPL_MARK_NAME": ATTR, "DMREPL_CHECKPOINT": checkpoint,
                               "OCF_RESKEY_CRM_meta_on_node": node})


def marks(env) -> dict:
    out = {}
    for node in ("alpha", "beta", "gamma"):
        r = subprocess.run(["crm_attribute", "-N", node, "-n", ATTR, "-l", "forever", "-G", "-q"],
                           capture_output=True, text=True, env=env)
        if r.returncode == 0:
            out[node] = r.stdout.strip()
    return out


def test_outdate_marks_every_other_node_and_clear_removes_the_marks(cib):
    r = fencing(cib, "outdate")
    assert (r.returncode, r.stdout) == (0, f"{ATTR}=8 on: beta gamma\n"), r
    assert marks(cib) == {"beta": "8", "gamma": "8"}
    r = fencing(cib, "outdate", checkpoint="11")            # again, newer: the value follows
    assert r.returncode == 0 and marks(cib) == {"beta": "11", "gamma": "11"}
    r = fencing(cib, "outdate", node="beta", checkpoint="3")   # another host's primary marks alpha
    assert r.returncode == 0 and marks(cib) == {"alpha": "3", "beta": "11", "gamma": "3"}
    r = fencing(cib, "clear")
    assert (r.returncode, r.stdout) == (0, f"{ATTR} removed on: beta gamma\n"), r
    assert marks(cib) == {"alpha": "3"}
    assert fencing(cib, "clear").returncode == 0            # nothing left to clear: still fine


@pytest.mark.parametrize("node,checkpoint,action,message", [
    ("delta", "8", "outdate", "crm-fencing: this node 'delta' is not among the cluster's nodes (alpha beta gamma): "
                              "nothing marked"),
    ("alpha", "8x", "outdate", "crm-fencing: DMREPL_CHECKPOINT is not a checkpoint number: '8x'"),
    ("alpha", "8", "fence", "usage: DMREPL_MARK_NAME=ATTRIBUTE DMREPL_CHECKPOINT=N"),
])
def test_mistakes_change_nothing_and_say_why(cib, node, checkpoint, action, message):
    r = fencing(cib, action, node=node, checkpoint=checkpoint)
    assert r.returncode in (1, 2) and r.stdout.startswith(message), r
    assert marks(cib) == {}


def test_without_a_cluster_it_fails_and_says_so(cib):
    env = {k: v for k, v in cib.items() if k != "CIB_file"}
    env["CIB_file"] = "/nonexistent/cib.xml"
    r = fencing(env, "outdate")
    assert r.returncode == 1 and r.stdout.startswith("crm-fencing: cannot read the cluster's nodes (cibadmin:"), r
