"""structlog set-up: JSON lines for journald and log shippers, readable lines on a terminal.

Event names are snake_case and their keys are stable, because admins alert on them. Libraries
that log through the standard library (trio's ``serve_listeners`` reports accept errors that
way) come out through the same renderer, so the journal holds one format only.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

from spamguardd.core.config import LogConfig, LogFormat


def configure_logging(config: LogConfig, *, stream: TextIO | None = None) -> None:
    """Route structlog to *stream* (default stdout) at the configured level and format."""
    stream = stream or sys.stdout
    as_json = config.format is LogFormat.JSON or (
        config.format is LogFormat.AUTO and not stream.isatty()
    )
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    shared: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *shared,
            structlog.processors.format_exc_info if as_json else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[config.level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.WARNING)
