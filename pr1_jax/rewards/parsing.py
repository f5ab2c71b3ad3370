"""Parsing of model answers and ground truth, shared by the rewards and by evaluation.

Decode conventions (as PR1): grounding and counting completions are decoded with special
tokens KEPT (`<|object_ref_start|>…<|box_start|>(x1,y1),(x2,y2)<|box_end|><|im_end|>` plus
`<|endoftext|>` padding); detection and OCR completions are decoded with special tokens
SKIPPED (a JSON list, optionally in a ```json fence, or plain text).

The parse functions are total on strings: they return a value or None and never raise
(`eval_numeric` raises exactly where Python's eval would; `solution_column` raises on a
column of the wrong length, a caller bug).

Public: `find_box_pr1`, `pr1_grounding_box` (PR1's grounding parse, also its eval variant),
`box_groups`, `parse_qwen_box(es)` (strict Qwen2-VL boxes), `eval_numeric`,
`pr1_box_center(s)` (PR1's counting parse), `parse_box_value`, `parse_points`,
`parse_detection_solution` (ground truth), `box_array`, `pr1_detection_items`,
`pr1_parse_detection`, `parse_detection_items` (Qwen2.5-VL JSON answers), `load_json`,
`strip_code_fence`, `collapse_whitespace`, `as_text`.
"""

from __future__ import annotations

import ast
import itertools
import json
import math
import operator
import re
import warnings
from typing import Any, Sequence

import numpy as np

from pr1_jax.coco import COCO_NAME_TO_ID

ENDOFTEXT = "<|endoftext|>"
IM_END = "<|im_end|>"
BOX_START = "<|box_start|>"
BOX_END = "<|box_end|>"
OBJECT_REF_START = "<|object_ref_start|>"
OBJECT_REF_END = "<|object_ref_end|>"

_F32_MAX = float(np.finfo(np.float32).max)
_I64_MAX = 2 ** 63


