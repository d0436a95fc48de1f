"""Randomized interleavings: generated schedules replayed on a real ``AgentSession``, every
invariant of a bounded, complete close checked after each, and a failing schedule shrunk to
a minimal one printed as a ready-to-paste catalogue scenario.

:mod:`.schedule` is the data (no livekit-agents import), :mod:`.strategies` generates it
with ``hypothesis``, :mod:`.world` and :mod:`.replay` run it, :mod:`.invariants` checks it,
:mod:`.engine` runs many, shrinks the failures and prints them.
"""
