"""Schedules from a flat sequence of integer choices: drawn by a seeded random generator
for the run, by ``hypothesis`` for shrinking.

One decoder (:func:`decode`) turns choices into a schedule; :func:`generate` feeds it a
``random.Random`` seeded per schedule (fast, and schedule ``i`` of a seed is the same
whatever ``--jobs`` is), :func:`schedules` feeds it ``hypothesis`` draws, one integer per
choice. A failing schedule's choices are therefore a valid hypothesis example, which
:func:`.engine.shrink` hands to hypothesis's shrinker through its example database.

Every choice lists its simplest value first (index 0): the setup field's default, a step
that does nothing, ``wait 0``. Hypothesis shrinks toward 0, so a minimal reproducer keeps
only the faults and steps its failure needs. The bounds are small (drain 0.1-0.3 s, close
0.6-1.5 s, graceful 0.3-0.5 s, final transcript 0.05 s): a schedule takes about a second.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from hypothesis import strategies as st

from .schedule import CLOSE_PATHS, TOOLS, Schedule, Setup, Step

#: (field, its values with the default first, generation weights)
SETUP_CHOICES: tuple[tuple[str, tuple[Any, ...], tuple[int, ...]], ...] = (
    ("drain_timeout", (0.2, 0.1, 0.3), (1, 1, 1)),
    ("close_timeout", (1.0, 0.6, 1.5), (1, 1, 1)),
    ("graceful_timeout", (0.5, 0.3), (1, 1)),
    ("on_enter", (None, "slow", "park", "swallow"), (85, 5, 5, 5)),
    ("on_exit", (None, "slow", "park", "swallow"), (85, 5, 5, 5)),
    ("next_on_enter", (None, "slow", "park", "swallow"), (85, 5, 5, 5)),
    ("next_on_exit", (None, "slow", "park", "swallow"), (85, 5, 5, 5)),
    # a stream that swallows every cancellation is a zombie by definition (the catalogue's
    # zombie-stream scenarios cover how it is reported): only streams a cancel can stop
    ("stt_close", ("none", "hang"), (80, 20)),
    ("llm_close", ("none", "hang"), (80, 20)),
    ("tts_close", ("none", "hang"), (80, 20)),
    ("final_on_flush", (False, True), (1, 1)),
    ("toolset", (None, "close", "session-close", "setup"), (85, 5, 5, 5)),
    ("dead_sink", (False, True), (85, 15)),
)

_USER = ("text", *(f"tool:{t}" for t in TOOLS), *(f"talk+tool:{t}" for t in TOOLS), "stall")
#: (kind, its arguments, generation weight); kind 0 is a step that is not there
STEP_CHOICES: tuple[tuple[str, tuple[Any, ...], int], ...] = (
    ("skip", (None,), 0),
    ("wait", (0, 10, 50, 150), 15),
    ("started", (None,), 5),
    ("user", _USER, 30),
    ("close", CLOSE_PATHS, 20),
    ("say", (True, False), 7),
    ("interrupt", (False, True), 5),
    ("hangup", (None,), 5),
    ("error", ("stt", "llm", "tts"), 5),
    ("tts_stall", (None,), 3),
    ("restart", (None,), 5),
)
MAX_STEPS = 10
ARGS = max(len(args) for _, args, _ in STEP_CHOICES)

#: ``pick(n, weights)``: one choice in ``range(n)``
Pick = Callable[[int, Sequence[int] | None], int]


def decode(pick: Pick) -> Schedule:
    """The schedule the choices ``pick`` makes describe (the one layout both sources use)."""
    setup = Setup(**{name: values[pick(len(values), w)] for name, values, w in SETUP_CHOICES})
    n = 1 + pick(MAX_STEPS, None)
    steps: list[Step] = []
    kinds = [w for _, _, w in STEP_CHOICES]
    for i in range(n):
        kind = pick(len(STEP_CHOICES), _step_weights(kinds, i, n))
        arg = pick(ARGS, None)
        name, args, _ = STEP_CHOICES[kind]
        if name != "skip":
            steps.append(Step(name, args[arg % len(args)]))  # type: ignore[arg-type]
    return Schedule(setup, tuple(steps))


def _step_weights(kinds: list[int], i: int, n: int) -> list[int]:
    """Most schedules let start() finish first and end with a close request."""
    if i == 0 and n > 1:
        return [w * (40 if k == 2 else 1) for k, w in enumerate(kinds)]
    if i == n - 1:
        return [w * (8 if k == 4 else 1) for k, w in enumerate(kinds)]
    return kinds


def generate_one(seed: int, index: int) -> tuple[Schedule, list[int]]:
    """Schedule ``index`` of ``seed``, with the choices that make it."""
    rng = random.Random(f"livekit-safeclose-fuzz:{seed}:{index}")
    choices: list[int] = []

    def pick(n: int, weights: Sequence[int] | None) -> int:
        c = rng.choices(range(n), weights=weights)[0] if weights else rng.randrange(n)
        choices.append(c)
        return c

    return decode(pick), choices


def generate(n: int, seed: int) -> list[Schedule]:
    """The ``n`` schedules of ``seed`` (the same on every run)."""
    return [generate_one(seed, i)[0] for i in range(n)]


@st.composite
def schedules(draw: Any) -> Schedule:
    """The hypothesis strategy: each choice one ``st.integers`` draw, 0 the simplest."""
    return decode(lambda n, _w: draw(st.integers(0, n - 1)))
