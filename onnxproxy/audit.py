"""`onnxproxy audit`: maximize a spread sample of units of every layer of a model with ordinary gradient ascent
and with ProxyGrad from the same starts, journal each finished batch of units, and summarize per node where
ProxyGrad gets higher and which units no tried input makes positive.

Reproducibility: a unit's starting inputs come from (seed, tensor, unit), and units are batched in groups
fixed by the plan, so an interrupted and resumed audit, or one spread over worker processes, computes exactly
what an uninterrupted single-process audit computes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from onnxproxy import audit_report, graph, report, run
from onnxproxy.errors import UserError
from onnxproxy.maximize import Target, UnitResult, maximize_units, prepare_target, starting_inputs
from onnxproxy.objectives import Objective, choose_objective
from onnxproxy.settings import Settings
from onnxproxy.validate import exposing, session

METHODS = ("vanilla", "proxygrad")
UNITS_PER_BATCH = 4  # 4 units x 4 seeds in one batch ran ~3x faster per unit than one unit at a time
JOURNAL = "units.jsonl"
JOURNAL_FORMAT = 1


@dataclass
class AuditRequest:
    model: Path | None
    nodes: str | None  # comma-separated node specs; None = every rectifier's input and the logits
    units_per_node: str  # K or "all"
    methods: str  # comma-separated, from METHODS
    settings: Settings
    workers: int
    out: Path | None
    resume: bool
    force: bool
    quiet: bool
    input_shapes: dict
    input_name: str | None


# ------------------------------------------------------------------------------------------ what to audit


def default_nodes(model: graph.LoadedModel) -> list[graph.NodeInfo]:
    """The pre-activation of every rectifier (the node producing its input) and the logits, in graph order."""
    producers = {node.output: node for node in model.nodes}
    chosen = [producers.get(node.inputs[0]) for node in model.nodes if node.rectifier]
    try:
        chosen.append(graph.logits_node(model))
    except UserError:  # the model's output is no node's: audit the pre-activations alone
        pass
    return _unique_in_graph_order(chosen)


def choose_nodes(model: graph.LoadedModel, spec: str | None) -> list[graph.NodeInfo]:
    if spec is None:
        return default_nodes(model)
    parts = [part.strip() for part in spec.split(",") if part.strip()]
    nodes = _unique_in_graph_order([graph.resolve_node(model, part, "--nodes") for part in parts])
    if not nodes:
        raise UserError(f"--nodes '{spec}' names no node")
    return nodes


def _unique_in_graph_order(nodes) -> list[graph.NodeInfo]:
    by_tensor = {node.output: node for node in nodes if node is not None}
    return sorted(by_tensor.values(), key=lambda node: node.index)


def parse_methods(text: str) -> list[str]:
    names = {name.strip() for name in text.split(",") if name.strip()}
    unknown = names - set(METHODS)
    if unknown or not names:
        raise UserError(f"--methods {text}: choose from {', '.join(METHODS)} (comma-separated)")
    return [method for method in METHODS if method in names]


def parse_units_per_node(text: str) -> int | None:
    """K, or None for `all`."""
    if text.strip() == "all":
        return None
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count <= 0:
        raise UserError(f"--units-per-node {text}: expected a positive integer or 'all'")
    return count


def spread_units(count: int, per_node: int | None) -> list[int]:
    """All units, or `per_node` of them evenly spaced from the first to the last."""
    if per_node is None or per_node >= count:
        return list(range(count))
    return [index * (count - 1) // max(per_node - 1, 1) for index in range(per_node)]


@dataclass(frozen=True)
class Batch:
    """Units of one node optimized together. The grouping comes from the plan alone, never from what is left
    to do, so resuming or spreading the work over processes batches every unit the same way."""

    node_index: int
    tensor: str
    objective: Objective
    units: tuple[int, ...]


@dataclass
class NodePlan:
    node: graph.NodeInfo
    shape: list[int]  # for a batch of one, as onnxruntime computes it
    objective: Objective
    units: list[int]

    def batches(self) -> list[Batch]:
        groups = [self.units[start:start + UNITS_PER_BATCH] for start in range(0, len(self.units), UNITS_PER_BATCH)]
        return [Batch(self.node.index, self.node.output, self.objective, tuple(units)) for units in groups]


def plan_audit(model: graph.LoadedModel, nodes: list[graph.NodeInfo], per_node: int | None) -> list[NodePlan]:
    shapes = tensor_shapes(model, [node.output for node in nodes])
    plans = []
    for node in nodes:
        shape = shapes[node.output]
        objective = choose_objective(None, shape, None)
        plans.append(NodePlan(node, shape, objective, spread_units(shape[1], per_node)))
    return plans


def tensor_shapes(model: graph.LoadedModel, tensors: list[str]) -> dict[str, list[int]]:
    """The shapes of `tensors` for a batch of one, from one onnxruntime run of the unchanged model (shape
    inference can leave some unknown)."""
    values = session(exposing(model.original, tensors)).run(tensors, graph.sample_inputs(model.repaired))
    return {name: list(value.shape) for name, value in zip(tensors, values)}


# ------------------------------------------------------------------------------------------ one batch


def unit_seed(seed: int, tensor: str, unit: int) -> int:
    """The seed of one unit's starting inputs: the same whichever units share its batch."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{tensor}/{unit}".encode()).digest()[:8], "little")


