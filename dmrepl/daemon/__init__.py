"""Processes: the secondary's supervisor daemon, its nbdkit export, and bringing both up and down.

    daemon/supervisor.py  the daemon (python -m dmrepl.daemon): keeps nbdkit running, watches the store
    daemon/export.py      one nbdkit process serving the origin device (no control link configured)
    daemon/gate.py        the NBD gate: one nbdkit per admitted connection of the authenticated primary
    daemon/service.py     up / down / failover with the daemon, in the right order (CLI and demo share it)

It sits above the policy (dmrepl.roles) and below the CLI.  Nothing is imported here: the CLI
imports dmrepl.daemon.control for every command, and the supervisor's imports (the policy,
prometheus_client) cost a command that does not run a daemon half its start-up.
"""
