"""The running daemon: listeners, query and admin servers, notices, systemd. trio."""
