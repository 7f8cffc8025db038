"""Turning the policy's values into JSON and sentences; the arguments every resource command takes."""

from __future__ import annotations

import dataclasses
import enum
import json
import sys


def jsonable(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def print_json(obj) -> None:
    json.dump(jsonable(obj), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


STATUS_SCHEMA_VERSION = 1      # docs/status-schema.json


def status_json(stack: str, status: dict) -> dict:
    """`status --json`: the schema's version and which stack reports (docs/status-schema.json)."""
    return {"schema_version": STATUS_SCHEMA_VERSION, "stack": stack, **status}


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


def tunnel_line(t: dict) -> str:
    """The status line of a WireGuard tunnel (daemon.tunnel.status), for either role."""
    if not t["up"]:
        return f"  tunnel  WireGuard {t['interface']}: MISSING (the link cannot run)"
    shake = ("no handshake yet" if t["last_handshake_s"] is None
             else f"last handshake {t['last_handshake_s']:.0f} s ago")
    return (f"  tunnel  WireGuard {t['interface']}: {t['address']} <-> {t['peer_address']} via {t['peer_endpoint']}, "
            f"{shake}, {t['tx_bytes'] >> 10} KiB sent, {t['rx_bytes'] >> 10} KiB received")


def resource_parser(sub, action: str, text: str):
    """A subcommand on one resource: NAME, --config, --json."""
    a = sub.add_parser(action, help=text)
    a.add_argument("name", metavar="NAME", help="resource name (config /etc/dmrepl/NAME.toml)")
    a.add_argument("--config", metavar="PATH", help="config file instead of /etc/dmrepl/NAME.toml")
    a.add_argument("--json", action="store_true", help="machine-readable output")
    return a
