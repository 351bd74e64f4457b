"""Thin entry points: one module per ``semjpeg`` subcommand."""
