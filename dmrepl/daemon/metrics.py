"""Prometheus metrics of one resource ([metrics], config/metrics.py): an HTTP endpoint, a
node-exporter textfile, or both.

Values are read when scraped (or when the textfile is written) from what `status` reads -- the
daemon's state, the state file, the kernel's block statistics -- and never kept a second time;
checkpoint pauses are the one thing counted here (a histogram).  Every metric carries the label
`resource`; the list is in README.md ("Operating dmrepl").
"""

from __future__ import annotations

import http.server
import os
import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry, generate_latest, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from dmrepl.config.metrics import Metrics
from dmrepl.daemon.machine import State
from dmrepl.errors import DmreplError
from dmrepl.kernel import blockdev

BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class PauseHistogram:
    """Checkpoint pauses (seconds) in Prometheus' cumulative buckets."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = [0] * (len(BUCKETS_S) + 1)
        self._sum = 0.0

    def observe(self, seconds: float) -> None:
        i = next((i for i, b in enumerate(BUCKETS_S) if seconds <= b), len(BUCKETS_S))
        with self._lock:
            self._counts[i] += 1
            self._sum += seconds

    def family(self, resource: str) -> HistogramMetricFamily:
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, running = [], 0
        for bound, n in zip([*(repr(b) for b in BUCKETS_S), "+Inf"], counts):
            running += n
            cumulative.append((bound, running))
        h = HistogramMetricFamily("dmrepl_checkpoint_pause_seconds", "How long a checkpoint held writes back "
                                  "(primary: its whole checkpoint; secondary: its table switch)", labels=["resource"])
        h.add_metric([resource], cumulative, total)
        return h


def _gauge(name: str, text: str, resource: str, value: float, **labels: str) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, text, labels=["resource", *labels])
    g.add_metric([resource, *labels.values()], value)
    return g


def _one_of(name: str, text: str, resource: str, label: str, current: str, every) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, text, labels=["resource", label])
    for value in every:
        g.add_metric([resource, value], 1.0 if value == current else 0.0)
    return g


def _written(path: str | None) -> float | None:
    try:
        return float(blockdev.io_bytes(path)[1]) if path else None
    except OSError:
        return None


def primary_families(s: dict, pauses: PauseHistogram, now: float) -> list:
    """The primary's metrics from its `status` reply (daemon/primary.py: status_reply)."""
    r = s["name"]
    out = [_one_of("dmrepl_role", "The role this host plays (1: the current one)", r, "role", "primary",
                   ("primary", "secondary")),
           _one_of("dmrepl_state", "The primary's replication state (1: the current one)", r, "state", s["state"],
                   [str(st) for st in State]),
           _gauge("dmrepl_link_up", "1 while every write reaches the secondary (replicating or resyncing)", r,
                  1.0 if s["state"] in (State.REPLICATING, State.RESYNCING) else 0.0)]
    if s.get("checkpoint") is not None:
        out.append(_gauge("dmrepl_checkpoint", "The newest checkpoint's number", r, s["checkpoint"]))
    last = s.get("last_checkpoint") or {}
    if last.get("time"):
        out.append(_gauge("dmrepl_checkpoint_age_seconds", "Time since the newest checkpoint", r, now - last["time"]))
    top = (s.get("devices") or {}).get("top")
    for name, text, path in (
            ("dmrepl_written_bytes", "Bytes the consumer wrote to the replicated device since it was built",
             top["path"] if top else None),
            ("dmrepl_replicated_bytes", "Bytes written to the secondary over NBD (writes and resync copies) "
             "since the NBD device was attached", s.get("nbd"))):
        written = _written(path)
        if written is not None:         # no device, or no statistics: no counter rather than a wrong one
            c = CounterMetricFamily(name, text, labels=["resource"])
            c.add_metric([r], written)
            out.append(c)
    resync = s.get("resync")
    out.append(_gauge("dmrepl_resync_active", "1 while a resync compares or copies", r, 1.0 if resync else 0.0))
    shown = resync or s.get("last_resync") or None
    if shown:
        g = GaugeMetricFamily("dmrepl_resync_bytes", "The current (else the last) resync's bytes, by kind",
                              labels=["resource", "kind"])
        for kind in ("candidate", "compared", "differing", "copy", "copied", "digest", "sent"):
            g.add_metric([r, kind], float(shown.get(f"{kind}_bytes", 0)))
        out.append(g)
        out.append(_gauge("dmrepl_resync_progress_ratio", "The current (else the last) resync's progress, 0 to 1: "
                          "comparing up to 0.5, copying from 0.5", r, resync_progress(shown)))
    out.append(_gauge("dmrepl_verify_active", "1 while a verify compares P and S", r, 1.0 if s.get("verify") else 0.0))
    last = s.get("last_verify") or {}
    if last:
        out.append(_gauge("dmrepl_verify_differing_bytes", "Bytes the last verify found differing between P and S", r,
                          float(last["differing_bytes"])))
        out.append(_gauge("dmrepl_verify_last_end_timestamp_seconds", "When the last verify ended (Unix time)", r,
                          float(last["finished"])))
        out.append(_gauge("dmrepl_verify_last_seconds", "How long the last verify took", r, float(last["seconds"])))
    fencing = s.get("fencing")
    if fencing:
        out.append(_gauge("dmrepl_peer_outdated", "1 while the other host is marked outdated ([fencing]: "
                          "outdated, or clearing or failing to clear the mark)", r,
                          0.0 if fencing["state"] in ("none", "cleared", "outdating", "outdate failed") else 1.0))
        out.append(_gauge("dmrepl_fencing_failing", "1 while [fencing]'s last run failed (it is retried)", r,
                          1.0 if fencing["state"].endswith("failed") else 0.0))
    out.append(pauses.family(r))
    return out


