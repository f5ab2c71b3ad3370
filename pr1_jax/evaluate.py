"""Evaluate a checkpoint on one PR1 task with the paper's prompts, decoding and metrics.

    python -m pr1_jax.evaluate --task=grounding --model_dir=ckpt --data=refcoco_val.json \\
        --image_dir=/data/coco --out_dir=eval/refcoco_val          # Acc@0.5 etc. (RefCOCO val 89.1 for PR1)
    python -m pr1_jax.evaluate --task=counting  --data=pixmo_count_val540.jsonl --image_dir=... ...
    python -m pr1_jax.evaluate --task=detection --data=coco_val2017.json --image_dir=val2017 ...
    python -m pr1_jax.evaluate --task=ocr       --data=en_page_ocr.json --image_dir=... ...

    report = evaluate("grounding", "ckpt", "refcoco_val.json", image_dir="/data/coco", out_dir="eval")
    report["metrics"]["acc@0.5"]

What each task sends and reads (docs/method.md §4.2–4.5; user message only, so the chat
template adds its default system prompt, as PR1's eval scripts):

* grounding — data: JSON {image, problem, solution[, normalized_solution]}; user text
  "Output the bounding box of the {problem} in the image."; special tokens kept;
  metrics ×100: iou, acc@{0.1,0.3,0.5,0.75,0.95}, center_acc, avg (= mean acc@0.5/0.75/0.95).
* counting — data: JSONL {image_path, question, ground_truth} (PR1's val540/test540), or
  training rows {image, problem, clicks}; user text "Output all the bounding boxes of the
  {question}"; special tokens kept; metrics ×100: accuracy (exact count), no_answer.
* detection — data: a COCO instances JSON, images at image_dir/file_name (or training rows,
  scored against their own boxes); user text PR1's
  eval prompt ("Locate every item from the category list in the image and output the
  coordinates in JSON format. ..."); special tokens skipped; metrics: COCO bbox AP, AP50,
  AP75, APs/m/l, AR1/10/100, ARs/m/l as fractions in [0, 1].
* ocr — data: JSON {image, conversations: [{value: question}, {value: text}]}; user text
  "<image>\\nOCR this image: " (PR1's literal "<image>" plus the real image); special tokens
  skipped; metrics ×100: edit_distance (lower is better), precision, recall, f1, bleu, meteor.
* any other registered task (pointing: grounding rows, "Point to the {problem} in the image.",
  point accuracy %) — its training rows, its `eval_prompt`, its `score` (`pr1_jax/tasks/`).

The predict-and-score loop is `pr1_jax.evaluator.Evaluator`, the one a training run's periodic
evaluation uses (so both report the same metrics for the same checkpoint, data and prompt;
`--prompt=training` sends the training prompt a run evaluates with). Decoding is greedy,
`batch_size` prompts at a time, on one device or split over `--devices`. Every batch
has the same shapes — prompt length, packed image row length and row count are fixed from
the largest example of the data set (image headers and prompt token counts are read
before any decoding) and the last batch is padded with text-only rows — so the rollout
program compiles once (`report["num_compiled"]`). Texts are decoded without the stop token,
as vLLM returns them. Default `max_new_tokens` are PR1's: 512 grounding / counting, 4096
detection, 2048 OCR. Not reproduced: PR1's grounding eval adds repetition_penalty 1.05.

Detection: Qwen2.5-VL answers in pixels of the resized image; they are rescaled to the
original image before COCO evaluation (PR1 compares them unscaled and infers every image
but the last — `pr1_exact=True` reproduces both, §8.8). Parsing is PR1's (`robust=False`)
unless `robust_parse=True`.

Rows that cannot be used never stop the run: malformed rows (the reader's count), and
images that are missing, not images, truncated or of an impossible aspect ratio are
skipped, counted by reason and listed in the report; metrics cover the evaluated rows
(scoring: each task's `score`, `pr1_jax/tasks/`). A file with no usable row of the task (one
of another task, a wrong --image_dir) is refused: one line, exit status 2 (pr1_jax/cli.py).
With `out_dir` the report (metrics, counts, per-sample predictions) is written as JSON, and
for grounding / counting / detection a PNG gallery of the first predictions (red) over the
ground truth (green).
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pr1_jax import cli, evaluator, tasks, viz
from pr1_jax.errors import ConfigError
from pr1_jax.evaluation import detection as detection_eval
from pr1_jax.evaluator import PROMPT_STYLES, Example, image_name
from pr1_jax.infer import DTYPES, load_pretrained



class EvalError(ConfigError):
    """Bad arguments or data files; the message is one line meant for the user."""


# ----------------------------------------------------------------------------- data
def read_examples(task: str, data: str | os.PathLike, *, image_dir=None, split: str | None = None
                  ) -> tuple[list[Example], dict, dict | None]:
    """The task's evaluation rows → (examples, reader report dict, COCO GT dict for detection).

    The formats of `Task.eval_formats` are tried in turn (default: the task's training rows);
    "coco" is a COCO instances JSON. A file none of them reads is refused with the first's reason.
    """
    from pr1_jax.data import readers

    formats = tasks.get(task).eval_formats or (task,)
    first_error = None
    for fmt in formats:
        try:
            if fmt == "coco":
                examples, report, gt = _read_coco(data, image_dir)
                return examples, report, gt
            # The reader refuses a file without a usable row of the task (one line, no per-row warnings).
            rows, report = readers.read(data, fmt, image_dir=image_dir, split=split or "train")
            return [Example(i, row) for i, row in enumerate(rows)], report.as_dict(), None
        except (OSError, ValueError) as e:  # ConfigError is a ValueError
            first_error = first_error or cli.one_line(e)
    others = ", ".join(f"{'training' if f == task else f} rows {readers.ROW_FORMATS.get(f, '')}".strip()
                       for f in formats[1:] if f != "coco")
    raise EvalError(first_error + (f" (or {others})" if others else ""))


def _read_coco(path, image_dir) -> tuple[list[Example], dict, dict]:
    try:
        gt = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise EvalError(f"{path}: cannot read the COCO annotation file ({' '.join(str(e).split())})") from e
    if not isinstance(gt, dict) or not all(k in gt for k in ("images", "annotations", "categories")):
        raise EvalError(f"{path}: detection needs a COCO instances JSON (a dict with images, annotations "
                        f"and categories)")
    report = {"source": os.fspath(path), "rows": len(gt["images"]), "read": 0, "skipped_malformed": 0,
              "reasons": {}}
    if not gt["images"]:
        raise EvalError(f"{path}: the COCO file lists no images to evaluate")
    examples = []
    for img in gt["images"]:
        if not isinstance(img, dict) or "id" not in img or not img.get("file_name"):
            report["skipped_malformed"] += 1
            report["reasons"]["bad_image_entry"] = report["reasons"].get("bad_image_entry", 0) + 1
            continue
        src = img["file_name"] if image_dir is None else os.path.join(os.fspath(image_dir), img["file_name"])
        examples.append(Example(len(examples), {"image": src, "image_id": int(img["id"])}))
        report["read"] += 1
    if not examples:
        raise EvalError(f"{path}: none of its {report['rows']} image entries has an id and a file_name")
    return examples, report, gt


# ----------------------------------------------------------------------------- evaluate
def evaluate(task: str, model_dir: str | os.PathLike, data: str | os.PathLike, *, image_dir=None,
             split: str | None = None, batch_size: int = 8, max_new_tokens: int | None = None,
             limit: int | None = None, out_dir: str | os.PathLike | None = None, backend: str = "pycocotools",
             min_pixels: int | None = None, max_pixels: int | None = None, dtype: str = "float32",
             robust_parse: bool = False, pr1_exact: bool = False, gallery_size: int = 16,
             progress: bool = True, pretrained=None, devices: int = 1, prompt: str = "paper",
             system_prompt: str | None = None) -> dict:
    """Runs the evaluation; returns the report dict (also written to `out_dir` when given):

        task, model_dir, data, split, config, shapes {seq_len, row_len, num_rows}, num_compiled,
        counts {rows, malformed, examples, evaluated, skipped, skip_reasons},
        metrics (the task's, see the module table; empty when nothing was evaluated),
        timing {seconds, decode_seconds, generated_tokens, tokens_per_second},
        predictions [{index, image, [problem,] completion, num_tokens, stopped, ...task fields}],
        skipped [{index, image, reason, message}], files {report, gallery}

    `devices`: how many of this process's devices decode (each batch's prompts split over them
    with the training rollout's sharded sampler; 0 = all; `batch_size` must be a multiple).
    `prompt`: "paper" (PR1's evaluation scripts) or "training" (the training prompt, with
    `system_prompt`, default PR1's; what a training run's evaluation sends by default).
    `counts`: rows = rows in the data; malformed = rows the reader rejected; examples =
    rows read (after `limit`) = evaluated + skipped. `pretrained`: an already loaded
    `Pretrained` to use instead of loading `model_dir`. Raises `EvalError` / `InferError`
    for bad arguments, data files or checkpoints.
    """
    t0 = time.perf_counter()
    if task not in tasks.names():
        raise EvalError(f"task must be one of {tasks.names()}, got {task!r}")
    if batch_size <= 0:
        raise EvalError(f"batch_size must be positive, got {batch_size}")
    max_new_tokens = tasks.get(task).eval_max_new_tokens if max_new_tokens is None else int(max_new_tokens)
    if max_new_tokens <= 0:
        raise EvalError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if limit is not None and limit <= 0:
        raise EvalError(f"limit must be positive (or None: every row), got {limit}")
    if gallery_size < 0:
        raise EvalError(f"gallery_size must be ≥ 0 (0: no gallery), got {gallery_size}")
    if backend not in detection_eval.BACKENDS:
        raise EvalError(f"backend must be one of {detection_eval.BACKENDS}, got {backend!r}")
    if prompt not in PROMPT_STYLES:
        raise EvalError(f"prompt must be one of {PROMPT_STYLES}, got {prompt!r}")
    if not os.path.exists(os.fspath(data)) and not os.fspath(data).startswith("tfds:"):
        raise EvalError(f"{data}: no such data file or directory")
    if out_dir is not None:  # before the model loads and decodes
        cli.writable_dir(out_dir, "--out_dir", EvalError)
    try:
        mesh = evaluator.local_mesh(devices, batch_size)
    except ConfigError as e:
        raise EvalError(str(e)) from None

    examples, reader_report, coco_gt = read_examples(task, data, image_dir=image_dir, split=split)
    if limit is not None:
        examples = examples[:limit]
    pre = pretrained or load_pretrained(model_dir, dtype=dtype, min_pixels=min_pixels, max_pixels=max_pixels,
                                        mesh=mesh)
    ev = evaluator.Evaluator(pre, task, sample=evaluator.local_sampler(pre, mesh), mesh=mesh, batch_size=batch_size,
                             max_new_tokens=max_new_tokens, prompt=prompt, system_prompt=system_prompt)
    plan = ev.plan(examples)
    if not plan.batches:
        reasons = dict(collections.Counter(reason for _, reason, _ in plan.skipped))
        first = plan.skipped[0][2] if plan.skipped else ""
        raise EvalError(f"{data}: none of its {len(examples)} {task} rows has a usable image ({reasons}; first: "
                        f"{first}): check --image_dir")
    options = dict(coco_gt=coco_gt, backend=backend, robust=robust_parse, rescale=not pr1_exact,
                   pr1_exact=pr1_exact) if task == "detection" else {}
    result = ev(pre.params, examples, score_options=options, progress=progress, desc=f"eval {task}")

    predictions = [{"index": ex.index, "image": image_name(ex.image),
                    **({"problem": ex.row["problem"]} if "problem" in ex.row else {}),
                    "completion": c.text, "num_tokens": c.num_tokens, "stopped": c.stopped, **r}
                   for ex, c, r in zip(result.evaluated, result.completions, result.scores.records)]
    reasons = collections.Counter(reason for _, reason, _ in result.skipped)
    seconds = result.decode_seconds
    report = {
        "task": task, "model_dir": os.fspath(model_dir), "data": os.fspath(data), "split": split,
        "config": {"prompt": prompt, "prompt_template": ev.task.eval_prompt if prompt == "paper" else ev.task.prompt,
                   "batch_size": batch_size, "max_new_tokens": max_new_tokens,
                   "limit": limit, "devices": 1 if mesh is None else mesh.size,
                   "min_pixels": pre.image_config.min_pixels, "max_pixels": pre.image_config.max_pixels,
                   "image_dir": None if image_dir is None else os.fspath(image_dir), "dtype": dtype,
                   "skip_special_tokens": ev.task.skip_special_tokens,
                   **({"backend": backend, "robust_parse": robust_parse, "pr1_exact": pr1_exact}
                      if task == "detection" else {})},
        "shapes": {"seq_len": plan.seq_len, "row_len": plan.row_len, "num_rows": plan.num_rows},
        "num_compiled": ev.sample.num_compiled(),
        "counts": {"rows": reader_report["rows"], "malformed": reader_report["skipped_malformed"],
                   "malformed_reasons": dict(reader_report.get("reasons", {})), "examples": len(examples),
                   "evaluated": len(result.answers), "skipped": len(result.skipped), "skip_reasons": dict(reasons)},
        "metrics": result.scores.metrics,
        "timing": {"seconds": round(time.perf_counter() - t0, 3), "decode_seconds": round(seconds, 3),
                   "generated_tokens": result.generated_tokens,
                   "tokens_per_second": round(result.generated_tokens / seconds, 1) if seconds else None},
        "predictions": predictions,
        "skipped": [{"index": ex.index, "image": image_name(ex.image), "reason": reason, "message": msg}
                    for ex, reason, msg in result.skipped],
        "files": {},
    }
    if out_dir is not None:
        _write(report, result, Path(out_dir), gallery_size)
    return report


def _write(report: dict, result: evaluator.EvalResult, out_dir: Path, gallery_size: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = report["task"] + (f"_{report['split']}" if report["split"] else "")
    items = evaluator.gallery_items(result, gallery_size) if gallery_size > 0 else []
    if items:
        path = out_dir / f"{stem}_gallery.png"
        viz.gallery(items, path)
        report["files"]["gallery"] = os.fspath(path)
    path = out_dir / f"{stem}.json"
    report["files"]["report"] = os.fspath(path)
    path.write_text(json.dumps(report, indent=1, ensure_ascii=False, default=_jsonable) + "\n")


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


# ----------------------------------------------------------------------------- command line
def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser("pr1_jax.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--task", required=True, choices=tasks.names())
    p.add_argument("--model_dir", required=True, help="HF Qwen2-VL / Qwen2.5-VL checkpoint directory")
    p.add_argument("--data", required=True, help="evaluation file (COCO instances JSON for detection)")
    p.add_argument("--image_dir", default=None, help="root that relative image paths are joined with")
    p.add_argument("--split", default=None, help="split of an HF/TFDS data set; also names the report")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=None, help="default: PR1's per task (512/512/4096/2048)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N rows only")
    p.add_argument("--out_dir", default=None, help="where to write <task>.json and <task>_gallery.png")
    p.add_argument("--backend", choices=detection_eval.BACKENDS, default="pycocotools", help="COCO evaluation")
    p.add_argument("--min_pixels", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--max_pixels", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--robust_parse", action="store_true", help="detection: lenient JSON parsing")
    p.add_argument("--pr1_exact", action="store_true",
                   help="detection: PR1's quirks (no rescaling to original pixels, last image not inferred)")
    p.add_argument("--gallery_size", type=int, default=16)
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--prompt", choices=PROMPT_STYLES, default="paper",
                   help="paper: PR1's evaluation prompts; training: the training prompt and system prompt")
    p.add_argument("--system_prompt", default=None, help="with --prompt=training: the system prompt (default PR1's)")
    p.add_argument("--devices", type=int, default=0,
                   help="devices that decode each batch, its prompts split over them (0: all of them)")
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    report = evaluate(args.task, args.model_dir, args.data, image_dir=args.image_dir, split=args.split,
                      batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, limit=args.limit,
                      out_dir=args.out_dir, backend=args.backend, min_pixels=args.min_pixels,
                      max_pixels=args.max_pixels, dtype=args.dtype, robust_parse=args.robust_parse,
                      pr1_exact=args.pr1_exact, gallery_size=args.gallery_size, progress=not args.no_progress,
                      devices=args.devices, prompt=args.prompt, system_prompt=args.system_prompt)
    print(json.dumps({"task": report["task"], "metrics": report["metrics"], "counts": report["counts"],
                      "files": report["files"]}, indent=1))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: 0, or 2 after one line on stderr for an expected mistake (pr1_jax/cli.py)."""
    return cli.run("pr1_jax.evaluate", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
