"""`dmrepl up|down|status|checkpoint|failover|verify|wait|resolve NAME`: one set of commands for either role.

The config's section says the role (with both sections: the state file's role).  On the primary, `up` is the daemon in
the foreground (systemd's ExecStart) and the other commands talk to it over
its control socket; on the secondary, `up` builds the stack and then runs
the secondary's daemon in the same process, and the other
commands act through the secondary's policy as `dmrepl secondary ...` does.
"""

from __future__ import annotations

import os
import sys
import time

from dmrepl import poll
from dmrepl.cli.render import print_json, resource_parser, status_json, tunnel_line
from dmrepl.config import PrimaryConfig, load
from dmrepl.daemon import control
from dmrepl.errors import DmreplError

HELPS = {"up": "start this host's role for NAME (foreground daemon; systemd runs it)",
         "down": "stop the daemon and remove the stack (refuses while the consumer has it open)",
         "status": "role, replication state and its reason, checkpoint, devices",
         "checkpoint": "take a checkpoint now (on the primary: on both hosts)",
         "failover": "on the secondary: fence the primary and take over at the last checkpoint",
         "verify": "on the primary: compare P and S by digests (only digests travel); exit 1 if they differ",
         "wait": "on the primary: wait until it replicates (an initial sync or a resync done), with a progress "
                 "bar on a terminal; exit 1 at --timeout",
         "tune": "on the primary: change the copies' rate limits (initial sync, resync), also for the one "
                 "running, until the daemon's next start",
         "switchover": "on the primary: move the primary's role to the secondary (no write lost, no resync); "
                       "this host becomes its secondary. The consumer stops first",
         "resize": "on the primary, once both disks have grown to the same size: the replicated device grows "
                   "online on both hosts (the new range is compared and copied by a resync)",
         "resolve": "give up this host's writes since the last shared checkpoint and follow the other host "
                    "as its secondary (failback, split brain); needs --discard-my-data"}


def rate_arg(text: str) -> int:
    from argparse import ArgumentTypeError

    from dmrepl.config.fields import parse_rate
    try:
        return parse_rate(text)
    except ValueError as e:
        raise ArgumentTypeError(str(e)) from None


def rate_arg_or_zero(text: str) -> int:
    return 0 if text.strip() == "0" else rate_arg(text)


def add_parsers(sub, run) -> None:
    for action, text in HELPS.items():
        a = resource_parser(sub, action, text)
        if action == "up":
            a.add_argument("--assume-clean", action="store_true",
                           help="primary, first start: the disks are known equal, skip the initial copy")
            a.add_argument("--detach", action="store_true",
                           help="run the daemon in the background (log: STATE_DIR/NAME/daemon.log) and return "
                                "once it is ready, as systemd would see it; for callers without systemd")
            a.add_argument("--timeout", type=float, default=300.0, metavar="S",
                           help="with --detach: how long to wait for the daemon to be ready (an initial sync "
                                "extends it while it progresses; default 300)")
        if action == "down":
            a.add_argument("--force", action="store_true",
                           help="secondary: remove even while the active device is open")
        if action == "failover":
            a.add_argument("--no-wait", action="store_true", help="return after the switch; the merge goes on")
        if action == "wait":
            a.add_argument("--timeout", type=float, default=None, metavar="S",
                           help="give up after S seconds (exit 1, saying what runs); default: no limit")
        if action == "verify":
            a.add_argument("--repair", action="store_true", help="copy the differing pieces from P to S")
            a.add_argument("--rate", type=rate_arg, default=None, metavar="RATE",
                           help="read at most RATE bytes a second on each host (K, M, G: 200M = 200 MiB/s); "
                                "default: as fast as the disks go")
        if action == "tune":
            a.add_argument("--resync-max", type=rate_arg_or_zero, default=None, metavar="RATE",
                           help="a copy takes at most RATE bytes a second, less what the consumer writes "
                                "(K, M, G: 200M); 0: no limit")
            a.add_argument("--resync-min", type=rate_arg_or_zero, default=None, metavar="RATE",
                           help="... but at least RATE, whatever the consumer writes")
            a.add_argument("--resync-share", type=float, default=None, metavar="F",
                           help="... and while the consumer writes, at most this share (0.01 to 1) of --resync-max")
        if action == "switchover":
            a.add_argument("--no-wait", action="store_true",
                           help="return once the other host took over; do not wait for it to replicate back "
                                "to this one")
            a.add_argument("--timeout", type=float, default=300.0, metavar="S",
                           help="how long to wait for the new primary to replicate to this host (default 300)")
        if action == "resize":
            a.add_argument("--no-wait", action="store_true",
                           help="return once both stacks have grown; do not wait for the resync of the new range")
            a.add_argument("--timeout", type=float, default=None, metavar="S",
                           help="give up waiting for the resync after S seconds (exit 1); default: no limit")
        if action == "resolve":
            a.add_argument("--discard-my-data", action="store_true",
                           help="this host's writes since the last shared checkpoint are overwritten by the peer's")
        a.set_defaults(func=run, action=action)