def maximize_batch(target: Target, batch: Batch, methods: list[str],
                   settings: Settings) -> tuple[list[UnitResult], bool]:
    """maximize_units, with each unit starting from its own seeded inputs."""
    start = torch.cat([starting_inputs(target.input_shape, settings.seeds,
                                       replace(settings, seed=unit_seed(settings.seed, batch.tensor, unit)))
                       for unit in batch.units])
    return maximize_units(target, batch.objective, list(batch.units), methods, settings, start=start)


def journal_entries(target: Target, batch: Batch, results: list[UnitResult], zero_gradient: bool) -> list[dict]:
    """One journal line per unit: its records (maximize's, plus node, tensor and objective, with image and input
    names unique across nodes) and its best inputs."""
    folder = node_folder(target.node)
    entries = []
    for unit in batch.units:
        records, inputs = [], {}
        for result in (result for result in results if result.unit == unit):
            record = {"node": target.node.name, "tensor": target.tensor, "objective": batch.objective.kind,
                      **result.record(), "image": f"images/{folder}/{result.key}.png",
                      "input": f"{folder}/{result.key}"}
            records.append(record)
            inputs[record["input"]] = _encode(result.best_input)
        entries.append({"tensor": target.tensor, "unit": unit, "zero_gradient": zero_gradient,
                        "rectifiers_rewritten": sum(target.rewritten.values()), "results": records, "inputs": inputs})
    return entries


def node_folder(node: graph.NodeInfo) -> str:
    """A folder name per node: its graph position keeps names unique after unsafe characters are replaced."""
    return f"{node.index:03d}_{report.safe_name(node.name)}"


def _encode(array: np.ndarray) -> dict:
    array = np.ascontiguousarray(array, dtype=np.float32)
    return {"shape": list(array.shape), "float32": base64.b64encode(array.tobytes()).decode("ascii")}


def decode_input(encoded: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(encoded["float32"]), dtype=np.float32).reshape(encoded["shape"])


class BatchAuditor:
    """Runs batches in this process. Keeps only the last node's prepared target: batches are handed out in plan
    order, so each process converts each node once."""

    def __init__(self, model: graph.LoadedModel, methods: list[str], settings: Settings):
        self.model, self.methods, self.settings = model, methods, settings
        self._target: Target | None = None

    def __call__(self, batch: Batch) -> list[dict]:
        target = self._target_for(batch.node_index)
        results, zero_gradient = maximize_batch(target, batch, self.methods, self.settings)
        return journal_entries(target, batch, results, zero_gradient)

    def _target_for(self, node_index: int) -> Target:
        if self._target is None or self._target.node.index != node_index:
            self._target = None  # free the previous node's module before converting the next
            node = self.model.nodes[node_index]
            self._target = prepare_target(self.model, node, self.settings.backward_slope, self.settings.device)
        return self._target


# ---------------------------------------------------------------------------------------------- journal


