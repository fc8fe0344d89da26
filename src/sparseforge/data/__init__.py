"""Bundled text (calibration and held-out evaluation) and synthetic long-context retrieval tasks."""
from __future__ import annotations

import pathlib

DATA_DIR = pathlib.Path(__file__).resolve().parent
CALIBRATION_TEXT = DATA_DIR / "calibration.txt"
HELDOUT_TEXT = DATA_DIR / "heldout.txt"


def read_text(name_or_path: str | pathlib.Path) -> str:
    """Text of a bundled split ('calibration', 'heldout') or of a UTF-8 text file."""
    from sparseforge.errors import UserInputError

    bundled = {"calibration": CALIBRATION_TEXT, "heldout": HELDOUT_TEXT}
    path = bundled.get(str(name_or_path), pathlib.Path(name_or_path))
    if not path.is_file():
        raise UserInputError(
            f"text source '{name_or_path}' is neither a bundled split (calibration, heldout) nor a readable file; "
            "pass one of those or a path to a UTF-8 text file"
        )
    return path.read_text(encoding="utf-8")
