"""`mft eval`: check everything, reuse finished work, generate what is missing, score, write the files.

Every input is checked (task specs, data, few-shot files, model path, output folder) before a model is
loaded, and the model is loaded only if some task still needs generations.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mft.errors import MftError
from mft.eval import outputs
from mft.eval.backends import (check_backend_options, check_model_path, load_backend, resolve_model_type_why,
                               resolve_settings)
from mft.eval.backends.decode import DECODE_KWARGS, Generation, prompt_budget
from mft.eval.backends.hf import parse_batch_size
from mft.eval.data import describe_record, packaged_data_dir
from mft.eval.fingerprint import model_fingerprint
from mft.eval.specs import build_tasks
from mft.eval.tasks import Task


@dataclass
class Plan:
    """One task of the run: its documents, requests and whatever an earlier run left to reuse."""

    index: int
    task: Task
    docs: list[dict]
    requests: list[dict]
    predictions: list[dict] | None = None
    metrics: dict | None = None
    generated: bool = field(default=False)
    batch_size_used: int | None = None  # hf: the batch size its predictions were generated with


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_requests(task: Task, docs: list[dict]) -> list[dict]:
    kwargs = {"max_gen_toks": task.max_gen_toks, "temperature": 0.0, "do_sample": False}
    return [{"doc_id": d["doc_id"], "native_id": d["native_id"], "request_type": "generate_until",
             "request": {"context": task.prompt(d), "stop_sequences": list(task.stops), "generation_kwargs": kwargs},
             "label": task.label(d)} for d in docs]


def load_requests(tasks: list[Task]) -> list[tuple[Task, list[dict], list[dict]]]:
    """(task, docs, requests) per task, checked before anything is created or loaded: no prompt is empty
    (vLLM refuses an empty one)."""
    loaded = []
    for task in tasks:
        docs = task.load_docs()
        log(f"{task.name}: data: {describe_record(task.data_source)}")
        requests = build_requests(task, docs)
        empty = [r["doc_id"] for r in requests if not r["request"]["context"]]
        if empty:
            raise MftError(f"{task.name}: the prompt of doc_id(s) {empty[:10]} is empty; every request needs a "
                           "non-empty prompt (vLLM refuses an empty one): check the task's data")
        loaded.append((task, docs, requests))
    return loaded


def plan_tasks(loaded: list[tuple[Task, list[dict], list[dict]]], out: Path, model_config: dict) -> list[Plan]:
    plans = []
    for index, (task, docs, requests) in enumerate(loaded):
        predictions, metrics, reason, provenance = outputs.reusable(out, task.name, requests, task.config(),
                                                                    model_config)
        if reason:
            log(f"{task.name}: recomputing: {reason}" if predictions is None else f"{task.name}: {reason}")
        used = (provenance or {}).get("batch_size_used")
        plans.append(Plan(index, task, docs, requests, predictions, metrics, batch_size_used=used))
    return plans


def predictions_rows(plan: Plan, generations: list[Generation], scored: list[dict] | None) -> list[dict]:
    rows = []
    for i, (request, gen) in enumerate(zip(plan.requests, generations)):
        score = scored[i] if scored else {"metrics": {}, "model_answer": None}
        rows.append({"doc_id": request["doc_id"], "native_id": request["native_id"], "metrics": score["metrics"],
                     "model_output": [{"continuation": gen.text, "num_tokens": gen.num_tokens,
                                       "model_answer": score["model_answer"]}],
                     "label": request["label"]})
    return rows


def generate(plan: Plan, backend, out: Path, model_config: dict) -> list[Generation]:
    task = plan.task
    prompts = [r["request"]["context"] for r in plan.requests]
    generations = backend.generate(prompts, task.stops, task.max_gen_toks, desc=f"generating {task.name}")
    plan.batch_size_used = getattr(backend, "last_batch_size", None)  # hf: "auto" resolved; vLLM: None
    # Written before scoring, so that a crash while scoring does not cost the generations; the record of
    # what produced them goes last (and the old one first), so predictions never sit beside a wrong record.
    outputs.task_path(out, plan.index, task.name, "provenance.json").unlink(missing_ok=True)
    outputs.write_jsonl(outputs.task_path(out, plan.index, task.name, "requests.jsonl"), plan.requests)
    outputs.write_jsonl(outputs.task_path(out, plan.index, task.name, "predictions.jsonl"),
                        predictions_rows(plan, generations, None))
    outputs.write_provenance(out, plan.index, task.name, model_config, task.config(), plan.batch_size_used)
    plan.generated = True
    return generations


def score_and_write(plan: Plan, generations: list[Generation], out: Path, model_config: dict, workers, seconds):
    task, name = plan.task, plan.task.name
    scored = task.score(plan.docs, [g.text for g in generations], workers)
    metrics = task.aggregate([s["metrics"] for s in scored])
    outputs.remove_stale(out, name, plan.index)
    outputs.write_jsonl(outputs.task_path(out, plan.index, name, "requests.jsonl"), plan.requests)
    outputs.write_jsonl(outputs.task_path(out, plan.index, name, "predictions.jsonl"),
                        predictions_rows(plan, generations, scored))
    outputs.write_provenance(out, plan.index, name, model_config, task.config(), plan.batch_size_used)
    record = {"task_name": name, "task_idx": plan.index, "metrics": metrics, "num_instances": len(plan.docs),
              "task_config": task.config(), "model_config": model_config,
              **({"batch_size_used": plan.batch_size_used} if plan.batch_size_used is not None else {}),
              "processing_time": round(time.time() - seconds, 3), "current_date": time.strftime("%Y-%m-%d %H:%M:%S")}
    outputs.write_json(outputs.task_path(out, plan.index, name, "metrics.json"), record)
    return record


def run_eval(model: str, task_specs: list[str], output_dir: str, model_type: str = "auto", limit: int | None = None,
             batch_size: int | str = "auto", data_dir: str | None = None, max_model_len: int | None = None,
             workers: int | None = None, tensor_parallel_size: int | None = None, dtype: str | None = None,
             gpu_memory_utilization: float | None = None) -> dict:
    """Evaluate `model` on the tasks; returns the metrics.json content.

    `data_dir="packaged"` reads the benchmark files shipped in the package (GSM8K test, MATH-500).
    `tensor_parallel_size`, `dtype`, `gpu_memory_utilization`: see `VLLMBackend` (the first and last only
    with vllm; `dtype` also sets the hf backend's weights when not None/"auto"). `max_model_len` None = the
    protocol's 2048, capped at the model's context (`model_info.resolve_max_model_len`). The resolved device,
    dtype, max_model_len and tensor_parallel_size are recorded in `model_config`.
    """
    if data_dir == "packaged":
        data_dir = str(packaged_data_dir())
    if data_dir and not Path(data_dir).expanduser().is_dir():
        raise MftError(f"--data-dir {data_dir} is not a folder")
    if limit is not None and limit < 1:
        raise MftError(f"--limit must be at least 1, got {limit}")
    batch_size = parse_batch_size(batch_size)
    tasks = build_tasks(task_specs, limit=limit, data_dir=data_dir)
    check_model_path(model)
    local = Path(model).expanduser()
    outputs.check_dir(output_dir, str(local.resolve()) if local.exists() else model)  # before any slow work
    model_type, why = resolve_model_type_why(model_type)
    if why:
        log(why)
    check_backend_options(model_type, tensor_parallel_size, dtype, gpu_memory_utilization, why)
    loaded = load_requests(tasks)
    settings = resolve_settings(model_type, model, max_model_len, tensor_parallel_size, dtype)
    if model_type == "hf":  # VLLMBackend logs its own when it loads
        for line in settings["log"]:
            log(f"hf: {line}")
    for task in tasks:  # each task's max_gen_toks leaves room for a prompt
        prompt_budget(settings["max_model_len"], task.max_gen_toks)
    # The settings that shape the generations (reuse compares them), as resolved: `--dtype auto` is
    # float32 on a CPU and bfloat16 on most GPUs; the decode rule too, so predictions decoded by an
    # earlier rule are generated again.
    model_config = {"model": str(local.resolve()) if local.exists() else model, "model_type": model_type,
                    "max_model_len": settings["max_model_len"], "dtype": settings["dtype"],
                    "device": settings["device"], "tensor_parallel_size": settings["tensor_parallel_size"],
                    "decode": dict(DECODE_KWARGS), "fingerprint": model_fingerprint(model)}
    if model_type == "hf":
        # The hf backend's batch size can change the arithmetic too (rows are left-padded to the batch's
        # longest prompt, and kernels sum in another order for another shape): predictions made in batches
        # of 8 are not reused for batches of 16. (vLLM schedules its own batches; --batch-size is unused.)
        model_config["batch_size"] = batch_size
    out = outputs.prepare_dir(output_dir, model_config)
    plans = plan_tasks(loaded, out, model_config)
    backend, entries = None, []
    for plan in plans:
        started, name = time.time(), plan.task.name
        if plan.predictions is not None:
            generations = [Generation(p["model_output"][0]["continuation"], p["model_output"][0]["num_tokens"])
                           for p in plan.predictions]
            log(f"{name}: reusing {len(generations)} predictions from {out}")
        else:
            if backend is None:
                log(f"loading {model} with the {model_type} backend")
                # The flags as given: each backend resolves them again, to the same `settings`.
                backend = load_backend(model_type, model, batch_size, max_model_len, tensor_parallel_size, dtype,
                                       gpu_memory_utilization)
            generations = generate(plan, backend, out, model_config)
        record = plan.metrics if plan.metrics and not plan.generated else None
        if record is None:
            record = score_and_write(plan, generations, out, model_config, workers, started)
        else:
            log(f"{name}: reusing its metrics")
        entries.append(outputs.summary_entry(name, record["metrics"], record["num_instances"], record["task_config"]))
        if plan.batch_size_used is not None:  # hf: the batch size used (model_config.batch_size: the setting)
            entries[-1]["batch_size_used"] = plan.batch_size_used
        log(f"{name}: {plan.task.primary_metric} = {record['metrics']['primary_score']:.4f}")
    summary_path = outputs.write_summary(out, entries, model_config)
    return json.loads(summary_path.read_text())
