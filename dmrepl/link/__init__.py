"""The control link between the two hosts' dmrepl daemons.

    link/frames.py  versioned, length-prefixed frames with a MAC, and their limits
    link/auth.py    the pre-shared key file and the HMAC challenge-response
    link/session.py an authenticated connection: typed messages in, typed messages out

Nothing a peer sends is acted on before the challenge-response succeeded, and
after it every frame carries a MAC under a key fresh to the session and a
sequence number, so that a replayed or forged frame does nothing.
"""
