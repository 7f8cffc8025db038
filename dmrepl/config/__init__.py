"""Resource configuration: /etc/dmrepl/NAME.toml (or --config PATH).

    # /etc/dmrepl/vm1.toml
    name = "vm1"                      # optional: defaults to the file name
    resource_id = "vm1-2026"          # optional: peers must agree on it
    state_dir = "/var/lib/dmrepl"     # optional: state lives in STATE_DIR/NAME

    [secondary]
    disk = "/srv/vm1/disk.img"        # the secondary disk S: a block device or an image file
    hidden_stores = ["/srv/vm1/h0.img", "/srv/vm1/h1.img"]   # the two COW stores, used in turn
    listen = "127.0.0.1:10809"        # where the NBD export listens
    chunk_kib = 4                     # copy-before-write granularity
    store_fill_warn = 0.75            # ask for an early checkpoint above this fill level
    link_listen = "127.0.0.1:10810"   # the control link from the primary (default: listen's port + 1)
    key_file = "/etc/dmrepl/vm1.key"  # its pre-shared key (0600); without it, no control link
    netns = "repl"                    # optional: the daemon serves the export and the link from this
                                      # network namespace (it enters it before making a socket)

    # or, on the primary host:
    [primary]
    disk = "/srv/vm1/disk.img"        # the local disk P
    era_metadata = "/srv/vm1/era.img" # dm-era's metadata (a few MiB)
    key_file = "/etc/dmrepl/vm1.key"  # the same key as the secondary's
    era_block_kib = 1024              # change-tracking granularity
    chunk_kib = 4                     # the secondary's chunk size, checked at hello
    checkpoint_interval_s = 5.0       # 0: only on demand
    heartbeat_interval_s = 1.0
    heartbeat_misses = 3              # this many unanswered heartbeats: "degraded"
    reconnect_interval_s = 5.0        # degraded: try the secondary again this often (then a delta resync)
    resync_max = "200M"               # a copy to S (initial sync, resync) takes at most this a second
                                      # less what the consumer writes (default: no limit)
    resync_min = "10M"                # ... but at least this, whatever the consumer writes (default 0)
    resync_share = 0.5                # ... and while it writes, at most this share of resync_max (default 1)
    verify_interval_s = 0             # verify P against S this often after the last (0: only `dmrepl verify`)
    verify_rate = "50M"               # the scheduled verify reads at most this much a second
    verify_repair = false             # the scheduled verify repairs what it finds
    nbd_connections = 4
    nbd_timeout_s = 5                 # the longest a dead secondary stalls a write
    netns = "repl"                    # optional: make the link's sockets in this network namespace
    [[primary.secondaries]]           # one today; the list is there for more
    nbd = "10.77.0.2:10809"
    link = "10.77.0.2:10810"

A host that is to change roles (failover, then failback: the old secondary
replicates back to the old primary) has both sections over the same disk, and
`start_as = "primary"` or `"secondary"` at the top: the role of its first start.
From then on the resource's state file says which role the host plays
(`config.role_of`).  With both sections, the secondary's failover starts dm-era
on [primary]'s era_metadata, so that the failback copies only what changed.

An optional [link] table runs the link inside a WireGuard tunnel (config/tunnel.py); an optional
[metrics] table exports Prometheus metrics (config/metrics.py); an optional [fencing] table marks the
other host outdated while this host's primary writes without it (config/fencing.py).

Unknown keys and wrong types are errors that name the file and the key.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, replace

from dmrepl import private
from dmrepl.config import fencing as fencing_table
from dmrepl.config import metrics as metrics_table
from dmrepl.config import tunnel as tunnel_table
from dmrepl.config.fencing import Fencing
from dmrepl.config.fields import (
    DEFAULT_PORT,
    NAME_RE,
    ConfigError,
    check_keys,
    chunk_sectors,
    distinct,
    expect,
    number,
    parse_address,
    parse_listen,
    rate,
)
from dmrepl.config.metrics import Metrics
from dmrepl.config.tunnel import Tunnel, check_inside

CONFIG_DIR = "/etc/dmrepl"
DEFAULT_STATE_DIR = "/var/lib/dmrepl"
DEFAULT_VERIFY_RATE = 50 << 20      # bytes a second: the scheduled verify's

def check_name(name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise ConfigError(f"resource name {name!r} is not valid: use 1-64 characters from A-Z a-z 0-9 "
                          "_ . + -, starting with a letter or digit (device-mapper names are built from it)")
    return name


@dataclass(frozen=True)
class SecondaryConfig:
    name: str
    resource_id: str
    disk: str
    hidden_stores: tuple[str, str]
    listen_host: str
    listen_port: int
    chunk_sectors: int
    store_fill_warn: float
    state_dir: str
    source: str = "<built>"
    link_host: str | None = None      # the control link; None: no link (checkpoints by CLI only)
    link_port: int | None = None
    key_file: str | None = None
    era_metadata: str | None = None   # [primary]'s, when this host has both: the failover tracks writes there
    era_block_sectors: int = 2048
    tunnel: Tunnel | None = None      # [link] encrypt = "wireguard"
    metrics: Metrics | None = None    # [metrics]
    fencing: Fencing | None = None    # [fencing] (used once this host takes over as primary)
    netns: str | None = None          # the whole daemon (and its nbdkit) runs in this network namespace
    role = "secondary"

    @property
    def resource_state_dir(self) -> str:
        return os.path.join(self.state_dir, self.name)


@dataclass(frozen=True)
class Peer:
    """One secondary as the primary reaches it."""

    nbd_host: str
    nbd_port: int
    link_host: str
    link_port: int


@dataclass(frozen=True)
class PrimaryConfig:
    name: str
    resource_id: str
    disk: str
    era_metadata: str
    key_file: str
    secondaries: tuple[Peer, ...]
    era_block_sectors: int
    chunk_sectors: int
    checkpoint_interval_s: float
    heartbeat_interval_s: float
    heartbeat_misses: int
    nbd_connections: int
    nbd_timeout_s: int
    state_dir: str
    source: str = "<built>"
    netns: str | None = None
    reconnect_interval_s: float = 5.0
    resync_min_bytes_s: int = 0
    resync_max_bytes_s: int | None = None     # None: a copy goes as fast as the kernel copies
    resync_share: float = 1.0
    verify_interval_s: float = 0.0            # 0: no scheduled verify
    verify_rate_bytes_s: int | None = DEFAULT_VERIFY_RATE
    verify_repair: bool = False
    # With both sections: [secondary]'s link address, where this host, while primary, answers a
    # hello from another primary (split brain: seen on both hosts).  None: nowhere.
    hello_listen: tuple[str, int] | None = None
    tunnel: Tunnel | None = None      # [link] encrypt = "wireguard"
    metrics: Metrics | None = None    # [metrics]
    fencing: Fencing | None = None    # [fencing]
    role = "primary"

    @property
    def resource_state_dir(self) -> str:
        return os.path.join(self.state_dir, self.name)


def default_path(name: str) -> str:
    return os.path.join(CONFIG_DIR, f"{check_name(name)}.toml")


# Every key each table takes (man/dmrepl.toml.5 documents each; a unit test holds them together).
TOP_KEYS = frozenset({"name", "resource_id", "state_dir", "start_as", "secondary", "primary", "link", "metrics",
                      "fencing"})
SECONDARY_KEYS = frozenset({"disk", "hidden_stores", "listen", "chunk_kib", "store_fill_warn", "link_listen",
                            "key_file", "netns"})
PRIMARY_KEYS = frozenset({"disk", "era_metadata", "key_file", "era_block_kib", "chunk_kib", "checkpoint_interval_s",
                          "heartbeat_interval_s", "heartbeat_misses", "nbd_connections", "nbd_timeout_s",
                          "secondaries", "netns", "reconnect_interval_s", "verify_interval_s", "verify_rate",
                          "verify_repair", "resync_min", "resync_max", "resync_share"})
PEER_KEYS = frozenset({"nbd", "link"})


def netns_name(table: dict, where: str) -> str | None:
    netns = expect(table, "netns", str, where)
    if netns is not None and not NAME_RE.match(netns):
        raise ConfigError(f"{where}: 'netns' {netns!r} is not a network namespace name (see `ip netns list`)")
    return netns


def _secondary(doc: dict, common: dict, source: str) -> SecondaryConfig:
    sec = expect(doc, "secondary", dict, source, required=True)
    where = f"{source} [secondary]"
    check_keys(sec, SECONDARY_KEYS, where)
    disk = expect(sec, "disk", str, where, required=True)
    stores = expect(sec, "hidden_stores", list, where, required=True)
    if len(stores) != 2 or not all(isinstance(s, str) and s for s in stores):
        raise ConfigError(f"{where}: 'hidden_stores' must list exactly two paths")
    host, port = parse_listen(expect(sec, "listen", str, where, f"127.0.0.1:{DEFAULT_PORT}"), where)
    fill = expect(sec, "store_fill_warn", float, where, 0.75)
    if not 0.0 < fill < 1.0:
        raise ConfigError(f"{where}: 'store_fill_warn' must be between 0 and 1, got {fill}")
    paths = distinct([disk, *stores], where, "the disk and the two hidden stores")
    check_inside(common["tunnel"], where, "'listen'", host, "address")
    key_file = expect(sec, "key_file", str, where)
    link_host = link_port = None
    if key_file is not None:
        default = f"{host}:{port + 1 if port < 65535 else 1}"
        link_host, link_port = parse_address(expect(sec, "link_listen", str, where, default), where,
                                              "link_listen", port + 1)
        if (link_host, link_port) == (host, port):
            raise ConfigError(f"{where}: 'link_listen' and 'listen' must differ (the control link "
                              "and the NBD export need a port each)")
        check_inside(common["tunnel"], where, "'link_listen'", link_host, "address")
        key_file = os.path.abspath(key_file)
    elif "link_listen" in sec:
        raise ConfigError(f"{where}: 'link_listen' needs 'key_file' (the control link is authenticated)")
    return SecondaryConfig(disk=paths[0], hidden_stores=(paths[1], paths[2]), listen_host=host,
                           listen_port=port, chunk_sectors=chunk_sectors(sec, where), store_fill_warn=fill,
                           link_host=link_host, link_port=link_port, key_file=key_file,
                           netns=netns_name(sec, where), **common)


def _peers(pri: dict, where: str, tunnel: Tunnel | None) -> tuple[Peer, ...]:
    raw = expect(pri, "secondaries", list, where, required=True)
    if len(raw) != 1:
        raise ConfigError(f"{where}: [[primary.secondaries]] lists {len(raw)} secondaries: "
                          "this dmrepl drives exactly one")
    peers = []
    for i, table in enumerate(raw):
        at = f"{where} secondaries[{i}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{at}: must be a table with 'nbd' and 'link'")
        check_keys(table, PEER_KEYS, at)
        nbd_host, nbd_port = parse_address(expect(table, "nbd", str, at, required=True), at, "nbd")
        link_host, link_port = parse_address(expect(table, "link", str, at, required=True), at, "link",
                                              DEFAULT_PORT + 1)
        check_inside(tunnel, at, "'nbd'", nbd_host, "peer_address")
        check_inside(tunnel, at, "'link'", link_host, "peer_address")
        peers.append(Peer(nbd_host, nbd_port, link_host, link_port))
    return tuple(peers)


def _primary(doc: dict, common: dict, source: str) -> PrimaryConfig:
    pri = expect(doc, "primary", dict, source, required=True)
    where = f"{source} [primary]"
    check_keys(pri, PRIMARY_KEYS, where)
    netns = netns_name(pri, where)
    disk, meta = distinct([expect(pri, "disk", str, where, required=True),
                            expect(pri, "era_metadata", str, where, required=True)],
                           where, "'disk' and 'era_metadata'")
    era_kib = expect(pri, "era_block_kib", int, where, 1024)
    if era_kib < 4 or era_kib > 1 << 20 or era_kib & (era_kib - 1):
        raise ConfigError(f"{where}: 'era_block_kib' must be a power of two from 4 to 1048576, got {era_kib}")
    interval = number(pri, "checkpoint_interval_s", float, where, 5.0, 0.0, 86400.0)
    if 0 < interval < 0.05:
        raise ConfigError(f"{where}: 'checkpoint_interval_s' must be 0 (on demand only) or at least 0.05")
    verify_interval = number(pri, "verify_interval_s", float, where, 0.0, 0.0, 366 * 86400.0)
    floor, ceiling = rate(pri, "resync_min", where, 0), rate(pri, "resync_max", where, None)
    if ceiling is not None and floor > ceiling:
        raise ConfigError(f"{where}: 'resync_min' ({floor} bytes/s) is above 'resync_max' ({ceiling} bytes/s)")
    share = number(pri, "resync_share", float, where, 1.0, 0.01, 1.0)
    return PrimaryConfig(
        disk=disk, era_metadata=meta,
        key_file=os.path.abspath(expect(pri, "key_file", str, where, required=True)),
        secondaries=_peers(pri, where, common["tunnel"]), era_block_sectors=era_kib * 2,
        chunk_sectors=chunk_sectors(pri, where),
        checkpoint_interval_s=interval,
        heartbeat_interval_s=number(pri, "heartbeat_interval_s", float, where, 1.0, 0.05, 60.0),
        heartbeat_misses=number(pri, "heartbeat_misses", int, where, 3, 1, 100),
        nbd_connections=number(pri, "nbd_connections", int, where, 4, 1, 16),
        nbd_timeout_s=number(pri, "nbd_timeout_s", int, where, 5, 1, 600), netns=netns,
        reconnect_interval_s=number(pri, "reconnect_interval_s", float, where, 5.0, 0.1, 3600.0),
        resync_min_bytes_s=floor, resync_max_bytes_s=ceiling, resync_share=share,
        verify_interval_s=verify_interval, verify_rate_bytes_s=rate(pri, "verify_rate", where, DEFAULT_VERIFY_RATE),
        verify_repair=expect(pri, "verify_repair", bool, where, False), **common)


ROLES = ("primary", "secondary")


def _toml(text: str, source: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None


def parse(text: str, *, source: str, default_name: str | None = None, role: str | None = None
          ) -> SecondaryConfig | PrimaryConfig:
    """The config of one role: the section present says which; with both sections, `role`
    (the state file's, see `role_of`) or else the file's `start_as`."""
    doc = _toml(text, source)
    check_keys(doc, TOP_KEYS, source)
    name = check_name(expect(doc, "name", str, source, default_name, required=default_name is None))
    common = dict(name=name, resource_id=expect(doc, "resource_id", str, source, name),
                  state_dir=os.path.abspath(expect(doc, "state_dir", str, source, DEFAULT_STATE_DIR)),
                  source=source, tunnel=tunnel_table.parse(doc, source, name),
                  metrics=metrics_table.parse(doc, source), fencing=fencing_table.parse(doc, source))
    start_as = expect(doc, "start_as", str, source)
    if start_as is not None and start_as not in ROLES:
        raise ConfigError(f"{source}: 'start_as' must be \"primary\" or \"secondary\", got {start_as!r}")
    if "primary" in doc and "secondary" in doc:
        if start_as is None:
            raise ConfigError(f"{source}: both [primary] and [secondary]: say which role this host starts "
                              "in with start_as = \"primary\" or \"secondary\"")
        pri, sec = _primary(doc, common, source), _secondary(doc, common, source)
        if pri.disk != sec.disk:
            raise ConfigError(f"{source}: [primary] disk {pri.disk} and [secondary] disk {sec.disk} differ: "
                              "both roles of a host use the same disk")
        if pri.era_metadata in sec.hidden_stores:
            raise ConfigError(f"{source}: [primary] era_metadata is one of [secondary]'s hidden_stores")
        if (role or start_as) == "primary":
            return replace(pri, hello_listen=(sec.link_host, sec.link_port) if sec.link_host else None)
        return replace(sec, era_metadata=pri.era_metadata, era_block_sectors=pri.era_block_sectors)
    if start_as is not None:
        raise ConfigError(f"{source}: 'start_as' needs both [primary] and [secondary]")
    if "primary" in doc:
        return _primary(doc, common, source)
    if "secondary" not in doc:
        raise ConfigError(f"{source}: missing required key 'secondary' (or 'primary'): "
                          "which role this host plays")
    return _secondary(doc, common, source)


def parse_secondary(text: str, *, source: str, default_name: str | None = None) -> SecondaryConfig:
    cfg = parse(text, source=source, default_name=default_name, role="secondary")
    if not isinstance(cfg, SecondaryConfig):
        raise ConfigError(f"{source}: this is the primary's config ([primary]); "
                          "`dmrepl secondary` commands need a [secondary] section")
    return cfg


def _read(name: str | None, path: str | None) -> tuple[str, str, str]:
    if path is None:
        if name is None:
            raise ConfigError("give a resource name or --config PATH")
        path = default_path(name)
    try:
        with open(path, encoding="utf-8") as f:
            _check_writers(path, os.fstat(f.fileno()))
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file (create it, or pass --config PATH)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    return path, text, name or os.path.splitext(os.path.basename(path))[0]


def _check_writers(path: str, st: os.stat_result) -> None:
    """A config names the disks dmrepl overwrites: only root (or this process's user) may change it."""
    try:
        private.check_writers(path, st, "config")
    except private.NotPrivate as e:
        raise ConfigError(f"{e}: refused (it says which disks dmrepl overwrites); {e.hint}") from None


def tunnel_key_file(name: str | None = None, path: str | None = None) -> tuple[str, str]:
    """(resource name, [link] private_key_file) read before the rest of the config can be complete:
    `dmrepl keygen NAME --wireguard` runs before the other host's public key is known."""
    path, text, default_name = _read(name, path)
    doc = _toml(text, path)
    table = expect(doc, "link", dict, path, {})
    key_file = expect(table, "private_key_file", str, f"{path} [link]")
    if key_file is None:
        raise ConfigError(f"{path} [link]: no 'private_key_file': say where this host's WireGuard key goes, "
                          f"e.g. private_key_file = \"/etc/dmrepl/{name or default_name}.wg\"")
    return check_name(expect(doc, "name", str, path, default_name)), os.path.abspath(key_file)


def load(name: str | None = None, path: str | None = None, role: str | None = None
         ) -> SecondaryConfig | PrimaryConfig:
    """Read the config of resource `name` (from /etc/dmrepl/NAME.toml) or from `path`; with both
    sections, as `role` (None: the state file's role, else start_as)."""
    path, text, default_name = _read(name, path)
    cfg = parse(text, source=path, default_name=default_name, role=role)
    if role is None:
        held = role_of(cfg.resource_state_dir)
        if held is not None and held != cfg.role:
            cfg = parse(text, source=path, default_name=default_name, role=held)
    if name is not None and cfg.name != name:
        raise ConfigError(f"{path}: names resource {cfg.name!r}, not {name!r}")
    return cfg


def role_of(resource_state_dir: str) -> str | None:
    """The role the state file records: "primary" (from the start, or a failover finished), else
    "secondary" (standby or merging); None before the first start."""
    try:
        with open(os.path.join(resource_state_dir, "state.json"), encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return None
    return "primary" if raw.get("role") == "primary" else "secondary"


def load_secondary(name: str | None = None, path: str | None = None) -> SecondaryConfig:
    cfg = load(name, path, role="secondary")
    if not isinstance(cfg, SecondaryConfig):
        raise ConfigError(f"{cfg.source}: this is the primary's config ([primary]); "
                          "`dmrepl secondary` commands need a [secondary] section")
    return cfg
