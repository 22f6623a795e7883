"""Draft trees for self-speculative decoding (a chain is the tree with width 1 everywhere).

A tree spec lists, per draft depth d = 1..k-1, how many candidates head d+1 proposes: ``(3, 2, 1)``
takes head 2's top-3, head 3's top-2 under each, head 4's top-1 under each (Medusa-style cartesian
tree): 1 root + 3 + 6 + 6 = 16 nodes, verified in ONE forward with an ancestor-only attention mask.
Nodes are in breadth-first order, so every parent comes before its children.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class DraftTree:
    widths: tuple[int, ...]  # candidates per depth (depth 1 = head 2)
    parent: np.ndarray  # [T] parent node (root: -1)
    depth: np.ndarray  # [T] 0 for the root
    rank: np.ndarray  # [T] candidate rank within its depth's top-w list (root: 0)
    mask: np.ndarray  # [T, T] bool: node i may attend to node j (j is i or an ancestor of i)
    path: np.ndarray  # [T, max_depth + 1] the ancestor of node i at each depth (padded with i)

    @property
    def size(self) -> int:
        return len(self.parent)

    @property
    def max_depth(self) -> int:
        return len(self.widths)

    @property
    def is_chain(self) -> bool:
        return all(w == 1 for w in self.widths)

    @property
    def n_heads(self) -> int:
        """Heads the tree needs: head 1 verifies, heads 2..k draft."""
        return len(self.widths) + 1


def parse_tree(spec: str | tuple | list | None, n_heads: int) -> DraftTree:
    """``None`` or ``'chain'`` -> a chain over ``n_heads`` heads; ``'3,2,1'`` -> that tree."""
    if spec is None or spec == "chain" or spec == "":
        widths = (1,) * (n_heads - 1)
    else:
        if isinstance(spec, str):
            try:
                widths = tuple(int(w) for w in spec.split(","))
            except ValueError:
                raise ValueError(f"--tree {spec!r}: expected comma-separated widths per draft depth,"
                                 " e.g. '3,2,1' (head 2 top-3, head 3 top-2, head 4 top-1).") from None
        else:
            widths = tuple(int(w) for w in spec)
        if any(w < 1 for w in widths):
            raise ValueError(f"--tree {spec!r}: every width must be >= 1.")
        if len(widths) != n_heads - 1:
            raise ValueError(f"--tree {spec!r} has {len(widths)} depths but {n_heads} heads draft"
                             f" {n_heads - 1} tokens: give {n_heads - 1} widths or change --heads.")
    return build_tree(widths)


def build_tree(widths: tuple[int, ...]) -> DraftTree:
    parent, depth, rank = [-1], [0], [0]
    level = [0]
    for d, w in enumerate(widths, start=1):
        nxt = []
        for p in level:
            for r in range(w):
                parent.append(p)
                depth.append(d)
                rank.append(r)
                nxt.append(len(parent) - 1)
        level = nxt
    T = len(parent)
    mask = np.zeros((T, T), bool)
    path = np.zeros((T, len(widths) + 1), np.int32)
    for i in range(T):
        j, chain = i, []
        while j >= 0:
            mask[i, j] = True
            chain.append(j)
            j = parent[j]
        chain = chain[::-1]  # root .. i
        path[i] = chain + [i] * (len(widths) + 1 - len(chain))
    return DraftTree(tuple(widths), np.asarray(parent, np.int32), np.asarray(depth, np.int32),
                     np.asarray(rank, np.int32), mask, path)
