"""`dmrepl role NAME`: this host's part in a resource, as a cluster manager needs it.

What runs (promoted: the primary; unpromoted: the secondary; standby: the primary's role with
nothing running; stopped; failed), the promotion score (roles/promotion.py) and why.  `--shell`
prints KEY=value lines, quoted for a shell's eval (the Pacemaker agent ocf/dmrepl reads them),
`--json` the same as an object.
"""

from __future__ import annotations

import shlex

from dmrepl.cli.render import print_json, resource_parser
from dmrepl.config import ConfigError, PrimaryConfig, SecondaryConfig, load
from dmrepl.names import outdated_mark
from dmrepl.roles.promotion import Facts, assess

HELP = ("this host's part in NAME for a cluster manager: what runs (promoted, unpromoted, standby, "
        "stopped, failed) and its promotion score")


def add_parser(sub, run) -> None:
    a = resource_parser(sub, "role", HELP)
    a.add_argument("--shell", action="store_true", help="KEY=value lines for a shell's eval")
    a.set_defaults(func=run, action="role")


def _section(name: str, path: str | None, role: str):
    try:
        return load(name, path, role=role)
    except ConfigError:
        return None


def facts(name: str, path: str | None) -> tuple[dict, Facts]:
    from dmrepl.daemon import control, pids
    from dmrepl.errors import DmreplError
    from dmrepl.kernel import dm
    from dmrepl.names import SECONDARY_PARTS, StackNames
    from dmrepl.roles.primary import stopped_uncleanly
    from dmrepl.roles.secondary.failover import runs_taken_over
    from dmrepl.state import StateStore

    cfg = load(name, path)              # the role the state file records, else start_as
    # The other role's section, if the config has it (read once more only for that one).
    other = _section(name, path, "primary" if isinstance(cfg, SecondaryConfig) else "secondary")
    sec = cfg if isinstance(cfg, SecondaryConfig) else other if isinstance(other, SecondaryConfig) else None
    both = sec is not None and (isinstance(cfg, PrimaryConfig) or isinstance(other, PrimaryConfig))
    try:
        primary_state = control.request(control.socket_path(cfg.resource_state_dir), "status", timeout=10)["state"]
    except control.DaemonNotRunning:
        primary_state = None
    except (DmreplError, OSError):          # it runs (its socket is there) but did not answer
        primary_state = "unanswered"
    names = StackNames(cfg.name)
    ours = {names.top(), names.dm("mirror"), *(names.dm(p) for p in SECONDARY_PARTS)}
    with dm.Control() as ctl:
        stack_left = any(d.name in ours for d in ctl.list_devices())
        openers = ctl.info(names.top()).open_count if ctl.exists(names.top()) else 0
        taken_over = isinstance(cfg, PrimaryConfig) and sec is not None and \
            runs_taken_over(cfg.name, cfg.disk, cfg.resource_state_dir, ctl)
    st = StateStore(cfg.resource_state_dir).load()
    f = Facts(role=cfg.role, primary_state=primary_state,
              secondary_running=sec is not None and pids.running_pid(sec) is not None,
              stack_left=stack_left, taken_over=taken_over,
              checkpoint=st.checkpoint if st else 0, checkpoint_lost=bool(st and st.checkpoint_lost),
              # After a handover (demote with the secondary connected) nothing was given up.
              diverged=bool(st and st.diverged and st.diverged.get("ranges") and cfg.role == "secondary"),
              merging=bool(st and st.role == "merging"),
              unclean=cfg.role == "primary" and stopped_uncleanly(cfg.resource_state_dir))
    return {"name": cfg.name, "resource_id": cfg.resource_id, "role": cfg.role, "both_roles": both,
            "config": cfg.source,
            "consumer_openers": openers}, f


def command(args) -> int:
    about, f = facts(args.name, args.config)
    v = assess(f)
    out = {**about, "run": v.run, "score": v.score, "why": v.why, "checkpoint": f.checkpoint,
           "mark_name": outdated_mark(about["resource_id"]),
           "primary_state": f.primary_state, "merging": f.merging}
    if args.json:
        print_json(out)
    elif args.shell:
        for key, value in out.items():
            text = "" if value is None else str(int(value)) if isinstance(value, bool) else str(value)
            text = " ".join(text.split())       # one line a variable: the agent keeps DMREPL_ lines only
            print(f"DMREPL_{key.upper()}={shlex.quote(text)}")
    else:
        score = "none (not to be promoted)" if v.score is None else v.score
        print(f"{about['name']}: {v.run}, role {f.role}, checkpoint {f.checkpoint}, promotion score {score}: {v.why}")
    return 0
