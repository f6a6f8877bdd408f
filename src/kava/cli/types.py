"""argparse types shared by the subcommands."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (argparse turns the ValueError into one line)."""
    value = int(text)
    if not 1 <= value <= 2**31:
        raise argparse.ArgumentTypeError(f"{text}: expected an integer from 1 to 2^31")
    return value


def count_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    value = int(text)
    if not 0 <= value <= 2**31:
        raise argparse.ArgumentTypeError(f"{text}: expected an integer from 0 to 2^31")
    return value