def command(args) -> int:
    from dmrepl.daemon import handover

    status = _command(args)
    while args.action == "up" and status == handover.HANDOVER:
        args.assume_clean = False       # a role change: a resync decides what the disks hold
        status = _command(args)         # the state file says the new role
    return status


def _command(args) -> int:
    cfg = load(args.name, args.config)
    if args.action == "resolve":
        return _resolve(args)
    if args.action == "up" and args.detach:
        return _detach(cfg, args)
    if args.action == "failover":
        from dmrepl.config.fencing import check_runnable

        why = check_runnable(cfg.fencing)       # before anything moves: the primary it leads to runs it
        if why is not None:
            raise DmreplError(f"{cfg.source}: {why}: the primary this failover leads to could not start",
                              "install the command or fix [fencing] in the config, then fail over")
    if isinstance(cfg, PrimaryConfig) and _took_over_here(cfg):
        if args.action == "up":
            raise DmreplError(f"{cfg.name} took over on this host (failover) and runs on the secondary's stack "
                              "(its consumer opens dmrepl-NAME-active)".replace("NAME", cfg.name),
                              f"to replicate back: the old primary runs `dmrepl resolve {cfg.name} --discard-my-data`"
                              f" and `dmrepl up {cfg.name}`; here stop the consumer, `dmrepl down {cfg.name}`, "
                              f"`dmrepl up {cfg.name}` (the consumer then opens /dev/mapper/dmrepl-{cfg.name})")
        return _secondary(load(args.name, args.config, role="secondary"), args)
    if isinstance(cfg, PrimaryConfig):
        return PRIMARY[args.action](cfg, args)
    return _secondary(cfg, args)


def _detach(cfg, args) -> int:
    from dmrepl import private
    from dmrepl.daemon import detach, pids

    if args.timeout <= 0:
        raise DmreplError(f"--timeout must be more than 0 seconds, got {args.timeout:g}")
    private.ensure_dir(cfg.resource_state_dir)
    config = os.path.abspath(args.config) if args.config else None
    argv = [sys.executable, "-m", "dmrepl.cli", "up", cfg.name, *(["--config", config] if config else []),
            *(["--assume-clean"] if args.assume_clean else [])]
    log_path = pids.log_path(cfg)
    pid, status = detach.start(argv, log_path, args.timeout)
    if args.json:
        print_json({"name": cfg.name, "pid": pid, "status": status, "log": log_path})
    else:
        print(f"{cfg.name}: up in the background (pid {pid}): {status}; log {log_path}")
    return 0


def _took_over_here(cfg: PrimaryConfig) -> bool:
    from dmrepl.kernel import dm
    from dmrepl.roles.secondary.failover import runs_taken_over

    with dm.Control() as ctl:
        return runs_taken_over(cfg.name, cfg.disk, cfg.resource_state_dir, ctl)


def _resolve(args) -> int:
    from dmrepl.kernel import dm
    from dmrepl.roles.secondary.resolve import discard_my_data

    if not args.discard_my_data:
        raise DmreplError("resolve gives up this host's writes since the last checkpoint both hosts shared",
                          f"say so: `dmrepl resolve {args.name} --discard-my-data` (on the host whose writes go)")
    cfg = load(args.name, args.config, role="secondary")
    with dm.Control() as ctl:
        st = discard_my_data(cfg, ctl)
    given_up = sum(n for _o, n in st.diverged["ranges"])
    if args.json:
        print_json({"name": cfg.name, "role": st.role, "checkpoint": st.checkpoint, "diverged": st.diverged})
    else:
        print(f"{cfg.name}: now the secondary at checkpoint {st.checkpoint}; {given_up >> 10} KiB written here "
              f"since then are given up (the primary's resync overwrites them). Next: `dmrepl up {cfg.name}`")
    return 0


