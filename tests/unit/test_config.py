"""Config parsing: every mistake is a clear error naming the file and the key (unit tier)."""

import pytest

from dmrepl.config import ConfigError, check_name, load_secondary, parse_secondary

GOOD = '''
name = "vm1"
resource_id = "vm1-2026"
state_dir = "/var/lib/dmrepl"
[secondary]
disk = "/srv/vm1/disk.img"
hidden_stores = ["/srv/vm1/h0.img", "/srv/vm1/h1.img"]
listen = "192.0.2.10:10900"
chunk_kib = 8
store_fill_warn = 0.5
'''


def test_good_config():
    cfg = parse_secondary(GOOD, source="vm1.toml")
    assert (cfg.name, cfg.resource_id) == ("vm1", "vm1-2026")
    assert cfg.disk == "/srv/vm1/disk.img" and cfg.hidden_stores == ("/srv/vm1/h0.img", "/srv/vm1/h1.img")
    assert (cfg.listen_host, cfg.listen_port, cfg.chunk_sectors, cfg.store_fill_warn) == ("192.0.2.10", 10900, 16, 0.5)
    assert cfg.resource_state_dir == "/var/lib/dmrepl/vm1"


def test_defaults_and_name_from_file():
    cfg = parse_secondary('[secondary]\ndisk = "/d"\nhidden_stores = ["/a", "/b"]\n', source="x.toml",
                          default_name="web")
    assert cfg.name == "web" and cfg.resource_id == "web"
    assert (cfg.listen_host, cfg.listen_port, cfg.chunk_sectors) == ("127.0.0.1", 10809, 8)


@pytest.mark.parametrize("text,message", [
    ('name = "vm1"\n[secondary\n', "not valid TOML"),
    ('name = "vm1"\nnmae = "x"\n[secondary]\ndisk = "/d"\nhidden_stores = ["/a", "/b"]\n', "unknown key 'nmae'"),
    ('name = "vm1"\n', "missing required key 'secondary'"),
    (GOOD + '[primary]\ndisk = "/p"\n', "section [primary]: this dmrepl has only the secondary's half"),
    ('name = "vm1"\n[secondary]\nhidden_stores = ["/a", "/b"]\n', "missing required key 'disk'"),
    ('name = "vm1"\n[secondary]\ndisk = "/d"\nhidden_stores = ["/a"]\n', "exactly two"),
    ('name = "vm1"\n[secondary]\ndisk = "/d"\nhidden_stores = ["/a", "/d"]\n', "three different paths"),
    ('name = "vm1"\n[secondary]\ndisk = 5\nhidden_stores = ["/a", "/b"]\n', "must be str"),
    ('name = "vm1"\n[secondary]\ndisk = "/d"\nhidden_stores = ["/a", "/b"]\nlisten = "host:1"\n', "IP:PORT"),
    ('name = "vm1"\n[secondary]\ndisk = "/d"\nhidden_stores = ["/a", "/b"]\nlisten = "127.0.0.1:0"\n', "1-65535"),
    ('name = "vm1"\n[secondary]\ndisk = "/d"\nhidden_stores = ["/a", "/b"]\nchunk_kib = 6\n', "power of two"),
    ('name = "vm1"\n[secondary]\ndisk = "/d"\nhidden_stores = ["/a", "/b"]\nstore_fill_warn = 1.5\n', "between 0 and 1"),
    ('name = "vm/1"\n[secondary]\ndisk = "/d"\nhidden_stores = ["/a", "/b"]\n', "not valid"),
])
def test_bad_configs(text, message):
    with pytest.raises(ConfigError) as e:
        parse_secondary(text, source="/etc/dmrepl/vm1.toml")
    assert message in str(e.value)
    assert "/etc/dmrepl/vm1.toml" in str(e.value) or "resource name" in str(e.value)


def test_names():
    for good in ("vm1", "db.prod-2", "a"):
        assert check_name(good) == good
    for bad in ("", "-x", "a/b", "a b", "x" * 65, "ünï"):
        with pytest.raises(ConfigError):
            check_name(bad)


def test_missing_file_and_name_mismatch(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_secondary(path=str(tmp_path / "nope.toml"))
    assert "no such config file" in str(e.value)
    p = tmp_path / "vm2.toml"
    p.write_text('name = "vm1"\n[secondary]\ndisk = "/d"\nhidden_stores = ["/a", "/b"]\n')
    with pytest.raises(ConfigError) as e:
        load_secondary("vm2", str(p))
    assert "names resource 'vm1', not 'vm2'" in str(e.value)
