"""Replication policy: one package per role, one module per job.

    roles/transitions.py  which operation is allowed in which role (a table, unit-tested)
    roles/secondary/      the secondary host's half: stack, checkpoint, failover and merge, store watch
    roles/primary/        the primary host's half (next: mirror to the NBD leg, era, checkpoints)

The policy uses only dmrepl.kernel below it and returns values; the daemon and
the CLI above it turn those into processes, sentences and JSON.
"""
