"""``spamguardctl``: the admin client (who is blocked and why; block, unblock, release, reset)."""