def _secondary(cfg, args) -> int:
    from dmrepl.cli import secondary
    from dmrepl.roles.secondary import Secondary

    if args.action == "up":
        from dmrepl.daemon import supervisor
        from dmrepl.kernel import netns

        if cfg.netns is not None:
            netns.enter(cfg.netns)      # before any socket: the export, the link, nbdkit live there
        with Secondary.open(cfg) as sec:
            st = sec.state()
            standby = [there for part, there in sec.stack.present().items() if part != "era"]
            if st is not None and sec.is_up() and all(standby) \
                    and supervisor.running_pid(cfg) is None:
                # Its daemon died (kill -9, a crash) and left the stack: serve it again as it is,
                # after making sure no export of the dead daemon's still holds the port.
                supervisor.fence(cfg)
                for line in sec.finish_interrupted_switch():
                    print(f"{cfg.name}: {line}", file=sys.stderr)
                print(f"{cfg.name}: the stack is up without its daemon: serving it again "
                      f"(checkpoint {st.checkpoint})", file=sys.stderr)
            else:
                st = sec.up()
        if st.role != "secondary":
            print(f"{cfg.name}: up as {st.role}: no export to serve", file=sys.stderr)
            return 0
        from dmrepl.daemon import handover

        supervisor.configure_logging()
        status = supervisor.run_secondary(cfg)
        if status == handover.HANDOVER:
            supervisor.become_primary(cfg)
        return status
    if args.action == "resize":
        raise DmreplError(f"{cfg.name} is the secondary on this host: resize runs on the primary, which grows "
                          "this host's stack over the control link", f"on the primary host: `dmrepl resize {cfg.name}`")
    if args.action == "switchover":
        raise DmreplError(f"{cfg.name} is the secondary on this host: switchover runs on the primary, which hands "
                          "its role over to this host", f"on the primary host: `dmrepl switchover {cfg.name}`")
    if args.action in ("verify", "wait", "tune"):
        why = "which compares both disks" if args.action == "verify" else "which drives the sync and the resync"
        raise DmreplError(f"{cfg.name} is the secondary on this host: {args.action} runs on the primary, {why}",
                          f"on the primary host: `dmrepl {args.action} {cfg.name}`")
    return secondary.command(args)


def _sock(cfg: PrimaryConfig) -> str:
    return control.socket_path(cfg.resource_state_dir)


def _p_up(cfg: PrimaryConfig, args) -> int:
    from dmrepl.daemon import handover, primary
    from dmrepl.daemon.progress import log

    status = primary.run(cfg, assume_clean=args.assume_clean)
    if status == handover.HANDOVER:
        handover.again(cfg.name, log)
    return status


def _p_down(cfg: PrimaryConfig, args) -> int:
    from dmrepl.daemon.primary_start import down_without_daemon
    from dmrepl.roles.primary import Primary

    try:
        reply = control.request(_sock(cfg), "status")
    except control.DaemonNotRunning:
        with Primary.open(cfg) as pri:
            done = down_without_daemon(pri)
    else:
        from dmrepl.daemon.supervisor import exited
        control.request(_sock(cfg), "stop")
        # Its socket goes first, then the process: done once the process has exited too.
        poll.wait_for(lambda: not os.path.exists(_sock(cfg)) and exited(reply["pid"]),
                      f"daemon pid {reply['pid']} to stop", timeout=60)
        done = [d["name"] for d in reply["devices"].values()] + ([reply["nbd"]] if reply.get("nbd") else [])
    if args.json:
        print_json({"name": cfg.name, "removed": done})
    else:
        print(f"{cfg.name}: down ({', '.join(done) or 'nothing was up'})")
    return 0


