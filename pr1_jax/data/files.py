"""Raw rows of PR1's JSON files, parsed row by row so that one bad row never costs the file.

    rows = load_rows("refcoco.json")   # [dict | Malformed, ...]

Formats, by content (not by name): a JSON list of rows; JSON Lines (also named `.json`, as
PR1's counting file); a COCO instances file (`{images, annotations, categories}`: one
detection row per image, see `coco_rows`). A row that does not parse comes back as a
`Malformed` placeholder (`bad_json`, `too_deep`, `bad_encoding`, `bad_image_entry`) for the
caller to count:

* the bytes are decoded as UTF-8 once; if that fails, again with `surrogateescape` so that
  each non-UTF-8 byte becomes one marker character and only the rows holding one are
  skipped (`bad_encoding`);
* a JSON list is parsed in one call; if that fails (one item nested past the recursion
  limit, a syntax error, a non-UTF-8 byte), it is split into its top-level items by a
  scanner that only tracks strings and brackets, and each item is parsed alone.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from pathlib import Path
from typing import Any

from pr1_jax.data.rows import Malformed
from pr1_jax.errors import ConfigError

# What `surrogateescape` turns the bytes 0x80–0xFF of invalid UTF-8 into.
_ESCAPED = re.compile("[\udc80-\udcff]")
# Tokens of the item scanner: a JSON string (possibly unterminated) or a bracket / comma.
_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{},]', re.S)


def decode(data: bytes) -> tuple[str, bool]:
    """(text, clean): UTF-8 (a BOM dropped); clean = False when some bytes were not UTF-8
    (each is then one character of `_ESCAPED` in the text)."""
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8"), True
    except UnicodeDecodeError:
        return data.decode("utf-8", "surrogateescape"), False


def parse_row(text: str, where: str, clean: bool = True) -> Any:
    """One row's JSON text → its value, or a Malformed placeholder saying why not."""
    if not clean and _ESCAPED.search(text):
        return Malformed("bad_encoding", f"{where}: bytes that are not UTF-8")
    try:
        return json.loads(text)
    except RecursionError:  # json's C scanner recurses once per nesting level
        return Malformed("too_deep", f"{where}: nested deeper than Python's recursion limit")
    except ValueError as e:  # JSONDecodeError, or an integer of more than 4300 digits
        return Malformed("bad_json", f"{where}: {' '.join(str(e).split())[:100]}")


def split_json_list(text: str) -> list[str]:
    """The source text of each top-level item of the JSON list in `text`, tolerant of broken
    items: strings are skipped whole (brackets in them do not count), and an unterminated
    list ends with its last item. A single empty item (`[]`) gives no item; text after the
    closing bracket comes back as one more (unparsable) item."""
    begin = text.index("[") + 1
    depth, items, close = 1, [], None  # close: the match of the list's closing bracket
    for m in _TOKENS.finditer(text, begin):
        c = m.group()[0]
        if c == '"':
            continue
        if c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth == 0:
                close = m
                break
        elif depth == 1:  # a comma between two items
            items.append(text[begin:m.start()])
            begin = m.end()
    last = text[begin:close.start()] if close else text[begin:]
    if items or last.strip():
        items.append(last)
    if close and text[close.end():].strip():
        items.append(text[close.end():])
    return items


def json_list_rows(text: str, clean: bool) -> list[Any]:
    """Rows of a JSON list file: one `json.loads` when it works, else item by item."""
    if clean:
        try:
            rows = json.loads(text)
            if isinstance(rows, list):
                return rows
        except (ValueError, RecursionError):
            pass
    return [parse_row(item, f"item {i}", clean) for i, item in enumerate(split_json_list(text))]


def jsonl_rows(text: str, clean: bool) -> list[Any]:
    """Rows of a JSON Lines file: one per non-blank line (split on "\\n" only: JSON strings
    may hold U+2028 or form feeds, which `str.splitlines` would split on)."""
    return [parse_row(line, f"line {i + 1}", clean) for i, line in enumerate(text.split("\n")) if line.strip()]


def is_coco(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("images"), list) and "annotations" in obj


def _xyxy(bbox: Any) -> Any:
    """COCO's [x, y, w, h] → [x1, y1, x2, y2]; anything else unchanged (the row check rejects it)."""
    if isinstance(bbox, list) and len(bbox) == 4 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
        x, y, w, h = bbox
        return [x, y, x + w, y + h]
    return bbox


def coco_rows(obj: dict, clean: bool = True) -> list[Any]:
    """A COCO instances file → one detection row per image entry, in the file's order:
    `{image: file_name, problem: "", solution: {target_id, target_box (xyxy pixels)},
    image_id, width, height}`. Crowd annotations (`iscrowd` 1: a region of many objects,
    which COCO's evaluation ignores) are left out; annotations of an image id that no image
    entry has belong to no row."""
    anns = obj.get("annotations")
    by_image: dict[Any, list] = {}
    for a in anns if isinstance(anns, list) else []:
        if isinstance(a, dict) and not a.get("iscrowd") and isinstance(a.get("image_id"), (int, str)):
            by_image.setdefault(a["image_id"], []).append(a)
    rows: list[Any] = []
    for i, img in enumerate(obj["images"]):
        where = f"image entry {i}"
        if not isinstance(img, dict) or not isinstance(img.get("id"), (int, str)) or not img.get("file_name"):
            rows.append(Malformed("bad_image_entry", f"{where}: needs an id and a file_name"))
            continue
        mine = by_image.get(img["id"], [])
        if not clean and _ESCAPED.search(json.dumps([img, mine], ensure_ascii=False)):
            rows.append(Malformed("bad_encoding", f"{where}: bytes that are not UTF-8"))
            continue
        rows.append({"image": img["file_name"], "problem": "", "image_id": img["id"],
                     "width": img.get("width"), "height": img.get("height"),
                     "solution": {"target_id": [a.get("category_id") for a in mine],
                                  "target_box": [_xyxy(a.get("bbox")) for a in mine]}})
    return rows


def load_rows(path: str | os.PathLike) -> list[Any]:
    """Raw rows of a JSON list, JSON Lines or COCO instances file (by content, not by name).

    Rows that do not parse are `Malformed` placeholders; raises ConfigError for a `.json`
    file holding one JSON object that is not a COCO file (a dict of columns is not PR1's
    format). OSError (a missing or unreadable file) is the caller's to report."""
    text, clean = decode(Path(path).read_bytes())
    head = text.lstrip()
    if head.startswith("["):
        return json_list_rows(text, clean)
    if head.startswith("{") and str(path).endswith(".json"):
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError):
            obj = None  # JSON Lines named .json (PR1's counting file)
        if is_coco(obj):
            return coco_rows(obj, clean)
        if isinstance(obj, dict):
            raise ConfigError(f"{path}: expected a JSON list of rows (or JSON Lines, or a COCO instances file), "
                              f"got an object with keys {sorted(map(str, obj))[:8]}")
    return jsonl_rows(text, clean)
