"""`fsr upscale` (being built: see the open issue)."""

from __future__ import annotations

from fsr.commands.common import fail


def upscale_command() -> None:
    """Not available yet in this build."""
    fail("fsr upscale is not available yet in this build")
