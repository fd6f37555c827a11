"""The state files: block file, counter snapshot, journal. Files, no trio."""
