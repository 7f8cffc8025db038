"""The primary host's half: every write to the local disk P and, synchronously, to the secondary.

    consumer -> dmrepl-NAME        = era M <mirror> <block>     (what changed in which era)
             -> dmrepl-NAME-mirror = mirror core P /dev/nbdX    (reads from P; the NBD leg is S)

stack.py builds and tears down the two devices and takes the primary's half of
a checkpoint (suspend with flush: every acknowledged write is on P and S).
"""