def _p_status(cfg: PrimaryConfig, args) -> int:
    try:
        s = control.request(_sock(cfg), "status")
    except control.DaemonNotRunning:
        from dmrepl.roles.primary import Primary

        with Primary.open(cfg) as pri:
            st = pri.state()
            s = {"name": cfg.name, "resource_id": cfg.resource_id, "role": "primary", "state": "down",
                 "reason": "no daemon runs (`dmrepl up " + cfg.name + "` starts it)",
                 "checkpoint": st.checkpoint if st else None, "devices": pri.devices()}
    s.pop("ok", None)
    if args.json:
        print_json(status_json("primary", s))
        return 0
    print(f"resource {s['name']} (id {s['resource_id']}): primary, {s['state'].upper()} ({s['reason']})")
    if s.get("split_brain"):
        print(f"  SPLIT BRAIN: {s['split_brain']}")
    if s.get("checkpoint") is not None:
        last = s.get("last_checkpoint") or {}
        extra = (f", last {time.time() - last['time']:.1f} s ago, pause {last['pause_ms']:.1f} ms"
                 if last else "")
        print(f"  checkpoint {s['checkpoint']}{extra}")
    for part, d in s.get("devices", {}).items():
        print(f"  {part:<7} {d['path']} ({d['dev']}) open {d['open_count']}{' SUSPENDED' if d['suspended'] else ''}")
    if s.get("nbd"):
        print(f"  nbd     {s['nbd']} -> secondary {s['secondary']}, mirror legs {s.get('mirror_health', '?')}"
              f", era {s.get('era', '?')}")
    elif s.get("nbd_leg") == "dropped":
        print(f"  nbd     none: the leg to {s['secondary']} is dropped, writes reach P only (era {s.get('era', '?')})")
    if s.get("tunnel"):
        print(tunnel_line(s["tunnel"]))
    f = s.get("fencing")
    if f and f["state"] != "none":
        print(f"  fencing {f['state']} (checkpoint {f['checkpoint']}: {f['reason']})"
              + (f": {f['error']}, again in {f['retry_in_s']:g} s" if f.get("error") else ""))
    for key, label in (("resync", "resync"), ("last_resync", "last resync")):
        r = s.get(key)
        if r:
            print(f"  {label}: {r['phase']}, {r['since']}; compared {r['compared_bytes'] >> 10} of "
                  f"{r['candidate_bytes'] >> 10} KiB, {r['differing_bytes'] >> 10} KiB differ, copied "
                  f"{r['copied_bytes'] >> 10} of {r['copy_bytes'] >> 10} KiB, {r['digest_bytes'] >> 10} KiB of digests"
                  f" ({r.get('compare_seconds', 0):.1f} s comparing, {r.get('copy_seconds', 0):.1f} s copying)")
    v, last = s.get("verify"), s.get("last_verify")
    if v:
        print(f"  verify: {v['phase']} ({v['why']}), {100 * v['done_bytes'] // max(v['total_bytes'], 1)}% "
              f"at {v['rate_bytes_s'] / 1e6:.1f} MB/s")
    if last:
        found = f"{last['differing_bytes'] >> 10} KiB differ" if last["differing"] else "P and S equal"
        print(f"  last verify ({last['why']}): {found}, {time.time() - last['finished']:.0f} s ago, "
              f"took {last['seconds']:.1f} s" + (f"; repair {last['repair']}" if last.get("repair") else ""))
    if s.get("verify_interval_s"):
        print(f"  verify every {s['verify_interval_s']:g} s")
    return 0


def _p_checkpoint(cfg: PrimaryConfig, args) -> int:
    r = control.request(_sock(cfg), "checkpoint")
    r.pop("ok", None)
    if args.json:
        print_json({"name": cfg.name, **r})
    else:
        print(f"{cfg.name}: checkpoint {r['checkpoint']} on both hosts, pause {r['pause_ms']:.1f} ms "
              f"(secondary's switch {r['secondary_pause_ms']:.1f} ms)")
    return 0


def _p_verify(cfg: PrimaryConfig, args) -> int:
    from concurrent.futures import ThreadPoolExecutor, wait

    from dmrepl.daemon.progress import Bar, bar_text

    bar = Bar() if sys.stderr.isatty() and not args.json else None   # in a log: the daemon's lines (each 25 %)
    try:
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(control.request, _sock(cfg), "verify", timeout=None, repair=args.repair,
                              rate_bytes_s=args.rate)
            while bar is not None and not wait([fut], timeout=0.5).done:
                try:
                    p = control.request(_sock(cfg), "status", timeout=10).get("verify")
                except (DmreplError, OSError):
                    continue                # the bar waits; the verify's own answer decides
                if p:
                    bar.draw(bar_text("verify", p["done_bytes"], p["total_bytes"], p["rate_bytes_s"], p["eta_s"]))
            r = fut.result()
    finally:
        if bar is not None:
            bar.end()
    r.pop("ok", None)
    if args.json:
        print_json({"name": cfg.name, **r})
    else:
        print(f"{cfg.name}: {r['compared_bytes'] >> 20} MiB compared in {r['seconds']:.1f} s "
              f"({r['digest_bytes'] >> 10} KiB of digests): "
              + (f"{len(r['differing'])} range(s) differ" if r["differing"] else "P and S are equal"))
        for off, n in r["differing"][:20]:
            print(f"  differ: bytes [{off}, {off + n}) ({n >> 10} KiB)")
        if len(r["differing"]) > 20:
            print(f"  ... and {len(r['differing']) - 20} more (--json lists all)")
        if r.get("frozen_pieces"):
            print(f"  {r['frozen_pieces'] * r['piece_bytes'] >> 10} KiB compared again with the writes suspended "
                  f"({r['frozen_pauses']} pause(s), the longest {r['frozen_pause_max_ms']:.1f} ms): "
                  "a write in flight is never reported")
        if r.get("repair"):
            print(f"  repair {r['repair']}")
    return 1 if r["differing"] and not r.get("repair") else 0


