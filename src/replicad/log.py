"""structlog setup: console or JSON lines on stderr, one event per decision."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog
from structlog.typing import EventDict

from . import events
from .model import printable

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def escape_controls(logger: Any, method: str, event_dict: EventDict) -> EventDict:
    """Console lines print values as they are: a peer's name or reason with a newline or a
    terminal escape in it would forge a line of its own. Escape them (JSON escapes by
    itself); a traceback keeps its lines."""
    for key, value in event_dict.items():
        if isinstance(value, str) and key != "exception" and not value.isprintable():
            event_dict[key] = printable(value)
    return event_dict


def setup(fmt: str = "console", level: str = "info") -> None:
    renderer = (structlog.processors.JSONRenderer() if fmt == "json"
                else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            events.bus.processor,  # `replicad events` (events.py)
            structlog.processors.format_exc_info,
            *([] if fmt == "json" else [escape_controls]),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get(name: str = "replicad") -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)
