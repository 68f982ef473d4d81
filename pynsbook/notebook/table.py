"""A small table that shows as HTML in a notebook and as aligned text in a terminal."""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any, List, Sequence, Tuple


@dataclass
class Section:
    title: str
    header: Tuple[str, ...]
    rows: List[Tuple[str, ...]] = field(default_factory=list)


@dataclass
class Table:
    """What ``%cgroup`` and ``%container`` return: sections of rows, and notes below."""

    title: str
    sections: List[Section] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def section(self, title: str, header: Sequence[str]) -> Section:
        s = Section(title, tuple(header))
        self.sections.append(s)
        return s

    def __str__(self) -> str:
        out = [self.title]
        for s in self.sections:
            out.append("")
            if s.title:
                out.append(s.title)
            widths = [max([len(h)] + [len(str(r[i])) for r in s.rows]) for i, h in enumerate(s.header)]
            fmt = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
            out.append(fmt(s.header))
            out += [fmt(r) for r in s.rows]
        if self.notes:
            out.append("")
            out += self.notes
        return "\n".join(out)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(str(self))

    def _repr_html_(self) -> str:
        e = html.escape
        parts = [f"<div><b>{e(self.title)}</b>"]
        for s in self.sections:
            if s.title:
                parts.append(f"<div style='margin-top:.5em'>{e(s.title)}</div>")
            parts.append("<table><tr>" + "".join(f"<th style='text-align:left'>{e(h)}</th>"
                                                 for h in s.header) + "</tr>")
            for r in s.rows:
                parts.append("<tr>" + "".join(f"<td style='text-align:left'><code>{e(str(c))}</code></td>"
                                              if i == 0 or "/" in str(c) else
                                              f"<td style='text-align:left'>{e(str(c))}</td>"
                                              for i, c in enumerate(r)) + "</tr>")
            parts.append("</table>")
        parts += [f"<div>{e(n)}</div>" for n in self.notes]
        parts.append("</div>")
        return "".join(parts)
