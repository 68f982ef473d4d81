"""What a layer changes: the union of layers below it, folded one layer at a time.

``fold`` applies layer directories bottom first to an in-memory tree, the way overlayfs
shows them merged, and reports each entry of each layer as a change:

- ``A`` added: nothing at that path below;
- ``C`` changed: something was there below (a file replaced, a directory's attributes
  or contents changed: directories in a layer show as C, as in ``docker diff``);
- ``D`` deleted: a whiteout hiding what was below (a whiteout of nothing is not shown).

The same fold gives the per-layer counts of ``layers_table`` and the container's
``diff`` (its upper directory folded on top of its image).
"""
from __future__ import annotations

import os
import stat
from typing import Callable, Dict, List, Optional, Tuple

from . import layers as L

Change = Tuple[str, str]  # ("A"|"C"|"D", "/path")


class _Node:
    __slots__ = ("is_dir", "children")

    def __init__(self, is_dir: bool) -> None:
        self.is_dir = is_dir
        self.children: Dict[str, "_Node"] = {}


def _count(node: _Node) -> int:
    return 1 + sum(_count(c) for c in node.children.values())


class Tree:
    """The merged view of the layers folded so far."""

    def __init__(self) -> None:
        self.root = _Node(True)

    def lookup(self, rel: str) -> Optional[_Node]:
        node = self.root
        for part in rel.split("/"):
            node = node.children.get(part)  # type: ignore[assignment]
            if node is None:
                return None
        return node

    def entries(self) -> int:
        return _count(self.root) - 1

    def fold(self, layer_dir: str, report: Optional[Callable[[str, str], None]] = None,
             skip_mount_points: bool = False) -> None:
        """Apply one layer directory on top; ``report(kind, "/path")`` for each change."""
        for rel, full, st in L.walk(layer_dir, skip_mount_points):
            parent_rel, _, name = rel.rpartition("/")
            parent = self.lookup(parent_rel) if parent_rel else self.root
            if parent is None or not parent.is_dir:  # a directory this layer made anew
                parent = self._ensure_dir(parent_rel)
            existing = parent.children.get(name)
            if L.is_whiteout(st):
                if existing is not None:
                    del parent.children[name]
                    if report:
                        report("D", "/" + rel)
                continue
            is_dir = stat.S_ISDIR(st.st_mode)
            if is_dir and existing is not None and existing.is_dir:
                if L.is_opaque(full):  # hides everything below: what it lacks is deleted
                    present = set(L.list_dir(full, st))  # a live layer: never a link
                    for child in sorted(existing.children):
                        if child not in present:
                            del existing.children[child]
                            if report:
                                report("D", f"/{rel}/{child}")
                        else:
                            existing.children[child].children.clear()
                if report:
                    report("C", "/" + rel)
                continue
            parent.children[name] = _Node(is_dir)
            if report:
                report("C" if existing is not None else "A", "/" + rel)

    def _ensure_dir(self, rel: str) -> _Node:
        node = self.root
        for part in rel.split("/"):
            child = node.children.get(part)
            if child is None or not child.is_dir:
                child = node.children[part] = _Node(True)
            node = child
        return node


def fold_layers(layer_dirs: List[str]) -> Tuple[Tree, List[Dict[str, int]]]:
    """Fold layer directories (BOTTOM first); returns the tree and each layer's counts."""
    tree = Tree()
    counts = []
    for d in layer_dirs:
        c = {"A": 0, "C": 0, "D": 0}

        def report(kind: str, path: str, c: Dict[str, int] = c) -> None:
            c[kind] += 1
        tree.fold(d, report)
        counts.append(c)
    return tree, counts


def changes(image_layer_dirs: List[str], upper: str) -> List[Change]:
    """What the container layer ``upper`` changes on top of the image (bottom-first dirs)."""
    tree, _ = fold_layers(image_layer_dirs)
    out: List[Change] = []
    tree.fold(upper, lambda kind, path: out.append((kind, path)), skip_mount_points=True)
    return out


def upper_of(container_dir: str) -> str:
    return os.path.join(container_dir, "upper")
