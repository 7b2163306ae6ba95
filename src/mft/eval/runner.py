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
from mft.eval.backends import (DECODE_KWARGS, MAX_MODEL_LEN, Generation, check_backend_options, check_model_path,
                               hf_device_dtype, load_backend, resolve_model_type)
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


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_requests(task: Task, docs: list[dict]) -> list[dict]:
    kwargs = {"max_gen_toks": task.max_gen_toks, "temperature": 0.0, "do_sample": False}
    return [{"doc_id": d["doc_id"], "native_id": d["native_id"], "request_type": "generate_until",
             "request": {"context": task.prompt(d), "stop_sequences": list(task.stops), "generation_kwargs": kwargs},
             "label": task.label(d)} for d in docs]


def plan_tasks(tasks: list[Task], out: Path, model_config: dict) -> list[Plan]:
    plans = []
    for index, task in enumerate(tasks):
        docs = task.load_docs()
        log(f"{task.name}: data: {describe_record(task.data_source)}")
        requests = build_requests(task, docs)
        predictions, metrics, reason = outputs.reusable(out, task.name, requests, task.config(), model_config)
        if reason:
            log(f"{task.name}: recomputing: {reason}" if predictions is None else f"{task.name}: {reason}")
        plans.append(Plan(index, task, docs, requests, predictions, metrics))
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
    # Written before scoring, so that a crash while scoring does not cost the generations; the record of
    # what produced them goes last (and the old one first), so predictions never sit beside a wrong record.
    outputs.task_path(out, plan.index, task.name, "provenance.json").unlink(missing_ok=True)
    outputs.write_jsonl(outputs.task_path(out, plan.index, task.name, "requests.jsonl"), plan.requests)
    outputs.write_jsonl(outputs.task_path(out, plan.index, task.name, "predictions.jsonl"),
                        predictions_rows(plan, generations, None))
    outputs.write_provenance(out, plan.index, task.name, model_config, task.config())
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
    outputs.write_provenance(out, plan.index, name, model_config, task.config())
    record = {"task_name": name, "task_idx": plan.index, "metrics": metrics, "num_instances": len(plan.docs),
              "task_config": task.config(), "model_config": model_config,
              "processing_time": round(time.time() - seconds, 3), "current_date": time.strftime("%Y-%m-%d %H:%M:%S")}
    outputs.write_json(outputs.task_path(out, plan.index, name, "metrics.json"), record)
    return record


def run_eval(model: str, task_specs: list[str], output_dir: str, model_type: str = "auto", limit: int | None = None,
             batch_size: int = 8, data_dir: str | None = None, max_model_len: int = MAX_MODEL_LEN,
             workers: int | None = None, tensor_parallel_size: int | None = None, dtype: str | None = None,
             gpu_memory_utilization: float | None = None) -> dict:
    """Evaluate `model` on the tasks; returns the metrics.json content.

    `data_dir="packaged"` reads the benchmark files shipped in the package (GSM8K test, MATH-500).
    `tensor_parallel_size`, `dtype`, `gpu_memory_utilization`: see `VLLMBackend` (the first and last only
    with vllm; `dtype` also sets the hf backend's weights when not None/"auto").
    """
    if data_dir == "packaged":
        data_dir = str(packaged_data_dir())
    if data_dir and not Path(data_dir).expanduser().is_dir():
        raise MftError(f"--data-dir {data_dir} is not a folder")
    if limit is not None and limit < 1:
        raise MftError(f"--limit must be at least 1, got {limit}")
    if batch_size < 1:
        raise MftError(f"--batch-size must be at least 1, got {batch_size}")
    tasks = build_tasks(task_specs, limit=limit, data_dir=data_dir)
    check_model_path(model)
    model_type = resolve_model_type(model_type)
    check_backend_options(model_type, tensor_parallel_size, dtype, gpu_memory_utilization)
    local = Path(model).expanduser()
    # The settings that shape the generations (reuse compares them): the decode rule too, so predictions
    # decoded by an earlier rule are generated again.
    model_config = {"model": str(local.resolve()) if local.exists() else model, "model_type": model_type,
                    "max_model_len": max_model_len, "dtype": dtype or "auto",
                    "tensor_parallel_size": tensor_parallel_size, "decode": dict(DECODE_KWARGS),
                    "fingerprint": model_fingerprint(model)}
    if model_type == "hf":
        # The hf backend's device and effective dtype change the arithmetic, and so can the batch size
        # (rows are left-padded to the batch's longest prompt, and kernels sum in another order for
        # another shape): predictions made on the CPU in float32, or in batches of 8, are not reused on
        # a GPU in bfloat16 or in batches of 16. (vLLM schedules its own batches; --batch-size is unused.)
        device, hf_dtype = hf_device_dtype(dtype)
        model_config.update({"dtype": hf_dtype, "device": device, "batch_size": batch_size})
    out = outputs.prepare_dir(output_dir, model_config)
    plans = plan_tasks(tasks, out, model_config)
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
                backend = load_backend(model_type, model, batch_size, max_model_len, tensor_parallel_size, dtype,
                                       gpu_memory_utilization)
            generations = generate(plan, backend, out, model_config)
        record = plan.metrics if plan.metrics and not plan.generated else None
        if record is None:
            record = score_and_write(plan, generations, out, model_config, workers, started)
        else:
            log(f"{name}: reusing its metrics")
        entries.append(outputs.summary_entry(name, record["metrics"], record["num_instances"], record["task_config"]))
        log(f"{name}: {plan.task.primary_metric} = {record['metrics']['primary_score']:.4f}")
    summary_path = outputs.write_summary(out, entries, model_config)
    return json.loads(summary_path.read_text())
