"""Griffe extension: make the code's Sphinx-flavoured docstrings read well in mkdocstrings.

1. ``#:`` comments above a module or class attribute (the Sphinx convention the code uses,
   e.g. ``#: Default encoding per bit width``) become that attribute's docstring.
2. Sphinx roles become Markdown cross-references: ``:class:`~arrow_quant_v2.progress.ProgressEvent```
   turns into ``[`ProgressEvent`][arrow_quant_v2.progress.ProgressEvent]`` (a leading ``~``
   shows the last component only). Short names are looked up as Python would see them
   from the documented object (its members, its parents' members, their imports), then
   as a unique name anywhere in the package. A role whose target is not rendered in the
   API reference (private, undocumented, or in a module no reference page shows) becomes
   plain code, so it never leaves a dangling link.

The modules the reference renders are read from the ``::: module`` lines of
``docs/reference/*.md``; the rendering filter is mkdocstrings' ``public``.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|data|exc|mod|obj):`(~?)([\w.]+)(?:\(\))?`")
REFERENCE = Path(__file__).resolve().parents[1] / "reference"


def rendered_modules() -> List[str]:
    out = []
    for page in sorted(REFERENCE.glob("*.md")):
        out += re.findall(r"^::: ([\w.]+)\s*$", page.read_text(encoding="utf-8"), re.M)
    return out


def _walk(obj) -> Iterator[Any]:
    yield obj
    for member in list(obj.members.values()):
        if not member.is_alias:
            yield from _walk(member)


def _target(obj):
    if obj.is_alias:
        try:
            return obj.final_target
        except Exception:  # noqa: BLE001 - an alias to something outside the package
            return None
    return obj


class SphinxRoles(griffe.Extension):
    """``#:`` comments as attribute docstrings, and Sphinx roles as cross-references."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        objects = list(_walk(pkg))
        for obj in objects:
            if obj.is_attribute and obj.docstring is None:
                self._comment_docstring(obj)
        by_name: Dict[str, List[Any]] = {}
        for obj in objects:
            by_name.setdefault(obj.name, []).append(obj)
        self.pkg, self.by_name, self.shown = pkg, by_name, rendered_modules()
        for obj in objects:
            if obj.docstring is not None:
                obj.docstring.value = ROLE.sub(lambda m, o=obj: self._role(m, o), obj.docstring.value)

    # -- #: comments -------------------------------------------------------------------------

    @staticmethod
    def _comment_docstring(obj) -> None:
        try:
            lines = obj.lines_collection[obj.filepath]
        except (KeyError, TypeError):
            return
        if not lines or not obj.lineno:
            return
        i, doc = obj.lineno - 2, []
        while i >= 0 and lines[i].strip().startswith("#:"):
            doc.insert(0, lines[i].strip()[2:].strip())
            i -= 1
        if doc:
            obj.docstring = griffe.Docstring("\n".join(doc), lineno=i + 2, parent=obj)

    # -- roles -------------------------------------------------------------------------------

    def _role(self, m: re.Match, where) -> str:
        tilde, name = m.group(1), m.group(2)
        label = name.rsplit(".", 1)[-1] if tilde else name
        target = self._resolve(name, where)
        if target is not None and self._is_rendered(target):
            return f"[`{label}`][{target.path}]"
        return f"`{label}`"

    def _resolve(self, name: str, where) -> Optional[Any]:
        root = self.pkg.name
        for candidate in (name, f"{root}.{name}"):
            if candidate.startswith(root + "."):
                try:
                    return _target(self.pkg[candidate[len(root) + 1:]])
                except (KeyError, ValueError, Exception):  # noqa: BLE001
                    pass
        head, _, rest = name.partition(".")
        scope = where
        while scope is not None:
            if head in scope.members:
                found = _target(scope.members[head])
                try:
                    return found[rest] if (found is not None and rest) else found
                except Exception:  # noqa: BLE001
                    return None
            scope = scope.parent
        matches = [o for o in self.by_name.get(name.rsplit(".", 1)[-1], []) if o.path.endswith(name)]
        return matches[0] if len(matches) == 1 else None

    def _is_rendered(self, obj) -> bool:
        if not any(obj.path == m or obj.path.startswith(m + ".") for m in self.shown):
            return False
        node = obj
        while node is not None and not node.is_module:
            if node.docstring is None or not node.docstring.value.strip() or not node.is_public:
                return False
            node = node.parent
        return node is not None and any(node.path == m or node.path.startswith(m + ".") for m in self.shown)
