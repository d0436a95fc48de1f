"""The benchmark sections behind ``python benchmarks/run.py``.

Each section module exposes ``run(mode, quick) -> dict`` (JSON-ready) and is run by
``run.py`` in a child process of its own, so one section's leftovers (a vanilla session
that never closed, a zombie) cannot skew another's numbers.
"""
