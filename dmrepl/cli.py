"""The dmrepl command line.

Errors print `dmrepl: <message>` and a hint; the traceback only with --debug.
Exit status: 0 success, 1 a check or operation failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from dmrepl import __version__
from dmrepl.config import ConfigError
from dmrepl.errors import DmreplError
from dmrepl.export import ExportError
from dmrepl.state import StateError


class UserError(Exception):
    """An error for the user: a message and a hint, no traceback."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


def _print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def cmd_doctor(args) -> int:
    from dmrepl import doctor

    checks = doctor.run_checks()
    failed = [c for c in checks if c.verdict == "fail"]
    if args.json:
        _print_json({"ok": not failed, "checks": [c.as_dict() for c in checks]})
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            print(f"{c.verdict.upper():4}  {c.name:<{width}}  {c.detail}")
        print("verdict: this host can run dmrepl" if not failed
              else f"verdict: this host cannot run dmrepl ({len(failed)} check(s) failed)")
    return 1 if failed else 0


def cmd_ls(args) -> int:
    import os

    from dmrepl.kernel import dm

    if not os.path.exists(dm.CONTROL_PATH):
        raise UserError("device-mapper is not available on this host",
                        "run `dmrepl doctor`; on a development machine use the test VM")
    rows = []
    with dm.Control() as ctl:
        for entry in ctl.list_devices():
            if not entry.uuid.startswith(dm.UUID_PREFIX):
                continue
            info = ctl.info(entry.name)
            types = [s.target_type for s in ctl.table(entry.name)] if info.live_table else []
            rows.append({"name": entry.name, "uuid": entry.uuid, "dev": f"{info.major}:{info.minor}",
                         "open_count": info.open_count, "suspended": info.suspended,
                         "deferred_remove": info.deferred_remove, "targets": types})
    if args.json:
        _print_json(rows)
    elif not rows:
        print("no dmrepl devices")
    else:
        width = max(len(r["name"]) for r in rows)
        print(f"{'NAME':<{width}}  {'DEV':>7}  OPEN  {'STATE':<15}  TARGETS")
        for r in rows:
            state = ("removal-deferred" if r["deferred_remove"] else
                     "suspended" if r["suspended"] else "active")
            print(f"{r['name']:<{width}}  {r['dev']:>7}  {r['open_count']:>4}  {state:<15}  "
                  f"{','.join(r['targets']) or '-'}")
        if any(r["deferred_remove"] for r in rows):
            print("removal-deferred: the kernel removes the device when its last opener closes it")
    return 0


def _require_root(what: str) -> None:
    import os

    if os.geteuid() != 0:
        raise UserError(f"{what} needs root (it creates device-mapper and loop devices)",
                        "run it with sudo")


