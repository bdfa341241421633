"""The page a report is written to, once for Markdown (GitHub) and once for HTML (one self-contained file):
`Table` and `Page` are plain data, `markdown(page)` and `html(page)` the two writers every report uses."""

from __future__ import annotations

import base64
import dataclasses
import html as html_lib
import re
from collections.abc import Mapping

STYLE = (
    "body{font-family:sans-serif;max-width:1200px;margin:2em auto;line-height:1.4}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #999;padding:3px 6px;font-size:13px}"
    "th{background:#eee}.note{color:#555;font-size:12px}.warn{background:#fdd;padding:6px;font-weight:bold}"
    "img{max-width:100%}figure{margin:1em 0}figcaption{color:#555;font-size:12px}.headline li{margin:.3em 0}"
    "table.settings td{font-size:12px}"
)


def escape_markdown(text: str) -> str:
    """`<` as `&lt;`: GitHub drops what looks like an HTML tag (`<EOS>`) from Markdown."""
    return text.replace("<", "&lt;")


def literal(text: str) -> str:
    """User-given text (a run name, a `--label`, a path) for a line with the page's own Markdown (`**bold**`):
    what could start inline markup is backslash-escaped (backslash, backtick, asterisk, tilde, a bracket that
    opens a link, an underscore at a word's edge, an ampersand that begins an entity; `<` is `escape_markdown`'s),
    so `*y*` or `<b>x</b>` shows as typed in report.md while `FID_XRV` or `0.61 [0.5, 0.7]` stay as they are.
    `strong` undoes the escapes for report.html."""
    text = re.sub(r"([\\`*~])", r"\\\1", text)
    text = re.sub(r"\[(?=[^\]]*\]\s*[\[(])", r"\\[", text)
    text = re.sub(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", r"\\_", text)
    return re.sub(r"&(?=#?\w+;)", r"\\&", text)


def strong(text: str) -> str:
    """A line of `markdown`'s headline as HTML: escaped, the page's **bold** as <strong>, `literal`'s backslash
    escapes undone (an escaped `*` never makes bold)."""
    kept: list[str] = []

    def keep(match: re.Match[str]) -> str:  # an escaped character waits outside the bold rule, as a NUL-marked slot
        kept.append(match[1])
        return f"\0{len(kept) - 1}\0"

    marked = re.sub(r"\\(.)", keep, text)
    bold = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html_lib.escape(marked))
    return re.sub("\0(\\d+)\0", lambda m: html_lib.escape(kept[int(m[1])]), bold)


@dataclasses.dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""
    kind: str = "measured"  # "settings": what was run, no published counterpart

    def markdown(self) -> str:
        """GitHub-flavoured Markdown; headers and cells are text (run names, labels): `literal`, and `<` escaped, since
        GitHub drops what looks like an HTML tag (`<EOS>`)."""
        lines = [f"### {escape_markdown(self.title)}", ""]
        lines.append("| " + " | ".join(escape_markdown(literal(h)) for h in self.headers) + " |")
        lines.append("|" + "---|" * len(self.headers))
        lines += [
            "| " + " | ".join(escape_markdown(literal(c.replace("|", "/"))) for c in row) + " |" for row in self.rows
        ]
        if self.note:
            lines += ["", f"*{escape_markdown(self.note)}*"]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        head = "".join(f"<th>{html_lib.escape(h)}</th>" for h in self.headers)
        body = "".join("<tr>" + "".join(f"<td>{html_lib.escape(c)}</td>" for c in row) + "</tr>" for row in self.rows)
        note = f'<p class="note">{html_lib.escape(self.note)}</p>' if self.note else ""
        table = f'<table class="{self.kind}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
        return f"<h3>{html_lib.escape(self.title)}</h3>{table}{note}"


@dataclasses.dataclass
class Page:
    """Everything on the page, in reading order: title, banner, headline (words, then its table and the
    trade-off figure), the sections (each with its figures beside its tables), the settings tables, the
    protocol (after a line that says where the published numbers come from)."""

    title: str
    banner: str = ""
    headline: list[str] = dataclasses.field(default_factory=list)
    summary: Table | None = None
    figures: Mapping[str, tuple[bytes, str]] = dataclasses.field(default_factory=dict)  # name → (PNG, caption)
    sections: list[tuple[str, list[str], list[Table]]] = dataclasses.field(default_factory=list)
    settings: list[Table] = dataclasses.field(default_factory=list)
    protocol: list[str] = dataclasses.field(default_factory=list)
    sources: str = ""


def markdown(doc: Page) -> str:
    """report.md, one page that renders on GitHub: figures as relative links to the PNG files beside it."""

    def figure(name: str) -> list[str]:
        return [f"![{name}]({name}.png)", "", f"*Figure ({name}): {doc.figures[name][1]}*", ""]

    md = [f"# {escape_markdown(doc.title)}", ""] + ([doc.banner, ""] if doc.banner else [])
    if doc.headline or doc.summary is not None:
        md += ["## Headline", ""] + [f"- {escape_markdown(line)}" for line in doc.headline] + [""]
        md += [doc.summary.markdown()] if doc.summary is not None else []
        md += figure("trade-off") if "trade-off" in doc.figures else []
    for heading, figures, tabs in doc.sections:
        md += [f"## {escape_markdown(heading)}", ""]
        for name in figures:
            md += figure(name)
        md += [t.markdown() for t in tabs]
    if doc.settings:
        md += ["## Runs and settings", ""] + [t.markdown() for t in doc.settings]
    if doc.protocol:
        md += ["## Protocol", ""] + ([escape_markdown(doc.sources), ""] if doc.sources else [])
        md += [f"- {escape_markdown(p)}" for p in doc.protocol]
    return "\n".join(md) + "\n"


def html(doc: Page) -> str:
    """report.html: one file, the same page as report.md, figures inlined, nothing fetched from the network."""

    def figure(name: str) -> str:
        png, caption = doc.figures[name]
        data = base64.b64encode(png).decode()
        return (
            f'<figure><img alt="{html_lib.escape(name)}" src="data:image/png;base64,{data}">'
            f"<figcaption>Figure ({html_lib.escape(name)}): {html_lib.escape(caption)}</figcaption></figure>"
        )

    body = [f"<h1>{html_lib.escape(doc.title)}</h1>"]
    if doc.banner:
        body.append(f'<p class="warn">{html_lib.escape(doc.banner.strip("*"))}</p>')
    if doc.headline or doc.summary is not None:
        items = "".join(f"<li>{strong(x)}</li>" for x in doc.headline)
        body.append(f'<h2>Headline</h2><ul class="headline">{items}</ul>')
        body.append(doc.summary.html() if doc.summary is not None else "")
        body.append(figure("trade-off") if "trade-off" in doc.figures else "")
    for heading, figures, tabs in doc.sections:
        body.append(f"<h2>{html_lib.escape(heading)}</h2>" + "".join(figure(n) for n in figures))
        body += [t.html() for t in tabs]
    if doc.settings:
        body.append("<h2>Runs and settings</h2>" + "".join(t.html() for t in doc.settings))
    if doc.protocol:
        sources = f"<p>{html_lib.escape(doc.sources)}</p>" if doc.sources else ""
        body.append(f"<h2>Protocol</h2>{sources}<ul>")
        body.append("".join(f"<li>{html_lib.escape(p)}</li>" for p in doc.protocol) + "</ul>")
    head = f'<meta charset="utf-8"><title>{html_lib.escape(doc.title)}</title><style>{STYLE}</style>'
    return f"<!DOCTYPE html><html><head>{head}</head><body>{''.join(body)}</body></html>"