def as_text(completion: Any) -> str:
    """A completion as a string: a str as is, PR1/TRL's `[{"role", "content"}]` → its content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return as_text(completion.get("content", ""))
    if isinstance(completion, (list, tuple)):
        return as_text(completion[0]) if completion else ""
    return "" if completion is None else str(completion)


# ---------------------------------------------------------------------------------------
# Grounding: PR1's three-regex box parse
# ---------------------------------------------------------------------------------------
PR1_TRAIN_NUMBER = r"(-?\d+(?:\.\d+)?)"
PR1_EVAL_NUMBER = r"(-?\d+\.?\d*)"


def _pr1_box_patterns(n: str) -> tuple[re.Pattern, ...]:
    return (re.compile(rf"\[\s*{n},\s*{n},\s*{n},\s*{n}\s*\]"),          # [x1, y1, x2, y2]
            re.compile(rf"\(\s*{n},\s*{n},\s*{n},\s*{n}\s*\)"),          # (x1, y1, x2, y2)
            re.compile(rf"\(\s*{n},\s*{n}\),\s*\(\s*{n},\s*{n}\)"))      # (x1,y1),(x2,y2)


_PATTERNS = {PR1_TRAIN_NUMBER: _pr1_box_patterns(PR1_TRAIN_NUMBER),
             PR1_EVAL_NUMBER: _pr1_box_patterns(PR1_EVAL_NUMBER)}


def find_box_pr1(text: str, number: str = PR1_TRAIN_NUMBER) -> list[float] | None:
    """PR1's `parse_float_sequence_within`: the first match of, in this order, `[a, b, c, d]`,
    `(a, b, c, d)`, `(a,b),(c,d)` anywhere in `text` (each pattern searched over the whole
    text before the next is tried), as floats; None if none matches (PR1 then uses [0,0,0,0]).

    `number` is the regex of one number: PR1_TRAIN_NUMBER (training reward) or
    PR1_EVAL_NUMBER (`-?\\d+\\.?\\d*`, PR1's grounding evaluation script).
    `\\d` is Unicode-aware, so e.g. Arabic-Indic digits parse (as `float()` accepts them).
    """
    pats = _PATTERNS.get(number) or _pr1_box_patterns(number)
    for pat in pats:
        m = pat.search(text)
        if m:
            return [float(g) for g in m.groups()]
    return None


def pr1_grounding_box(text: str) -> tuple[list[float] | None, bool]:
    """PR1's `extract_bbox_answer` on an already `<|endoftext|>`-stripped completion.

    Returns (box, has_box_token). If `<|box_start|>` is absent the numbers are assumed to be
    in [0, 1] and mapped with `int(1000·v)` (truncation toward zero), also for a parse
    failure ([0,0,0,0]). The box is None only where PR1 would raise (int(±inf) of a
    >308-digit number).

    Example: "<|box_start|>(10,20),(30,40)<|box_end|>" → ([10., 20., 30., 40.], True);
    "[0.1, 0.25, 0.5, 0.9]" → ([100, 250, 500, 900], False).
    """
    has_token = BOX_START in text
    box = find_box_pr1(text) or [0, 0, 0, 0]
    if not has_token:
        try:
            box = [int(v * 1000) for v in box]
        except (OverflowError, ValueError):
            return None, has_token
    return box, has_token


# ---------------------------------------------------------------------------------------
# A safe stand-in for PR1's eval() of box contents and ground-truth strings
# ---------------------------------------------------------------------------------------
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.BitAnd: operator.and_, ast.BitOr: operator.or_, ast.BitXor: operator.xor,
           ast.RShift: operator.rshift, ast.Pow: operator.pow}
_UNOPS = {ast.UAdd: operator.pos, ast.USub: operator.neg, ast.Invert: operator.invert,
          ast.Not: operator.not_}
_NUMBER = (bool, int, float, complex)


def _ev(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, _NUMBER):
            return node.value
        raise ValueError("not a number")
    if isinstance(node, (ast.Tuple, ast.List)):
        return tuple(_ev(e) for e in node.elts)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNOPS:
        v = _ev(node.operand)
        if not isinstance(v, _NUMBER):
            raise ValueError("unary op on a sequence")
        return _UNOPS[type(node.op)](v)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = _ev(node.left), _ev(node.right)
        if not (isinstance(a, _NUMBER) and isinstance(b, _NUMBER)):
            raise ValueError("arithmetic on a sequence")
        if isinstance(node.op, ast.Pow) and isinstance(a, int) and isinstance(b, int) \
                and b > 0 and abs(a) > 1 and abs(a).bit_length() * b > 4096:
            # eval would build a >1233-digit integer; any use of it as a coordinate
            # overflows float conversion, so the box is unusable either way.
            raise OverflowError("integer power too large")
        return _BINOPS[type(node.op)](a, b)
    raise ValueError(f"unsupported expression {type(node).__name__}")


def eval_numeric(src: str) -> Any:
    """Evaluates a numeric Python expression the way `eval` would, without executing code.

    Supported: int/float/complex/bool literals (any Python spelling: `0x10`, `1_000`, `1e3`),
    tuples and lists, unary `+ - ~ not`, binary `+ - * / // % ** & | ^ >>` on numbers.
    Leading spaces/tabs are stripped as `eval` does. Names, calls, strings, sets, dicts,
    comprehensions and sequence arithmetic raise ValueError (eval would run or evaluate
    them; PR1 only ever needs numbers). Raises on any syntax error, like eval.
    Example: "(1, 2), (3, 4)" → ((1, 2), (3, 4)).
    """
    with warnings.catch_warnings():  # e.g. SyntaxWarning "'tuple' object is not callable"
        warnings.simplefilter("ignore")
        tree = ast.parse(src.lstrip(" \t"), mode="eval")
    return _ev(tree.body)


_BOX_GROUP = re.compile(r"<\|box_start\|>(.*?)<\|box_end\|>")
_INT = r"(-?(?:0+|[1-9][0-9]*))"
_FAST_PAIR = re.compile(rf"[ \t]*\([ \t]*{_INT}[ \t]*,[ \t]*{_INT}[ \t]*\)[ \t]*,"
                        rf"[ \t]*\([ \t]*{_INT}[ \t]*,[ \t]*{_INT}[ \t]*\)[ \t]*")


def box_groups(text: str) -> list[str]:
    """Contents of every `<|box_start|>…<|box_end|>` (non-greedy, not across newlines)."""
    return _BOX_GROUP.findall(text)


def pr1_box_center(group: str) -> tuple | None:
    """PR1's counting `extract_boxes` for one box group: `(x1, y1), (x2, y2) = eval(group)`,
    centre ((x1+x2)/2, (y1+y2)/2) with Python arithmetic; None where PR1 skips the group
    (any exception). Complex centres are returned as is (PR1 then fails the whole answer).
    Example: "(10,20),(30,40)" → (20.0, 30.0).
    """
    m = _FAST_PAIR.fullmatch(group)
    try:
        if m:
            x1, y1, x2, y2 = (int(g) for g in m.groups())
        else:
            (x1, y1), (x2, y2) = eval_numeric(group)
        return ((x1 + x2) / 2, (y1 + y2) / 2)
    except Exception:  # noqa: BLE001 - PR1 skips the group on any error
        return None


def pr1_box_centers(text: str) -> list[tuple]:
    """Centres of all box groups of `text` that PR1's `extract_boxes` would keep."""
    out = []
    for g in box_groups(text):
        c = pr1_box_center(g)
        if c is not None:
            out.append(c)
    return out


_QWEN_NUM = r"(-?\d+(?:\.\d+)?)"
_STRICT_PAIR = re.compile(rf"\s*\(\s*{_QWEN_NUM}\s*,\s*{_QWEN_NUM}\s*\)\s*,\s*\(\s*{_QWEN_NUM}\s*,\s*{_QWEN_NUM}\s*\)\s*",
                          re.ASCII)


def parse_qwen_box(group: str) -> tuple[float, float, float, float] | None:
    """Strict parse of one box group `(x1,y1),(x2,y2)` (ASCII decimal numbers, optional
    spaces) → floats, or None. Example: "(10, 20),(30,40)" → (10.0, 20.0, 30.0, 40.0)."""
    m = _STRICT_PAIR.fullmatch(group)
    if not m:
        return None
    v = tuple(float(g) for g in m.groups())
    return v if all(math.isfinite(x) for x in v) else None


def parse_qwen_boxes(text: str) -> tuple[np.ndarray, int]:
    """All Qwen2-VL boxes of `text`: (boxes [N, 4] float64 in the model's coordinates,
    number of box groups that did not parse). Used by the strict rewards and by eval."""
    boxes, bad = [], 0
    for g in box_groups(text):
        b = parse_qwen_box(g)
        if b is None:
            bad += 1
        else:
            boxes.append(b)
    return np.asarray(boxes, np.float64).reshape(-1, 4), bad


# ---------------------------------------------------------------------------------------
# Ground truth
# ---------------------------------------------------------------------------------------
def _is_num(v: Any) -> bool:
    return isinstance(v, (bool, int, float, np.integer, np.floating)) and not isinstance(v, complex)


def _literal(obj: Any) -> Any:
    """A GT value given as a string (JSON or a Python literal) → its value; else unchanged."""
    if isinstance(obj, (str, bytes)):
        s = obj.decode() if isinstance(obj, bytes) else obj
        try:
            return json.loads(s)
        except Exception:  # noqa: BLE001 — rewards never raise: unparsable → None, scored 0
            return eval_numeric(s.strip())
    return obj


def parse_box_value(obj: Any) -> np.ndarray | None:
    """A ground-truth box `[x1, y1, x2, y2]` (list, tuple, array or its string) → float64 [4],
    or None if it is not exactly four finite numbers."""
    try:
        v = _literal(obj)
        a = np.asarray(v, dtype=object)
        if a.shape != (4,) or not all(_is_num(x) for x in a):
            return None
        a = a.astype(np.float64)
        return a if np.isfinite(a).all() else None
    except Exception:  # noqa: BLE001 — rewards never raise: unparsable → None, scored 0
        return None


def parse_points(obj: Any) -> np.ndarray | None:
    """Ground-truth points (PR1's counting `clicks`) → float64 [N, 2], or None if malformed.

    Accepts `[[x, y], ...]`, `[{"x": x, "y": y}, ...]` (PixMo-Count's own form), a 2-D array,
    or the JSON/Python string of any of these. An empty list gives shape [0, 2]. Coordinates
    must be finite and within float32 range: PR1 holds them in float32 tensors, where a larger
    value is inf and its matcher raises (so PR1 scores 0); in float64 a value near the float64
    maximum overflows the squared distances and makes scipy's assignment raise.
    """
    try:
        v = _literal(obj)
        if isinstance(v, np.ndarray):
            v = v.tolist()
        pts = []
        for p in v:
            if isinstance(p, dict):
                p = (p["x"], p["y"])
            if len(p) != 2 or not (_is_num(p[0]) and _is_num(p[1])):
                return None
            pts.append((float(p[0]), float(p[1])))
        a = np.asarray(pts, np.float64).reshape(-1, 2)
        return a if (np.abs(a) <= _F32_MAX).all() else None  # also False for NaN
    except Exception:  # noqa: BLE001 — rewards never raise: unparsable → None, scored 0
        return None


def box_array(raw: Any) -> np.ndarray | None:
    """A list of boxes (JSON `bbox_2d` values or GT boxes) → float64 [n, 4] in one NumPy call,
    or None unless every box is a list of exactly 4 numbers (bools count as numbers, as in
    torch.tensor; strings, None, nesting, ints ≥ 2⁶⁴ fail like torch.tensor does — ints in
    [2⁶³, 2⁶⁴), which torch also rejects, are read as floats here). Non-finite values are
    kept: callers decide (PR1 only fails on them at its matcher)."""
    if type(raw) is list and raw:
        # Fast path, ~2× np.asarray on JSON-made lists: every box has 4 items, and `sum` over
        # all items raises TypeError unless each is an int/float/bool (a string box iterates
        # its characters, a dict its keys, a nested list cannot be added: all raise).
        try:
            if set(map(len, raw)) == {4}:
                flat = list(itertools.chain.from_iterable(raw))
                sum(flat)
                a = np.array(flat, np.float64).reshape(-1, 4)
                if not (np.abs(a) >= 2.0 ** 63).any():  # else: maybe huge ints (slow path rejects)
                    return a
        except (TypeError, ValueError, OverflowError):
            pass
    try:
        a = np.asarray(raw)
    except (ValueError, TypeError, OverflowError):  # ragged
        return None
    if a.ndim != 2 or a.shape[1] != 4 or a.dtype.kind not in "bif":
        return None
    return a.astype(np.float64)


def parse_detection_solution(obj: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """PR1's detection GT `{"target_id": [ids], "target_box": [[x1,y1,x2,y2], ...]}` (dict or
    its JSON string) → (ids int64 [M], boxes float64 [M, 4]); None if malformed (ids not
    integral in (−2³¹, 2³¹), boxes not M×4 finite numbers, or length mismatch)."""
    try:
        v = _literal(obj)
        ids_raw, boxes_raw = v["target_id"], v["target_box"]
        if len(ids_raw) != len(boxes_raw):
            return None
        if len(ids_raw) == 0:
            return np.zeros(0, np.int64), np.zeros((0, 4))
        ids = np.asarray(ids_raw)
        if ids.ndim != 1 or ids.dtype.kind not in "iuf" or not np.all(np.abs(ids) < 2 ** 31):
            return None
        if ids.dtype.kind == "f" and not np.all(ids == np.round(ids)):
            return None
        boxes = box_array(boxes_raw)
        if boxes is None or not np.isfinite(boxes).all():
            return None
        return ids.astype(np.int64), boxes
    except Exception:  # noqa: BLE001 — rewards never raise: unparsable → None, scored 0
        return None


# ---------------------------------------------------------------------------------------
# Detection answers (Qwen2.5-VL JSON)
# ---------------------------------------------------------------------------------------
def strip_code_fence(text: str) -> str:
    """PR1's fence removal: deletes every "```json" and then every "```" (anywhere)."""
    if "`" not in text:
        return text
    return text.replace("```json", "").replace("```", "")


_scan_once = json.JSONDecoder().scan_once
_LABEL, _BBOX = operator.itemgetter("label"), operator.itemgetter("bbox_2d")


def load_json(text: str) -> tuple[bool, Any]:
    """(ok, value) of `json.loads(text)` (Python's json: NaN/Infinity accepted), without
    json.loads' wrapper: JSON whitespace stripped, one scan, nothing may follow."""
    text = text.strip(" \t\n\r")
    try:
        value, end = _scan_once(text, 0)
    except Exception:  # noqa: BLE001 - StopIteration, JSONDecodeError, RecursionError
        return False, None
    return (True, value) if end == len(text) else (False, None)


def as_box4(v: Any) -> tuple[float, float, float, float] | None:
    """One JSON `bbox_2d` value → 4 floats if it is a list of exactly four finite numbers
    (bools count as numbers) within float32 range; else None."""
    if not isinstance(v, list) or len(v) != 4:
        return None
    out = []
    for x in v:
        if isinstance(x, bool):
            x = int(x)
        elif isinstance(x, int):
            if not -_I64_MAX <= x < _I64_MAX:
                return None
        elif not isinstance(x, float) or not math.isfinite(x) or abs(x) > _F32_MAX:
            return None
        out.append(float(x))
    return out[0], out[1], out[2], out[3]


def pr1_detection_items(text: str, name_to_id: dict[str, int] = COCO_NAME_TO_ID
                        ) -> tuple[list[int], list[Any], int] | None:
    """PR1's item rule (`json.loads` after fence removal + `parse_json`), before box conversion.

    An item is valid iff it is a dict with a `bbox_2d` key and a `label` that is one of the
    80 COCO names (exact, case-sensitive); other items are "wrong". Returns
    (COCO ids, raw `bbox_2d` values, number of items), or None where PR1's reward is 0:
    not JSON, not a list (a dict iterates its keys, a string its characters: all wrong), or
    no valid item (PR1's helper then returns 2 values instead of 3 → exception).
    """
    ok, content = load_json(strip_code_fence(text))
    if not ok or type(content) is not list:
        return None
    try:  # fast path: every item valid (a non-dict item, missing key or unknown label raises)
        ids = list(map(name_to_id.__getitem__, map(_LABEL, content)))  # only dicts take "label"
        if ids:
            return ids, list(map(_BBOX, content)), len(content)
    except (KeyError, TypeError, IndexError):
        pass
    ids, raw = [], []
    get = name_to_id.get
    for item in content:
        if type(item) is dict and "bbox_2d" in item:
            label = item.get("label")
            cid = get(label) if type(label) is str else None
            if cid is not None:
                ids.append(cid)
                raw.append(item["bbox_2d"])
    if not ids:
        return None
    return ids, raw, len(content)


def pr1_parse_detection(text: str, name_to_id: dict[str, int] = COCO_NAME_TO_ID
                        ) -> tuple[list[int], np.ndarray, float] | None:
    """PR1's detection parse: (COCO ids, boxes float64 [n, 4], format = 1 − wrong/len(items)),
    or None where PR1's reward is 0 (see `pr1_detection_items`; also a valid item whose
    `bbox_2d` is not 4 numbers: torch.tensor/unbind raise). Boxes may be non-finite.
    Example: '[{"bbox_2d": [1, 2, 3, 4], "label": "cat"}, {"label": "cat"}]'
    → ([17], [[1., 2., 3., 4.]], 0.5).
    """
    items = pr1_detection_items(text, name_to_id)
    if items is None:
        return None
    ids, raw, n = items
    boxes = box_array(raw)
    if boxes is None:
        return None
    return ids, boxes, 1.0 - (n - len(ids)) / n


def parse_detection_items(text: str, name_to_id: dict[str, int] = COCO_NAME_TO_ID
                          ) -> tuple[list[int], list[tuple], int] | None:
    """Lenient, per-item detection parse (the robust reward and evaluation).

    Fences removed as PR1; a single JSON object is treated as a one-item list. Each item is
    kept iff it is a dict with `bbox_2d` = 4 finite numbers with x2 ≥ x1 and y2 ≥ y1 and a
    `label` naming a COCO class (case and surrounding spaces ignored). Returns
    (ids, boxes, number of items) — the items dropped are `len(items) − len(ids)` — or
    None if the text is not JSON or not a list/object.
    Example: '[{"bbox_2d": [5, 5, 1, 1], "label": "cat"}, {"bbox_2d": [0, 0, 9, 9], "label": "Dog "}]'
    → ([18], [(0., 0., 9., 9.)], 2).
    """
    ok, content = load_json(strip_code_fence(text))
    if not ok:
        return None
    if isinstance(content, dict):
        content = [content]
    if not isinstance(content, list):
        return None
    ids, boxes = [], []
    for item in content:
        if not isinstance(item, dict):
            continue
        label, b = item.get("label"), as_box4(item.get("bbox_2d"))
        if not isinstance(label, str) or b is None or b[2] < b[0] or b[3] < b[1]:
            continue
        cid = name_to_id.get(label.strip().lower())
        if cid is not None:
            ids.append(cid)
            boxes.append(b)
    return ids, boxes, len(content)


def collapse_whitespace(s: str) -> str:
    """`" ".join(s.split())` (MMR1/PR1 OCR normalisation)."""
    return " ".join(s.split())


def solution_column(columns: dict, n: int, *keys: str) -> Sequence[Any]:
    """The ground-truth column for `n` completions: the first of `keys` present (and not None)."""
    for k in keys:
        col = columns.get(k)
        if col is not None:
            if isinstance(col, (str, bytes, dict)) or not hasattr(col, "__len__"):
                raise TypeError(f"column {k!r} must be a list with one entry per completion, got {type(col).__name__}")
            if len(col) != n:
                raise ValueError(f"column {k!r} has {len(col)} entries for {n} completions")
            return col
    raise KeyError(f"missing ground-truth column (one of {keys})")