class Journal:
    """units.jsonl: a header line saying what is audited and how, then one line per finished unit. Lines are
    appended and fsynced as each batch finishes, so a crash loses at most the batches in flight, and leaves at
    most a partial last line, which resuming drops."""

    def __init__(self, path: Path):
        self.path = path

    def start(self, header: dict, resume: bool) -> dict[tuple[str, int], dict]:
        """The finished units by (tensor, unit): those already journaled when resuming, else none."""
        if resume and self.path.exists():
            return self._continue(header)
        self._write([{"audit": header}], "w")
        return {}

    def append(self, entries: list[dict]):
        self._write(entries, "a")

    def _write(self, lines: list[dict], mode: str):
        with open(self.path, mode) as file:
            file.write("".join(json.dumps(line) + "\n" for line in lines))
            file.flush()
            os.fsync(file.fileno())

    def _continue(self, header: dict) -> dict[tuple[str, int], dict]:
        data = self.path.read_bytes()
        complete = data[:data.rfind(b"\n") + 1]
        if len(complete) < len(data):
            with open(self.path, "r+b") as file:  # a line cut off by a crash: drop it before appending
                file.truncate(len(complete))
        try:
            lines = [json.loads(line) for line in complete.decode().splitlines()]
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise UserError(f"{self.path} is damaged ({error}); start again without --resume") from None
        found = lines[0].get("audit") if lines else None
        if found != header:
            raise UserError(f"--resume: {self.path} was written by a different audit "
                            f"({_differences(found or {}, header)}); rerun with its options or use another --out")
        return {(entry["tensor"], entry["unit"]): entry for entry in lines[1:]}


def _differences(journaled: dict, wanted: dict) -> str:
    def flat(document, prefix=""):
        items = {}
        for key, value in document.items():
            items.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
        return items

    journaled, wanted = flat(journaled), flat(wanted)
    keys = [key for key in dict.fromkeys([*wanted, *journaled]) if journaled.get(key) != wanted.get(key)]
    return "; ".join(f"{key}: {journaled.get(key)} there, {wanted.get(key)} now" for key in keys)


def journal_header(model: graph.LoadedModel, methods: list[str], settings: Settings, input_shapes: dict) -> dict:
    """What decides a unit's result; a journal is resumed only by an audit with the same header. The nodes and
    units may differ: units already journaled are reused, the others computed."""
    header = {"format": JOURNAL_FORMAT, "model_sha256": _sha256(model.path), "input": model.input.name,
              "input_shapes": input_shapes, "methods": methods, "settings": asdict(settings)}
    return json.loads(json.dumps(header))  # as it reads back from the file (tuples become lists)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- running


def _run_here(auditor: BatchAuditor, batches: list[Batch]):
    for batch in batches:
        yield batch, auditor(batch)


_worker_auditor: BatchAuditor | None = None


def _start_worker(model_path, input_shapes, input_name, methods, settings):
    global _worker_auditor
    torch.set_num_threads(1)
    _worker_auditor = BatchAuditor(graph.load_model(model_path, input_shapes, input_name), methods, settings)


def _audit_in_worker(batch: Batch) -> list[dict]:
    return _worker_auditor(batch)


