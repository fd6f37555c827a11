"""Replay Exim's logs through the policy: whom a limit would have blocked, how close the rest came.

``engine`` feeds log events to one policy per candidate limit and keeps peaks and timelines;
``logs`` opens the logs and merges them by time; ``report`` renders the table, JSON and HTML;
``command`` is ``spamguardctl replay``.
"""

from __future__ import annotations

from spamguardd.tools.replay.command import replay_main

__all__ = ["replay_main"]
