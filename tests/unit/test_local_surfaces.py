"""Local surfaces (issue 11, point 3): configs others can change, state and logs others can read,
and the control socket, refused or closed (unit tier)."""

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest

from dmrepl import private
from dmrepl.config import ConfigError, load
from dmrepl.daemon import control
from dmrepl.state import ResourceState, StateStore

CONFIG = 'name = "vm1"\nresource_id = "vm1"\nstate_dir = "{state}"\n[secondary]\ndisk = "/dev/sdz"\n' \
         'hidden_stores = ["/dev/sdy", "/dev/sdx"]\nlisten = "127.0.0.1:10809"\n'


def _config(tmp_path, mode: int) -> str:
    p = tmp_path / "vm1.toml"
    p.write_text(CONFIG.format(state=tmp_path / "state"))
    os.chmod(p, mode)
    return str(p)


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666, 0o620])
def test_a_config_others_can_change_is_refused(tmp_path, mode):
    path = _config(tmp_path, mode)
    with pytest.raises(ConfigError, match=rf"mode {mode:04o}: group or others can change it.*chmod go-w"):
        load("vm1", path)


@pytest.mark.parametrize("mode", [0o644, 0o600, 0o400])
def test_a_config_only_its_owner_can_change_is_read(tmp_path, mode):
    assert load("vm1", _config(tmp_path, mode)).name == "vm1"


def test_a_config_of_another_user_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to give the file away")
    path = _config(tmp_path, 0o644)
    os.chown(path, 65534, 65534)
    with pytest.raises(ConfigError, match="belongs to uid 65534"):
        load("vm1", path)


def _state(tmp_path) -> StateStore:
    store = StateStore(str(tmp_path / "vm1"))
    store.save(ResourceState(name="vm1", resource_id="vm1"))
    return store


def test_state_is_written_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        store = _state(tmp_path)
        with private.open_file(os.path.join(store.directory, "daemon.log"), "ab") as f:
            f.write(b"x\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(store.directory).st_mode) == 0o700
    for name in ("state.json", "daemon.log"):
        assert stat.S_IMODE(os.stat(os.path.join(store.directory, name)).st_mode) == 0o600, name
    assert store.load().resource_id == "vm1"


def test_a_state_directory_others_can_reach_is_refused(tmp_path):
    store = _state(tmp_path)
    os.chmod(store.directory, 0o755)
    before = open(store.path).read()
    for attempt in (store.load, lambda: store.save(ResourceState(name="vm1", resource_id="other"))):
        with pytest.raises(private.NotPrivate, match=r"directory .*vm1 is mode 0755.*") as e:
            attempt()
        assert e.value.hint.startswith("chmod 700 ")
    assert open(store.path).read() == before               # nothing changed


def test_state_and_log_files_others_can_read_are_refused(tmp_path):
    store = _state(tmp_path)
    os.chmod(store.path, 0o644)
    with pytest.raises(private.NotPrivate, match=r"state.json is mode 0644"):
        store.load()
    log = os.path.join(store.directory, "daemon.log")
    with open(log, "w") as f:
        f.write("old\n")
    os.chmod(log, 0o640)
    with pytest.raises(private.NotPrivate, match=r"daemon.log is mode 0640"):
        private.open_file(log, "ab")
    assert open(log).read() == "old\n"


@pytest.mark.skipif(not shutil.which("setpriv"), reason="setpriv (util-linux) is not installed")
def test_the_control_socket_refuses_a_non_root_caller_even_in_an_open_directory():
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another user")
    top = tempfile.mkdtemp(prefix="dmrepl-sock-")
    try:
        os.chmod(top, 0o755)
        sock_dir = os.path.join(top, "vm1")
        os.mkdir(sock_dir, 0o755)
        path = control.socket_path(sock_dir)
        srv = control.ControlServer(path, lambda req: {"state": "replicating"}, lambda _m: None)
        try:
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            probe = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\n"
                     "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(13)\n")
            proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                   sys.executable, "-c", probe, path], capture_output=True, text=True)
            assert proc.returncode == 13, proc.stderr
            assert control.request(path, "status")["state"] == "replicating"    # root still gets in
        finally:
            srv.close()
    finally:
        shutil.rmtree(top)


def test_keygen_writes_a_private_key_once_and_never_over_one(tmp_path, capsys):
    from dmrepl import cli
    from dmrepl.link import auth

    if os.geteuid() != 0:
        pytest.skip("keygen needs root")
    key = tmp_path / "keys" / "vm1.key"
    path = _config(tmp_path, 0o644)
    with open(path, "a") as f:
        f.write(f'link_listen = "127.0.0.1:10810"\nkey_file = "{key}"\n')
    assert cli.main(["keygen", "vm1", "--config", path]) == 0
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600 and len(auth.load_key(str(key))) == 32
    first = key.read_text()
    assert cli.main(["keygen", "vm1", "--config", path]) == 1
    err = capsys.readouterr().err
    assert "exists already: kept" in err and "hint: to make a new one, remove" in err
    assert key.read_text() == first and os.listdir(key.parent) == ["vm1.key"]     # no temporary left


def test_keygen_without_a_key_file_in_the_config_says_what_to_add(tmp_path, capsys):
    from dmrepl import cli

    if os.geteuid() != 0:
        pytest.skip("keygen needs root")
    assert cli.main(["keygen", "vm1", "--config", _config(tmp_path, 0o644)]) == 1
    err = capsys.readouterr().err
    assert "names no key_file" in err and 'key_file = "/etc/dmrepl/vm1.key"' in err


def test_keygen_wireguard_before_the_peer_key_is_known_prints_the_public_key(tmp_path, capsys):
    from dmrepl import cli
    from dmrepl.link import x25519

    if os.geteuid() != 0:
        pytest.skip("keygen needs root")
    wg = tmp_path / "keys" / "vm1.wg"
    path = _config(tmp_path, 0o644)
    with open(path, "a") as f:      # peer_public_key still missing: the other host has no key yet
        f.write(f'[link]\nencrypt = "wireguard"\nprivate_key_file = "{wg}"\n')
    assert cli.main(["keygen", "vm1", "--config", path, "--wireguard", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    key = x25519.decode(wg.read_text())
    assert stat.S_IMODE(os.stat(wg).st_mode) == 0o600 and out["created"] is True
    assert out["public_key"] == x25519.encode(x25519.public(key)) and out["private_key_file"] == str(wg)
    # Again: the key is kept and its public key printed once more.
    assert cli.main(["keygen", "vm1", "--config", path, "--wireguard"]) == 0
    text = capsys.readouterr().out
    assert "exists: kept" in text and out["public_key"] in text and x25519.decode(wg.read_text()) == key
    os.chmod(wg, 0o640)
    assert cli.main(["keygen", "vm1", "--config", path, "--wireguard"]) == 1
    assert "WireGuard key file" in capsys.readouterr().err


def test_keygen_wireguard_without_a_key_path_says_what_to_add(tmp_path, capsys):
    from dmrepl import cli

    if os.geteuid() != 0:
        pytest.skip("keygen needs root")
    assert cli.main(["keygen", "vm1", "--config", _config(tmp_path, 0o644), "--wireguard"]) == 1
    assert 'private_key_file = "/etc/dmrepl/vm1.wg"' in capsys.readouterr().err
