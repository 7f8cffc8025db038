"""The dmrepl command line.

Errors print `dmrepl: <message>` and a hint; the traceback only with --debug.
Exit status: 0 success, 1 a check or operation failed, 2 usage error.

    cli/__init__.py   the parser, the root and device-mapper checks, error handling
    cli/resource.py   `dmrepl up|down|status|checkpoint|failover NAME`, either role
    cli/secondary.py  `dmrepl secondary ...`
    cli/events.py     `dmrepl events [NAME]`
    cli/cluster.py    `dmrepl role NAME` (for cluster managers: ocf/dmrepl)
    cli/render.py     values to JSON and sentences
"""

from __future__ import annotations

import argparse
import os
import sys

from dmrepl import __version__
from dmrepl.config import ConfigError
from dmrepl.errors import DmreplError
from dmrepl.state import StateError


class UserError(DmreplError):
    """An error for the user: a message and a hint, no traceback."""


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise UserError(f"{what} needs root (it reads and changes device-mapper and loop devices)",
                        "run it with sudo")


def _require_dm() -> None:
    from dmrepl import inventory

    if not inventory.available():
        raise UserError("device-mapper is not available on this host",
                        "run `dmrepl doctor`; on a development machine use the test VM (scripts/demo, scripts/vm)")


def cmd_doctor(args) -> int:
    from dmrepl import doctor
    from dmrepl.cli.render import print_json

    checks = doctor.run_checks()
    failed = [c for c in checks if c.verdict == "fail"]
    if args.json:
        print_json({"ok": not failed, "checks": [c.as_dict() for c in checks]})
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            print(f"{c.verdict.upper():4}  {c.name:<{width}}  {c.detail}")
            if c.install:
                print(f"{'':4}  {'':<{width}}  install: {c.install}")
        print("verdict: this host can run dmrepl" if not failed
              else f"verdict: this host cannot run dmrepl ({len(failed)} check(s) failed)")
    return 1 if failed else 0


def cmd_ls(args) -> int:
    from dmrepl import inventory
    from dmrepl.cli.render import print_json

    _require_dm()
    _require_root("dmrepl ls")
    rows = inventory.ours()
    if args.json:
        print_json(rows)
    elif not rows:
        print("no dmrepl devices")
    else:
        width = max(len(r.name) for r in rows)
        print(f"{'NAME':<{width}}  {'DEV':>7}  OPEN  {'STATE':<16}  TARGETS")
        for r in rows:
            state = "removal-deferred" if r.deferred_remove else "suspended" if r.suspended else "active"
            print(f"{r.name:<{width}}  {r.dev:>7}  {r.open_count:>4}  {state:<16}  {','.join(r.targets) or '-'}")
        if any(r.deferred_remove for r in rows):
            print("removal-deferred: the kernel removes the device when its last opener closes it")
    return 0


def _wireguard_keygen(args) -> int:
    from dmrepl import private
    from dmrepl.cli.render import print_json
    from dmrepl.config import tunnel_key_file
    from dmrepl.link import x25519

    name, path = tunnel_key_file(args.name, args.config)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        private.write_secret(path, x25519.encode(x25519.new_private()) + "\n", replace=False)
        made = True
    except FileExistsError:
        made = False
    try:
        key = x25519.decode(private.read_secret(path, "WireGuard key file", UserError))
    except ValueError as e:
        raise UserError(f"WireGuard key file {path}: {e}", f"remove it and run `dmrepl keygen {name} "
                        "--wireguard` again (then give the other host the new public key)") from None
    pub = x25519.encode(x25519.public(key))
    if args.json:
        print_json({"name": name, "private_key_file": path, "created": made, "public_key": pub})
    elif made:
        print(f"{name}: new WireGuard key in {path} (mode 0600; it stays on this host).\n"
              f"public key, for the other host's [link] peer_public_key:\n{pub}")
    else:
        print(f"{name}: {path} exists: kept.\npublic key, for the other host's [link] peer_public_key:\n{pub}")
    return 0


