"""What keeps a test run and a user on a real host safe (unit tier: no root needed, no device touched)."""

import os
import shutil
import subprocess
import sys

import pytest
import sweep

from dmrepl import cli
from dmrepl.kernel.tables import TableError


@pytest.fixture
def on_host(monkeypatch):
    monkeypatch.delenv("DMREPL_IN_VM", raising=False)
    monkeypatch.delenv(sweep.OPT_IN, raising=False)


def test_sweep_refuses_outside_the_test_vm(on_host, tmp_path):
    assert not sweep.in_test_vm()
    with pytest.raises(sweep.RefusedOnHost) as e:
        sweep.sweep(str(tmp_path))
    assert "only inside the test VM" in str(e.value) and sweep.OPT_IN in str(e.value)


def test_power_loss_helper_refuses_outside_the_test_vm(on_host):
    with pytest.raises(sweep.RefusedOnHost) as e:
        sweep.power_loss(ctl=None, resource="vm1")
    assert str(e.value).startswith("the power-loss helper removes devices")


def test_the_vm_marker_alone_is_not_enough(monkeypatch):
    """DMREPL_IN_VM=1 leaked into a host shell does not unlock the sweep: the kernel must be virtme's."""
    monkeypatch.setenv("DMREPL_IN_VM", "1")
    monkeypatch.delenv(sweep.OPT_IN, raising=False)
    with open("/proc/cmdline") as f:
        if "virtme" in f.read():
            pytest.skip("this unit test runs inside the test VM")
    with pytest.raises(sweep.RefusedOnHost):
        sweep.require_vm("x")


def test_sweep_only_counts_processes_this_run_started(tmp_path):
    other = subprocess.Popen(["sleep", "30"], start_new_session=True)  # not a daemon: never a candidate
    try:
        assert sweep.our_processes(str(tmp_path)) == []
    finally:
        other.kill()
        other.wait()


@pytest.mark.skipif(not shutil.which("setpriv"), reason="setpriv (util-linux) is not installed")
@pytest.mark.parametrize("argv", [["secondary", "status", "vm1"], ["secondary", "up", "vm1"], ["ls"]])
def test_non_root_caller_gets_a_clear_error(argv, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another user")
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           sys.executable, "-m", "dmrepl.cli", *argv], capture_output=True, text=True,
                          cwd="/")
    assert proc.returncode == 1, proc.stderr
    if argv == ["ls"] and "device-mapper is not available" in proc.stderr:
        return  # a host without device-mapper says that first
    assert proc.stderr.startswith(f"dmrepl: dmrepl {' '.join(argv[:2]) if argv[0] == 'secondary' else 'ls'} "
                                  "needs root"), proc.stderr
    assert "hint: run it with sudo" in proc.stderr and "Traceback" not in proc.stderr


def test_a_value_error_reaching_main_is_a_sentence(monkeypatch, capsys):
    def broken(args):
        raise TableError("snapshot: chunk size 3 is not a power of two")
    monkeypatch.setattr(cli, "cmd_doctor", broken)
    assert cli.main(["doctor"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dmrepl: TableError: snapshot: chunk size 3 is not a power of two\n")
    assert "hint: this is dmrepl's fault" in err and "Traceback" not in err
    with pytest.raises(TableError):
        cli.main(["--debug", "doctor"])
