"""`dmrepl secondary up|down|status|checkpoint|failover NAME`: the secondary's commands and their text."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

from dmrepl.cli.render import human_bytes, print_json, resource_parser, status_json, tunnel_line
from dmrepl.config import SecondaryConfig, default_path, load_secondary

if TYPE_CHECKING:
    from dmrepl.roles.secondary import Secondary, SecondaryStatus

# The daemon and the policy are imported by the functions that use them: `dmrepl --help` and every
# other command build this parser, and a Python start in the test VM pays for each module read.

HELPS = {"up": "build the stack from disk and start the NBD export",
         "down": "stop the export and remove the stack (refuses while active is open)",
         "status": "show role, checkpoint, store fill, merge progress",
         "checkpoint": "switch the hidden store: the active view becomes the disk's current data",
         "failover": "take over: fence the export, merge the hidden store, keep the active view"}


def add_parser(sub, run) -> None:
    sp = sub.add_parser("secondary", help="the secondary host's half of a resource")
    ssub = sp.add_subparsers(dest="action", metavar="ACTION")
    ssub.required = True
    for action, text in HELPS.items():
        a = resource_parser(ssub, action, text)
        if action == "down":
            a.add_argument("--force", action="store_true",
                           help="remove even while the active device is open (its users get I/O errors)")
        if action == "failover":
            a.add_argument("--no-wait", action="store_true", help="return after the switch; the merge goes on")
        a.set_defaults(func=run)


def command(args) -> int:
    from dmrepl.roles.secondary import Secondary

    cfg = load_secondary(args.name, args.config)
    config_path = args.config or default_path(args.name)
    if args.action == "up" and cfg.netns is not None:
        from dmrepl.kernel import netns

        netns.enter(cfg.netns)          # the daemon started here, with its export and link, lives there
    with Secondary.open(cfg) as sec:
        return ACTIONS[args.action](sec, cfg, config_path, args)


def _up(sec: Secondary, cfg: SecondaryConfig, config_path: str, args) -> int:
    from dmrepl.daemon import service

    res = service.up(sec, config_path)
    st = res["state"]
    out = {"name": cfg.name, "role": st.role, "checkpoint": st.checkpoint, "active": sec.active_path,
           "daemon_pid": res["daemon_pid"], "listen": f"{cfg.listen_host}:{cfg.listen_port}"}
    if args.json:
        print_json(out)
        return 0
    print(f"{cfg.name}: up as {st.role}, checkpoint {st.checkpoint}, active device {sec.active_path}")
    if res["daemon_pid"] and cfg.key_file is not None:
        print(f"{cfg.name}: NBD gate on {cfg.listen_host}:{cfg.listen_port}: admits only the primary that proves "
              f"the key on {cfg.link_host}:{cfg.link_port}, from that address (daemon pid {res['daemon_pid']})")
    elif res["daemon_pid"]:
        print(f"{cfg.name}: NBD export on {cfg.listen_host}:{cfg.listen_port} "
              f"(export name {cfg.resource_id!r}, daemon pid {res['daemon_pid']}); open to any host that "
              "reaches it: configure link_listen and key_file")
    if st.role == "merging":
        print(f"{cfg.name}: a merge was interrupted and goes on; "
              f"`dmrepl secondary failover {cfg.name}` waits for it")
    return 0


def _down(sec: Secondary, cfg: SecondaryConfig, config_path: str, args) -> int:
    from dmrepl.daemon import service

    done = service.down(sec, force=args.force)
    if args.json:
        print_json({"name": cfg.name, "removed": done})
    else:
        print(f"{cfg.name}: down ({', '.join(done) or 'nothing was up'})")
    return 0


def _checkpoint(sec: Secondary, cfg: SecondaryConfig, config_path: str, args) -> int:
    st, pause = sec.checkpoint()
    if args.json:
        print_json({"name": cfg.name, "checkpoint": st.checkpoint, "store": st.current_store,
                    "pause_ms": round(pause * 1000, 3)})
    else:
        print(f"{cfg.name}: checkpoint {st.checkpoint} (store {st.current_store}), pause {pause * 1000:.1f} ms")
    return 0


def _failover(sec: Secondary, cfg: SecondaryConfig, config_path: str, args) -> int:
    from dmrepl.daemon import service

    t0 = time.perf_counter()
    st = service.failover(sec)
    switch = time.perf_counter() - t0
    if not args.json:
        print(f"{cfg.name}: failed over from checkpoint {st.checkpoint} in {switch * 1000:.1f} ms; "
              f"{sec.active_path} now runs on the merged view")
    if args.no_wait:
        if args.json:
            print_json({"name": cfg.name, "role": st.role, "switch_ms": round(switch * 1000, 3)})
        return 0

    def show(p):
        if not args.json and sys.stderr.isatty():
            print(f"\rmerge: {p.fraction:6.1%}  {human_bytes(p.remaining_bytes)} left   ",
                  end="", file=sys.stderr, flush=True)

    t1 = time.perf_counter()
    st = sec.wait_merge(progress=show)
    merge = time.perf_counter() - t1
    if args.json:
        print_json({"name": cfg.name, "role": st.role, "switch_ms": round(switch * 1000, 3),
                    "merge_s": round(merge, 3)})
        return 0
    if sys.stderr.isatty():
        print(file=sys.stderr)
    print(f"{cfg.name}: merge complete in {merge:.2f} s; the origin is linear over the disk, role {st.role}")
    return 0


def warnings(s: SecondaryStatus, cfg: SecondaryConfig) -> list[str]:
    out = []
    for d in s.deferred:
        out.append(f"{d.describe()} (it fails all I/O meanwhile)")
    lost = (s.store is not None and s.store.lost) or (s.state is not None and s.state.checkpoint_lost)
    if lost:
        out.append("CHECKPOINT LOST: the kernel invalidated the hidden store; "
                   "the standby view is gone, a resync is needed")
    elif s.store is not None and s.store.over_threshold:
        out.append(f"hidden store {s.store.fill:.0%} full (warn at {cfg.store_fill_warn:.0%}): "
                   "early checkpoint requested")
    return out


def status_dict(s: SecondaryStatus, cfg: SecondaryConfig) -> dict:
    from dmrepl.daemon import tunnel
    from dmrepl.daemon.secondary_link import read_peer
    from dmrepl.daemon.supervisor import running_pid

    st = s.state
    out: dict = {"name": s.name, "resource_id": s.resource_id, "up": s.up, "role": st.role if st else None,
                 "devices": {d.part: {"name": d.name, "path": d.path, "dev": d.dev, "open_count": d.open_count,
                                      "suspended": d.suspended, "deferred_remove": d.deferred_remove,
                                      **({"link": d.link} if d.link else {})} for d in s.devices},
                 "deferred_removal": [{"name": d.name, "holders": [{"pid": p, "command": c} for p, c in d.holders]}
                                      for d in s.deferred],
                 "warnings": warnings(s, cfg), "daemon_pid": running_pid(cfg),
                 "listen": f"{cfg.listen_host}:{cfg.listen_port}", "primary": read_peer(cfg)}
    if cfg.tunnel is not None and out["daemon_pid"] is not None:   # the daemon makes it and removes it
        out["tunnel"] = tunnel.status(cfg)
    if st is not None:
        out.update(checkpoint=st.checkpoint, current_store=st.current_store, store_path=s.store_path,
                   checkpoint_lost=st.checkpoint_lost, early_checkpoint_requested=st.early_checkpoint_requested)
    if s.store is not None:
        out["store"] = {"state": s.store.state, "allocated_bytes": s.store.allocated_bytes,
                        "total_bytes": s.store.total_bytes, "fill": round(s.store.fill, 4),
                        "warn_at": cfg.store_fill_warn}
    if s.merge is not None:
        out["merge"] = {"remaining_bytes": s.merge.remaining_bytes, "total_bytes": s.merge.total_bytes,
                        "fraction": round(s.merge.fraction, 4), "done": s.merge.done}
    return out


def _status(sec: Secondary, cfg: SecondaryConfig, config_path: str, args) -> int:
    out = status_dict(sec.status(), cfg)
    if args.json:
        print_json(status_json("secondary", out))
        return 0
    print(f"resource {cfg.name} (id {cfg.resource_id}): {'up' if out['up'] else 'down'}, "
          f"role {out['role'] or 'never started'}")
    if out.get("role"):
        print(f"  checkpoint {out['checkpoint']}, current store {out['current_store']} ({out['store_path']})")
    for part, d in out["devices"].items():
        if d["deferred_remove"]:
            continue
        extra = f" -> {d['link']}" if d.get("link") else ""
        print(f"  {part:<7} {d['path']} ({d['dev']}) open {d['open_count']}"
              f"{' SUSPENDED' if d['suspended'] else ''}{extra}")
    if "store" in out:
        s_ = out["store"]
        if s_["state"] != "valid":
            # An invalidated snapshot reports no fill level (dm-snap.c: snapshot_status).
            print(f"  store   {s_['state'].upper()}: the kernel dropped the hidden store")
        else:
            print(f"  store   {s_['state']}, {human_bytes(s_['allocated_bytes'])} of "
                  f"{human_bytes(s_['total_bytes'])} ({s_['fill']:.1%}, warn at {s_['warn_at']:.0%})")
    if "merge" in out:
        m = out["merge"]
        print(f"  merge   {m['fraction']:.1%} done, {human_bytes(m['remaining_bytes'])} left")
    print(f"  export  {out['listen']}: " + (f"daemon pid {out['daemon_pid']}" if out["daemon_pid"] else "not running"))
    if out["primary"] is not None:
        pr = out["primary"]
        print(f"  primary {pr['peer']} {pr['primary'].upper() if pr['primary'] == 'lost' else pr['primary']}"
              f" since {time.strftime('%H:%M:%S', time.localtime(pr['since']))}: {pr['reason']}")
    if out.get("tunnel"):
        print(tunnel_line(out["tunnel"]))
    for w in out["warnings"]:
        print(f"  WARNING {w}")
    return 0


ACTIONS = {"up": _up, "down": _down, "status": _status, "checkpoint": _checkpoint, "failover": _failover}
