"""One way to print every result: table (a few key columns), list (every field), json.

Data goes to stdout; diagnostics and progress go to stderr."""

from __future__ import annotations

import json
from collections.abc import Sequence

import click


def _cell(v, sep: str = ", ") -> str:
    """A value as the CLI writes it: true/false like its flags, lists joined, never a repr."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return sep.join(_cell(x.get("path", x)) if isinstance(x, dict) else _cell(x) for x in v)
    if isinstance(v, dict):
        return sep.join(f"{k}={_cell(x)}" for k, x in v.items())
    return str(v)


plain = _cell


def render(data, fmt: str, columns: Sequence[str] = ()) -> None:
    if fmt == "json":
        click.echo(json.dumps(data, indent=2))
        return
    rows = data if isinstance(data, list) else [data]
    if fmt == "list" or not columns:
        for i, row in enumerate(rows):
            if i:
                click.echo("")
            width = max((len(k) for k in row), default=0)
            for k, v in row.items():
                click.echo(f"{k.ljust(width)} : {_cell(v)}")
        return
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    click.echo("  ".join("-" * w for w in widths))
    for r in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


EVENT_SKIP = ("event", "timestamp", "level", "vm", "vm_id")


def event_line(e: dict) -> str:
    """One event for a terminal: time, VM, what happened, then its details."""
    when = str(e.get("timestamp", ""))[:19].replace("T", " ")
    details = " ".join(f"{k}={_cell(v, ',')}" for k, v in e.items() if k not in EVENT_SKIP and v is not None)
    return f"{when}  {str(e.get('vm', '-')):<16} {e.get('event', ''):<24} {details}".rstrip()
