"""Self-contained HTML reports: text, tables and matplotlib figures embedded as base64 PNG (opens offline)."""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em} h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f4f4f4} td:first-child,th:first-child{text-align:left}
img{max-width:100%} .note{color:#555;font-size:.92em} .big{font-size:1.3em}
"""


class Report:
    """Collects sections and writes one HTML file; figures are embedded, nothing is fetched when it opens."""

    def __init__(self, title: str):
        self.title = title
        self.parts: list[str] = []

    def heading(self, text: str) -> "Report":
        self.parts.append(f"<h2>{html.escape(text)}</h2>")
        return self

    def text(self, text: str, cls: str = "") -> "Report":
        attr = f' class="{cls}"' if cls else ""
        self.parts.append(f"<p{attr}>{html.escape(text)}</p>")
        return self

    def table(self, rows: list[dict[str, Any]]) -> "Report":
        if not rows:
            return self
        cols = list(rows[0])
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
        self.parts.append(f"<table><tr>{head}</tr>{body}</table>")
        return self

    def figure(self, fig: plt.Figure, caption: str = "") -> "Report":
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        data = base64.b64encode(buf.getvalue()).decode("ascii")
        cap = f"<figcaption class='note'>{html.escape(caption)}</figcaption>" if caption else ""
        self.parts.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>{cap}</figure>")
        return self

    def image_grid(self, images: Iterable[tuple[Any, str]], cmap: str = "gray", cols: int = 10) -> "Report":
        """Small images (2-D arrays) with a caption each, as one figure."""
        images = list(images)
        if not images:
            return self
        rows = math.ceil(len(images) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.5 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, (img, label) in zip(axes.flat, images):
            ax.imshow(img, cmap=cmap)
            ax.set_title(label, fontsize=7)
        return self.figure(fig)

    def render(self) -> str:
        body = "\n".join(self.parts)
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{_STYLE}</style></head><body><h1>{html.escape(self.title)}</h1>\n{body}\n</body></html>")

    def write(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.render(), encoding="utf-8")
        os.replace(tmp, path)
        return path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return "" if value is None else str(value)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSONL file; a torn last line (crash mid-write) is ignored."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows
