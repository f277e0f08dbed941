"""Argument types and checks shared by the command lines (``lserve-hf`` and its subcommands).

Nothing here imports torch at module level: ``lserve-hf --help`` builds every parser and must
answer at once."""

from __future__ import annotations

import argparse
import os


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except None and False: those options say in their help text
    what leaving them out does ("default: the embedded model"), which "(default: None)" would not.
    A list default is shown as it would be typed (``1000 2000``, not ``[1000, 2000]``)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        if isinstance(action.default, (list, tuple)):
            return f"{action.help} (default: {' '.join(map(str, action.default))})"
        return super()._get_help_string(action)


def at_least(low: int):
    """An integer of at least ``low``."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is less than {low}")
        return value
    parse.__name__ = "int"   # argparse says "invalid int value" for a value that is not a number
    return parse


positive_int = at_least(1)


def fraction(text: str) -> float:
    """A relative position in a prompt: 0 is its start, 1 its end."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 1] (0: the start of the text, 1: its end)")
    return value


fraction.__name__ = "float"


def model_folder(text: str) -> str:
    # Transformers would read a missing path as a hub repo id and answer "Repo id must be in the
    # form...", which hides the typo; everything here is offline, so a model is a local folder.
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"no model folder at {text}")
    return text


def check_device(parser: argparse.ArgumentParser, device: str | None) -> None:
    """Refuse (exit 2, no traceback) a device this torch build cannot use, before any model loads."""
    if device is None:
        return
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError) as e:
        parser.error(f"--device {device}: {e}")
    if kind == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device}: no CUDA GPU is usable here (torch {torch.__version__}: "
                     "torch.cuda.is_available() is False); leave --device out to run on the CPU")

