"""Kernel interface layer: thin Python over the Cython module dmrepl._kernel.

Everything here talks to the kernel or describes what it speaks (table and
status lines); nothing here knows about replication.
"""
