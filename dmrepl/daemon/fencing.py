"""The primary marks its secondary outdated while it writes without it ([fencing], config/fencing.py).

    the secondary falls behind            -> COMMAND outdate   (DMREPL_CHECKPOINT: the newest
      (daemon/primary.py: degraded, resyncing,                    checkpoint the other host may hold)
       a failed checkpoint)
    a checkpoint joins the hosts again    -> COMMAND clear     (only if a mark was asked for)

While the primary replicates, a failover to the secondary's checkpoint loses at most one
checkpoint interval of writes; degraded or resyncing (no checkpoint until the resync is done),
or with checkpoints failing, the loss has no bound: that is when the other host is marked.

The wish is kept in STATE_DIR/NAME/fencing.json until a `clear` succeeded: a daemon that starts
after one that marked (a restart, a takeover of its stack) marks again at once (the command is
idempotent) and clears at its first joined checkpoint.  DMREPL_CHECKPOINT is the primary's last
checkpoint, + 1 when a checkpoint failed since (it may have reached the secondary although the
primary kept n-1).  A cluster-side reader compares it with the secondary's checkpoint (outdated
while that is not newer), so a mark whose `clear` never ran holds a secondary back only until a
newer checkpoint joined the hosts.  DMREPL_MARK_NAME is the name to record the mark under
(names.outdated_mark: the shared resource id).

The command runs on a thread of its own: no write waits for it (the stall bound after losing
the secondary holds whatever the cluster does).  A run that fails or outlives timeout_s (killed)
is logged, shown in `status` (fencing) and tried again every retry_interval_s; a run that outlives
it is killed with its whole process group.  It runs in the host's network namespace, not the
link's (a cluster's IPC is there), with DMREPL_RESOURCE, DMREPL_RESOURCE_ID, DMREPL_MARK_NAME,
DMREPL_CHECKPOINT and DMREPL_REASON in its environment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from typing import Callable

from dmrepl import private
from dmrepl.config import PrimaryConfig
from dmrepl.names import outdated_mark
from dmrepl.tools import NSENTER

WISH_FILE = "fencing.json"
OUTPUT_CHARS = 400          # of the command's output, kept for the log and status


class PeerFencing:
    def __init__(self, cfg: PrimaryConfig, log: Callable[[str], None],
                 emit: Callable[..., object] = lambda *a, **k: None, host_netns_fd: int | None = None):
        self.cfg, self.fencing, self.log, self.emit = cfg, cfg.fencing, log, emit
        self.netns_fd = host_netns_fd
        self.path = os.path.join(cfg.resource_state_dir, WISH_FILE)
        self._cond = threading.Condition()
        self._want: dict | None = None          # {"action", "checkpoint", "reason"}: the newest wish
        self._done: dict | None = None          # the wish the last successful run carried out
        self._failed: dict | None = None        # the wish the last failed run tried
        self._retry_at = 0.0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.state: dict = {"state": "none"}
        wish = self._read_wish()
        if wish is not None and self.fencing is not None:
            # An earlier daemon's mark, perhaps never set: again (it is idempotent), cleared at
            # this daemon's first joined checkpoint.
            self._ask({"action": "outdate", "checkpoint": wish["checkpoint"],
                       "reason": f"kept from an earlier daemon: {wish.get('reason')}"})

    # -- what the daemon asks (its loop's thread) --------------------------------------------

    def outdate(self, checkpoint: int, reason: str) -> None:
        if self.fencing is None:
            return
        self._ask({"action": "outdate", "checkpoint": checkpoint, "reason": reason})

    def clear(self, checkpoint: int) -> None:
        """After checkpoint `checkpoint` joined the hosts: clear a mark this daemon or an earlier one asked for."""
        if self.fencing is None:
            return
        with self._cond:
            if self._want is not None and self._want["action"] == "clear" and self._want != self._done:
                return              # one under way or failing: its retries keep their pace
            # The wish file is read once, at the start (which asks for its outdate again), and
            # written by every outdate since: `_want` tells whether a mark was asked for.
            marked = self._want is not None and self._want["action"] == "outdate"
        if marked:
            self._ask({"action": "clear", "checkpoint": checkpoint, "reason": f"checkpoint {checkpoint} joined the hosts"})

    def status(self) -> dict | None:
        if self.fencing is None:
            return None
        with self._cond:
            return {"command": " ".join(self.fencing.command), **self.state}

    def close(self) -> None:
        """At the daemon's stop: a wish not yet tried runs first (up to timeout_s), so that the
        `clear` after a handover's last checkpoint is not lost with the process; a failed one
        stays in the wish file for the next daemon."""
        with self._cond:
            # A run under way, then the newest wish: twice the command's time at most.
            deadline = time.monotonic() + 2 * self.fencing.timeout_s + 1 if self.fencing else 0
            while (self._thread is not None and self._want is not None and self._want != self._done
                   and self._want != self._failed and time.monotonic() < deadline):
                self._cond.wait(max(0.0, deadline - time.monotonic()))
            self._stopping = True
            self._cond.notify_all()

    # -- the worker ------------------------------------------------------------------------

    def _ask(self, wish: dict) -> None:
        with self._cond:
            if wish["action"] == "outdate":     # under the lock: a clear's forget cannot undo it
                try:
                    private.write_secret(self.path, json.dumps({"checkpoint": wish["checkpoint"],
                                                                 "reason": wish["reason"], "time": time.time()}) + "\n")
                except OSError as e:
                    self.log(f"WARNING: cannot record the fencing wish in {self.path}: {e}")
            self._want = wish
            self._retry_at = 0.0
            self.state = {"state": "outdating" if wish["action"] == "outdate" else "clearing",
                          "checkpoint": wish["checkpoint"], "reason": wish["reason"]}
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="fencing", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (self._want is None or self._want == self._done
                                              or time.monotonic() < self._retry_at):
                    wait = None if self._want is None or self._want == self._done else \
                        max(0.0, self._retry_at - time.monotonic())
                    self._cond.wait(wait)
                if self._stopping:
                    return
                wish = dict(self._want)
            ok, said, took = self._run(wish)
            with self._cond:
                current = self._want == wish
                self._cond.notify_all()            # close() may wait for this run
                if ok:
                    self._done = wish
                    if current:
                        self.state = {"state": "outdated" if wish["action"] == "outdate" else "cleared",
                                      "checkpoint": wish["checkpoint"], "reason": wish["reason"],
                                      "time": time.time(), "took_s": round(took, 3)}
                    if current and wish["action"] == "clear":
                        self._forget_wish()
                else:
                    self._failed = wish
                if not ok and current:          # a superseded wish is not retried
                    self._retry_at = time.monotonic() + self.fencing.retry_interval_s
                    self.state = {"state": f"{wish['action']} failed", "checkpoint": wish["checkpoint"],
                                  "reason": wish["reason"], "error": said, "time": time.time(),
                                  "retry_in_s": self.fencing.retry_interval_s}
            self._report(wish, ok, said, took)

    def _run(self, wish: dict) -> tuple[bool, str, float]:
        argv = [*self.fencing.command, wish["action"]]
        pass_fds: tuple[int, ...] = ()
        if self.netns_fd is not None:           # back to the host's namespace for this command
            argv = [NSENTER.path() or "nsenter", f"--net=/proc/self/fd/{self.netns_fd}", "--", *argv]
            pass_fds = (self.netns_fd,)
        env = {**os.environ, "DMREPL_RESOURCE": self.cfg.name, "DMREPL_RESOURCE_ID": self.cfg.resource_id,
               "DMREPL_MARK_NAME": outdated_mark(self.cfg.resource_id),
               "DMREPL_CHECKPOINT": str(wish["checkpoint"]), "DMREPL_REASON": wish["reason"]}
        t0 = time.monotonic()
        try:
            # A session of its own: at the timeout its children go too (a late `outdate` from a
            # killed run must not land after a `clear`).
            proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, pass_fds=pass_fds, start_new_session=True)
        except OSError as e:
            return False, f"cannot run {argv[0]}: {e.strerror or e}", time.monotonic() - t0
        try:
            out, _ = proc.communicate(timeout=self.fencing.timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.communicate()
            return False, f"no answer within {self.fencing.timeout_s:g} s (killed)", time.monotonic() - t0
        said = " ".join(out.decode(errors="replace").split())[-OUTPUT_CHARS:]
        if proc.returncode != 0:
            return False, f"exit status {proc.returncode}" + (f": {said}" if said else ""), time.monotonic() - t0
        return True, said, time.monotonic() - t0

    def _report(self, wish: dict, ok: bool, said: str, took: float) -> None:
        what = ("the secondary marked outdated" if wish["action"] == "outdate" else "the outdated mark cleared")
        if ok:
            self.log(f"fencing: {what} (checkpoint {wish['checkpoint']}, {took:.2f} s)" + (f": {said}" if said else ""))
        else:
            self.log(f"WARNING: fencing: `{wish['action']}` failed ({said}); tried again every "
                     f"{self.fencing.retry_interval_s:g} s while it is wanted")
        self.emit("fencing", action=wish["action"], ok=ok, checkpoint=wish["checkpoint"],
                  **({} if ok else {"error": said}))

    def _read_wish(self) -> dict | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                wish = json.load(f)
            return wish if isinstance(wish, dict) and isinstance(wish.get("checkpoint"), int) else None
        except (OSError, ValueError):
            return None

    def _forget_wish(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            self.log(f"WARNING: cannot remove {self.path}: {e}")
