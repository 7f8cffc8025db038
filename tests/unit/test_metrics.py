"""Prometheus metrics: the [metrics] table, the families built from a status, the endpoint and the
textfile (dmrepl/daemon/metrics.py; unit tier: no kernel, the block statistics are absent here)."""

import socket
import time
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dmrepl.config import ConfigError, parse
from dmrepl.config.metrics import Metrics
from dmrepl.daemon import metrics
from dmrepl.errors import DmreplError

SECONDARY = '[secondary]\ndisk = "/d"\nhidden_stores = ["/a", "/b"]\n'


def samples(families) -> dict:
    """{(name, frozenset(labels)): value} of what a scrape would show."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(type("C", (), {"collect": lambda self: iter(families)})())
    text = generate_latest(reg).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_the_metrics_table():
    cfg = parse(SECONDARY + '[metrics]\nlisten = "127.0.0.1:9650"\ntextfile = "/var/lib/node/dmrepl.prom"\n',
                source="vm1.toml", default_name="vm1")
    assert cfg.metrics == Metrics(("127.0.0.1", 9650), "/var/lib/node/dmrepl.prom", 15.0)
    assert parse(SECONDARY, source="vm1.toml", default_name="vm1").metrics is None


@pytest.mark.parametrize("table,message", [
    ("", "say where the metrics go"),
    ('textfile = "/var/lib/node/dmrepl.txt"\n', "must end in .prom"),
    ('listen = "localhost:9650"\n', "expected IP:PORT"),
    ('listen = "127.0.0.1:9650"\ntextfile_interval_s = 0\n', "'textfile_interval_s' must be from 0.1 to 3600"),
    ('listen = "127.0.0.1:9650"\nlsiten = "x"\n', "unknown key 'lsiten'"),
])
def test_metrics_table_mistakes(table, message):
    with pytest.raises(ConfigError) as e:
        parse(SECONDARY + "[metrics]\n" + table, source="vm1.toml", default_name="vm1")
    assert message in str(e.value) and "vm1.toml [metrics]" in str(e.value)


def test_pauses_fall_in_cumulative_buckets():
    h = metrics.PauseHistogram()
    for s in (0.0004, 0.002, 0.002, 0.3, 7.0):
        h.observe(s)
    got = samples([h.family("vm1")])
    bucket = {dict(k)["le"]: v for (n, k), v in got.items() if n == "dmrepl_checkpoint_pause_seconds_bucket"}
    assert (bucket["0.001"], bucket["0.0025"], bucket["0.25"], bucket["0.5"], bucket["2.5"], bucket["+Inf"]) == (
        1, 3, 3, 4, 4, 5)
    assert got[("dmrepl_checkpoint_pause_seconds_count", frozenset({("resource", "vm1")}))] == 5
    assert got[("dmrepl_checkpoint_pause_seconds_sum", frozenset({("resource", "vm1")}))] == pytest.approx(7.3044)


RESYNC = {"phase": "copying", "since": "checkpoint 4", "candidate_bytes": 1 << 20, "compared_bytes": 1 << 20,
          "differing_bytes": 65536, "copy_bytes": 65536, "copied_bytes": 16384, "digest_bytes": 2048,
          "sent_bytes": 67584}


def test_the_primarys_families_from_its_status():
    status = {"name": "vm1", "state": "resyncing", "checkpoint": 4, "last_checkpoint": {"time": 1000.0},
              "devices": {}, "nbd": None, "resync": RESYNC, "last_resync": {}, "verify": None,
              "last_verify": {"differing_bytes": 8192, "finished": 990.0, "seconds": 4.5}}
    got = samples(metrics.primary_families(status, metrics.PauseHistogram(), now=1012.5))
    r = ("resource", "vm1")
    assert got[("dmrepl_state", frozenset({r, ("state", "resyncing")}))] == 1
    assert got[("dmrepl_state", frozenset({r, ("state", "degraded")}))] == 0
    assert got[("dmrepl_role", frozenset({r, ("role", "primary")}))] == 1
    assert got[("dmrepl_link_up", frozenset({r}))] == 1
    assert got[("dmrepl_checkpoint", frozenset({r}))] == 4
    assert got[("dmrepl_checkpoint_age_seconds", frozenset({r}))] == 12.5
    assert got[("dmrepl_resync_active", frozenset({r}))] == 1
    assert got[("dmrepl_resync_bytes", frozenset({r, ("kind", "sent")}))] == 67584
    assert got[("dmrepl_resync_progress_ratio", frozenset({r}))] == 0.625
    assert (got[("dmrepl_verify_active", frozenset({r}))], got[("dmrepl_verify_differing_bytes", frozenset({r}))],
            got[("dmrepl_verify_last_end_timestamp_seconds", frozenset({r}))],
            got[("dmrepl_verify_last_seconds", frozenset({r}))]) == (0, 8192, 990.0, 4.5)
    # No block statistics here (no such device): no byte counters rather than wrong ones.
    assert not [k for k in got if k[0].startswith(("dmrepl_written", "dmrepl_replicated"))]
    assert not [k for k in got if k[0] in ("dmrepl_peer_outdated", "dmrepl_fencing_failing")]  # no [fencing]


@pytest.mark.parametrize("state,outdated,failing", [
    ("none", 0, 0), ("outdating", 0, 0), ("outdated", 1, 0), ("outdate failed", 0, 1), ("clearing", 1, 0),
    ("clear failed", 1, 1), ("cleared", 0, 0)])
def test_the_fencing_gauges(state, outdated, failing):
    status = {"name": "vm1", "state": "degraded", "checkpoint": 4, "devices": {}, "nbd": None, "resync": None,
              "fencing": {"command": "/usr/lib/dmrepl/crm-fencing", "state": state, "checkpoint": 5}}
    got = samples(metrics.primary_families(status, metrics.PauseHistogram(), now=0))
    r = frozenset({("resource", "vm1")})
    assert (got[("dmrepl_peer_outdated", r)], got[("dmrepl_fencing_failing", r)]) == (outdated, failing)


@pytest.mark.parametrize("phase,compared,copy,copied,want", [
    ("comparing", 1 << 19, 0, 0, 0.25), ("copying", 1 << 20, 65536, 0, 0.5), ("copied", 1 << 20, 65536, 65536, 1.0),
    ("interrupted", 1 << 18, 0, 0, 0.125), ("interrupted", 1 << 20, 65536, 32768, 0.75),
    ("copied", 1 << 20, 0, 0, 1.0)])
def test_resync_progress(phase, compared, copy, copied, want):
    r = {**RESYNC, "phase": phase, "compared_bytes": compared, "copy_bytes": copy, "copied_bytes": copied}
    assert metrics.resync_progress(r) == want


def test_the_endpoint_and_the_textfile(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    textfile = tmp_path / "dmrepl-vm1.prom"
    logged = []
    ex = metrics.Exporter(Metrics(("127.0.0.1", port), str(textfile), 0.1), "vm1", logged.append)
    h = metrics.PauseHistogram()
    h.observe(0.002)
    ex.families = lambda: [h.family("vm1")]
    ex.start()
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert 'dmrepl_checkpoint_pause_seconds_count{resource="vm1"} 1.0' in body
        assert 'dmrepl_metrics_error{resource="vm1"} 0.0' in body
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=10)
        for _ in range(100):
            if textfile.exists():
                break
            time.sleep(0.05)
        assert 'dmrepl_checkpoint_pause_seconds_count{resource="vm1"} 1.0' in textfile.read_text()

        def broken():
            raise OSError("the state file is gone")
        ex.families = broken
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert 'dmrepl_metrics_error{resource="vm1"} 1.0' in body
        # A second exporter on the same port: a clear error, not a traceback.
        with pytest.raises(DmreplError) as e:
            metrics.Exporter(Metrics(("127.0.0.1", port), None), "vm2", logged.append).start()
        assert f"cannot listen on 127.0.0.1:{port}" in str(e.value) and "[metrics] listen" in e.value.hint
    finally:
        ex.close()
    assert not textfile.exists()               # a stopped resource has no metrics, not stale ones
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    assert logged == [f"metrics: http://127.0.0.1:{port}/metrics"]
