"""Genotype cells drawn as SVG by plain string building (no graphviz needed).

Layout is an arc diagram: the states sit in one row in index order (inputs, intermediate nodes, output), each edge
is an arc above the row from its input to its node, labelled with its op at the arc's apex. An arc's height grows
with the number of states it spans, so two labels meet only when two edges join the same pair of states; the second
of those is drawn below the row. Edges into the output (mean or concat) are dashed arcs below the row.

    RNN: node 0 = (x_t, h_{t-1}); node i reads recurrent[i-1] = (op, j); h_t = mean of the concat nodes.
    CNN: inputs c_{k-2}, c_{k-1} (indices 0, 1); node i (index i+2) sums edges normal[2i], normal[2i+1];
         c_k = concat of the concat nodes.
"""
from __future__ import annotations

from dataclasses import dataclass
from xml.sax.saxutils import escape

from shared.genotypes import CNN_PRIMITIVES, RNN_PRIMITIVES, CNNGenotype, RNNGenotype

SPACING, BOX_H, FONT = 150, 30, 12  # px: distance between states, state box height, font size
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
OP_COLORS = {op: PALETTE[i % len(PALETTE)] for ops in (RNN_PRIMITIVES, CNN_PRIMITIVES) for i, op in enumerate(ops)}


@dataclass(frozen=True)
class Cell:
    """A cell as a graph: states (label, kind) in index order, the output last; edges (input, node, op)."""

    title: str
    states: tuple[tuple[str, str], ...]  # kind: "input" | "node" | "output"
    edges: tuple[tuple[int, int, str], ...]  # op "" for the dashed edges into the output


def rnn_cell(genotype: RNNGenotype, title: str) -> Cell:
    """The recurrent cell: x_t,h_{t-1} -> nodes 1..n -> h_t (mean of concat)."""
    n = len(genotype.recurrent)
    states = (("x_t, h_{t-1}", "input"), *((str(i), "node") for i in range(1, n + 1)), ("h_t = mean", "output"))
    edges = [(j, i, op) for i, (op, j) in enumerate(genotype.recurrent, start=1)]
    edges += [(c, n + 1, "") for c in genotype.concat]
    return Cell(title, states, tuple(edges))


def cnn_cell(genotype: CNNGenotype, which: str, title: str) -> Cell:
    """The normal or reduce cell: c_{k-2}, c_{k-1} -> nodes 0..n-1 -> c_k (concat)."""
    edges_in, concat = getattr(genotype, which), getattr(genotype, f"{which}_concat")
    n = len(edges_in) // 2
    states = (("c_{k-2}", "input"), ("c_{k-1}", "input"), *((str(i), "node") for i in range(n)),
              ("c_k = concat", "output"))
    edges = [(j, k // 2 + 2, op) for k, (op, j) in enumerate(edges_in)]
    edges += [(c, n + 2, "") for c in concat]
    return Cell(title, states, tuple(edges))


def _width(text: str) -> float:
    return 0.62 * FONT * len(text) + 16


def _arc(x1: float, x2: float, y: float, height: float, color: str, dashed: bool) -> str:
    """A quadratic arc from (x1, y) to (x2, y) whose apex is `height` px above (negative: below) the row."""
    dash = ' stroke-dasharray="5,4"' if dashed else ""
    return (f'<path d="M {x1:.1f} {y:.1f} Q {(x1 + x2) / 2:.1f} {y - 2 * height:.1f} {x2:.1f} {y:.1f}" '
            f'fill="none" stroke="{color}" stroke-width="1.6"{dash} marker-end="url(#arrow)"/>')


def _label(x: float, y: float, text: str, color: str) -> str:
    w = _width(text)
    return (f'<rect x="{x - w / 2:.1f}" y="{y - 9:.1f}" width="{w:.1f}" height="18" rx="4" fill="white" '
            f'stroke="{color}" stroke-width="0.8"/><text x="{x:.1f}" y="{y + 4:.1f}" text-anchor="middle" '
            f'fill="{color}">{escape(text)}</text>')


def _state(x: float, y: float, text: str, kind: str) -> str:
    fill = {"input": "#d9e8f5", "node": "#fdf2d0", "output": "#dff0d8"}[kind]
    w = max(_width(text), 36.0)
    return (f'<rect x="{x - w / 2:.1f}" y="{y - BOX_H / 2:.1f}" width="{w:.1f}" height="{BOX_H}" rx="8" '
            f'fill="{fill}" stroke="#333"/><text x="{x:.1f}" y="{y + 4:.1f}" text-anchor="middle" '
            f'font-weight="bold">{escape(text)}</text>')


def _heights(cell: Cell) -> list[float]:
    """Signed apex height per edge: above the row for ops (the repeat of a state pair below), below for outputs."""
    heights, seen = [], set()
    for src, dst, op in cell.edges:
        below = op == "" or (src, dst) in seen
        height = (14.0 + 10.0 * (dst - src - 1)) if op == "" else (26.0 + 30.0 * (dst - src - 1))
        seen.add((src, dst))
        heights.append(-height if below else height)
    return heights


def cell_svg(cell: Cell) -> str:
    """The cell as a standalone SVG document."""
    heights = _heights(cell)
    top = max([h for h in heights if h > 0], default=0) + BOX_H
    bottom = max([-h for h in heights if h < 0], default=0) + BOX_H / 2
    y = 40 + top  # the row of states, below the title and the tallest arc
    xs = [70 + SPACING * i for i in range(len(cell.states))]
    width, height = xs[-1] + 90, y + bottom + 15
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height:.0f}" '
             f'viewBox="0 0 {width} {height:.0f}" font-family="sans-serif" font-size="{FONT}">',
             f"<title>{escape(cell.title)}</title>",
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
             'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#444"/></marker></defs>',
             f'<text x="10" y="20" font-size="{FONT + 2}" font-weight="bold">{escape(cell.title)}</text>']
    labels = []
    for (src, dst, op), h in zip(cell.edges, heights):
        color = OP_COLORS.get(op, "#666") if op else "#888"
        edge_y = y - BOX_H / 2 if h > 0 else y + BOX_H / 2
        parts.append(_arc(xs[src] + 8, xs[dst] - 8, edge_y, h, color, dashed=not op))
        if op:
            labels.append(_label((xs[src] + xs[dst]) / 2, edge_y - h, op, color))
    parts += labels  # on top of every arc
    parts += [_state(x, y, text, kind) for x, (text, kind) in zip(xs, cell.states)]
    return "\n".join(parts + ["</svg>"]) + "\n"


def genotype_cells(genotype: RNNGenotype | CNNGenotype, title: str) -> dict[str, Cell]:
    """The cells to draw for a genotype: {'recurrent': ...} or {'normal': ..., 'reduce': ...}."""
    if isinstance(genotype, RNNGenotype):
        return {"recurrent": rnn_cell(genotype, f"{title}: recurrent cell")}
    return {which: cnn_cell(genotype, which, f"{title}: {which} cell") for which in ("normal", "reduce")}
