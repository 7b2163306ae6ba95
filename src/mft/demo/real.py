"""`mft demo --model NAME`: the demo's pipeline on a real pretrained model with real GSM8K problems.

    data (a seeded split of the shipped GSM8K test set) -> FFT of the model on the train part -> MFT from FFT
    -> random / L1 baselines -> apply (streaming) -> 8-shot GSM8K evaluation of the held-out part -> table

Every stage is the project's own code (`mft train`, `mft.masking.apply`, `mft eval`), as in the tiny demo.

The split is a DEMO split, never a benchmark number: the 1319 problems of GSM8K's test set (shipped in
`mft/data/benchmarks/gsm8k`) are shuffled with the seed; the first `n_train` train FFT and MFT (chat format,
with the model's own chat template), the next `n_test` are held out and evaluated with the 8-shot GSM8K
protocol of `mft eval` (plain few-shot prompts, greedy, exact match). The indices are written to
`data/split.json`. Accuracy is given with a 95 % Wilson score interval over the held-out problems.

Sizes: the default run is meant for one GPU (about 20 minutes; not timed: no GPU was lent); `--quick` (8 + 8
problems, 2 optimizer steps each for FFT and MFT, 64 new tokens) is sized for a CPU in under 10 minutes
(measured: 154 s on 2 idle cores with SmolLM2-135M-Instruct, README) and only shows that every stage works
on a real model.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
from dataclasses import asdict, replace
from pathlib import Path

from mft.demo.data import write_jsonl
from mft.demo.pipeline import Stages, prepare_output, run_training
from mft.demo.settings import LABELS, MARKER, MODELS, REAL_QUICK, Paths, RealSettings
from mft.errors import MftError

SPLIT_LABEL = "demo split of the GSM8K test set"


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (Wilson 1927), as (low, high) in [0, 1]; (0, 1) for n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def gsm8k_target(answer: str) -> str:
    """A GSM8K reference solution in the 8-shot exemplars' form: one paragraph, no <<calculator>> notes,
    ending `So the answer is N.` (the form the GSM8K task's extraction and the exemplars use)."""
    body, _, final = answer.partition("####")
    body = re.sub(r"<<[^>]*>>", "", body)
    body = " ".join(line.strip() for line in body.splitlines() if line.strip())
    return f"{body} So the answer is {final.strip().replace(',', '')}."


def split_gsm8k(n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict], dict]:
    """(train rows, held-out rows, split record) from the shipped GSM8K test set, disjoint by index."""
    from mft.eval.data import packaged_data_dir

    source = packaged_data_dir() / "gsm8k" / "test.jsonl"
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    if n_train < 1 or n_test < 1 or n_train + n_test > len(rows):
        raise MftError(f"the demo split needs 1 <= n_train, n_test and n_train + n_test <= {len(rows)} "
                       f"(GSM8K test problems); got {n_train} + {n_test}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    train_idx, test_idx = sorted(order[:n_train]), sorted(order[n_train : n_train + n_test])
    record = {"what": SPLIT_LABEL + ": not a benchmark number", "source": "mft/data/benchmarks/gsm8k/test.jsonl",
              "seed": seed, "train_indices": train_idx, "heldout_indices": test_idx}
    return [rows[i] for i in train_idx], [rows[i] for i in test_idx], record


@contextlib.contextmanager
def real_environment():
    """Offline and without accelerate's launcher settings from the caller; a GPU is used where there is one."""
    forced = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_DEEPSPEED": "false"}
    defaults = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    saved = {k: os.environ.get(k) for k in (*forced, *defaults)}
    os.environ.update(forced)
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_real_demo(model: str, output_dir: str | Path, seed: int = 0, quick: bool = False, overwrite: bool = False,
                  settings: RealSettings | None = None, echo=print) -> dict:
    """Every stage on `model` (a short name from `mft models list` or a local folder); returns the results,
    also written to results.json / results.md in `output_dir`."""
    from mft.hub import resolve_model

    from mft.paths import check_output_vs_inputs

    if not isinstance(model, str) or not model.strip():
        raise MftError(f"--model is empty ({model!r}): expected a short name from `mft models list` (e.g. "
                       "smollm2-135m-instruct) or a local model folder; without --model, `mft demo` runs the tiny demo")
    s = settings or RealSettings()
    if quick and settings is None:
        s = replace(s, **REAL_QUICK)
    split_gsm8k(s.n_train, s.n_test, seed)  # bad sizes fail before anything is written
    base = resolve_model(model)
    if not (Path(base) / "config.json").is_file():
        raise MftError(f"--model {model}: expected a short name from `mft models list` or a local model folder")
    root = Path(output_dir).expanduser().resolve()
    # `--overwrite` deletes the output folder first: refuse one that is or holds the model (as `mft train` does)
    check_output_vs_inputs(root, {"model": base}, "--output-dir")
    check_masked_layers(Path(base), model, s.masked_layers)
    prepare_output(root, overwrite)
    (root / MARKER).write_text(json.dumps({"what": "mft demo output; `mft demo --overwrite` replaces it",
                                           "model": model, "seed": seed, "quick": quick, "settings": asdict(s)},
                                          indent=1))
    with real_environment():
        return _run(Paths(root), Path(base), model, s, seed, quick, echo)


def check_masked_layers(base: Path, model: str, masked_layers: str) -> None:
    """MftError, before anything is written, when the model in `base` (its config.json) has no decoder layer of
    some index in `masked_layers` (the demo's MFT would fail only after FFT)."""
    from mft.eval.backends.model_info import load_config
    from mft.masking.config import parse_layers

    wanted = parse_layers(masked_layers)
    config = load_config(str(base))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    count = getattr(text, "num_hidden_layers", None)
    if not isinstance(count, int):
        raise MftError(f"--model {model}: its config.json ({base}) gives no num_hidden_layers; the demo masks "
                       f"decoder layers {' '.join(map(str, wanted))}")
    outside = [layer for layer in wanted if layer >= count]
    if outside:
        raise MftError(f"--model {model} has {count} decoder layers (0-{count - 1}, config.json num_hidden_layers), "
                       f"but the real-model demo masks layers {' '.join(map(str, wanted))} "
                       f"({' '.join(map(str, outside))} do not exist): use a model with at least {max(wanted) + 1} "
                       "decoder layers")


def _run(paths: Paths, base: Path, model: str, s: RealSettings, seed: int, quick: bool, echo) -> dict:
    import torch

    from mft.eval.runner import run_eval
    from mft.masking.apply import Checkpoint, apply_masks, l1_masks, masks_from_mask_model, random_masks, targets_of

    root = paths.root
    torch.manual_seed(seed)
    stages = Stages(6, echo)
    common = {"max_seq_length": s.max_seq_length, "per_device_train_batch_size": s.batch_size,
              "chat_template_name": "tokenizer"}

    stages.begin("data", f"data: {SPLIT_LABEL}, seed {seed}: {s.n_train} train / {s.n_test} held-out problems")
    train_rows, test_rows, record = split_gsm8k(s.n_train, s.n_test, seed)
    paths.data.mkdir(parents=True, exist_ok=True)
    (paths.data / "split.json").write_text(json.dumps(record, indent=1) + "\n")
    train_file = write_jsonl(paths.data / "train.jsonl", [
        {"messages": [{"role": "user", "content": r["question"]},
                      {"role": "assistant", "content": gsm8k_target(r["answer"])}]} for r in train_rows])
    test_file = write_jsonl(paths.data / "heldout.jsonl", test_rows)

    stages.begin("fft", f"FFT: full fine-tuning of {model} on {s.n_train} problems, {s.fft_epochs} epoch(s)")
    run_training(paths, seed, model_name_or_path=str(base), train_file=str(train_file),
                 output_dir=str(paths.model("fft")), method="fft", learning_rate=s.fft_lr,
                 num_train_epochs=s.fft_epochs, **common)

    stages.begin("mft", f"MFT: learn a mask over layers {s.masked_layers} of FFT, keeping {s.keep_ratio:.0%}")
    cfg = _mask_config(s)
    run_training(paths, seed, model_name_or_path=str(paths.model("fft")), train_file=str(train_file),
                 output_dir=str(paths.runs / "mft"), method="mft", subnet_mode="both",
                 masked_layers=s.masked_layers, keep_ratio_attn=s.keep_ratio, keep_ratio_mlp=s.keep_ratio,
                 learning_rate=s.mft_lr, num_train_epochs=s.mft_epochs, **common)

    stages.begin("apply", "masks: learned (MFT), random and L1 at the same layers and ratio, applied to FFT")
    fft = paths.model("fft")
    checkpoint = Checkpoint(fft)
    targets = targets_of(checkpoint, cfg)
    learned, _ = masks_from_mask_model(str(paths.runs / "mft"))
    for name, mask_set in {"mft": learned, "random": random_masks(targets, cfg, seed=seed),
                           "l1": l1_masks(checkpoint, targets, cfg)}.items():
        apply_masks(fft, mask_set, paths.model(name), save_masks=True)

    stages.begin("eval", f"accuracy: {s.num_shots}-shot GSM8K protocol (greedy, exact match) on the "
                         f"{s.n_test} held-out problems")
    results = {}
    spec = json.dumps({"task_name": "gsm8k", "num_shots": s.num_shots, "dataset_path": str(test_file),
                       "generation_kwargs": {"max_gen_toks": s.max_gen_toks}})
    for name in MODELS:
        folder = base if name == "base" else paths.model(name)
        entry = run_eval(str(folder), [spec], str(paths.evals / name), model_type="hf",
                         batch_size=s.eval_batch_size, max_model_len=s.max_model_len)["metrics"][0]
        n = entry["num_instances"]
        correct = round(entry["exact_match"] * n)
        low, high = wilson_interval(correct, n)
        results[name] = {"accuracy": correct / n, "correct": correct, "num_instances": n, "ci95": [low, high]}

    stages.begin("report", "results table")
    summary = {"model": model, "model_path": str(base), "seed": seed, "quick": quick, "settings": asdict(s),
               "split": {k: v for k, v in record.items() if not k.endswith("indices")}, "models": results}
    (root / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    table = results_table(summary)
    (root / "results.md").write_text(table + "\n")
    total = stages.finish()
    (root / "timings.json").write_text(json.dumps({"stage_seconds": stages.times, "total_seconds": total}) + "\n")
    echo("\n" + table)
    echo(f"took {total:.0f} s; everything is in {root}")
    return {**summary, "total_seconds": total}


def _mask_config(s: RealSettings):
    from mft.masking.config import MaskConfig

    return MaskConfig(masked_layers=s.masked_layers, subnet_mode="both", keep_ratio_attn=s.keep_ratio,
                      keep_ratio_mlp=s.keep_ratio)


def results_table(summary: dict) -> str:
    """The markdown table: one row per model, accuracy with its 95 % interval, labelled as a demo split."""
    s = summary["settings"]
    quick = " (--quick: every stage runs; the numbers mean nothing)" if summary["quick"] else ""
    lines = [f"{summary['model']}, {SPLIT_LABEL} (seed {summary['seed']}: {s['n_train']} train / {s['n_test']} "
             f"held-out problems): NOT a benchmark number{quick}",
             "",
             f"| model | GSM8K {s['num_shots']}-shot accuracy (held-out) | 95 % interval (Wilson) | correct / n |",
             "|---|---|---|---|"]
    for name in MODELS:
        r = summary["models"][name]
        low, high = r["ci95"]
        lines.append(f"| {LABELS[name]} | {r['accuracy']:.1%} | {low:.1%} - {high:.1%} | "
                     f"{r['correct']} / {r['num_instances']} |")
    return "\n".join(lines)