def resync_progress(r: dict) -> float:
    """Comparing counts for the first half, copying for the second; an interrupted resync stays
    where it stopped."""
    if r["phase"] == "copied":
        return 1.0
    if r["phase"] == "copying" or r["copy_bytes"]:
        return 0.5 + 0.5 * r["copied_bytes"] / r["copy_bytes"] if r["copy_bytes"] else 1.0
    return 0.5 * r["compared_bytes"] / r["candidate_bytes"] if r["candidate_bytes"] else 0.0


def secondary_families(name: str, status, peer: dict | None, pauses: PauseHistogram, now: float) -> list:
    """The secondary's metrics from its policy's status (roles/secondary: SecondaryStatus) and the
    link's record of the primary (daemon/secondary_link.py: read_peer)."""
    st = status.state
    out = [_one_of("dmrepl_role", "The role this host plays (1: the current one)", name, "role",
                   "secondary" if st is None or st.role == "secondary" else "primary", ("primary", "secondary")),
           _gauge("dmrepl_link_up", "1 while the primary is connected", name,
                  1.0 if peer and peer["primary"] == "connected" else 0.0)]
    if st is not None:
        out.append(_gauge("dmrepl_checkpoint", "The newest checkpoint's number", name, st.checkpoint))
        times = [h["time"] for h in st.history if "checkpoint" in h and "time" in h]
        if times:
            out.append(_gauge("dmrepl_checkpoint_age_seconds", "Time since the newest checkpoint", name,
                              now - times[-1]))
    if status.store is not None:
        out.append(_gauge("dmrepl_store_fill_ratio", "How full the hidden store is, 0 to 1", name, status.store.fill))
        out.append(_gauge("dmrepl_store_allocated_bytes", "Bytes the hidden store holds", name,
                          status.store.allocated_bytes))
    if status.merge is not None:
        out.append(_gauge("dmrepl_merge_progress_ratio", "A failover's merge of the hidden store, 0 to 1", name,
                          status.merge.fraction))
    out.append(pauses.family(name))
    return out


class _Collector:
    def __init__(self, resource: str, families: Callable[[], list]):
        self.resource, self.families = resource, families

    def collect(self):
        try:
            fams = self.families()
            error = 0.0
        except Exception:   # noqa: BLE001 -- a scrape says it failed, it never takes the daemon down
            fams, error = [], 1.0
        yield from fams
        yield _gauge("dmrepl_metrics_error", "1 if this scrape could not read the resource's state",
                     self.resource, error)


class Exporter:
    """The endpoint and the textfile of one resource's metrics, each on a thread of its own."""

    def __init__(self, cfg: Metrics, resource: str, log: Callable[[str], None]):
        self.cfg, self.resource, self.log = cfg, resource, log
        self.families: Callable[[], list] = lambda: []
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(resource, lambda: self.families()))
        self.server: http.server.ThreadingHTTPServer | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Listen now (in the calling thread's network namespace: call before entering the link's)."""
        if self.cfg.listen is not None:
            registry = self.registry

            class Handler(http.server.BaseHTTPRequestHandler):
                def do_GET(self):
                    if self.path.split("?")[0] not in ("/metrics", "/"):
                        self.send_error(404, "try /metrics")
                        return
                    body = generate_latest(registry)
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

                def log_message(self, *args):
                    pass

            host, port = self.cfg.listen
            try:
                self.server = http.server.ThreadingHTTPServer((host, port), Handler)
            except OSError as e:
                raise DmreplError(f"metrics: cannot listen on {host}:{port}: {e.strerror}",
                                  "another process has that port, or the address is not this host's: "
                                  "change [metrics] listen") from None
            self.server.daemon_threads = True
            self._spawn(self.server.serve_forever, "metrics-http")
            self.log(f"metrics: http://{host}:{port}/metrics")
        if self.cfg.textfile is not None:
            self._spawn(self._write_textfile, "metrics-textfile")

    def _spawn(self, target, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _write_textfile(self) -> None:
        warned = False
        while not self._stop.is_set():
            try:
                write_to_textfile(self.cfg.textfile, self.registry)   # a temp file renamed over it
                warned = False
            except OSError as e:
                if not warned:
                    self.log(f"metrics: cannot write {self.cfg.textfile}: {e}")
                    warned = True
            self._stop.wait(self.cfg.textfile_interval_s)

    def close(self) -> None:
        """Stop both; the textfile goes (a stopped resource has no metrics, not stale ones)."""
        self._stop.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        for t in self._threads:
            t.join(timeout=5)
        if self.cfg.textfile is not None:
            try:
                os.unlink(self.cfg.textfile)
            except FileNotFoundError:
                pass
