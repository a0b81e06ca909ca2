"""The report's page: blocks (Heading, Para, Table, Plot) rendered to markdown with PNG files beside it, or to one
self-contained HTML page with the plots embedded. The steps build blocks; this module only renders them."""

import base64
import html
import io
import re
from dataclasses import dataclass
from pathlib import Path

from common.io.files import atomic_path
from common.reporting.eval_tables import table


def new_figure(panels):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(min(4.2 * panels, 12), 3.2), squeeze=False)
    return fig, axes[0]


def png(fig):
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str


@dataclass
class Table:
    header: list
    rows: list


@dataclass
class Plot:
    name: str  # the PNG's file name in <out>_plots/, and the HTML figure's id
    data: bytes
    caption: str


def plot(name, fig, caption):
    """A Plot block of a matplotlib figure (closed here)."""
    return Plot(name, png(fig), caption)


def to_markdown(title, blocks, plots_dir):
    """Markdown with the plots as PNG files in plots_dir, linked relative to the markdown file."""
    parts = [f"# {title}"]
    for block in blocks:
        match block:
            case Heading(text, level):
                parts.append("#" * level + " " + text)
            case Para(text):
                parts.append(text)
            case Table(header, rows):
                parts.append(table(header, rows))
            case Plot(name, data, caption):
                with atomic_path(plots_dir / f"{name}.png") as tmp:
                    Path(tmp).write_bytes(data)
                parts.append(f"![{caption}]({plots_dir.name}/{name}.png)")
    return "\n\n".join(parts) + "\n"


def inline_html(text):
    """Escape text for HTML; `code` spans become <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #1f2328; line-height: 1.45; }
h1 { border-bottom: 1px solid #d1d9e0; padding-bottom: .3em; }
h2 { border-bottom: 1px solid #d1d9e0; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .8em 0; font-size: 14px; }
th, td { border: 1px solid #d1d9e0; padding: 4px 10px; text-align: left; }
th { background: #f6f8fa; }
tr:nth-child(even) td { background: #fbfcfd; }
figure { margin: 1em 0; } img { max-width: 100%; } figcaption { color: #59636e; font-size: 13px; }
code { background: #f0f2f4; padding: 0 3px; border-radius: 3px; }
"""


def to_html(title, blocks):
    """One self-contained page: inline CSS, plots as base64 data URIs, no external requests."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    for block in blocks:
        match block:
            case Heading(text, level):
                body.append(f"<h{level}>{inline_html(text)}</h{level}>")
            case Para(text):
                body.append(f"<p>{inline_html(text)}</p>")
            case Table(header, rows):
                head = "".join(f"<th>{inline_html(str(c))}</th>" for c in header)
                cells = "".join("<tr>" + "".join(f"<td>{inline_html(str(c))}</td>" for c in row) + "</tr>"
                                for row in rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
            case Plot(name, data, caption):
                uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
                body.append(f'<figure id="{name}"><img src="{uri}" alt="{html.escape(caption)}">'
                            f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")
