"""`fsr verify-sweep` and `fsr verify` (being built: see the open issue)."""

from __future__ import annotations

from fsr.commands.common import fail


def verify_sweep_command() -> None:
    """Not available yet in this build."""
    fail("fsr verify-sweep is not available yet in this build")


def verify_command() -> None:
    """Not available yet in this build."""
    fail("fsr verify is not available yet in this build")
