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


RATE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
MIN_RATE = 64 << 10       # bytes a second: less would take a day for 5 GiB


def parse_rate(value) -> int:
    """Bytes a second from an integer or a string with a binary unit ("200M" = 200 MiB/s; K, M,
    G; an optional "/s"); ValueError with what is wrong."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"a rate is a number of bytes a second or a string such as \"200M\", got {value!r}")
    text = str(value).strip().upper().removesuffix("/S").removesuffix("IB").removesuffix("B")
    unit = text[-1:] if text[-1:] in RATE_UNITS else ""
    digits = text[:len(text) - len(unit)]
    if not digits.isdigit():
        raise ValueError(f"not a rate: {value!r} (bytes a second, or with K, M or G: \"200M\")")
    rate = int(digits) * RATE_UNITS[unit]
    if rate < MIN_RATE:
        raise ValueError(f"a rate must be at least 64K (bytes a second), got {value!r}")
    return rate


def rate(table: dict, key: str, where: str, default: int | None) -> int | None:
    """An optional rate key (parse_rate); `default` when absent."""
    if key not in table:
        return default
    try:
        return parse_rate(table[key])
    except ValueError as e:
        raise ConfigError(f"{where}: '{key}': {e}") from None
