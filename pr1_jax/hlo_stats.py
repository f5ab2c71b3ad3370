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
    flops_by_op: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # by op_name tail

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
    # name → result shape text, and integer constants, module-wide (instruction names are unique)
    shapes, consts = {}, {}
    for lines in comps.values():
        for line in lines:
            m = _INSTR.match(line)
            if m:
                shapes[m.group(1)] = m.group(2)
                if m.group(3) == "constant":
                    value = re.match(r"\s*(-?\d+)\)", m.group(4))
                    if value:
                        consts[m.group(1)] = int(value.group(1))
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
                        n = float(trip.group(1)) if trip else _counted_loop_trips(line, comps, consts)
                        factor = n if n is not None else 1.0
                        stats.unknown_loops += n is None
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
            if op == "dot":
                operands = re.findall(r"%[\w.\-]+", rest.split(")")[0])
                lhs = _first_dims(shapes.get(operands[0], "")) if operands else []
                contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
                size = math.prod(lhs[int(i)] for i in contracting.group(1).split(",") if i) if (
                    contracting and lhs) else 1
                flops = k * 2.0 * math.prod(_first_dims(result) or [1]) * size
            if op == "convolution":
                operands = re.findall(r"%[\w.\-]+", rest.split(")")[0])
                lhs = _first_dims(shapes.get(operands[0], "")) if operands else []
                flops = k * 2.0 * _convolution_macs(_first_dims(result), lhs, line)
            if op in ("dot", "convolution"):
                stats.flops += flops
                where = re.search(r'op_name="([^"]*)"', line)
                stats.flops_by_op["/".join(where.group(1).split("/")[-2:]) if where else op] += flops
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


def _counted_loop_trips(line: str, comps: dict, consts: dict) -> float | None:
    """Trips of a while loop whose backend_config does not say (TPU): a condition
    `compare(get-tuple-element(p, index=i), constant(N)), direction=LT` (a scan, a windowed
    collective matmul) counts from element i of the initial tuple, when it is a constant, else
    from 0 (scans start there), to N, by the constant the body adds to element i (else 1;
    XLA's bidirectional collective matmuls add 2). Any other condition (a decode loop that stops when
    every row has ended): None."""
    cond = re.search(r"condition=(%[\w.\-]+)", line)
    body = comps.get(cond.group(1), []) if cond else []
    root = next((m for m in (_INSTR.match(x) for x in body if x.lstrip().startswith("ROOT")) if m), None)
    if root is None or root.group(3) != "compare" or "direction=LT" not in root.group(4):
        return None
    operands = _operands(root.group(4))
    defs = {m.group(1): m for m in (_INSTR.match(x) for x in body) if m}
    if len(operands) != 2 or operands[1] not in consts or operands[0] not in defs:
        return None
    counter = defs[operands[0]]
    index = re.search(r"index=(\d+)", counter.group(4))
    if counter.group(3) != "get-tuple-element" or not index:
        return None
    start = 0
    init = _operands(line.split(" while(", 1)[1]) if " while(" in line else []
    for comp_lines in comps.values():  # the initial tuple, if it is built in the caller
        for x in comp_lines:
            m = _INSTR.match(x)
            if m and init and m.group(1) == init[0] and m.group(3) == "tuple":
                elements = _operands(m.group(4))
                if int(index.group(1)) < len(elements) and elements[int(index.group(1))] in consts:
                    start = consts[elements[int(index.group(1))]]
    step = 1  # the body's update of element i: add(element i, constant(step))
    body_name = re.search(r"body=(%[\w.\-]+)", line)
    body_lines = comps.get(body_name.group(1), []) if body_name else []
    body_defs = {m.group(1): m for m in (_INSTR.match(x) for x in body_lines) if m}
    body_root = next((m for m in (_INSTR.match(x) for x in body_lines if x.lstrip().startswith("ROOT")) if m), None)
    if body_root is not None and body_root.group(3) == "tuple":
        elements = _operands(body_root.group(4))
        update = body_defs.get(elements[int(index.group(1))]) if int(index.group(1)) < len(elements) else None
        if update is not None and update.group(3) == "add":
            steps = [consts[o] for o in _operands(update.group(4)) if o in consts]
            step = steps[0] if len(steps) == 1 and steps[0] > 0 else step
    return float(max(0, -(-(consts[operands[1]] - start) // step)))


def _convolution_macs(out: list[int], lhs: list[int], line: str) -> float:
    """Multiply-adds of a convolution (TPU writes every matmul as one; batch and head dims
    become spatial dims with a window over them): per output element, the lhs feature size
    (/ feature_group_count) times the window taps that land inside the unpadded input, summed
    over output positions dimension by dimension."""
    labels = re.search(r"dim_labels=([0-9a-z]+)_([0-9a-z]+)->([0-9a-z]+)", line)
    if not labels or not out or len(labels.group(1)) != len(lhs):
        return float(math.prod(out or [1]))
    lhs_l, _, out_l = labels.groups()
    groups = re.search(r"feature_group_count=(\d+)", line)
    macs = math.prod(out) * lhs[lhs_l.index("f")] / (int(groups.group(1)) if groups else 1)
    window = re.search(r"window=\{([^}]*)\}", line)
    fields = dict(f.split("=", 1) for f in window.group(1).split()) if window else {}
    spatial = sorted(ch for ch in lhs_l if ch.isdigit())
    sizes = [int(x) for x in fields.get("size", "").split("x") if x]
    pads = [tuple(int(v) for v in x.split("_")) for x in fields.get("pad", "").split("x") if x]
    strides = [int(x) for x in fields.get("stride", "").split("x") if x]
    for d, ch in enumerate(spatial):
        n_in, n_out = lhs[lhs_l.index(ch)], out[out_l.index(ch)]
        w = sizes[d] if d < len(sizes) else 1
        lo = pads[d][0] if d < len(pads) else 0
        stride = strides[d] if d < len(strides) else 1
        taps = 0
        for tap in range(w):  # output positions o with 0 ≤ o·stride + tap − lo < n_in
            first = max(0, -((tap - lo) // stride) if tap < lo else 0)
            last = min(n_out - 1, (n_in - 1 + lo - tap) // stride)
            taps += max(0, last - first + 1)
        macs *= taps / n_out  # mean valid taps per output position along this dimension
    return float(macs)


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
