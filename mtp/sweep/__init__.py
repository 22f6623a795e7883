"""Sweeps: a grid of configs trained point by point (resumably), then one results table and plots.

``mtp sweep`` (mtp/sweep/cli.py) is the command; ``grid`` parses ``--sweep`` specs and names points,
``run`` trains them and collects rows, ``report`` writes results.md/json and plots. docs/sweeps.md
is the guide.
"""

from mtp.sweep.grid import SIZES, Point, SweepError, SweepSpec, make_grid, parse_spec

__all__ = ["SIZES", "Point", "SweepError", "SweepSpec", "make_grid", "parse_spec"]