def cmd_keygen(args) -> int:
    from dmrepl.config import load
    from dmrepl.link import auth

    _require_root("dmrepl keygen")
    if args.wireguard:
        return _wireguard_keygen(args)
    cfg = load(args.name, args.config)
    if cfg.key_file is None:
        raise UserError(f"{cfg.source} names no key_file: there is no control link to key",
                        f'add key_file = "/etc/dmrepl/{cfg.name}.key" to its section (both hosts)')
    os.makedirs(os.path.dirname(cfg.key_file), exist_ok=True)
    auth.write_new_key(cfg.key_file, replace=False)
    print(f"{cfg.name}: new key in {cfg.key_file} (mode 0600); copy it to the other host at the path its "
          "config names, keeping the mode (e.g. `scp -p`)")
    return 0


def cmd_secondary(args) -> int:
    from dmrepl.cli import secondary

    _require_root(f"dmrepl secondary {args.action}")
    _require_dm()
    return secondary.command(args)


def cmd_resource(args) -> int:
    from dmrepl.cli import resource

    _require_root(f"dmrepl {args.action}")
    _require_dm()
    return resource.command(args)


def cmd_role(args) -> int:
    from dmrepl.cli import cluster

    _require_root("dmrepl role")
    _require_dm()
    return cluster.command(args)


def cmd_events(args) -> int:
    from dmrepl.cli import events

    _require_root("dmrepl events")
    return events.command(args)


def cmd_demo(args) -> int:
    _require_root("dmrepl demo")
    _require_dm()
    if args.secondary_only:
        from dmrepl import demo_secondary

        return demo_secondary.run(keep=args.keep)
    from dmrepl import demo

    return demo.run(keep=args.keep)


def build_parser() -> argparse.ArgumentParser:
    from dmrepl.cli import cluster, events, resource, secondary

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

    k = sub.add_parser("keygen", help="write a new pre-shared key to the key_file NAME's config names, or with "
                       "--wireguard this host's WireGuard key (never over an existing one)")
    k.add_argument("name", metavar="NAME", help="resource name (config /etc/dmrepl/NAME.toml)")
    k.add_argument("--config", metavar="PATH", help="config file instead of /etc/dmrepl/NAME.toml")
    k.add_argument("--wireguard", action="store_true",
                   help="the [link] private_key_file instead, and print its public key for the other host")
    k.add_argument("--json", action="store_true", help="machine-readable output (with --wireguard)")
    k.set_defaults(func=cmd_keygen)

    resource.add_parsers(sub, cmd_resource)
    cluster.add_parser(sub, cmd_role)
    events.add_parser(sub, cmd_events)
    secondary.add_parser(sub, cmd_secondary)

    demo = sub.add_parser("demo", help="a primary and a secondary in two network namespaces on loop-backed "
                          "files: replicate, checkpoint, fail over, check every byte")
    demo.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs, images)")
    demo.add_argument("--secondary-only", action="store_true",
                      help="the secondary alone, with a userspace NBD client as its primary")
    demo.set_defaults(func=cmd_demo)
    return p


def _fail(message: str, hint: str | None) -> int:
    print(f"dmrepl: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("dmrepl: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- every error reaches the user as a sentence
        if args.debug:
            raise
        if isinstance(e, DmreplError):
            return _fail(str(e), e.hint)
        if isinstance(e, (ConfigError, StateError)):
            return _fail(str(e), None)
        if isinstance(e, OSError):
            return _fail(str(e), "run with --debug for a traceback; `dmrepl doctor` checks this host")
        # A ValueError from a table or a name, or a bug: still a sentence, never a bare traceback.
        return _fail(f"{type(e).__name__}: {e}",
                     "this is dmrepl's fault, not yours: run with --debug and report the traceback")


if __name__ == "__main__":
    sys.exit(main())
