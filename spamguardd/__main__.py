"""Allow ``python -m spamguardd``."""

from __future__ import annotations

from spamguardd.cli import main

raise SystemExit(main())
