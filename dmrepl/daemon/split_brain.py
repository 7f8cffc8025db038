"""Split brain seen from both sides: a primary that can also be a secondary answers hellos.

A host with both roles' sections, while primary, listens on its secondary
link address.  Nothing replicates there: a hello from a primary (the other
host took over, or never stopped) gets a refusal carrying this host's hello,
so that the connecting primary reads "SPLIT BRAIN" (roles.hello.agree) and
this host records it too.  Neither resyncs on its own: the admin picks the
host whose writes go (`dmrepl resolve NAME --discard-my-data`).
"""

from __future__ import annotations

import socket
import threading
from typing import Callable

from dmrepl.daemon.progress import log
from dmrepl.link import auth
from dmrepl.link.frames import FrameError, Kind
from dmrepl.link.session import Listener
from dmrepl.roles.hello import Hello, agree

HELLO_TIMEOUT = 10.0


class HelloResponder:
    def __init__(self, host: str, port: int, key_file: str, mine: Callable[[], Hello],
                 seen: Callable[[str], None]):
        self.listener = Listener(host, port, auth.load_key(key_file))
        self.mine, self.seen = mine, seen
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="hello-responder", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            try:
                session = self.listener.accept(timeout=0.5)
            except socket.timeout:
                continue
            except FrameError as e:
                log(f"split-brain watch: refused a connection: {e}")
                continue
            except OSError:
                return     # closed: the daemon stops
            with session:
                try:
                    kind, body = session.recv(timeout=HELLO_TIMEOUT)
                    theirs = Hello.from_wire(body) if kind == Kind.HELLO else None
                    if theirs is None:
                        continue
                    mine = self.mine()
                    reasons = agree(mine, theirs).reasons or ["this host is primary: it follows nobody"]
                    session.send(Kind.REFUSED, {"reasons": reasons, "hello": mine.to_wire()})
                except (FrameError, OSError, ValueError) as e:
                    log(f"split-brain watch: {session.peer}: {e}")
                    continue
            if theirs.role == "primary":
                self.seen(f"the peer at {session.peer} is primary too: " + "; ".join(reasons))

    def close(self) -> None:
        self.stopping = True
        self.listener.close()
        self.thread.join(timeout=2)
