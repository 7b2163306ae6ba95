"""`mft demo --model NAME`: the demo's pipeline on a real pretrained model with real GSM8K problems.

    data (a seeded split of the shipped GSM8K test set) -> FFT of the model on the train part -> MFT from FFT
    -> random / L1 baselines -> apply (streaming) -> the held-out part evaluated twice (8-shot GSM8K protocol;
    0-shot with the model's chat template) -> table, plots

Every stage is the project's own code (`mft train`, `mft.masking.apply`, `mft eval`), as in the tiny demo.

The split is a DEMO split, never a benchmark number: the 1319 problems of GSM8K's test set (shipped in
`mft/data/benchmarks/gsm8k`) are shuffled with the seed; the first `n_train` train FFT and MFT (chat format,
with the model's own chat template), the next `n_test` are held out and evaluated with the 8-shot GSM8K
protocol of `mft eval` (plain few-shot prompts, greedy, exact match), and a second time with the chat
template (`CHAT_COLUMN`: the question as the user turn, rendered by the tokenizer's own chat template with
the generation prompt, 0-shot, greedy through the hf backend's `generate`, scored by the GSM8K task's answer
extraction and exact match). The indices are written to `data/split.json`. Accuracy is given with a 95 % Wilson
score interval over the held-out problems. `plots/demo.png`: training loss and learning rate of FFT and MFT, mask
entries flipped per masked layer, and both accuracies per model with their intervals (`write_plots`).

Sizes: the default run is meant for one GPU (about 20 minutes; not timed: no GPU was lent); `--quick` (8 + 8
problems, 2 optimizer steps each for FFT and MFT, 64 new tokens 8-shot, 128 for the chat answers) is sized for
a CPU in under 10 minutes (measured: 260 s on 2 cores with SmolLM2-135M-Instruct, README) and only shows
that every stage works on a real model.
"""

from __future__ import annotations

import contextlib
import json
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
CHAT_COLUMN = "chat template, 0-shot"
FIGURE = "demo.png"


def wilson_interval(correct: int, n: int) -> tuple[float, float]:
    """95 % Wilson score interval of `correct` successes in `n`, as (low, high) in [0, 1]; (0, 1) for n = 0.
    The one computation `mft report` uses too (`mft.eval.report.binomial_interval`, scipy's)."""
    from mft.eval.report import binomial_interval

    if n == 0:
        return 0.0, 1.0
    low, high = binomial_interval(correct / n, n)
    return max(0.0, low), min(1.0, high)


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
    from transformers import AutoTokenizer

    chat_prompts(AutoTokenizer.from_pretrained(base), [])  # FFT/MFT and the chat evaluation need a chat template
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
    stages = Stages(7, echo)
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
        results[name] = accuracy_record(correct, n)

    stages.begin("chat", f"accuracy: {CHAT_COLUMN} (the model's chat template, greedy, exact match) on the "
                         f"{s.n_test} held-out problems")
    for name in MODELS:
        folder = base if name == "base" else paths.model(name)
        results[name]["chat"] = evaluate_chat(folder, test_rows, s, root / "eval_chat" / name, name)

    stages.begin("report", "results table and plots")
    summary = {"model": model, "model_path": str(base), "seed": seed, "quick": quick, "settings": asdict(s),
               "split": {k: v for k, v in record.items() if not k.endswith("indices")}, "models": results}
    (root / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    table = results_table(summary)
    (root / "results.md").write_text(table + "\n")
    plot = write_plots(paths, summary)
    total = stages.finish()
    (root / "timings.json").write_text(json.dumps({"stage_seconds": stages.times, "total_seconds": total}) + "\n")
    echo("\n" + table)
    echo(f"plots: {plot}\ntook {total:.0f} s; everything is in {root}")
    return {**summary, "total_seconds": total, "plot": str(plot)}


def accuracy_record(correct: int, n: int) -> dict:
    low, high = wilson_interval(correct, n)
    return {"accuracy": correct / n, "correct": correct, "num_instances": n, "ci95": [low, high]}


def chat_prompts(tokenizer, rows: list[dict]) -> list[str]:
    """Each GSM8K question as the only user turn, rendered by the tokenizer's own chat template with the
    generation prompt (the text the model sees before its answer; encoded without extra special tokens)."""
    if not getattr(tokenizer, "chat_template", None):
        raise MftError(f"{getattr(tokenizer, 'name_or_path', 'the model')}: its tokenizer has no chat template; "
                       f"the real-model demo's '{CHAT_COLUMN}' evaluation needs one")
    return [tokenizer.apply_chat_template([{"role": "user", "content": r["question"]}], tokenize=False,
                                          add_generation_prompt=True) for r in rows]


def evaluate_chat(folder: Path, rows: list[dict], s: RealSettings, out: Path, name: str) -> dict:
    """Accuracy on `rows` with the chat template (`chat_prompts`): greedy generation by the hf backend
    (`HFBackend.generate`, stopped at the model's EOS / end-of-turn tokens only, at most `s.chat_max_gen_toks`
    new tokens), scored by the GSM8K task (last number of the answer, exact match with the number after ####).
    Writes `out/predictions.jsonl` (one row per problem: prompt, continuation, num_tokens, model_answer, label,
    exact_match)."""
    from mft.eval.backends.hf import HFBackend
    from mft.eval.tasks.gsm8k import GSM8K

    task = GSM8K(name="gsm8k", num_shots=0)
    backend = HFBackend(str(folder), batch_size=s.eval_batch_size, max_model_len=s.max_model_len)
    prompts = chat_prompts(backend.tokenizer, rows)
    generations = backend.generate(prompts, [], s.chat_max_gen_toks, desc=f"chat 0-shot, {name}")
    del backend
    scored = task.score(rows, [g.text for g in generations])
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "predictions.jsonl", [
        {"doc_id": i, "prompt": prompt, "continuation": g.text, "num_tokens": g.num_tokens,
         "model_answer": r["model_answer"], "label": task.label(row), "exact_match": r["metrics"]["exact_match"]}
        for i, (row, prompt, g, r) in enumerate(zip(rows, prompts, generations, scored))])
    return accuracy_record(sum(r["metrics"]["exact_match"] for r in scored), len(rows))


