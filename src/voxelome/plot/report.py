"""One self-contained HTML report per run: metrics, figures, tables and the config.

The file has no external resources and no JavaScript: images are embedded as base64 ``data:``
URIs and the CSS is inline, so it can be mailed, archived or opened offline. Every piece of text
is HTML-escaped.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

__all__ = ["write_html_report", "flatten_dict", "format_value", "to_yaml_text"]

_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml",
         ".gif": "image/gif", ".webp": "image/webp"}

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1200px;
margin:2em auto;padding:0 1.2em;color:#1d232a;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.2em}h2{font-size:1.25em;border-bottom:1px solid #d5dae0;padding-bottom:.2em;
margin-top:1.8em}.summary{font-size:1.05em;color:#333}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #d5dae0;padding:.25em .6em;
text-align:left;vertical-align:top}th{background:#f1f4f7}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#fafbfc}figure{margin:1.2em 0}figure img{max-width:100%;height:auto;
border:1px solid #e3e7eb}figcaption{color:#444;font-size:.92em;margin-top:.3em}
pre{background:#f6f8fa;border:1px solid #e3e7eb;padding:.8em;overflow-x:auto;font-size:.85em}
.missing{color:#a00}footer{margin-top:2.5em;color:#666;font-size:.85em;border-top:1px solid #d5dae0;padding-top:.5em}
"""


def _is_scalar(v) -> bool:
    return v is None or isinstance(v, (str, bytes, bool, int, float, np.generic, Path))


def format_value(v) -> str:
    """Text of one value: floats to 3 significant digits, ``None``/NaN as ``n/a``, short lists inline."""
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, np.generic):
        v = v.item()
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        head = ", ".join(format_value(x) for x in v[:12])
        return f"[{head}{', …' if len(v) > 12 else ''}]"
    return str(v)


def flatten_dict(d: Mapping, prefix: str = "") -> dict:
    """Nested mapping → ``{"a.b.c": value}``; lists of scalars stay whole values."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(flatten_dict(v, key))
        else:
            out[key] = v
    return out


def _is_block(v) -> bool:
    """Whether ``v`` needs its own indented block (a non-empty mapping, or a list holding one)."""
    if isinstance(v, Mapping):
        return bool(v)
    return isinstance(v, (list, tuple)) and not all(_is_scalar(x) for x in v)


def to_yaml_text(obj, indent: int = 0) -> str:
    """YAML-like text of nested dicts/lists for display (not a YAML serializer)."""
    pad = "  " * indent
    if isinstance(obj, Mapping):
        if not obj:
            return pad + "{}"
        return "\n".join(f"{pad}{k}:\n{to_yaml_text(v, indent + 1)}" if _is_block(v) else f"{pad}{k}: {_yaml_scalar(v)}"
                         for k, v in obj.items())
    if _is_block(obj):
        return "\n".join(f"{pad}- " + to_yaml_text(x, indent + 1).lstrip() for x in obj)
    return pad + _yaml_scalar(obj)


def _yaml_scalar(v) -> str:
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_yaml_scalar(x) for x in v) + "]"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, Mapping):
        return "{}"
    return str(v)


def _table_html(rows: Sequence[Mapping]) -> str:
    if not rows:
        return "<p><em>(empty)</em></p>"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = []
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cls = ' class="num"' if isinstance(v, (int, float, np.number)) and not isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{html.escape(format_value(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _figure_html(caption: str, png) -> str:
    cap = html.escape(str(caption))
    p = Path(png)
    mime = _MIME.get(p.suffix.lower(), "image/png")
    try:
        data = base64.b64encode(p.read_bytes()).decode("ascii")
    except OSError as exc:
        return (f'<figure><p class="missing">figure not available: {html.escape(str(p))} '
                f'({html.escape(type(exc).__name__)})</p><figcaption>{cap}</figcaption></figure>')
    return f'<figure><img src="data:{mime};base64,{data}" alt="{cap}"><figcaption>{cap}</figcaption></figure>'


def write_html_report(path, *, title: str, summary: str, metrics: Mapping,
                      figures: Sequence[tuple[str, Path]] = (), config: Mapping | None = None,
                      tables: Mapping[str, Sequence[Mapping]] | None = None,
                      notes: Sequence[str] | None = None) -> Path:
    """Write one self-contained HTML report, atomically.

    Parameters
    ----------
    path : str or Path
        Output file (conventionally ``report.html`` in the run folder, ``constants.REPORT_FILE``).
    title : str
        Page title and heading.
    summary : str
        Plain text shown under the title; blank lines separate paragraphs.
    metrics : dict
        Key metrics, possibly nested (e.g. ``summarise`` output); shown as one table of dotted keys
        with floats to 3 significant digits.
    figures : sequence of (caption, path)
        Images (PNG, JPEG or SVG) embedded as base64 ``data:`` URIs; an unreadable file is shown as
        a visible "figure not available" line rather than failing the report.
    config : dict or dataclass instance, optional
        Run configuration, shown as YAML-like preformatted text.
    tables : dict of str → list of dict, optional
        Named tables; columns are the union of row keys in first-seen order.
    notes : sequence of str, optional
        Bullet points (caveats, provenance).

    Returns
    -------
    Path
        The written file. It is created via a temporary file in the same folder and
        :func:`os.replace`, so readers never see a half-written report.
    """
    from voxelome import __version__

    esc = html.escape
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    parts = [f"<h1>{esc(str(title))}</h1>"]
    for para in str(summary).split("\n\n"):
        if para.strip():
            parts.append(f'<p class="summary">{esc(para.strip())}</p>')
    flat = flatten_dict(metrics or {})
    parts.append("<h2>Key metrics</h2>")
    if flat:
        rows = "".join(
            f'<tr><td>{esc(k)}</td><td class="num">{esc(format_value(v))}</td></tr>' for k, v in flat.items())
        parts.append(f"<table><thead><tr><th>metric</th><th>value</th></tr></thead><tbody>{rows}</tbody></table>")
    else:
        parts.append("<p><em>(no metrics)</em></p>")
    if figures:
        parts.append("<h2>Figures</h2>")
        parts.extend(_figure_html(cap, png) for cap, png in figures)
    for name, rows in (tables or {}).items():
        parts.append(f"<h2>{esc(str(name))}</h2>{_table_html(list(rows))}")
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(str(n))}</li>" for n in notes) + "</ul>")
    if config is not None:
        parts.append(f"<h2>Configuration</h2><pre>{esc(to_yaml_text(config))}</pre>")
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    parts.append(f"<footer>voxelome {esc(__version__)} · generated {esc(stamp)}</footer>")
    doc = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
           f"<title>{esc(str(title))}</title><style>{_CSS}</style></head><body>\n"
           + "\n".join(parts) + "\n</body></html>\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(doc)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
