"""Error text, CLI behaviour on a host without device-mapper, the VM runner (unit tier)."""

import errno
import json
import os
import subprocess
import sys
import time

import pytest
import testvm

from dmrepl import cli
from dmrepl.kernel import dm
from dmrepl.kernel.errors import DMError, LoopError

NO_DM = not os.path.exists(dm.CONTROL_PATH)


def test_error_text_names_call_object_and_errno():
    e = DMError(errno.EBUSY, "DM_TABLE_LOAD", "dmrepl-vm1-hidden")
    assert str(e) == "DM_TABLE_LOAD dmrepl-vm1-hidden: Device or resource busy (EBUSY)"
    assert e.errno == errno.EBUSY and e.call == "DM_TABLE_LOAD" and e.obj == "dmrepl-vm1-hidden"
    e = LoopError(errno.ENOENT, "open", "/x.img", "backing file")
    assert str(e) == "open /x.img: No such file or directory (ENOENT): backing file"
    assert isinstance(e, OSError)


def test_name_validation():
    for bad in ("", "a/b", ".", "..", "x" * 128, "tab\tname"):
        with pytest.raises(ValueError):
            dm.validate_name(bad)
    dm.validate_name("dmrepl-vm1-origin")


@pytest.mark.skipif(not NO_DM, reason="this host has device-mapper; the check is for hosts without it")
def test_doctor_says_device_mapper_is_missing_and_points_to_the_vm(capsys):
    rc = cli.main(["doctor", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1 and out["ok"] is False
    dmcheck = next(c for c in out["checks"] if c["name"] == "device-mapper")
    assert dmcheck["verdict"] == "fail"
    assert "device-mapper is missing" in dmcheck["detail"] and "test VM" in dmcheck["detail"]
    rc = cli.main(["doctor"])
    text = capsys.readouterr().out
    assert rc == 1 and "FAIL  device-mapper" in text and "cannot run dmrepl" in text


@pytest.mark.skipif(not NO_DM, reason="this host has device-mapper")
def test_ls_without_device_mapper_is_a_clear_error(capsys):
    assert cli.main(["ls"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dmrepl: device-mapper is not available") and "hint:" in err
    assert "Traceback" not in err


def test_console_script_usage_error():
    proc = subprocess.run([sys.executable, "-m", "dmrepl.cli", "frobnicate"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_vm_guest_script_loads_modules_and_marks_start():
    script = testvm.guest_script(["python", "-m", "pytest", "-m", "kernel"], "/p/.vm/run-x/started", "/p")
    lines = script.splitlines()
    assert lines[1] == "echo started > /p/.vm/run-x/started"
    assert "dm-snapshot" in script and "dm-era" in script and "loop" in script
    assert lines[-1] == "python -m pytest -m kernel"


def test_vm_carries_the_interpreter_in_one_tar(tmp_path):
    import os
    import tarfile
    tar = str(tmp_path / "i.tar")
    paths = testvm.pack_interpreter(tar, testvm.PROJECT_DIR)
    assert paths[0] == os.path.dirname(os.__file__) and sys.prefix in paths
    assert paths[-1] == os.path.join(testvm.PROJECT_DIR, "dmrepl")
    assert [p for p in testvm.SYSTEM_PYTHON if os.path.isdir(p)] == [p for p in paths if p in testvm.SYSTEM_PYTHON]
    with tarfile.open(tar) as t:
        names = set(t.getnames())
    assert "0/os.py" in names and not any(n.startswith(("0/test/", "0/site-packages/")) for n in names)
    venv = str(paths.index(sys.prefix))
    assert f"{venv}/bin/python" in names
    assert any(n.startswith(f"{venv}/lib/") and "/site-packages/pyroute2/" in n for n in names)
    assert not any("/site-packages/pip/" in n for n in names)
    package = str(len(paths) - 1)
    assert {f"{package}/cli/__init__.py", f"{package}/cli/__pycache__/__init__.cpython-"
            f"{sys.version_info.major}{sys.version_info.minor}.pyc"} <= names
    line, = testvm.unpack_lines(tar, paths)
    assert f"mount --bind /run/dmrepl-testvm/0 {paths[0]}" in line and "|| echo" in line
    assert f"> {testvm.FAST_MAP}" in line


def test_vm_runner_refuses_without_a_command(capsys):
    with pytest.raises(SystemExit) as e:
        testvm.main([])
    assert e.value.code == 2


def test_vm_runner_kills_what_the_vm_started_at_its_timeout(tmp_path, capsys):
    # vng's QEMU is its child: a timeout that kills vng alone left QEMU holding the console pipe.
    pidfile = tmp_path / "grandchild"
    script = f"sleep 300 & echo $! > {pidfile}; wait"
    rc = testvm.run_group(["bash", "-c", script], dict(os.environ), timeout=1.0)
    assert rc == testvm.VM_FAILED
    assert "exceeded 1 s" in capsys.readouterr().err
    pid = int(pidfile.read_text())
    assert poll_until_gone(pid)


def test_vm_runner_leaves_nothing_after_a_normal_exit(tmp_path):
    pidfile = tmp_path / "grandchild"
    rc = testvm.run_group(["bash", "-c", f"sleep 300 & echo $! > {pidfile}; exit 3"], dict(os.environ), timeout=30)
    assert rc == 3
    assert poll_until_gone(int(pidfile.read_text()))


def poll_until_gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True     # killed; its reaper has not reaped it yet
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_vm_runner_stopped_by_sigterm_stops_what_it_started(tmp_path):
    pidfile = tmp_path / "grandchild"
    code = ("import testvm\n"
            "testvm.stop_on_sigterm()\n"
            f"testvm.run_group(['bash', '-c', 'sleep 300 & echo $! > {pidfile}; wait'], {{}}, timeout=60)\n")
    here = os.path.dirname(testvm.__file__)     # by PYTHONPATH: the wheel tier runs with PYTHONSAFEPATH
    runner = subprocess.Popen([sys.executable, "-c", code], cwd=here, env=dict(os.environ, PYTHONPATH=here))
    deadline = time.monotonic() + 10
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline, "the runner did not start its command"
        time.sleep(0.05)
    runner.terminate()
    assert runner.wait(timeout=10) == testvm.VM_FAILED
    assert poll_until_gone(int(pidfile.read_text()))


def test_the_cli_starts_without_the_daemons_and_the_policy():
    """Every command builds the whole parser; a Python start in the test VM pays for each module it
    reads over 9p (about 5 s with the daemon's imports, half without), and the OCF agent runs
    `dmrepl role` at every monitor."""
    code = ("import sys, dmrepl.cli as c; c.build_parser(); "
            "print(sorted(m for m in sys.modules if m.startswith(('dmrepl.daemon.supervisor', "
            "'dmrepl.roles.secondary', 'dmrepl.roles.primary', 'prometheus_client', 'pyroute2'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
