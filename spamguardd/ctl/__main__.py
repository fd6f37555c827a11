"""``python -m spamguardd.ctl``: spamguardctl, for hosts without the script on PATH."""

from __future__ import annotations

from spamguardd.ctl.main import main

raise SystemExit(main())