def _p_wait(cfg: PrimaryConfig, args) -> int:
    """Poll the daemon's status until it replicates: a bar for the sync or resync on a terminal,
    a line each 10 % and each new state otherwise (stderr); the final state on stdout."""
    if args.timeout is not None and args.timeout <= 0:
        raise DmreplError(f"--timeout must be more than 0 seconds, got {args.timeout:g}")
    t0 = time.monotonic()
    st = _wait_with_bar(cfg, args, t0)
    waited = time.monotonic() - t0
    if args.json:
        print_json({"name": cfg.name, "state": st["state"], "checkpoint": st.get("checkpoint"),
                    "waited_s": round(waited, 1)})
    else:
        print(f"{cfg.name}: replicating at checkpoint {st.get('checkpoint')} (waited {waited:.1f} s)")
    return 0


def _wait_with_bar(cfg: PrimaryConfig, args, t0: float) -> dict:
    """_wait_replicating with a progress bar on a terminal (not for --json), until args.timeout."""
    from dmrepl.daemon.progress import Bar

    bar = Bar() if sys.stderr.isatty() and not args.json else None
    try:
        return _wait_replicating(cfg, args.timeout, t0, bar)
    finally:
        if bar is not None:
            bar.end()


def _wait_replicating(cfg: PrimaryConfig, timeout: float | None, t0: float, bar) -> dict:
    from dmrepl.daemon.progress import Rate, bar_text, running_work

    rate = Rate()
    said = ""
    while True:
        left = None if timeout is None else timeout - (time.monotonic() - t0)
        try:
            st = control.request(_sock(cfg), "status", timeout=10 if left is None else max(min(10, left), 0.1))
        except TimeoutError:
            st = None                           # a busy daemon: ask again, unless the time is up
        except ConnectionError as e:
            raise DmreplError(f"{cfg.name}: the daemon stopped while this waited ({e})",
                              f"see its log; `dmrepl status {cfg.name}` says what runs") from None
        now = time.monotonic()
        if st is not None and st["state"] == "replicating":
            return st
        work = running_work(st) if st is not None else None
        if work is not None:
            label, done, total = work
            line = bar_text(label, done, total, *rate(label, done, total, now))
            step = f"{label} {100 * done // max(total, 1) // 10}"      # a line each 10 % in a log
            if bar is not None:
                bar.draw(line)
            elif step != said:
                said = step
                print(f"{cfg.name}: {line}", file=sys.stderr, flush=True)
        elif st is not None and st["state"] != said:
            said = st["state"]
            if bar is not None:
                bar.end()
            print(f"{cfg.name}: {st['state']} ({st['reason']})", file=sys.stderr, flush=True)
        if timeout is not None and now - t0 >= timeout:
            if st is None:
                raise DmreplError(f"{cfg.name}: its daemon did not answer within {timeout:g} s",
                                  f"see its log (journalctl -u dmrepl@{cfg.name})")
            doing = f"; {work[0]} at {100 * work[1] // max(work[2], 1)}%" if work else ""
            raise DmreplError(f"{cfg.name} is not replicating after {timeout:g} s: {st['state']} "
                              f"({st['reason']}){doing}",
                              f"`dmrepl status {cfg.name}` shows what it waits for; wait again to go on")
        if st is not None:
            time.sleep(0.5)


