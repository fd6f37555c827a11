"""Tools the daemon never loads: log replay, the Exim log parser, Exim's queue."""
