"""Results that print well: as text in a terminal, as HTML in a notebook."""
from __future__ import annotations

import html
from typing import Any, List, Sequence, Tuple


class Table:
    """Rows under headers. ``str()`` aligns columns; notebooks render ``_repr_html_``."""

    def __init__(self, headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "",
                 footer: str = "") -> None:
        self.headers = list(headers)
        self.rows = [[("" if v is None else str(v)) for v in r] for r in rows]
        self.title = title
        self.footer = footer

    def __len__(self) -> int:
        return len(self.rows)

    def __str__(self) -> str:
        widths = [max([len(h)] + [len(r[i]) for r in self.rows]) for i, h in enumerate(self.headers)]
        lines = [self.title] if self.title else []
        lines.append("  ".join(h.ljust(w) for h, w in zip(self.headers, widths)).rstrip())
        for r in self.rows:
            lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
        if self.footer:
            lines.append(self.footer)
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        head = "".join(f"<th style='text-align:left'>{html.escape(h)}</th>" for h in self.headers)
        body = "".join("<tr>" + "".join(f"<td style='text-align:left'><code>{html.escape(v)}</code></td>"
                                        for v in r) + "</tr>" for r in self.rows)
        cap = f"<caption style='text-align:left'>{html.escape(self.title)}</caption>" if self.title else ""
        foot = f"<p>{html.escape(self.footer)}</p>" if self.footer else ""
        return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{foot}"


class Diff(List[Tuple[str, str]]):
    """A container's changes: ``("A"|"C"|"D", "/path")`` pairs, printed as ``docker diff``
    prints them (one ``A /path`` per line)."""

    def __str__(self) -> str:
        return "\n".join(f"{kind} {path}" for kind, path in self) if self else "(no changes)"

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        color = {"A": "green", "C": "darkorange", "D": "red"}
        lines = "\n".join(f"<span style='color:{color[k]}'>{k}</span> {html.escape(p)}"
                          for k, p in self)
        return f"<pre>{lines or '(no changes)'}</pre>"
