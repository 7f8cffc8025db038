"""Config parsing: every mistake is a clear error naming the file and the key (unit tier)."""

import pytest

from dmrepl.config import (
    ConfigError,
    Peer,
    PrimaryConfig,
    check_name,
    load,
    load_secondary,
    parse,
    parse_secondary,
)

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
    assert cfg.netns is None and parse_secondary(GOOD + 'netns = "repl"\n', source="vm1.toml").netns == "repl"


def test_defaults_and_name_from_file():
    cfg = parse_secondary('[secondary]\ndisk = "/d"\nhidden_stores = ["/a", "/b"]\n', source="x.toml",
                          default_name="web")
    assert cfg.name == "web" and cfg.resource_id == "web"
    assert (cfg.listen_host, cfg.listen_port, cfg.chunk_sectors) == ("127.0.0.1", 10809, 8)


@pytest.mark.parametrize("text,message", [
    ('name = "vm1"\n[secondary\n', "not valid TOML"),
    ('name = "vm1"\nnmae = "x"\n[secondary]\ndisk = "/d"\nhidden_stores = ["/a", "/b"]\n', "unknown key 'nmae'"),
    ('name = "vm1"\n', "missing required key 'secondary'"),
    (GOOD + '[primary]\ndisk = "/p"\n', "both [primary] and [secondary]: say which role this host starts in"),
    (GOOD.replace('name = "vm1"', 'name = "vm1"\nstart_as = "primary"'), "'start_as' needs both"),
    ('name = "vm1"\n[secondary]\ndisk = "/d"\nhidden_stores = ["/a", "/b"]\nlink_listen = "127.0.0.1:1"\n',
     "'link_listen' needs 'key_file'"),
    ('name = "vm1"\n[secondary]\ndisk = "/d"\nhidden_stores = ["/a", "/b"]\nkey_file = "/k"\n'
     'link_listen = "127.0.0.1:10809"\n', "'link_listen' and 'listen' must differ"),
    ('name = "vm1"\n[secondary]\nhidden_stores = ["/a", "/b"]\n', "missing required key 'disk'"),
    ('name = "vm1"\n[secondary]\ndisk = "/d"\nhidden_stores = ["/a"]\n', "exactly two"),
    ('name = "vm1"\n[secondary]\ndisk = "/d"\nhidden_stores = ["/a", "/d"]\n', "must be different paths"),
    ('name = "vm1"\n[secondary]\ndisk = 5\nhidden_stores = ["/a", "/b"]\n', "must be str"),
    ('name = "vm1"\n[secondary]\ndisk = "/d"\nhidden_stores = ["/a", "/b"]\nlisten = "host:1"\n', "IP:PORT"),
    ('name = "vm1"\n[secondary]\ndisk = "/d"\nhidden_stores = ["/a", "/b"]\nlisten = "127.0.0.1:0"\n', "1-65535"),
    ('name = "vm1"\n[secondary]\ndisk = "/d"\nhidden_stores = ["/a", "/b"]\nchunk_kib = 6\n', "power of two"),
    ('name = "vm1"\n[secondary]\ndisk = "/d"\nhidden_stores = ["/a", "/b"]\nstore_fill_warn = 1.5\n', "between 0 and 1"),
    ('name = "vm/1"\n[secondary]\ndisk = "/d"\nhidden_stores = ["/a", "/b"]\n', "not valid"),
    (GOOD + 'netns = "a b"\n', "'netns' 'a b' is not a network namespace name"),
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


PRIMARY = '''
name = "vm1"
resource_id = "vm1-2026"
[primary]
disk = "/srv/vm1/disk.img"
era_metadata = "/srv/vm1/era.img"
key_file = "/etc/dmrepl/vm1.key"
era_block_kib = 64
checkpoint_interval_s = 1
[[primary.secondaries]]
nbd = "10.77.0.2:10809"
link = "10.77.0.2:10810"
'''


def test_primary_config():
    cfg = parse(PRIMARY, source="vm1.toml")
    assert isinstance(cfg, PrimaryConfig) and cfg.role == "primary"
    assert (cfg.disk, cfg.era_metadata, cfg.key_file) == ("/srv/vm1/disk.img", "/srv/vm1/era.img",
                                                          "/etc/dmrepl/vm1.key")
    assert cfg.secondaries == (Peer("10.77.0.2", 10809, "10.77.0.2", 10810),)
    assert (cfg.era_block_sectors, cfg.chunk_sectors, cfg.checkpoint_interval_s) == (128, 8, 1.0)
    assert (cfg.heartbeat_interval_s, cfg.heartbeat_misses, cfg.nbd_connections, cfg.nbd_timeout_s) == (1.0, 3, 4, 5)
    assert (cfg.verify_interval_s, cfg.verify_rate_bytes_s, cfg.verify_repair) == (0.0, 50 << 20, False)


@pytest.mark.parametrize("value,rate", [('"200M"', 200 << 20), ('"64K"', 64 << 10), ('"1G/s"', 1 << 30),
                                        ('"50MiB/s"', 50 << 20), ("1048576", 1 << 20), ('"3mb"', 3 << 20)])
def test_verify_schedule_and_its_rate(value, rate):
    cfg = parse(PRIMARY.replace("checkpoint_interval_s = 1", f"verify_interval_s = 3600\nverify_rate = {value}\n"
                                "verify_repair = true"), source="vm1.toml")
    assert (cfg.verify_interval_s, cfg.verify_rate_bytes_s, cfg.verify_repair) == (3600.0, rate, True)


def test_secondary_link_defaults_to_the_next_port():
    cfg = parse_secondary('[secondary]\ndisk = "/d"\nhidden_stores = ["/a", "/b"]\nlisten = "10.0.0.2:900"\n'
                          'key_file = "k"\n', source="x.toml", default_name="web")
    assert (cfg.link_host, cfg.link_port) == ("10.0.0.2", 901) and cfg.key_file.endswith("/k")
    plain = parse_secondary('[secondary]\ndisk = "/d"\nhidden_stores = ["/a", "/b"]\n', source="x.toml",
                            default_name="web")
    assert plain.link_port is None and plain.key_file is None


@pytest.mark.parametrize("change,message", [
    (("era_block_kib = 64", "era_block_kib = 48"), "'era_block_kib' must be a power of two"),
    (("checkpoint_interval_s = 1", "checkpoint_interval_s = 0.01"), "0 (on demand only) or at least 0.05"),
    (("checkpoint_interval_s = 1", "heartbeat_misses = 0"), "'heartbeat_misses' must be from 1 to 100"),
    (("checkpoint_interval_s = 1", "nbd_conections = 2"), "unknown key 'nbd_conections'"),
    (("checkpoint_interval_s = 1", "verify_interval_s = -1"), "'verify_interval_s' must be from 0.0 to"),
    (("checkpoint_interval_s = 1", 'verify_rate = "fast"'), "'verify_rate': not a rate: 'fast'"),
    (("checkpoint_interval_s = 1", 'verify_rate = "1K"'), "'verify_rate': a rate must be at least 64K"),
    (("checkpoint_interval_s = 1", "verify_rate = 2.5"), "'verify_rate': a rate is a number of bytes a second"),
    (("checkpoint_interval_s = 1", 'verify_repair = "yes"'), "key 'verify_repair' must be bool"),
    (('era_metadata = "/srv/vm1/era.img"', 'era_metadata = "/srv/vm1/disk.img"'), "must be different paths"),
    (('key_file = "/etc/dmrepl/vm1.key"\n', ''), "missing required key 'key_file'"),
    (('link = "10.77.0.2:10810"', 'link = "peer:10810"'), "link address 'peer:10810': expected IP:PORT"),
    (('[[primary.secondaries]]', '[[primary.secondaries]]\nnbd = "10.0.0.3:1"\nlink = "10.0.0.3:2"\n'
      '[[primary.secondaries]]'), "lists 2 secondaries: this dmrepl drives exactly one"),
])
def test_bad_primary_configs(change, message):
    with pytest.raises(ConfigError) as e:
        parse(PRIMARY.replace(*change), source="/etc/dmrepl/vm1.toml")
    assert message in str(e.value) and "/etc/dmrepl/vm1.toml" in str(e.value)


def test_secondary_commands_refuse_a_primary_config(tmp_path):
    p = tmp_path / "vm1.toml"
    p.write_text(PRIMARY)
    assert load("vm1", str(p)).role == "primary"
    with pytest.raises(ConfigError) as e:
        load_secondary("vm1", str(p))
    assert "this is the primary's config" in str(e.value)


BOTH = PRIMARY.replace('name = "vm1"', 'name = "vm1"\nstart_as = "secondary"') + '''
[secondary]
disk = "/srv/vm1/disk.img"
hidden_stores = ["/srv/vm1/h0.img", "/srv/vm1/h1.img"]
'''


def test_both_sections_a_host_that_changes_roles(tmp_path):
    sec = parse(BOTH, source="vm1.toml")
    assert sec.role == "secondary" and sec.era_metadata == "/srv/vm1/era.img" and sec.era_block_sectors == 128
    assert parse(BOTH, source="vm1.toml", role="primary").role == "primary"
    assert parse(BOTH.replace('"secondary"\n', '"primary"\n', 1), source="vm1.toml").role == "primary"
    # The state file's role rules once there is one.
    p = tmp_path / "vm1.toml"
    p.write_text(BOTH.replace('resource_id = "vm1-2026"', f'resource_id = "vm1-2026"\nstate_dir = "{tmp_path}"'))
    assert load("vm1", str(p)).role == "secondary"
    (tmp_path / "vm1").mkdir()
    (tmp_path / "vm1" / "state.json").write_text('{"role": "primary"}')
    assert load("vm1", str(p)).role == "primary" and load_secondary("vm1", str(p)).role == "secondary"
    (tmp_path / "vm1" / "state.json").write_text('{"role": "merging"}')
    assert load("vm1", str(p)).role == "secondary"


@pytest.mark.parametrize("change,message", [
    (('start_as = "secondary"', 'start_as = "both"'), "'start_as' must be \"primary\" or \"secondary\""),
    (('disk = "/srv/vm1/disk.img"\nhidden', 'disk = "/srv/vm1/other.img"\nhidden'), "differ: both roles"),
    (('"/srv/vm1/h1.img"]', '"/srv/vm1/era.img"]'), "era_metadata is one of [secondary]'s hidden_stores"),
])
def test_bad_both_sections(change, message):
    with pytest.raises(ConfigError) as e:
        parse(BOTH.replace(*change), source="vm1.toml")
    assert message in str(e.value)