def _secondary(args):
    """(config, config path) for NAME / --config."""
    from dmrepl.config import default_path, load_secondary

    cfg = load_secondary(args.name, args.config)
    return cfg, (args.config or default_path(args.name))


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_secondary(args) -> int:
    from dmrepl import service
    from dmrepl.kernel import dm
    from dmrepl.secondary import Secondary

    if args.action != "status":
        _require_root(f"dmrepl secondary {args.action}")
    cfg, config_path = _secondary(args)
    if not os.path.exists(dm.CONTROL_PATH):
        raise UserError("device-mapper is not available on this host",
                        "run `dmrepl doctor`; on a development machine use the test VM (scripts/demo)")
    with dm.Control() as ctl:
        sec = Secondary(cfg, ctl)
        if args.action == "up":
            res = service.up(sec, config_path)
            st = res["state"]
            out = {"name": cfg.name, "role": st.role, "checkpoint": st.checkpoint,
                   "active": sec.active_path, "daemon_pid": res["daemon_pid"],
                   "listen": f"{cfg.listen_host}:{cfg.listen_port}"}
            if args.json:
                _print_json(out)
            else:
                print(f"{cfg.name}: up as {st.role}, checkpoint {st.checkpoint}, active device {sec.active_path}")
                if res["daemon_pid"]:
                    print(f"{cfg.name}: NBD export on {cfg.listen_host}:{cfg.listen_port} "
                          f"(export name {cfg.resource_id!r}, daemon pid {res['daemon_pid']})")
                if st.role == "merging":
                    print(f"{cfg.name}: a merge was interrupted and goes on; "
                          f"`dmrepl secondary failover {cfg.name}` waits for it")
            return 0
        if args.action == "down":
            removed = service.down(sec, force=args.force)
            if args.json:
                _print_json({"name": cfg.name, "removed": removed})
            else:
                print(f"{cfg.name}: down ({', '.join(removed) or 'nothing was up'})")
            return 0
        if args.action == "checkpoint":
            st, pause = sec.checkpoint()
            if args.json:
                _print_json({"name": cfg.name, "checkpoint": st.checkpoint, "store": st.current_store,
                             "pause_ms": round(pause * 1000, 3)})
            else:
                print(f"{cfg.name}: checkpoint {st.checkpoint} (store {st.current_store}), "
                      f"pause {pause * 1000:.1f} ms")
            return 0
        if args.action == "failover":
            t0 = time.perf_counter()
            st = service.failover(sec)
            switch = time.perf_counter() - t0
            if not args.json:
                print(f"{cfg.name}: failed over from checkpoint {st.checkpoint} in {switch * 1000:.1f} ms; "
                      f"{sec.active_path} now runs on the merged view")
            if args.no_wait:
                if args.json:
                    _print_json({"name": cfg.name, "role": st.role, "switch_ms": round(switch * 1000, 3)})
                return 0

            def show(p):
                if not args.json and sys.stderr.isatty():
                    print(f"\rmerge: {p.fraction:6.1%}  {_human_bytes(p.remaining_bytes)} left   ",
                          end="", file=sys.stderr, flush=True)

            t1 = time.perf_counter()
            st = sec.wait_merge(progress=show)
            merge = time.perf_counter() - t1
            if args.json:
                _print_json({"name": cfg.name, "role": st.role, "switch_ms": round(switch * 1000, 3),
                             "merge_s": round(merge, 3)})
            else:
                if sys.stderr.isatty():
                    print(file=sys.stderr)
                print(f"{cfg.name}: merge complete in {merge:.2f} s; the origin is linear over the disk, "
                      f"role {st.role}")
            return 0
        # status
        out = sec.status()
        from dmrepl import daemon

        out["daemon_pid"] = daemon.running_pid(cfg)
        out["listen"] = f"{cfg.listen_host}:{cfg.listen_port}"
        if args.json:
            _print_json(out)
            return 0
        print(f"resource {cfg.name} (id {cfg.resource_id}): {'up' if out['up'] else 'down'}, "
              f"role {out['role'] or 'never started'}")
        for d in out["deferred_removal"]:
            who = ", ".join(f"{h['command']}[{h['pid']}]" for h in d["holders"]) or "a process"
            print(f"  {d['name']}: removal deferred until {who} closes it (it fails all I/O meanwhile)")
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
            print(f"  store   {s_['state']}, {_human_bytes(s_['allocated_bytes'])} of "
                  f"{_human_bytes(s_['total_bytes'])} ({s_['fill']:.1%}, warn at {s_['warn_at']:.0%})")
        if "merge" in out:
            m = out["merge"]
            print(f"  merge   {m['fraction']:.1%} done, {_human_bytes(m['remaining_bytes'])} left")
        print(f"  export  {out['listen']}: " + (f"daemon pid {out['daemon_pid']}" if out["daemon_pid"] else "not running"))
        for w in out["warnings"]:
            print(f"  WARNING {w}")
        return 0


def cmd_demo(args) -> int:
    from dmrepl import demo

    _require_root("dmrepl demo")
    return demo.run(keep=args.keep)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dmrepl", description="Continuous-checkpoint block replication "
                                "on Linux device-mapper.")
    p.add_argument("--version", action="version", version=f"dmrepl {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    d = sub.add_parser("doctor", help="check whether this host can run dmrepl")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.set_defaults(func=cmd_doctor)

    ls = sub.add_parser("ls", help="list the device-mapper devices dmrepl created")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=cmd_ls)

    sp = sub.add_parser("secondary", help="the secondary host's half of a resource")
    ssub = sp.add_subparsers(dest="action", metavar="ACTION")
    ssub.required = True
    helps = {"up": "build the stack from disk and start the NBD export",
             "down": "stop the export and remove the stack (refuses while active is open)",
             "status": "show role, checkpoint, store fill, merge progress",
             "checkpoint": "switch the hidden store: the active view becomes the disk's current data",
             "failover": "take over: fence the export, merge the hidden store, keep the active view"}
    for action, text in helps.items():
        a = ssub.add_parser(action, help=text)
        a.add_argument("name", metavar="NAME", help="resource name (config /etc/dmrepl/NAME.toml)")
        a.add_argument("--config", metavar="PATH", help="config file instead of /etc/dmrepl/NAME.toml")
        a.add_argument("--json", action="store_true", help="machine-readable output")
        if action == "down":
            a.add_argument("--force", action="store_true",
                           help="remove even while the active device is open (its users get I/O errors)")
        if action == "failover":
            a.add_argument("--no-wait", action="store_true", help="return after the switch; the merge goes on")
        a.set_defaults(func=cmd_secondary)

    demo = sub.add_parser("demo", help="run a secondary end to end on loop-backed files, checking every byte")
    demo.add_argument("--keep", action="store_true", help="keep the work directory")
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UserError, DmreplError) as e:
        if args.debug:
            raise
        print(f"dmrepl: {e}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        return 1
    except (ConfigError, StateError, ExportError) as e:
        if args.debug:
            raise
        print(f"dmrepl: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if args.debug:
            raise
        print(f"dmrepl: {e}", file=sys.stderr)
        print("hint: run with --debug for a traceback; `dmrepl doctor` checks this host", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dmrepl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
