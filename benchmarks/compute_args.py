"""The compute options every benchmark script takes, with one spelling and one help text."""

from __future__ import annotations

import argparse


def add_compute_arguments(parser: argparse.ArgumentParser, *, batch_size: int | None, batch_help: str,
                          threads: int = 0, precision: str | None = "auto") -> None:
    """--device, --precision (unless ``precision`` is None), --batch-size and --threads."""
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] | mps")
    if precision is not None:
        parser.add_argument("--precision", default=precision, help="auto | fp32 | bf16 | fp16 (never half on the CPU)")
    parser.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)
    parser.add_argument("--threads", type=int, default=threads, help="CPU threads (0 = torch's default, all cores)")
