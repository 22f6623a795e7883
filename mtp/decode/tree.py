"""Draft trees for self-speculative decoding (a chain is the tree with width 1 everywhere).

A node of a draft tree is a tuple of candidate ranks ``(r1, ..., rd)``: the token at depth d is
head d+1's rank-``rd`` candidate (0 = its argmax) under the path ``(r1, ..., r(d-1))``. Parallel
heads all read the same position, so head d+1's candidates do not depend on the path above them;
a tree only chooses which combinations are worth verifying. Every tree is verified in ONE forward
with an ancestor-only attention mask; nodes are in breadth-first order, so parents come first.

- ``(3, 2, 1)`` -- widths per depth (Medusa-style cartesian tree): head 2's top-3, head 3's top-2
  under each, head 4's top-1 under each: 1 root + 3 + 6 + 6 = 16 nodes;
- a *sparse* tree lists its nodes, e.g. ``((0,), (1,), (0, 0))`` (``--tree 0;1;0.0``): the nodes a
  calibration found most often accepted (``mtp.decode.calibrate``), so the same node budget
  accepts more than a cartesian tree.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np


@dataclasses.dataclass(frozen=True)
class DraftTree:
    widths: tuple[int, ...]  # candidates fetched per depth (depth 1 = head 2): 1 + the largest rank used
    parent: np.ndarray  # [T] parent node (root: -1)
    depth: np.ndarray  # [T] 0 for the root
    rank: np.ndarray  # [T] candidate rank within its depth's top-w list (root: 0)
    mask: np.ndarray  # [T, T] bool: node i may attend to node j (j is i or an ancestor of i)
    path: np.ndarray  # [T, max_depth + 1] the ancestor of node i at each depth (padded with i)
    nodes: tuple[tuple[int, ...], ...] = ()  # every non-root node as its rank tuple, in node order

    @property
    def size(self) -> int:
        return len(self.parent)

    @property
    def max_depth(self) -> int:
        return len(self.widths)

    @property
    def is_chain(self) -> bool:
        return self.size == self.max_depth + 1

    @property
    def n_heads(self) -> int:
        """Heads the tree needs: head 1 verifies, heads 2..k draft."""
        return len(self.widths) + 1


def is_node_list(spec) -> bool:
    """True for a sparse tree given as rank tuples (``((0,), (1,), (0, 0))``), False for widths."""
    return bool(spec) and all(isinstance(n, tuple | list) for n in spec)


def parse_nodes(text: str) -> tuple[tuple[int, ...], ...]:
    """``'0;1;0.0;0.0.0'`` -> ``((0,), (1,), (0, 0), (0, 0, 0))``."""
    try:
        return tuple(tuple(int(r) for r in node.split(".")) for node in text.split(";") if node.strip())
    except ValueError:
        raise ValueError(f"--tree {text!r}: a sparse tree lists nodes as rank paths separated by ';',"
                         " ranks within a path by '.', e.g. '0;1;0.0;1.0;0.0.0'.") from None


def parse_tree(spec: str | tuple | list | None, n_heads: int) -> DraftTree:
    """``None`` or ``'chain'`` -> a chain over ``n_heads`` heads; ``'3,2,1'`` -> that cartesian
    tree; ``'0;1;0.0'`` (or a tuple of rank tuples) -> that sparse tree (depth <= n_heads - 1)."""
    if spec is None or spec == "chain" or spec == "":
        return build_tree((1,) * (n_heads - 1))
    if isinstance(spec, str) and (";" in spec or "." in spec):
        spec = parse_nodes(spec)
    if is_node_list(spec):
        tree = build_tree_nodes(spec)
        if tree.max_depth > n_heads - 1:
            raise ValueError(f"--tree has nodes {tree.max_depth} deep, but {n_heads} heads draft only"
                             f" {n_heads - 1} tokens: use --heads {tree.max_depth + 1} or more.")
        return tree
    if isinstance(spec, str):
        try:
            widths = tuple(int(w) for w in spec.split(","))
        except ValueError:
            raise ValueError(f"--tree {spec!r}: expected comma-separated widths per draft depth,"
                             " e.g. '3,2,1' (head 2 top-3, head 3 top-2, head 4 top-1), or sparse nodes"
                             " such as '0;1;0.0'.") from None
    else:
        widths = tuple(int(w) for w in spec)
    if any(w < 1 for w in widths):
        raise ValueError(f"--tree {spec!r}: every width must be >= 1.")
    if len(widths) != n_heads - 1:
        raise ValueError(f"--tree {spec!r} has {len(widths)} depths but {n_heads} heads draft"
                         f" {n_heads - 1} tokens: give {n_heads - 1} widths or change --heads.")
    return build_tree(widths)


def cartesian_nodes(widths: tuple[int, ...]) -> list[tuple[int, ...]]:
    return [node for d in range(1, len(widths) + 1) for node in itertools.product(*map(range, widths[:d]))]


def build_tree(widths: tuple[int, ...]) -> DraftTree:
    """The cartesian tree of ``widths`` (every depth-d node has ``widths[d]`` children)."""
    return build_tree_nodes(cartesian_nodes(tuple(widths)))


def build_tree_nodes(nodes) -> DraftTree:
    """A tree from its non-root nodes (rank tuples, any order; every node's parent must be there)."""
    nodes = sorted({tuple(int(r) for r in n) for n in nodes}, key=lambda n: (len(n), n))
    index = {(): 0}
    for n in nodes:
        if not n or min(n) < 0:
            raise ValueError(f"draft tree node {n}: ranks must be >= 0 and a node at least one deep.")
        if n[:-1] not in index:
            raise ValueError(f"draft tree node {'.'.join(map(str, n))} has no parent"
                             f" {'.'.join(map(str, n[:-1]))} in the tree; list every prefix of a path.")
        index[n] = len(index)
    max_depth = max((len(n) for n in nodes), default=0)
    widths = tuple(1 + max(n[d] for n in nodes if len(n) > d) for d in range(max_depth))
    T = len(nodes) + 1
    parent = np.asarray([-1] + [index[n[:-1]] for n in nodes], np.int32)
    depth = np.asarray([0] + [len(n) for n in nodes], np.int32)
    rank = np.asarray([0] + [n[-1] for n in nodes], np.int32)
    mask = np.zeros((T, T), bool)
    path = np.zeros((T, max_depth + 1), np.int32)
    for i in range(T):
        j, chain = i, []
        while j >= 0:
            mask[i, j] = True
            chain.append(j)
            j = parent[j]
        chain = chain[::-1]  # root .. i
        path[i] = chain + [i] * (max_depth + 1 - len(chain))
    return DraftTree(widths, parent, depth, rank, mask, path, tuple(nodes))


def format_nodes(nodes) -> str:
    """The ``--tree`` text of a sparse tree: ``'0;1;0.0'``."""
    return ";".join(".".join(map(str, n)) for n in nodes)
