"""`dmrepl events [NAME]`: a resource's events as JSON lines, as they happen (daemon/events.py).

Without NAME, every resource configured in /etc/dmrepl.  Each line is one JSON object with at
least "time", "resource", "role" and "event"; a script reads them one by one:

    dmrepl events vm1 | while read -r e; do ...; done
    dmrepl events vm1 --history --no-follow | jq -c 'select(.event == "state")'
"""

from __future__ import annotations

import os
import sys
import time

from dmrepl.config import CONFIG_DIR, ConfigError, load
from dmrepl.errors import DmreplError

POLL_S = 0.2


def add_parser(sub, run) -> None:
    e = sub.add_parser("events", help="follow a resource's events (state changes, checkpoints, the peer) as JSON "
                       "lines; without NAME, every resource in /etc/dmrepl")
    e.add_argument("name", metavar="NAME", nargs="?", help="resource name (config /etc/dmrepl/NAME.toml)")
    e.add_argument("--config", metavar="PATH", help="config file instead of /etc/dmrepl/NAME.toml")
    e.add_argument("--history", action="store_true", help="first the events recorded so far (the last MiB or two)")
    e.add_argument("--no-follow", action="store_true", help="print the recorded events and exit (implies --history)")
    e.set_defaults(func=run)


def _state_dirs(name: str | None, config: str | None) -> dict[str, str]:
    if name is not None or config is not None:
        cfg = load(name, config)
        return {cfg.name: cfg.resource_state_dir}
    out = {}
    try:
        entries = sorted(n for n in os.listdir(CONFIG_DIR) if n.endswith(".toml"))
    except FileNotFoundError:
        entries = []
    for entry in entries:
        try:
            cfg = load(entry[:-len(".toml")])
        except ConfigError as e:
            print(f"dmrepl: skipped: {e}", file=sys.stderr)
            continue
        out[cfg.name] = cfg.resource_state_dir
    if not out:
        raise DmreplError(f"no resource is configured in {CONFIG_DIR}", "name one: `dmrepl events NAME --config PATH`")
    return out


def command(args) -> int:
    from dmrepl.daemon.events import Follower

    history = args.history or args.no_follow
    followers = [Follower(d, history) for d in _state_dirs(args.name, args.config).values()]
    try:
        while True:
            for f in followers:
                for line in f.lines():
                    sys.stdout.write(line)
            sys.stdout.flush()
            if args.no_follow:
                return 0
            time.sleep(POLL_S)
    except BrokenPipeError:         # `| head`: the reader has had enough
        sys.stdout = open(os.devnull, "w")
        return 0
    finally:
        for f in followers:
            f.close()
