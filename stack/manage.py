#!/usr/bin/env python3
"""Django's command-line utility for the stack (migrate, loadgen, taskreport, ...)."""

from __future__ import annotations

import os
import sys


def main() -> None:
    """Run a management command with the stack's settings."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "core.settings")
    from django.core.management import execute_from_command_line  # noqa: PLC0415 - after the env default

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
