"""The secondary daemon's end of the control link: one primary at a time, served in a thread.

The listener is bound before the daemon reports ready (a port in use is a
start error, not a silent thread death).  A peer that fails the key handshake,
sends garbage or another resource id is logged and dropped; the next one is
accepted.  Checkpoints run through the secondary's own policy (its lock, its
one switch) with a device-mapper handle of this thread's own.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Callable

from dmrepl.config import SecondaryConfig
from dmrepl.daemon import peer
from dmrepl.kernel import blockdev
from dmrepl.link import auth
from dmrepl.link.frames import FrameError, Kind
from dmrepl.link.session import Listener, Session
from dmrepl.roles.hello import Hello
from dmrepl.roles.secondary import Secondary

log = logging.getLogger(__name__)


class LinkServer:
    def __init__(self, cfg: SecondaryConfig, stopping: Callable[[], bool]):
        self.cfg = cfg
        self.stopping = stopping
        self.listener = Listener(cfg.link_host, cfg.link_port, auth.load_key(cfg.key_file))
        self.session: Session | None = None
        self._thread = threading.Thread(target=self._run, name="link", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self.listener.close()
        if self.session is not None:
            self.session.close()
        self._thread.join(timeout=5)

    def request_early_checkpoint(self, reason: str) -> bool:
        """Ask the connected primary for a checkpoint now; False if none is connected."""
        session = self.session
        if session is None:
            return False
        try:
            session.send(Kind.EARLY_CHECKPOINT, {"reason": reason})
            return True
        except OSError:
            return False

    def _hello(self, sec: Secondary, theirs: Hello) -> Hello:
        st = sec.state()
        stores = sec.stack.backing().stores
        return Hello(resource_id=self.cfg.resource_id, role="secondary",
                     size_bytes=blockdev.size_bytes(sec.origin_device()), chunk_sectors=self.cfg.chunk_sectors,
                     era_block_sectors=theirs.era_block_sectors, checkpoints=[st.checkpoint] if st else [],
                     store_bytes=min(blockdev.size_bytes(d) for d in stores))

    def _run(self) -> None:
        with Secondary.open(self.cfg) as sec:
            while not self.stopping():
                try:
                    session = self.listener.accept(timeout=0.5)
                except socket.timeout:
                    continue
                except FrameError as e:
                    log.warning("control link: refused %s", e)
                    continue
                except OSError:
                    return  # the listener was closed: the daemon stops
                log.info("control link: %s authenticated", session.peer)
                self.session = session
                try:
                    peer.serve(session, lambda theirs: self._hello(sec, theirs),
                               lambda n: sec.checkpoint(number=n)[1])
                except (FrameError, OSError) as e:
                    log.info("control link: %s: %s", session.peer, e)
                finally:
                    self.session = None
                    session.close()
