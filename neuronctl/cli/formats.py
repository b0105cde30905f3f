"""How the CLI shows models: sizes (the package's `units.fmt_bytes`), spans, the status
table and its colours. Pure formatting over `/models` entries, shared by `status`,
`status --watch`, `events` and `fleet status`."""

from __future__ import annotations

import time
from typing import Any

from rich.cells import cell_len
from rich.table import Table
from rich.text import Text

from ..units import fmt_bytes

STATUS_STYLES = {
    "loaded": "green", "loading": "yellow", "downloading": "yellow", "restarting": "yellow",
    "unloading": "yellow", "failed": "red", "unloaded": "dim",
}


def fmt_download(download: dict[str, Any] | None) -> str:
    if not download:
        return "-"
    return f"{fmt_bytes(download.get('done_bytes'))} / {fmt_bytes(download.get('total_bytes'))}"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def fmt_span(seconds: float) -> str:
    """A coarse span for a countdown or a TTL: `45s`, `5m`, `2h05m`; `long` past 100 days
    (or a value a node should never send: infinity, NaN)."""
    if not 0 <= seconds < 100 * 86400:
        return "long" if seconds > 0 else "0s"
    s = round(seconds)
    if s < 100:
        return f"{s}s"
    if s < 6000:
        return f"{round(s / 60)}m"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def fmt_memory(m: dict[str, Any], sep: str = "\n") -> str:
    """RSS, and VRAM on a line of its own (`sep`), or the bytes of a download: the column
    stays narrow at 80 columns. A saved prompt cache's bytes on disk follow, loaded or not."""
    download = m.get("download")
    if m["status"] == "downloading" and download:
        return (f"{fmt_bytes(download.get('done_bytes'))}{sep}"
                f"of {fmt_bytes(download.get('total_bytes'))}")
    lines = []
    if m.get("rss_bytes") is not None:
        lines.append(fmt_bytes(m["rss_bytes"]))
    if m.get("vram_used_mb"):
        lines.append(f"{fmt_bytes(m['vram_used_mb'] << 20)} VRAM")
    if m.get("prompt_cache_bytes"):
        lines.append(f"{fmt_bytes(m['prompt_cache_bytes'])} cache")
    return sep.join(lines) or "-"


def fmt_devices(m: dict[str, Any]) -> str:
    if m.get("devices"):
        return "GPU " + ",".join(str(d) for d in m["devices"])
    if m.get("vram_used_mb"):
        return "GPU"  # no devices named: the server chose
    return "-" if m["status"] == "unloaded" else "CPU"


def fmt_until(m: dict[str, Any], now: float) -> str:
    """When it goes: the idle countdown; a TTL that has not begun counting (busy, or not
    loaded); `pinned` for a model never unloaded but by hand; else `-` (evictable)."""
    if m.get("idle_until") is not None:
        return f"in {fmt_span(max(0.0, m['idle_until'] - now))}"
    if m.get("ttl_s") is not None:
        return f"ttl {fmt_span(m['ttl_s'])}"
    return "pinned" if m.get("pinned") else "-"


def fmt_traffic(m: dict[str, Any]) -> str:
    queued, in_flight = m.get("queued"), m.get("in_flight")
    if queued is None or in_flight is None or (m["status"] == "unloaded"
                                               and not queued and not in_flight):
        return "-"
    return f"{queued}/{in_flight}"


COLUMNS = ("STATUS", "MEMORY", "DEVICES", "CTX", "UNTIL", "Q/RUN", "UPTIME", "RESTARTS")
RIGHT = frozenset({"CTX", "RESTARTS"})


def status_table(models: list[dict[str, Any]], width: int | None = None,
                  now: float | None = None) -> Table:
    """The models as `status` and `status --watch` show them. Within `width` columns the
    MODEL column folds long ids, never the others; None: as wide as the ids (output that
    is not a terminal, for grep)."""
    now = time.time() if now is None else now
    rows = []
    for m in models:
        cells = [m["status"], fmt_memory(m), fmt_devices(m),
                 str(m["n_ctx"]) if m.get("n_ctx") else "-", fmt_until(m, now),
                 fmt_traffic(m), fmt_duration(m.get("uptime_s")), str(m.get("restarts", 0))]
        rows.append(cells)
    columns: tuple[str, ...] = COLUMNS
    # Two harnesses side by side: which runs each model is worth a column (one alone is
    # not: every row would say the same).
    if len({m.get("harness") for m in models}) > 1:
        columns = ("HARNESS", *COLUMNS)
        rows = [[str(m.get("harness") or "-"), *cells] for m, cells in zip(models, rows,
                                                                        strict=True)]
    # Every column but MODEL is as wide as its widest line; MODEL gets the rest.
    widths = [max([len(h), *(len(line) for r in rows for line in r[i].splitlines())])
              for i, h in enumerate(columns)]
    longest = max([5, *(cell_len(m["id"]) for m in models)])
    gap, model_width = 2, longest
    if width is not None:
        room = width - sum(widths) - gap * len(columns)
        if room < min(longest, 24):  # tight: one space between columns
            gap, room = 1, room + len(columns)
        model_width = max(8, min(longest, room))
    table = Table(box=None, header_style="bold", pad_edge=False,
                  padding=(0, 1) if gap == 2 else (0, 1, 0, 0))
    # Ids are what people grep for and paste: folded onto more lines, never cut short.
    table.add_column("MODEL", overflow="fold", width=model_width)
    for header in columns:
        table.add_column(header, no_wrap=True, justify="right" if header in RIGHT else "left")
    for m, cells in zip(models, rows, strict=True):
        style = STATUS_STYLES.get(m["status"], "")
        at = columns.index("STATUS")
        table.add_row(Text(m["id"]), *cells[:at], Text(cells[at], style=style),
                      *cells[at + 1:], style="dim" if m["status"] == "unloaded" else None)
    return table
