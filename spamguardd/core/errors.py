"""The exception hierarchy, grouped by what the caller does about each error.

This module imports nothing from the package, so every layer may raise these.
"""

from __future__ import annotations


class SpamguardError(Exception):
    """Root of every error spamguardd raises on purpose."""


class ConfigError(SpamguardError):
    """The configuration is wrong; the daemon refuses to start (exit 78, EX_CONFIG).

    Carries every problem found, so an admin fixes the file in one pass.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class ProtocolError(SpamguardError):
    """A request or reply did not follow the query protocol."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something we cannot serve: answer ``error`` and close."""


class StoreError(SpamguardError):
    """A state file could not be read, parsed or written.

    The message names the file (and the line, for a damaged file) and what is wrong.
    """


class NotifyError(SpamguardError):
    """A notice could not be handed over (mail system or hook); the dispatcher retries it."""


class StateLockedError(SpamguardError):
    """Another process holds the state directory's lock: this daemon must not start (exit 75).

    Two daemons on one state directory would each rewrite the block file from their own view
    and lose the other's blocks.
    """