@contextmanager
def _ignoring_interrupts():
    """Processes started meanwhile inherit an ignored Ctrl-C, so only the parent handles it (by stopping them);
    a worker interrupted while it imports torch would print a traceback."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _run_in_workers(workers: int, worker_args: tuple, batches: list[Batch]):
    executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_start_worker, initargs=worker_args)
    try:
        with _ignoring_interrupts():  # submit starts the worker processes
            futures = {executor.submit(_audit_in_worker, batch): batch for batch in batches}
        for future in as_completed(futures):
            yield futures[future], future.result()
    except BaseException:
        _stop_now(executor)
        raise
    executor.shutdown()


def _stop_now(executor: ProcessPoolExecutor):
    """Drop the queued batches and end the workers mid-batch, instead of waiting for the batches in flight."""
    processes = list((executor._processes or {}).values())  # no public way to reach them before Python 3.14
    executor.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()


class Progress:
    """An overall bar (units, with a time estimate) and one for the node whose units finished last."""

    def __init__(self, plans: list[NodePlan], finished: dict, enabled: bool):
        self.names = {plan.node.output: plan.node.name for plan in plans}
        self.totals = {plan.node.output: len(plan.units) for plan in plans}
        self.done = {plan.node.output: sum((plan.node.output, unit) in finished for unit in plan.units)
                     for plan in plans}
        self.overall = tqdm(total=sum(self.totals.values()), initial=sum(self.done.values()), desc="audit",
                            unit="unit", disable=not enabled, position=0)
        self.node = tqdm(total=0, disable=not enabled, position=1, leave=False,  # no rate: units come in batches
                         bar_format="{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} units")
        unfinished = [tensor for tensor, total in self.totals.items() if self.done[tensor] < total]
        if unfinished:
            self._show(unfinished[0])

    def finished(self, batch: Batch):
        self.done[batch.tensor] += len(batch.units)
        self.overall.update(len(batch.units))
        self._show(batch.tensor)

    def _show(self, tensor: str):
        self.node.set_description(self.names[tensor], refresh=False)
        self.node.total, self.node.n = self.totals[tensor], self.done[tensor]
        self.node.refresh()

    def close(self):
        self.node.close()
        self.overall.close()


def _run(request: AuditRequest, model: graph.LoadedModel, methods: list[str], plans: list[NodePlan],
         journal: Journal, finished: dict):
    """Runs every batch with an unfinished unit, journaling each as it finishes."""
    batches = [batch for plan in plans for batch in plan.batches()
               if any((batch.tensor, unit) not in finished for unit in batch.units)]
    if request.workers > 1:
        worker_args = (model.path, request.input_shapes, request.input_name, methods, request.settings)
        runner = _run_in_workers(request.workers, worker_args, batches)
    else:
        runner = _run_here(BatchAuditor(model, methods, request.settings), batches)
    progress = Progress(plans, finished, not request.quiet and sys.stderr.isatty())
    try:
        for batch, entries in runner:
            journal.append(entries)
            finished.update({(entry["tensor"], entry["unit"]): entry for entry in entries})
            progress.finished(batch)
    except KeyboardInterrupt:
        done, total = sum(progress.done.values()), sum(progress.totals.values())
        raise UserError(f"interrupted: {done} of {total} units are saved in {journal.path}; continue with the same "
                        f"command and --out {journal.path.parent} --resume", exit_code=130) from None
    finally:
        runner.close()
        progress.close()


# -------------------------------------------------------------------------------------------- summaries


def summarize_node(plan: NodePlan, entries: list[dict], methods: list[str], settings: Settings) -> dict:
    """Units audited, mean and median validated activation per method, where ProxyGrad is higher by more than
    the validation tolerance, the median gain, and dead units (no tried input made them positive)."""
    per_unit = [_unit_row(entry, methods, settings) for entry in entries]
    summary = {"node": plan.node.name, "tensor": plan.node.output, "op_type": plan.node.op_type, "shape": plan.shape,
               "objective": plan.objective.kind, "rectifiers_before": entries[0]["rectifiers_rewritten"],
               "units_audited": len(entries), "zero_gradient": any(entry["zero_gradient"] for entry in entries),
               "validated": all(record["validated"] for entry in entries for record in entry["results"]
                                if record["status"] != "nonfinite")}
    for method in methods:
        summary[method] = _mean_and_median([row[method] for row in per_unit])
    if len(methods) == len(METHODS):
        compared = [row for row in per_unit if row["gain"] is not None]
        higher = sum(row["proxygrad_higher"] for row in compared)
        summary.update({"compared_units": len(compared), "proxygrad_higher": higher,
                        "proxygrad_higher_share": higher / len(compared) if compared else None,
                        "median_gain": statistics.median(row["gain"] for row in compared) if compared else None})
    summary["dead_units"] = [row["unit"] for row in per_unit if row["dead"]]
    summary["units"] = per_unit
    return summary


def _unit_row(entry: dict, methods: list[str], settings: Settings) -> dict:
    """One unit: the validated activation per method, ProxyGrad's gain, whether it is higher or lower than
    vanilla's by more than the validation tolerance, and whether the unit is dead."""
    values = {record["method"]: record["onnxruntime_activation"] for record in entry["results"]}
    row = {"unit": entry["unit"], **{method: values[method] for method in methods}, "gain": None,
           "proxygrad_higher": None, "proxygrad_lower": None}
    vanilla, proxygrad = values.get("vanilla"), values.get("proxygrad")
    if vanilla is not None and proxygrad is not None:
        row["gain"] = proxygrad - vanilla
        tolerance = settings.atol + settings.rtol * abs(vanilla)
        row["proxygrad_higher"], row["proxygrad_lower"] = row["gain"] > tolerance, row["gain"] < -tolerance
    row["dead"] = all(values[method] is not None and values[method] <= 0 for method in methods)
    return row


def _mean_and_median(values: list) -> dict:
    finite = [value for value in values if value is not None]
    if not finite:
        return {"mean": None, "median": None}
    return {"mean": statistics.fmean(finite), "median": statistics.median(finite)}


def audit_document(request: AuditRequest, model: graph.LoadedModel, methods: list[str], plans: list[NodePlan],
                   finished: dict, header: dict) -> dict:
    """audit.json: settings and versions, the per-node summaries, and every unit's records in plan order."""
    entries = [[finished[(plan.node.output, unit)] for unit in plan.units] for plan in plans]
    records = [record for node_entries in entries for entry in node_entries for record in entry["results"]]
    scored = [record["validated"] for record in records if record["status"] != "nonfinite"]
    settings = {**header["settings"], "methods": methods, "nodes": request.nodes,
                "units_per_node": request.units_per_node, "input_shapes": request.input_shapes,
                "input": model.input.name}
    return {"model": str(model.path), "model_sha256": header["model_sha256"], "settings": settings,
            "versions": run.versions(),
            "nodes": [summarize_node(plan, node_entries, methods, request.settings)
                      for plan, node_entries in zip(plans, entries)],
            "results": records, "validated": bool(scored) and all(scored)}


