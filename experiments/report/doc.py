"""A tiny document model rendered twice, to Markdown and to self-contained HTML, so both show the same tables."""
from __future__ import annotations

from dataclasses import dataclass
from html import escape
from typing import Union


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Para:
    text: str


@dataclass(frozen=True)
class Items:
    """A bullet list; each item is plain text and an optional code part (an error line, a genotype)."""

    items: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Image:
    file: str  # relative to the report folder
    alt: str


Block = Union[Heading, Para, Items, Table, Image]

STYLE = """body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #eee; } code { background: #f4f4f4; padding: 1px 3px; }
img { max-width: 100%; display: block; margin: 0.5em 0 1.5em; }"""


def _md_code(text: str) -> str:
    """`text` as a Markdown code span, fenced with more backticks than it contains."""
    fence = "`"
    while fence in text:  # a fence that is no substring is longer than every backtick run in the text
        fence += "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ") or " "


def to_markdown(blocks: list[Block]) -> str:
    """GitHub-flavoured Markdown."""
    out = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Para):
            out.append(block.text)
        elif isinstance(block, Items):
            out.append("\n".join(f"- {text}{_md_code(code) if code else ''}" for text, code in block.items))
        elif isinstance(block, Table):
            lines = [block.header, tuple("---" for _ in block.header), *block.rows]
            out.append("\n".join("| " + " | ".join(_md_cell(c) for c in line) + " |" for line in lines))
        else:
            out.append(f"![{block.alt}]({block.file})")
    return "\n\n".join(out) + "\n"


def _html_block(block: Block) -> str:
    if isinstance(block, Heading):
        return f"<h{block.level}>{escape(block.text)}</h{block.level}>"
    if isinstance(block, Para):
        return f"<p>{escape(block.text)}</p>"
    if isinstance(block, Items):
        items = (f"<li>{escape(text)}{f'<code>{escape(code)}</code>' if code else ''}</li>"
                 for text, code in block.items)
        return "<ul>\n" + "\n".join(items) + "\n</ul>"
    if isinstance(block, Table):
        head = "".join(f"<th>{escape(c)}</th>" for c in block.header)
        rows = ("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in block.rows)
        return f"<table>\n<tr>{head}</tr>\n" + "\n".join(rows) + "\n</table>"
    return f'<img src="{escape(block.file)}" alt="{escape(block.alt)}">'


def to_html(blocks: list[Block], title: str) -> str:
    """One HTML page with its style inline; images stay files beside it."""
    body = "\n".join(_html_block(block) for block in blocks)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{escape(title)}</title>\n'
            f"<style>\n{STYLE}\n</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")