def _p_tune(cfg: PrimaryConfig, args) -> int:
    given = {k: v for k, v in (("resync_min", args.resync_min), ("resync_max", args.resync_max),
                               ("resync_share", args.resync_share)) if v is not None}
    if not given:
        raise DmreplError("tune: nothing to change", "give --resync-max, --resync-min or --resync-share")
    r = control.request(_sock(cfg), "tune", **given)
    r.pop("ok", None)
    if args.json:
        print_json({"name": cfg.name, **r})
        return 0
    now = r["now"]
    if now["ceiling_bytes_s"] is None:
        print(f"{cfg.name}: copies to S go as fast as the kernel copies (no limit)")
    else:
        print(f"{cfg.name}: copies to S take {now['floor_bytes_s'] / (1 << 20):g} to "
              f"{now['ceiling_bytes_s'] / (1 << 20):g} MiB/s less the consumer's writes (at most "
              f"{now['share']:.0%} of it while the consumer writes); now {now['rate_limit_bytes_s'] / (1 << 20):.1f} "
              f"MiB/s (the consumer writes {now['consumer_write_bytes_s'] / (1 << 20):.1f} MiB/s). "
              f"Until the next start: put resync_max etc. in {cfg.source} to keep it")
    return 0


def _p_switchover(cfg: PrimaryConfig, args) -> int:
    """Ask the daemon; then (unless --no-wait) wait for this host's secondary to hold the new
    primary's first checkpoint: the other host replicates to this one."""
    from dmrepl.config import load_secondary
    from dmrepl.state import StateStore

    if args.timeout <= 0:
        raise DmreplError(f"--timeout must be more than 0 seconds, got {args.timeout:g}")
    try:
        sec_cfg = load_secondary(cfg.name, cfg.source)
    except DmreplError:
        sec_cfg = None
    if sec_cfg is None or sec_cfg.era_metadata is None:
        raise DmreplError(f"{cfg.source} has no [secondary] section: after a switchover this host follows the new "
                          "primary as its secondary", "add [secondary] and start_as to the config on both hosts")
    t0 = time.monotonic()
    r = control.request(_sock(cfg), "switchover", timeout=args.timeout)
    r.pop("ok", None)
    if not args.json:
        print(f"{cfg.name}: {r['new_primary']} took over at checkpoint {r['checkpoint']} in {r['seconds']:.2f} s "
              f"(nothing to resync); this host is its secondary now", flush=True)
    if not args.no_wait:

        def joined():
            st = StateStore(sec_cfg.resource_state_dir).load()
            return st is not None and st.role == "secondary" and st.checkpoint > r["checkpoint"] and not st.diverged

        try:
            poll.wait_for(joined, f"the new primary's first checkpoint on this host (after {r['checkpoint']})",
                          timeout=max(1.0, args.timeout - (time.monotonic() - t0)), interval=0.2)
        except poll.WaitTimeout:
            raise DmreplError(f"{cfg.name}: {r['new_primary']} took over at checkpoint {r['checkpoint']}, but has "
                              f"not replicated to this host within {args.timeout:g} s",
                              f"see `dmrepl status {cfg.name}` on both hosts and this host's daemon log") from None
        r["replicating_s"] = round(time.monotonic() - t0, 3)
        if not args.json:
            print(f"{cfg.name}: the new primary replicates to this host ({r['replicating_s']:.1f} s in all)")
    if args.json:
        print_json({"name": cfg.name, **r})
    return 0


def _p_resize(cfg: PrimaryConfig, args) -> int:
    if args.timeout is not None and args.timeout <= 0:
        raise DmreplError(f"--timeout must be more than 0 seconds, got {args.timeout:g}")
    t0 = time.monotonic()
    r = control.request(_sock(cfg), "resize", timeout=600)
    r.pop("ok", None)
    if not args.json:
        print(f"{cfg.name}: {r['old_bytes'] >> 20} MiB -> {r['new_bytes'] >> 20} MiB on both hosts "
              f"({r['new_bytes']} bytes); the resync compares the new range", flush=True)
    if not args.no_wait:
        st = _wait_with_bar(cfg, args, t0)
        r["replicating_s"] = round(time.monotonic() - t0, 3)
        r["last_resync"] = st.get("last_resync")
        if not args.json:
            print(f"{cfg.name}: replicating at {r['new_bytes'] >> 20} MiB ({r['replicating_s']:.1f} s in all)")
    if args.json:
        print_json({"name": cfg.name, **r})
    return 0


def _p_failover(cfg: PrimaryConfig, args) -> int:
    raise DmreplError(f"{cfg.name} is the primary on this host: failover runs on the secondary, which takes over",
                      f"on the secondary host: `dmrepl failover {cfg.name}`")


PRIMARY = {"up": _p_up, "down": _p_down, "status": _p_status, "checkpoint": _p_checkpoint,
           "failover": _p_failover, "switchover": _p_switchover, "resize": _p_resize, "verify": _p_verify, "wait": _p_wait, "tune": _p_tune}
