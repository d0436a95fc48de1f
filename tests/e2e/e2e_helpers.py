"""Bounds shared by the end-to-end tests."""

from __future__ import annotations

#: what the e2e tests give the layer: short, so a bounded close is quick to prove
DRAIN_TIMEOUT = 0.3
CLOSE_TIMEOUT = 2.0
#: slack for scheduling on a loaded 2-core box
MARGIN = 0.75
#: how long a vanilla close is given before it is called hung
VANILLA_WAIT = 1.0
