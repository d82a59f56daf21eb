"""Doris Stream Load emulator fixtures."""
