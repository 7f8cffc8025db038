"""`dmrepl demo --secondary-only`: a secondary end to end on loop-backed files, every byte checked.

A Python NBD client plays the primary: it writes through the secondary's NBD
export exactly as the primary's kernel NBD client will.  The steps follow
QEMU's replication tests (tests/unit/test-replication.c) with exact values.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import time

from dmrepl import inventory
from dmrepl.config import SecondaryConfig
from dmrepl.daemon import service
from dmrepl.daemon import supervisor as daemon
from dmrepl.demo import DemoFailure, check_bytes
from dmrepl.errors import DmreplError
from dmrepl.kernel import blockdev, loop
from dmrepl.nbd.client import NBDClient
from dmrepl.roles.secondary import Secondary

MiB = 1 << 20
DISK = 64 * MiB
STORE = 80 * MiB


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step(n: int, text: str) -> None:
    print(f"[{n:2}] {text}", flush=True)


def _nbd_write(client: NBDClient, off: int, length: int, value: int) -> float:
    t0 = time.perf_counter()
    block = bytes([value]) * (4 * MiB)
    for pos in range(off, off + length, len(block)):
        client.write(pos, block[:min(len(block), off + length - pos)])
    client.flush()
    dt = time.perf_counter() - t0
    return length / dt / 1e6


def _targets(sec: Secondary, part: str) -> str:
    return ",".join(next(d.targets for d in sec.status().devices if d.part == part))


def run(keep: bool = False) -> int:
    if not inventory.available():
        raise DmreplError("device-mapper is not available on this host",
                          "run the demo through the test VM: scripts/demo")
    work = tempfile.mkdtemp(prefix="dmrepl-demo-")
    name = "demo"
    cfg = SecondaryConfig(name=name, resource_id="demo-resource", disk=os.path.join(work, "disk.img"),
                          hidden_stores=(os.path.join(work, "h0.img"), os.path.join(work, "h1.img")),
                          listen_host="127.0.0.1", listen_port=_free_port(), chunk_sectors=8,
                          store_fill_warn=0.75, state_dir=os.path.join(work, "state"))
    config_path = os.path.join(work, f"{name}.toml")
    with open(config_path, "w") as f:
        f.write(f'name = "{name}"\nresource_id = "{cfg.resource_id}"\nstate_dir = "{cfg.state_dir}"\n\n'
                f'[secondary]\ndisk = "{cfg.disk}"\nhidden_stores = ["{cfg.hidden_stores[0]}", '
                f'"{cfg.hidden_stores[1]}"]\nlisten = "127.0.0.1:{cfg.listen_port}"\n')
    os.chmod(config_path, 0o600)                    # dmrepl refuses configs others can change
    t_start = time.perf_counter()
    opened = Secondary.open(cfg)
    sec = opened.__enter__()
    try:
        _step(1, f"secondary disk S: {DISK // MiB} MiB of 0x11; two hidden stores of {STORE // MiB} MiB ({work})")
        with open(cfg.disk, "wb") as f:
            f.write(b"\x11" * DISK)
        for store in cfg.hidden_stores:
            with open(store, "wb") as f:
                f.truncate(STORE)
        if os.path.exists(sec.active_path):
            raise DemoFailure(f"{sec.active_path} exists before up")

        _step(2, f"dmrepl secondary up {name}: origin, hidden, active + NBD export on 127.0.0.1:{cfg.listen_port}")
        t0 = time.perf_counter()
        service.up(sec, config_path)
        print(f"     up in {(time.perf_counter() - t0) * 1000:.0f} ms, daemon pid {daemon.running_pid(cfg)}")
        check_bytes(sec.active_path, [(0, DISK, 0x11)], "active after up")
        S = loop.find(cfg.disk)[0]

        _step(3, "primary (NBD client) writes 0x22 to [32M,64M) and flushes")
        with NBDClient.connect("127.0.0.1", cfg.listen_port, cfg.resource_id) as primary:
            print(f"     export: {primary.info.size_bytes // MiB} MiB, flush={primary.info.can_flush}, "
                  f"fua={primary.info.can_fua}")
            rate = _nbd_write(primary, 32 * MiB, 32 * MiB, 0x22)
            print(f"     primary write through NBD: {rate:.1f} MB/s")
            check_bytes(sec.active_path, [(0, DISK, 0x11)], "active keeps the checkpoint")
            check_bytes(S, [(0, 32 * MiB, 0x11), (32 * MiB, 32 * MiB, 0x22)], "S has the primary's data")

            _step(4, "consumer writes 0x33 to active [0,32M)")
            blockdev.write_at(sec.active_path, 0, b"\x33" * (32 * MiB))
            check_bytes(sec.active_path, [(0, 32 * MiB, 0x33), (32 * MiB, 32 * MiB, 0x11)], "active")
            check_bytes(S, [(0, 32 * MiB, 0x11)], "S untouched by the consumer")

            _step(5, "checkpoint 1")
            st, pause = sec.checkpoint()
            print(f"     checkpoint {st.checkpoint} on store {st.current_store}: pause {pause * 1000:.1f} ms")
            check_bytes(sec.active_path, [(0, 32 * MiB, 0x11), (32 * MiB, 32 * MiB, 0x22)],
                   "active equals S (consumer writes dropped)")

            _step(6, "after the checkpoint: primary writes 0x44 to [32M,48M), consumer writes 0x55 to [0,16M)")
            _nbd_write(primary, 32 * MiB, 16 * MiB, 0x44)
            blockdev.write_at(sec.active_path, 0, b"\x55" * (16 * MiB))
            view = [(0, 16 * MiB, 0x55), (16 * MiB, 16 * MiB, 0x11), (32 * MiB, 32 * MiB, 0x22)]
            check_bytes(sec.active_path, view, "active: checkpoint 1 + consumer writes")
            health = sec.store_health()
            print(f"     hidden store: {health.allocated_bytes / MiB:.1f} MiB of {health.total_bytes // MiB} MiB "
                  f"({health.fill:.1%})")

            _step(7, "failover: fence the export, merge the hidden store under active")
            fd = os.open(sec.active_path, os.O_RDONLY)  # a consumer holding the device open
            try:
                t0 = time.perf_counter()
                service.failover(sec)
                switch = time.perf_counter() - t0
                print(f"     switch took {switch * 1000:.1f} ms with {health.allocated_bytes / MiB:.1f} MiB to merge")
                if os.pread(fd, 4096, 0) != b"\x55" * 4096:
                    raise DemoFailure("the open active device changed across the failover")
            finally:
                os.close(fd)
            check_bytes(sec.active_path, view, "active unchanged across the switch (merge running)")
        try:
            NBDClient.connect("127.0.0.1", cfg.listen_port, cfg.resource_id, timeout=2).close()
            raise DemoFailure("the NBD export still accepts a primary after the failover")
        except OSError:
            print("     ok: the export is gone: the old primary can no longer write")

        _step(8, "wait for the merge")
        t0 = time.perf_counter()
        st = sec.wait_merge()
        print(f"     merge done in {time.perf_counter() - t0:.2f} s; role {st.role}; origin is "
              f"{_targets(sec, 'origin')} over S")
        check_bytes(S, view, "S after the merge: primary's post-checkpoint writes rolled back")
        check_bytes(sec.active_path, view, "active after the merge")

        _step(9, f"dmrepl secondary down {name}")
        removed = service.down(sec)
        left = [d.name for d in sec.status().devices]
        if left or loop.find(cfg.disk) or daemon.running_pid(cfg):
            raise DemoFailure(f"left behind: {left} {loop.find(cfg.disk)} {daemon.running_pid(cfg)}")
        print(f"     removed {len(removed)} devices; no dm device, loop device or process left")
        print(f"demo passed in {time.perf_counter() - t_start:.1f} s: every byte checked")
        return 0
    except BaseException:
        print("demo FAILED; cleaning up", file=sys.stderr)
        raise
    finally:
        try:
            daemon.stop(cfg)
            if sec.is_up() or loop.find(cfg.disk):
                sec.down(force=True)
        finally:
            opened.__exit__(None, None, None)
            if not keep:
                shutil.rmtree(work, ignore_errors=True)