def write_plots(paths: Paths, summary: dict, dpi: int = 100) -> Path:
    """`plots/demo.png`, four panels drawn with `mft plot`'s panel functions and the tiny demo's colours:
    training loss and learning rate of FFT and MFT (MFT drawn after FFT's last step; learning rates as `mft
    plot` draws far-apart ones, each relative to its own peak), mask entries flipped per masked layer during
    MFT, and held-out accuracy per model for both evaluations with its 95 % Wilson interval as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mft.demo.report import COLORS, SHORT, read_log, save_small_png
    from mft.plot import RunLog, loss_panel, lr_panel, mask_changes_panel

    fft_log, mft_log = read_log(paths.model("fft")), read_log(paths.runs / "mft")
    offset = fft_log[-1]["step"] if fft_log else 0
    runs = [RunLog("FFT", fft_log, COLORS["fft"]),
            RunLog("MFT (after FFT's last step)", mft_log, COLORS["mft"], offset=offset)]
    fig, ((ax_loss, ax_lr), (ax_flips, ax_acc)) = plt.subplots(2, 2, figsize=(13, 8.5))
    loss_panel(ax_loss, runs)
    lr_panel(ax_lr, runs)  # FFT's and MFT's peaks differ by 1000x: each drawn relative to its own peak
    mask_changes_panel(ax_flips, [RunLog("MFT", mft_log, COLORS["mft"])])
    ax_flips.set_xlabel("MFT optimizer step")

    models, s = summary["models"], summary["settings"]
    columns = [(f"GSM8K {s['num_shots']}-shot protocol", None, "///"), (CHAT_COLUMN, "chat", "")]
    width = 0.38
    for k, (label, key, hatch) in enumerate(columns):
        rows = [models[m][key] if key else models[m] for m in MODELS]
        xs = [i + (k - 0.5) * width for i in range(len(MODELS))]
        values = [100 * r["accuracy"] for r in rows]
        errors = [[100 * (r["accuracy"] - r["ci95"][0]) for r in rows], [100 * (r["ci95"][1] - r["accuracy"]) for r in rows]]
        ax_acc.bar(xs, values, width, color=[COLORS[m] for m in MODELS], alpha=1.0 if key else 0.55, hatch=hatch,
                   edgecolor="black", lw=0.5, yerr=errors, capsize=3, label=label)
        for x, r in zip(xs, rows):
            ax_acc.annotate(f"{100 * r['accuracy']:.0f}%\n{r['correct']}/{r['num_instances']}",
                            (x, 100 * r["ci95"][1]), ha="center", va="bottom", fontsize=7)
    ax_acc.set_xticks(range(len(MODELS)), [SHORT[m] for m in MODELS])
    ax_acc.set_ylim(0, 118)
    ax_acc.set_ylabel("held-out accuracy (%), 95 % Wilson interval")
    ax_acc.set_title(f"held-out accuracy, {models['fft']['num_instances']} problems ({SPLIT_LABEL})", fontsize=10)
    ax_acc.legend(fontsize=8, loc="upper right")
    quick = ", --quick: the numbers mean nothing" if summary["quick"] else ""
    fig.suptitle(f"mft demo --model {summary['model']} (seed {summary['seed']}{quick})", fontsize=11)
    fig.tight_layout()
    path = paths.plots / FIGURE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_small_png(fig, path, dpi)
    plt.close(fig)
    return path


def _mask_config(s: RealSettings):
    from mft.masking.config import MaskConfig

    return MaskConfig(masked_layers=s.masked_layers, subnet_mode="both", keep_ratio_attn=s.keep_ratio,
                      keep_ratio_mlp=s.keep_ratio)


def results_table(summary: dict) -> str:
    """The markdown table: one row per model, the accuracy of both evaluations (8-shot GSM8K protocol; chat
    template, 0-shot) each with its 95 % Wilson interval, labelled as a demo split."""
    s = summary["settings"]
    quick = " (--quick: every stage runs; the numbers mean nothing)" if summary["quick"] else ""
    lines = [f"{summary['model']}, {SPLIT_LABEL} (seed {summary['seed']}: {s['n_train']} train / {s['n_test']} "
             f"held-out problems): NOT a benchmark number{quick}",
             "",
             f"| model | GSM8K {s['num_shots']}-shot accuracy (held-out) | 95 % interval (Wilson) | correct / n "
             f"| {CHAT_COLUMN} | 95 % interval (Wilson) | correct / n |",
             "|---|---|---|---|---|---|---|"]

    def cells(r: dict) -> str:
        low, high = r["ci95"]
        return f"{r['accuracy']:.1%} | {low:.1%} - {high:.1%} | {r['correct']} / {r['num_instances']}"

    for name in MODELS:
        r = summary["models"][name]
        lines.append(f"| {LABELS[name]} | {cells(r)} | {cells(r['chat'])} |")
    return "\n".join(lines)
