"""The [metrics] table: Prometheus metrics of the resource, off unless asked for (issue 8, point 4).

    [metrics]
    listen = "127.0.0.1:9650"     # an HTTP endpoint Prometheus scrapes (/metrics)
    textfile = "/var/lib/prometheus/node-exporter/dmrepl-vm1.prom"   # node-exporter's textfile collector
    textfile_interval_s = 15      # how often the textfile is rewritten (atomically)

Either key, or both.  The endpoint listens in the host's own network namespace, also when the
link's sockets live in another (the primary's `netns`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from dmrepl.config.fields import ConfigError, check_keys, expect, number, parse_address

DEFAULT_PORT = 9650

KEYS = frozenset({"listen", "textfile", "textfile_interval_s"})


@dataclass(frozen=True)
class Metrics:
    listen: tuple[str, int] | None
    textfile: str | None
    textfile_interval_s: float = 15.0


def parse(doc: dict, source: str) -> Metrics | None:
    table = expect(doc, "metrics", dict, source)
    if table is None:
        return None
    where = f"{source} [metrics]"
    check_keys(table, KEYS, where)
    listen = expect(table, "listen", str, where)
    textfile = expect(table, "textfile", str, where)
    if listen is None and textfile is None:
        raise ConfigError(f"{where}: say where the metrics go: 'listen' (an HTTP endpoint, e.g. "
                          f"\"127.0.0.1:{DEFAULT_PORT}\") or 'textfile' (node-exporter's textfile collector), or both")
    if textfile is not None and not textfile.endswith(".prom"):
        raise ConfigError(f"{where}: 'textfile' {textfile!r} must end in .prom (node-exporter reads only those)")
    interval = number(table, "textfile_interval_s", float, where, 15.0, 0.1, 3600.0)
    return Metrics(listen=parse_address(listen, where, "listen", DEFAULT_PORT) if listen else None,
                   textfile=os.path.abspath(textfile) if textfile else None, textfile_interval_s=interval)
