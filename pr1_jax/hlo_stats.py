"""What one execution of a compiled (SPMD, per-device) program does, read from its optimized HLO:
matmul FLOPs, HBM bytes, and collectives by kind — with loops counted as often as they run.

    stats = program_stats(compiled.as_text())
    stats.flops, stats.hbm_bytes, stats.collectives["all-gather"]   # {"count", "bytes", "wire_bytes"}

XLA's own `cost_analysis()` counts a while loop's body once; our decoder layers are a scanned
loop (28 iterations for the 2B model), so its totals are a layer's, not a step's. Here every
computation gets a multiplier: a while body runs `known_trip_count` times (XLA writes it into
the loop's backend_config), called / fused / async computations inherit their caller's; a
loop without a known trip count counts once (said in `unknown_loops`).

* FLOPs: 2 · |result| · |contracted dims| per `dot` and convolution (elementwise work ignored).
* HBM bytes: each top-level instruction of a non-fused computation (a fusion, dot, copy,
  custom call, collective, ...) reads its operands and writes its result once — the usual
  "bytes accessed" approximation; parameters, tuples, bitcasts and constants move nothing.
* Collectives: count and result bytes per kind; `wire_bytes` is what one device sends over
  the interconnect in a ring over its replica group of n devices: all-gather R·(n−1)/n,
  reduce-scatter R·(n−1), all-reduce 2·R·(n−1)/n, all-to-all R·(n−1)/n, permute R.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
         "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?(%[\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?(%[\w.\-]+)\s.*\{\s*$")
_CALLED = re.compile(r"\b(body|condition|calls|to_apply|branch_computations|true_computation|"
                     r"false_computation)=\{?(%[\w.\-]+(?:\s*,\s*%[\w.\-]+)*)\}?")
_CONTROL = {"body", "condition", "branch_computations", "true_computation", "false_computation"}
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]")
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([\d,]*)\}")
_NO_TRAFFIC = {"parameter", "tuple", "get-tuple-element", "bitcast", "constant", "after-all", "partition-id",
               "replica-id", "iota", "while", "call", "conditional", "opt-barrier"}


@dataclasses.dataclass
class ProgramStats:
    flops: float = 0.0
    hbm_bytes: float = 0.0
    collectives: dict = dataclasses.field(
        default_factory=lambda: {k: {"count": 0, "bytes": 0.0, "wire_bytes": 0.0} for k in KINDS})
    unknown_loops: int = 0

    @property
    def wire_bytes(self) -> float:
        return sum(c["wire_bytes"] for c in self.collectives.values())


def shape_bytes(text: str) -> float:
    """Bytes of every array in a shape string (a tuple's elements summed)."""
    return float(sum(BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
                     for dt, dims in _ARRAY.findall(text)))


def _first_dims(text: str) -> list[int]:
    m = _ARRAY.search(text)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def _group_size(line: str, default: int) -> int:
    m = _GROUPS_IOTA.search(line)
    if m:
        return int(m.group(2))
    m = _GROUPS_LIST.search(line)
    return len([x for x in m.group(1).split(",") if x]) if m else default


def program_stats(hlo: str, num_devices: int = 1) -> ProgramStats:
    """The stats of one execution of the HLO module text (see the module docstring);
    `num_devices`: the replica group size where the HLO does not say."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        m = _COMP.match(line)
        if m and "=" not in line.split("{")[0].split("(")[0]:
            current = m.group(1)
            comps[current] = []
            if line.lstrip().startswith("ENTRY"):
                entry = current
            continue
        if current is not None and line.strip() == "}":
            current = None
            continue
        if current is not None:
            comps[current].append(line)
    # name → result shape text, module-wide (instruction names are unique)
    shapes = {}
    for lines in comps.values():
        for line in lines:
            m = _INSTR.match(line)
            if m:
                shapes[m.group(1)] = m.group(2)
    # multipliers by walking the call graph from the entry
    mult: dict[str, float] = collections.defaultdict(float)
    fused: set[str] = set()
    stats = ProgramStats()
    order, seen = [entry], set()
    mult[entry] = 1.0
    while order:
        comp = order.pop(0)
        if comp in seen or comp not in comps:
            continue
        seen.add(comp)
        for line in comps[comp]:
            m = _INSTR.match(line)
            if not m:
                continue
            op = m.group(3)
            for attr, group in _CALLED.findall(line):
                for callee in (c.strip() for c in group.split(",")):
                    if not callee.startswith("%"):
                        continue
                    factor = 1.0
                    if op == "while" and attr == "body":
                        trip = _TRIP.search(line)
                        factor = float(trip.group(1)) if trip else 1.0
                        stats.unknown_loops += trip is None
                    # Loop bodies, branches and plain calls run as programs of their own; fusions,
                    # reducers (to_apply) and async wrappers are parts of one instruction.
                    if not (attr in _CONTROL or (attr == "calls" and op == "call")):
                        fused.add(callee)
                    mult[callee] += mult[comp] * factor
                    order.append(callee)
    for comp, lines in comps.items():
        k = mult.get(comp, 0.0)
        if not k:
            continue
        for line in lines:
            m = _INSTR.match(line)
            if not m:
                continue
            name, result, op, rest = m.groups()
            if op in ("dot", "convolution"):
                operands = re.findall(r"%[\w.\-]+", rest.split(")")[0])
                lhs = _first_dims(shapes.get(operands[0], "")) if operands else []
                contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
                size = math.prod(lhs[int(i)] for i in contracting.group(1).split(",") if i) if (
                    contracting and lhs) else 1
                stats.flops += k * 2.0 * math.prod(_first_dims(result) or [1]) * size
            kind = op.removesuffix("-start")
            if kind in KINDS:
                r = shape_bytes(result) if not op.endswith("-start") else shape_bytes(result) / 2  # (in, out) pair
                n = _group_size(line, num_devices)
                wire = {"all-gather": r * (n - 1) / n, "reduce-scatter": r * (n - 1),
                        "all-reduce": 2 * r * (n - 1) / n, "all-to-all": r * (n - 1) / n,
                        "collective-permute": r}[kind]
                c = stats.collectives[kind]
                c["count"] += k
                c["bytes"] += k * r
                c["wire_bytes"] += k * wire
            if comp not in fused and op not in _NO_TRAFFIC and not op.endswith("-done"):
                stats.hbm_bytes += k * _traffic(op, result, rest, line, shapes, comps)
    return stats


def _operands(rest: str) -> list[str]:
    depth = 0
    for i, ch in enumerate(rest):  # the operand list ends at the ")" that closes the call
        if ch == "(":
            depth += 1
        elif ch == ")":
            if depth == 0:
                return re.findall(r"%[\w.\-]+", rest[:i])
            depth -= 1
    return re.findall(r"%[\w.\-]+", rest)


def _traffic(op: str, result: str, rest: str, line: str, shapes: dict, comps: dict) -> float:
    """HBM bytes one top-level instruction moves: its result written, its operands read — a
    slice of an operand where only a slice is read (dynamic-slice, and a fusion's parameter
    that its fused computation only slices: a scanned layer's weights from the stacked ones)."""
    operands = _operands(rest)
    if op in ("dynamic-slice", "slice", "gather"):
        return 2 * shape_bytes(result)
    if op == "dynamic-update-slice":  # reads and writes the update in place
        return 2 * shape_bytes(shapes.get(operands[1], "")) if len(operands) > 1 else shape_bytes(result)
    read = [shape_bytes(shapes.get(o, "")) for o in operands]
    called = re.search(r"calls=(%[\w.\-]+)", line)
    if op == "fusion" and called and called.group(1) in comps:
        body = comps[called.group(1)]
        params = {}
        for inner in body:
            m = _INSTR.match(inner)
            if m and m.group(3) == "parameter":
                params[int(re.match(r"(\d+)", m.group(4)).group(1))] = m.group(1)
        for i, pname in params.items():
            uses = [m for m in (_INSTR.match(x) for x in body) if m and re.search(re.escape(pname) + r"\b", m.group(4))]
            if uses and i < len(read) and all(u.group(3) in ("dynamic-slice", "slice") and
                                              _operands(u.group(4))[:1] == [pname] for u in uses):
                read[i] = sum(shape_bytes(u.group(2)) for u in uses)
            elif uses and i < len(read) and all(u.group(3) == "dynamic-update-slice" and
                                                _operands(u.group(4))[:1] == [pname] for u in uses):
                read[i] = 0.0  # updated in place: the written slice is counted with the result below
        root = next((m for m in (_INSTR.match(x) for x in body if x.lstrip().startswith("ROOT")) if m), None)
        if root is not None and root.group(3) == "dynamic-update-slice":
            upd = _operands(root.group(4))
            return sum(read) + (2 * shape_bytes(shapes.get(upd[1], "")) if len(upd) > 1 else shape_bytes(result))
    return shape_bytes(result) + sum(read)
