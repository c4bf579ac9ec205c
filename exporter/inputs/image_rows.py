"""Evaluation rows with an image, for a vision-language model's check: a local image and a chat about it.

A JSONL row of the evaluation data whose messages hold an image part, in the shape transformers'
processors take:

    {"messages": [{"role": "user", "content": [{"type": "image", "path": "receipt.png"},
                                               {"type": "text", "text": "What is the total?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "The total is 9.75."}]}]}

The image path is relative to the JSONL file (absolute paths are taken as they are); `url` or `image`
may name the file instead of `path`, local files only. The last message is the answer that is scored.
Without --eval-data the built-in rows are used: three 128×128 images drawn for edge-export (shapes, a bar
chart, a receipt; exporter/data/eval_images/) with a question and answer each. Text-only evaluation rows
are read by exporter.inputs.evaldata as before.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from converters.hashing import sha256_file
from exporter.core.errors import InputError

DEFAULT_IMAGE_SET = "eval_images.jsonl"
IMAGE_KEYS = ("path", "url", "image")


@dataclass(frozen=True)
class ImageRow:
    """One image and the chat about it: the messages with the image part left as {"type": "image"} (the
    processor takes the image itself), the last one the answer that is scored."""

    image: Path
    sha256: str
    messages: tuple[dict[str, Any], ...]

    @property
    def answer(self) -> str:
        content = self.messages[-1]["content"]
        return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)

    @property
    def prompt(self) -> list[dict[str, Any]]:
        return list(self.messages[:-1])

    def fingerprint(self) -> list[Any]:
        return [self.sha256, list(self.messages)]


def has_image(row: dict[str, Any]) -> bool:
    """A JSONL row whose messages hold an image part."""
    return any(
        isinstance(part, dict) and part.get("type") == "image"
        for message in row.get("messages") or ()
        if isinstance(message, dict) and isinstance(message.get("content"), list)
        for part in message["content"]
    )


def load_image_rows(path: Path | None) -> tuple[str, tuple[ImageRow, ...]]:
    """The image rows of the evaluation data (the built-in ones without a file), each image checked."""
    if path is None:
        folder = resources.files("exporter").joinpath("data")
        text = folder.joinpath(DEFAULT_IMAGE_SET).read_text(encoding="utf-8")
        source, root = f"built-in ({DEFAULT_IMAGE_SET})", Path(str(folder))
    elif path.suffix != ".jsonl" or not path.is_file():
        return str(path), ()
    else:
        text, source, root = path.read_text(encoding="utf-8"), str(path), path.parent
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)  # exporter.inputs.evaldata has already refused a line that is not JSON
        if isinstance(row, dict) and has_image(row):
            rows.append(_image_row(row, root, f"{source} line {number}"))
    return source, tuple(rows)


def _image_row(row: dict[str, Any], root: Path, where: str) -> ImageRow:
    messages = row["messages"]
    images: list[Path] = []
    cleaned = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image":
                    images.append(_image_path(part, root, where))
                    parts.append({"type": "image"})
                else:
                    parts.append(part)
            message = {**message, "content": parts}
        cleaned.append(message)
    if len(images) != 1:
        raise InputError(
            f"{where} has {len(images)} images; an evaluation row holds exactly one image (split a row with "
            "several into one row per image)."
        )
    if cleaned[-1].get("role") != "assistant" or has_image({"messages": cleaned[-1:]}):
        raise InputError(
            f"{where} does not end with an assistant message: the answer about the image is what is scored. "
            'End the row with {"role": "assistant", "content": "…"}.'
        )
    return ImageRow(images[0], sha256_file(images[0]), tuple(cleaned))


def _image_path(part: dict[str, Any], root: Path, where: str) -> Path:
    named = next((str(part[key]) for key in IMAGE_KEYS if isinstance(part.get(key), str)), None)
    if named is None or named.startswith(("http://", "https://", "data:")):
        raise InputError(
            f"{where} has an image part without a local file ({', '.join(IMAGE_KEYS)}; edge-export never "
            'downloads). Save the image beside the JSONL file and name it: {"type": "image", "path": "a.png"}.'
        )
    image = Path(named.removeprefix("file://"))
    image = image if image.is_absolute() else root / image
    try:
        from PIL import Image

        with Image.open(image) as opened:
            opened.verify()
    except FileNotFoundError:
        raise InputError(
            f"{where} names the image {image}, which does not exist. Paths are relative to the JSONL file; fix "
            "the path or add the file."
        ) from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for a file that is not an image
        raise InputError(
            f"{where} names the image {image}, which is not a readable image ({exc}). Give a PNG or JPEG file."
        ) from exc
    return image
