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

Unknown keys and wrong types are errors that name the file and the key.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass

CONFIG_DIR = "/etc/dmrepl"
DEFAULT_STATE_DIR = "/var/lib/dmrepl"
DEFAULT_PORT = 10809

# dm names are dmrepl-NAME-origin etc. (at most 127 bytes, no '/'); udev rules
# and paths take NAME as it is, so NAME is kept to a plain, portable set.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file and the key."""


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

    @property
    def resource_state_dir(self) -> str:
        return os.path.join(self.state_dir, self.name)


def default_path(name: str) -> str:
    return os.path.join(CONFIG_DIR, f"{check_name(name)}.toml")


def _parse_listen(value: str, where: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = value, str(DEFAULT_PORT)
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{where}: listen address {value!r}: expected IP:PORT, e.g. 127.0.0.1:10809") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{where}: listen port {port!r} must be 1-65535")
    return host, int(port)


def _expect(table: dict, key: str, kind, where: str, default=None, required: bool = False):
    if key not in table:
        if required:
            raise ConfigError(f"{where}: missing required key '{key}'")
        return default
    value = table[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{where}: key '{key}' must be {kind.__name__}, got {type(value).__name__}")
    return value


def parse_secondary(text: str, *, source: str, default_name: str | None = None) -> SecondaryConfig:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    top_keys = {"name", "resource_id", "state_dir", "secondary"}
    if "primary" in doc:
        # Accepted once the primary role exists; until then a [primary] section
        # would be a configuration that silently does nothing.
        raise ConfigError(f"{source}: section [primary]: this dmrepl has only the secondary's half; "
                          "remove the section (the primary role is not implemented yet)")
    for key in doc:
        if key not in top_keys:
            raise ConfigError(f"{source}: unknown key '{key}' (known: {', '.join(sorted(top_keys))})")
    name = check_name(_expect(doc, "name", str, source, default_name, required=default_name is None))
    resource_id = _expect(doc, "resource_id", str, source, name)
    state_dir = _expect(doc, "state_dir", str, source, DEFAULT_STATE_DIR)
    sec = _expect(doc, "secondary", dict, source, required=True)
    where = f"{source} [secondary]"
    sec_keys = {"disk", "hidden_stores", "listen", "chunk_kib", "store_fill_warn"}
    for key in sec:
        if key not in sec_keys:
            raise ConfigError(f"{where}: unknown key '{key}' (known: {', '.join(sorted(sec_keys))})")
    disk = _expect(sec, "disk", str, where, required=True)
    stores = _expect(sec, "hidden_stores", list, where, required=True)
    if len(stores) != 2 or not all(isinstance(s, str) and s for s in stores):
        raise ConfigError(f"{where}: 'hidden_stores' must list exactly two paths")
    host, port = _parse_listen(_expect(sec, "listen", str, where, f"127.0.0.1:{DEFAULT_PORT}"), where)
    chunk_kib = _expect(sec, "chunk_kib", int, where, 4)
    if chunk_kib < 4 or chunk_kib > 512 or chunk_kib & (chunk_kib - 1):
        raise ConfigError(f"{where}: 'chunk_kib' must be a power of two from 4 to 512, got {chunk_kib}")
    fill = _expect(sec, "store_fill_warn", float, where, 0.75)
    if not 0.0 < fill < 1.0:
        raise ConfigError(f"{where}: 'store_fill_warn' must be between 0 and 1, got {fill}")
    paths = [os.path.abspath(p) for p in (disk, *stores)]
    if len(set(paths)) != 3:
        raise ConfigError(f"{where}: the disk and the two hidden stores must be three different paths")
    return SecondaryConfig(name=name, resource_id=resource_id, disk=paths[0],
                           hidden_stores=(paths[1], paths[2]), listen_host=host, listen_port=port,
                           chunk_sectors=chunk_kib * 2, store_fill_warn=fill,
                           state_dir=os.path.abspath(state_dir), source=source)


def load_secondary(name: str | None = None, path: str | None = None) -> SecondaryConfig:
    """Read the config of resource `name` (from /etc/dmrepl/NAME.toml) or from `path`."""
    if path is None:
        if name is None:
            raise ConfigError("give a resource name or --config PATH")
        path = default_path(name)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file (create it, or pass --config PATH)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    default_name = name or os.path.splitext(os.path.basename(path))[0]
    cfg = parse_secondary(text, source=path, default_name=default_name)
    if name is not None and cfg.name != name:
        raise ConfigError(f"{path}: names resource {cfg.name!r}, not {name!r}")
    return cfg
