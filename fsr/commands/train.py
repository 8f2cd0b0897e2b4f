"""`fsr train` (being built: see the open issue)."""

from __future__ import annotations

from fsr.commands.common import fail


def train_command() -> None:
    """Not available yet in this build."""
    fail("fsr train is not available yet in this build")
