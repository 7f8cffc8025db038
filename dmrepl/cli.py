"""The dmrepl command line.

Errors print `dmrepl: <message>` and a hint; the traceback only with --debug.
Exit status: 0 success, 1 a check or operation failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import sys

from dmrepl import __version__


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
                         "targets": types})
    if args.json:
        _print_json(rows)
    elif not rows:
        print("no dmrepl devices")
    else:
        width = max(len(r["name"]) for r in rows)
        print(f"{'NAME':<{width}}  {'DEV':>7}  OPEN  STATE      TARGETS")
        for r in rows:
            state = "suspended" if r["suspended"] else "active"
            print(f"{r['name']:<{width}}  {r['dev']:>7}  {r['open_count']:>4}  {state:<9}  "
                  f"{','.join(r['targets']) or '-'}")
    return 0


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
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"dmrepl: {e}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
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
