"""The config's field parsers: each names the file, the table and the key in its error."""

from __future__ import annotations

import ipaddress
import os
import re

DEFAULT_PORT = 10809

# dm names are dmrepl-NAME-origin etc. (at most 127 bytes, no '/'); udev rules
# and paths take NAME as it is, so NAME is kept to a plain, portable set.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file and the key."""


def parse_address(value: str, where: str, what: str = "listen", default_port: int = DEFAULT_PORT
                   ) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = value, str(default_port)
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{where}: {what} address {value!r}: expected IP:PORT, "
                          f"e.g. 127.0.0.1:{default_port}") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{where}: {what} port {port!r} must be 1-65535")
    return host, int(port)


def parse_listen(value: str, where: str) -> tuple[str, int]:
    return parse_address(value, where)


def expect(table: dict, key: str, kind, where: str, default=None, required: bool = False):
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


def check_keys(table: dict, known: set[str], where: str) -> None:
    for key in table:
        if key not in known:
            raise ConfigError(f"{where}: unknown key '{key}' (known: {', '.join(sorted(known))})")


def chunk_sectors(table: dict, where: str) -> int:
    chunk_kib = expect(table, "chunk_kib", int, where, 4)
    if chunk_kib < 4 or chunk_kib > 512 or chunk_kib & (chunk_kib - 1):
        raise ConfigError(f"{where}: 'chunk_kib' must be a power of two from 4 to 512, got {chunk_kib}")
    return chunk_kib * 2


def number(table: dict, key: str, kind, where: str, default, low, high):
    value = expect(table, key, kind, where, default)
    if not low <= value <= high:
        raise ConfigError(f"{where}: '{key}' must be from {low} to {high}, got {value}")
    return value


def distinct(paths: list[str], where: str, what: str) -> list[str]:
    out = [os.path.abspath(p) for p in paths]
    if len(set(out)) != len(out):
        raise ConfigError(f"{where}: {what} must be different paths")
    return out