# ---------------------------------------------------------------------------------------------- command


def run_audit(request: AuditRequest, warn) -> tuple[dict, Path]:
    """Plans, runs what the journal lacks, and writes audit.json, audit.csv, images and report.html from the
    journal; returns the document and the folder."""
    request.settings.check()
    methods = parse_methods(request.methods)
    per_node = parse_units_per_node(request.units_per_node)
    if request.workers < 1:
        raise UserError(f"--workers must be at least 1, got {request.workers}")
    model_path = request.model or run.DEFAULT_MODEL
    if request.model is None and not model_path.exists():
        raise UserError(f"the default model {model_path} is missing; pass a MODEL")
    model = graph.load_model(model_path, request.input_shapes, request.input_name)
    plans = plan_audit(model, choose_nodes(model, request.nodes), per_node)
    out_dir = request.out or Path("runs") / f"{model.name}-audit-{time.strftime('%Y%m%d-%H%M%S')}"
    journal = Journal(out_dir / JOURNAL)
    _prepare_out_dir(out_dir, journal, request)
    header = journal_header(model, methods, request.settings, request.input_shapes)
    finished = journal.start(header, request.resume)
    _run(request, model, methods, plans, journal, finished)
    document = audit_document(request, model, methods, plans, finished, header)
    _warn_about(document, warn)
    inputs = {key: decode_input(encoded) for plan in plans for unit in plan.units
              for key, encoded in finished[(plan.node.output, unit)]["inputs"].items()}
    audit_report.write_outputs(out_dir, document, inputs, model.input.layout, request.settings.input_range)
    return document, out_dir


def _prepare_out_dir(out_dir: Path, journal: Journal, request: AuditRequest):
    if request.resume and out_dir.is_dir() and any(out_dir.iterdir()) and not journal.path.exists():
        raise UserError(f"--resume: {out_dir} holds no audit journal ({JOURNAL})")
    if not request.resume and not request.force and journal.path.exists():
        raise UserError(f"{out_dir} holds an audit: continue it with --resume, or start again with --force")
    if not request.resume:
        report.check_out_dir(out_dir, request.force)
        if out_dir.is_dir():
            shutil.rmtree(out_dir)  # --force: nothing of an earlier audit may leak into this one
    out_dir.mkdir(parents=True, exist_ok=True)


def _warn_about(document: dict, warn):
    stuck = [node["node"] for node in document["nodes"] if node["zero_gradient"]]
    if stuck:
        warn(f"the input gradient is exactly zero at the start for {', '.join(stuck)}: the optimizer cannot move "
             "there (e.g. Sign or step activations)")
    troubled = [record for record in document["results"] if record["status"] != "ok"]
    if troubled:
        warn(f"{len(troubled)} results hit NaN or infinite activations (see the status column of audit.csv)")


def summary_lines(document: dict) -> list[str]:
    """The per-node table printed after an audit."""
    methods = document["settings"]["methods"]
    width = max(len(node["node"]) for node in document["nodes"])
    header = f"{'node':{width}s}  {'op':8s} {'units':>5s}"
    header += "".join(f"  {method + ' mean':>14s} {'median':>9s}" for method in methods)
    compare = len(methods) == len(METHODS)
    if compare:
        header += f"  {'PG higher':>9s} {'med. gain':>9s}"
    lines = [header + f"  {'dead':>4s}  validated"]
    for node in document["nodes"]:
        line = f"{node['node']:{width}s}  {node['op_type']:8s} {node['units_audited']:5d}"
        line += "".join(f"  {_fmt(node[method]['mean']):>14s} {_fmt(node[method]['median']):>9s}" for method in methods)
        if compare:
            line += f"  {_share(node):>9s} {_fmt(node['median_gain'], signed=True):>9s}"
        lines.append(line + f"  {len(node['dead_units']):4d}  {'yes' if node['validated'] else 'NO'}")
    return lines


def _fmt(value, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.4g}" if signed and value else f"{value:.4g}"


def _share(node: dict) -> str:
    return f"{node['proxygrad_higher']}/{node['compared_units']}"
