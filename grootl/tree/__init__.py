"""Token graph, minimum spanning tree and the single-root tree scan of GrootL.

``build_tree`` and ``tree_scan`` are the public entry points; ``tree_scan_ref`` is the plain oracle.
"""

from grootl.tree.graph import DISTANCES, Tree, build_tree, edge_weights
from grootl.tree.scan import chain_scan, tree_scan, tree_scan_ref
from grootl.tree.validation import NonFiniteInputError

__all__ = ["DISTANCES", "NonFiniteInputError", "Tree", "build_tree", "chain_scan", "edge_weights", "tree_scan", "tree_scan_ref"]
