"""What the HuggingFace import and the Orbax model checkpoints share: the one error type of a bad checkpoint and
the reading of a JSON object file (config.json, model.safetensors.index.json). Imports nothing of the package."""

from __future__ import annotations

import json


class CheckpointError(ValueError):
    """A checkpoint that is unreadable, partial, corrupt, unsupported or inconsistent with its own config; the
    message names the file and says which."""


def json_object(file: str) -> dict:
    with open(file, "rb") as f:
        try:
            value = json.load(f)
        except ValueError as e:  # a file that is not UTF-8 raises UnicodeDecodeError, a ValueError too
            raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{file} holds a JSON {type(value).__name__}, expected an object")
    return value
