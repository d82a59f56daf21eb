"""Commands that live in modules of their own (one concern each), added to ``dicomflow``'s group.

A module here exposes ``COMMANDS``: a list of click commands. :func:`add_all` adds them all,
so a new command touches no shared file.
"""

from __future__ import annotations

import importlib
import pkgutil

import click

__all__ = ["add_all"]


def add_all(group: click.Group) -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for command in getattr(module, "COMMANDS", []):
            group.add_command(command)
