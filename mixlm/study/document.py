"""A report as a list of blocks, written once as Markdown and once as a static HTML page of the same content.

    blocks = [Heading("Study demo"), Paragraph("The search ..."), Table(["a", "b"], [[1, 2]]), Image("x.png", "x")]
    to_markdown(blocks); to_html(blocks, title="Study demo")

Text is plain with `code` spans; the HTML escapes everything and turns only those spans into <code>. Images are
paths relative to the page (the PNGs sit beside it), so the folder can be copied or served as it is.
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: list[str]


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list]
    caption: str = ""


@dataclass(frozen=True)
class Image:
    path: str
    caption: str


@dataclass(frozen=True)
class Code:
    text: str


Block = Heading | Paragraph | Bullets | Table | Image | Code


def cell(value) -> str:
    """A table cell as text: floats to 4 significant decimals, None as an en dash."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def to_markdown(blocks: list[Block]) -> str:
    out = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Paragraph):
            out.append(b.text)
        elif isinstance(b, Bullets):
            out.append("\n".join(f"- {item}" for item in b.items))
        elif isinstance(b, Table):
            rows = [" | ".join(cell(c).replace("|", "\\|") for c in row) for row in b.rows]
            text = "\n".join([f"| {' | '.join(b.header)} |", "|" + "---|" * len(b.header),
                              *(f"| {r} |" for r in rows)])
            out.append(f"{text}\n\n{b.caption}" if b.caption else text)
        elif isinstance(b, Image):
            out.append(f"![{b.caption}]({b.path})\n\n*{b.caption}*")
        elif isinstance(b, Code):
            out.append("```\n" + b.text.rstrip("\n") + "\n```")
    return "\n\n".join(out) + "\n"


_CODE = re.compile(r"`([^`]+)`")


def _inline(text: str) -> str:
    return _CODE.sub(lambda m: f"<code>{m.group(1)}</code>", html.escape(text, quote=False))


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}figure{margin:1.5em 0}img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:.9em}
pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:.85em}code{background:#f3f3f3;padding:0 .2em}"""


def to_html(blocks: list[Block], title: str) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{html.escape(title)}</title>", f"<style>{STYLE}</style>", "</head>", "<body>"]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{_inline(b.text)}</h{b.level}>")
        elif isinstance(b, Paragraph):
            out.append(f"<p>{_inline(b.text)}</p>")
        elif isinstance(b, Bullets):
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{_inline(h)}</th>" for h in b.header)
            body = "".join("<tr>" + "".join(f"<td>{_inline(cell(c))}</td>" for c in row) + "</tr>" for row in b.rows)
            caption = f"<p>{_inline(b.caption)}</p>" if b.caption else ""
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{caption}")
        elif isinstance(b, Image):
            out.append(f'<figure><img src="{html.escape(b.path)}" alt="{html.escape(b.caption)}">'
                       f"<figcaption>{_inline(b.caption)}</figcaption></figure>")
        elif isinstance(b, Code):
            out.append(f"<pre>{html.escape(b.text)}</pre>")
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"
