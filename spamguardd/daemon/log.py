"""structlog set-up: JSON lines for journald and log shippers, readable lines on a terminal.

Event names are snake_case and their keys are stable, because admins alert on them.
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
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if as_json else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[config.level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
