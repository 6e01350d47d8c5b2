"""A converter's error as the contract records it."""

from __future__ import annotations

from portable_models.compare.check import error_dict
from portable_models.errors import ConversionError


def test_terminal_colours_are_stripped_from_a_converters_message() -> None:
    exc = ConversionError("Failed to decompose. \x1b[96mThis is step 2/3\x1b[0m of exporting", stage="convert")
    assert error_dict(exc)["message"] == "Failed to decompose. This is step 2/3 of exporting"
