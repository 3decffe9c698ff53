"""Make the repository root importable when a tools/ckpts script is run as `python tools/ckpts/<script>.py`."""
import os
import sys


def add_repo_root() -> None:
    """Put the repository root (two levels above this file) first on sys.path."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if root not in sys.path:
        sys.path.insert(0, root)
