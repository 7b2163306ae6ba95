"""The demo pipeline: every stage through the project's own code, on a tiny Llama model, on the CPU.

    data -> tokenizer + model -> pre-train (base) -> FFT -> MFT -> random / L1 baselines -> apply (streaming)
         -> evaluate (GSM8K protocol, transformers backend) -> held-out loss -> table, plots

What drives what: training is `mft.train.loop.train` (the `mft train` job), masks come from
`mft.masking.apply` (learned, random, L1) and are baked in with its streaming `apply_masks`, accuracy is
`mft.eval.runner.run_eval` (the `mft eval` job: GSM8K extraction and exact match, greedy decoding). The demo
only generates the data, picks the settings, and writes the summary.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

from mft.demo.settings import MARKER, MODELS, QUICK, Paths, Settings
from mft.errors import MftError
from mft.masking.select import layer_index


def prepare_output(root: Path, overwrite: bool) -> None:
    """Create `root`; replace an earlier demo folder; refuse to touch anything else."""
    if root.exists() and not root.is_dir():
        raise MftError(f"--output-dir {root} is a file; choose a folder")
    if root.is_dir() and any(root.iterdir()):
        if not (root / MARKER).is_file():
            raise MftError(f"{root} exists and is not a demo output folder (no {MARKER}); the demo will not "
                           "overwrite it. Choose another --output-dir or empty that folder")
        if not overwrite:
            raise MftError(f"{root} holds an earlier demo run; pass --overwrite to replace it, or choose "
                           "another --output-dir")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)


class _NoApplyHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("bake the masks")


@contextlib.contextmanager
def demo_environment(root: Path):
    """CPU only, offline, quiet, one thread, deterministic; everything as it was before afterwards.

    CPU only, even where a GPU (or Apple's MPS) is present, and one thread: the same seed then gives the same
    table on any machine, and tiny matrices gain nothing from more (a busy machine loses a lot: threads wait
    on each other). A GPU is hidden only if CUDA was not initialised before in this process.
    """
    forced = {"ACCELERATE_USE_CPU": "true", "ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_DEEPSPEED": "false",
              "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
    defaults = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                # the `datasets` cache of the training data, inside the demo folder (read when datasets is imported)
                "HF_DATASETS_CACHE": str(root / "cache" / "datasets")}
    saved_env = {k: os.environ.get(k) for k in (*forced, *defaults)}
    os.environ.update(forced)
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    import torch
    import datasets
    import transformers

    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity(),
             transformers.logging.get_verbosity(), transformers.utils.logging.is_progress_bar_enabled(),
             logging.getLogger("mft.train.data").level)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("mft.train.data").setLevel(logging.WARNING)
    hint = _NoApplyHint()  # the demo bakes the masks itself, elsewhere
    logging.getLogger("mft.train").addFilter(hint)
    try:
        yield
    finally:
        logging.getLogger("mft.train").removeFilter(hint)
        threads, deterministic, ds_bars, ds_level, tf_level, tf_bars, data_level = saved
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        (datasets.enable_progress_bars if ds_bars else datasets.disable_progress_bars)()
        datasets.logging.set_verbosity(ds_level)
        transformers.logging.set_verbosity(tf_level)
        (transformers.utils.logging.enable_progress_bar if tf_bars else transformers.utils.logging.disable_progress_bar)()
        logging.getLogger("mft.train.data").setLevel(data_level)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class Stages:
    """Stage headers with the time so far, `[4/10] FFT: ...  (0:38)`, and each stage's duration."""

    def __init__(self, total: int, echo=print):
        self.total, self.index, self.echo, self.start = total, 0, echo, time.perf_counter()
        self.times: dict[str, float] = {}
        self._name, self._t0 = None, None

    def begin(self, name: str, what: str) -> None:
        self._close()
        self.index += 1
        self._name, self._t0 = name, time.perf_counter()
        elapsed = int(time.perf_counter() - self.start)
        self.echo(f"\n[{self.index}/{self.total}] {what}  ({elapsed // 60}:{elapsed % 60:02d})", flush=True)

    def _close(self) -> None:
        if self._name is not None:
            self.times[self._name] = round(time.perf_counter() - self._t0, 1)
            self._name = None

    def finish(self) -> float:
        self._close()
        return round(time.perf_counter() - self.start, 1)


# -- stages -------------------------------------------------------------------------------------------------
def make_data(paths: Paths, s: Settings, seed: int) -> dict:
    from mft.progress import progress as tqdm

    from mft.demo import data

    files = {}
    with tqdm(total=3, desc="data", unit="file") as bar:
        drills = data.drills(seed)
        files["pretrain"] = data.write_jsonl(paths.data / "pretrain.jsonl", [data.as_messages(r) for r in drills])
        bar.update()
        train, test = data.word_problems(s.n_train, s.n_test, seed)
        files["train"] = data.write_jsonl(paths.data / "train.jsonl", [data.as_messages(r) for r in train])
        bar.update()
        # The GSM8K task reads "question" and "answer" (gold = the text after ####).
        files["test"] = data.write_jsonl(paths.data / "test.jsonl", test)
        bar.update()
    return {"files": files, "drills": drills, "train": train, "test": test}


def make_init_model(paths: Paths, s: Settings, seed: int, texts: list[str]) -> Path:
    """A BPE tokenizer trained on the demo's text and a randomly initialised Llama model, saved together."""
    from mft.progress import progress as tqdm

    from mft.demo.data import QA_TEMPLATE
    from mft.tiny import tiny_model, train_tokenizer

    out = paths.model("init")
    with tqdm(total=2, desc="tokenizer + model", unit="step") as bar:
        tokenizer = train_tokenizer(texts, vocab_size=s.vocab_size, chat_template=QA_TEMPLATE)
        bar.update()
        model = tiny_model("llama", seed=seed, vocab_size=len(tokenizer), num_layers=s.layers, hidden=s.hidden,
                           num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                           intermediate_size=s.intermediate, max_position_embeddings=256)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        bar.update()
    return out


def run_training(paths: Paths, seed: int, **values):
    """`mft train` in this process, with a fresh accelerate state before and after (several runs, one process)."""
    from accelerate.state import AcceleratorState, GradientState

    from mft.train.config import TrainConfig
    from mft.train.loop import train

    # clip_grad_norm -1: the demo's recipe was tuned without clipping (the published runs clip at 1.0, the
    # default; with it this FFT model does not overfit, which is the situation the demo shows MFT in)
    values = {"chat_template_name": "tokenizer", "lr_scheduler_type": "linear", "warmup_ratio": 0.03,
              "logging_steps": 1, "report_to": ["none"], "fused_optimizer": False, "clip_grad_norm": -1.0,
              "dataset_local_cache_dir": str(paths.root / "cache"), "seed": seed, **values}
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        return train(TrainConfig(**values))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def mask_config(s: Settings):
    from mft.masking.config import MaskConfig

    return MaskConfig(masked_layers=s.masked_layers, subnet_mode="both", keep_ratio_attn=s.keep_ratio,
                      keep_ratio_mlp=s.keep_ratio, score_init=s.score_init)


def build_masked_models(paths: Paths, s: Settings, seed: int) -> dict[str, dict]:
    """The learned, random and L1 masks, each baked into the FFT checkpoint with the streaming apply."""
    from mft.masking.apply import Checkpoint, apply_masks, l1_masks, masks_from_mask_model, random_masks, targets_of

    fft = paths.model("fft")
    cfg = mask_config(s)
    checkpoint = Checkpoint(fft)
    targets = targets_of(checkpoint, cfg)
    learned, base = masks_from_mask_model(str(paths.runs / "mft"))
    if base is None or Path(base).resolve() != fft.resolve():
        raise MftError(f"the MFT run was trained from {base}, not from {fft}")
    sets = {"mft": learned, "random": random_masks(targets, cfg, seed=seed), "l1": l1_masks(checkpoint, targets, cfg)}
    summary = {}
    for name, mask_set in sets.items():
        apply_masks(fft, mask_set, paths.model(name), save_masks=True)
        entries = sum(m.numel() for m in mask_set.masks.values())
        summary[name] = {"source": mask_set.source, "matrices": len(mask_set.masks), "entries": entries,
                         "kept_fraction": sum(int(m.sum()) for m in mask_set.masks.values()) / entries}
    # How far apart the masks are: the share of entries where two masks disagree, and per masked layer the
    # share of MFT's pruned weights that a baseline prunes too (an unrelated mask: 1 - keep ratio).
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            differ = sum(int((sets[a].masks[k] != sets[b].masks[k]).sum()) for k in sets[a].masks)
            summary[a][f"differs_from_{b}"] = differ / summary[a]["entries"]
    overlap: dict[str, dict[str, list[int]]] = {}
    for module, mask in learned.masks.items():
        layer = layer_index(module)
        for other in ("random", "l1"):
            entry = overlap.setdefault(layer, {}).setdefault(other, [0, 0])
            entry[0] += int((~mask & ~sets[other].masks[module]).sum())
            entry[1] += int((~mask).sum())
    summary["mft"]["pruned_overlap_per_layer"] = {
        layer: {other: v[0] / max(1, v[1]) for other, v in entry.items()} for layer, entry in overlap.items()}
    return summary


def evaluate_accuracy(paths: Paths, s: Settings, name: str) -> dict:
    """`mft eval` on the held-out problems: 0-shot GSM8K protocol, transformers backend, greedy."""
    from mft.eval.runner import run_eval

    spec = json.dumps({"task_name": "gsm8k", "num_shots": 0, "dataset_path": str(paths.data / "test.jsonl"),
                       "generation_kwargs": {"max_gen_toks": s.max_gen_toks}})
    summary = run_eval(str(paths.model(name)), [spec], str(paths.evals / name), model_type="hf",
                       batch_size=s.eval_batch_size, max_model_len=256)
    entry = summary["metrics"][0]
    return {"accuracy": entry["exact_match"], "num_instances": entry["num_instances"]}


class HeldOutLoss:
    """Mean token NLL on the assistant tokens of the held-out conversations, by the training label rule."""

    def __init__(self, rows: list[dict], tokenizer, max_seq_length: int, batch_size: int = 100):
        from mft.demo.data import QA_TEMPLATE, as_messages
        from mft.train.data import Collator, tokenize_messages

        self.examples = [tokenize_messages(as_messages(r)["messages"], tokenizer, QA_TEMPLATE, max_seq_length)
                         for r in rows]
        self.collate, self.batch_size = Collator(tokenizer.pad_token_id), batch_size

    def __call__(self, model, desc: str) -> float:
        import torch
        from mft.progress import progress as tqdm

        from mft.train.data import IGNORE_INDEX

        total, count = 0.0, 0
        model.eval()
        with torch.inference_mode():
            for start in tqdm(range(0, len(self.examples), self.batch_size), desc=desc, unit="batch", leave=False):
                batch = self.collate(self.examples[start : start + self.batch_size])
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                labels = batch["labels"][:, 1:]
                nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                                        ignore_index=IGNORE_INDEX, reduction="sum")
                total += float(nll)
                count += int((labels != IGNORE_INDEX).sum())
        return total / count


def load_model(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def _checkpoints(run: Path) -> list[tuple[int, Path]]:
    from mft.train.loop import CHECKPOINTS

    found = [(int(p.name.split("_")[1]), p) for p in (run / CHECKPOINTS).glob("step_*")]
    return sorted(found)


def training_curves(paths: Paths, loss: HeldOutLoss, s: Settings, seed: int) -> dict:
    """From the FFT and MFT checkpoints (removed afterwards): the held-out loss along both runs, and the mask
    changes per masked layer along MFT.

    FFT checkpoints hold every weight. MFT checkpoints hold the scores only; each is loaded into the mask
    layers of the training run (`inject_masks` with the run's mask settings, on the final FFT weights), so
    its mask is the one the training loop computed from those scores (`refresh_masks`: the library's rule)
    and the forward masks the weights as training did.
    """
    import torch
    from safetensors.torch import load_file
    from mft.progress import progress as tqdm

    from mft.masking.files import read_masks
    from mft.masking.inject import extract_masks, inject_masks, refresh_masks
    from mft.train.loop import CHECKPOINTS

    fft_points, mft_points = _checkpoints(paths.model("fft")), _checkpoints(paths.runs / "mft")
    model = load_model(paths.model("fft"))
    curves = {"fft": [], "mft": [], "mft_layer_changes": []}
    with tqdm(total=len(fft_points) + len(mft_points), desc="held-out loss along training", unit="checkpoint") as bar:
        for step, checkpoint in fft_points:
            model.load_state_dict(load_file(str(checkpoint / "model.safetensors")), strict=True)
            curves["fft"].append({"step": step, "heldout_loss": loss(model, f"FFT step {step}")})
            bar.update()
        model = load_model(paths.model("fft"))  # the final FFT weights, which MFT masks
        inject_masks(model, mask_config(s), seed=seed, refreshed_by_caller=True)  # a seeded draw (replaced below) leaves torch's RNG alone
        score_keys = {name for name, _ in model.named_parameters() if name.endswith(".scores")}
        previous, previous_step, masks = None, 0, {}
        for step, checkpoint in mft_points:
            scores = load_file(str(checkpoint / "model.safetensors"))
            if set(scores) != score_keys:
                raise MftError(f"{checkpoint} holds {len(scores)} tensors, not the scores of the {len(score_keys)} "
                               f"matrices the demo's mask settings select (layers {s.masked_layers})")
            model.load_state_dict(scores, strict=False)
            refresh_masks(model)
            masks = extract_masks(model)
            curves["mft"].append({"step": step, "heldout_loss": loss(model, f"MFT step {step}")})
            if previous is not None:  # share of each layer's mask entries that flipped, per step
                changed: dict[str, list[int]] = {}
                for name, mask in masks.items():
                    layer = layer_index(name)
                    entry = changed.setdefault(layer, [0, 0])
                    entry[0] += int((mask != previous[name]).sum())
                    entry[1] += mask.numel()
                curves["mft_layer_changes"].append(
                    {"step": step, **{k: v[0] / v[1] / (step - previous_step) for k, v in changed.items()}})
            previous, previous_step = masks, step
            bar.update()
    final = read_masks(paths.runs / "mft" / "masks.safetensors").masks
    if masks and any(not torch.equal(final[name], masks[name]) for name in final):
        raise MftError("the masks of the last MFT checkpoint differ from the run's masks.safetensors")
    for run in (paths.model("fft"), paths.runs / "mft"):
        shutil.rmtree(run / CHECKPOINTS, ignore_errors=True)
    return curves


# -- the whole run ------------------------------------------------------------------------------------------
def run_demo(output_dir: str | Path, seed: int = 0, quick: bool = False, overwrite: bool = False,
             settings: Settings | None = None, echo=print) -> dict:
    """Run every stage; returns the results (also written to results.json / results.md)."""
    s = settings or Settings()
    if quick and settings is None:
        s = replace(s, **QUICK)
    root = Path(output_dir).expanduser().resolve()
    prepare_output(root, overwrite)
    paths = Paths(root)
    (root / MARKER).write_text(json.dumps({"what": "mft demo output; `mft demo --overwrite` replaces it",
                                           "seed": seed, "quick": quick, "settings": asdict(s)}, indent=1))
    with demo_environment(root):
        return _run(paths, s, seed, quick, echo)


def _run(paths: Paths, s: Settings, seed: int, quick: bool, echo) -> dict:
    import torch
    from mft.progress import progress as tqdm

    from mft.demo import report

    root = paths.root
    torch.manual_seed(seed)
    stages = Stages(10, echo)
    common = {"max_seq_length": s.max_seq_length, "per_device_train_batch_size": s.batch_size}

    stages.begin("data", "data: synthetic arithmetic drills and GSM8K-style word problems")
    d = make_data(paths, s, seed)
    echo(f"  {len(d['drills'])} drills, {len(d['train'])} training problems, {len(d['test'])} held-out problems "
         f"-> {paths.data}")

    stages.begin("init", f"tokenizer and a {s.layers}-layer Llama model, built locally")
    from mft.demo.data import tokenizer_texts

    init = make_init_model(paths, s, seed, tokenizer_texts(d["drills"] + d["train"]))

    stages.begin("pretrain", "base model: pre-training on the arithmetic drills (mft train, full fine-tuning)")
    run_training(paths, seed, model_name_or_path=str(init), train_file=str(d["files"]["pretrain"]),
                 output_dir=str(paths.model("base")), method="fft", learning_rate=s.pretrain_lr,
                 num_train_epochs=s.pretrain_epochs, **common)

    stages.begin("fft", f"FFT: full fine-tuning of base on {s.n_train} word problems, {s.fft_epochs} epochs")
    steps_per_epoch = -(-s.n_train // s.batch_size)
    run_training(paths, seed, model_name_or_path=str(paths.model("base")), train_file=str(d["files"]["train"]),
                 output_dir=str(paths.model("fft")), method="fft", learning_rate=s.fft_lr,
                 num_train_epochs=s.fft_epochs, checkpointing_steps=s.fft_curve_every * steps_per_epoch,
                 keep_last_n_checkpoints=-1, **common)

    stages.begin("mft", f"MFT: learn a mask over layers {s.masked_layers} of FFT, keeping {s.keep_ratio:.0%}")
    run_training(paths, seed, model_name_or_path=str(paths.model("fft")), train_file=str(d["files"]["train"]),
                 output_dir=str(paths.runs / "mft"), method="mft", subnet_mode="both",
                 masked_layers=s.masked_layers, keep_ratio_attn=s.keep_ratio, keep_ratio_mlp=s.keep_ratio,
                 score_init=s.score_init, learning_rate=s.mft_lr, num_train_epochs=s.mft_epochs,
                 checkpointing_steps=s.mft_curve_every * steps_per_epoch, keep_last_n_checkpoints=-1, **common)

    stages.begin("apply", "masks: learned (MFT), random and L1 at the same layers and ratio, applied to FFT")
    masks = build_masked_models(paths, s, seed)

    stages.begin("eval", "accuracy: GSM8K protocol (0-shot, greedy, exact match) on the held-out problems")
    results = {}
    for name in MODELS:
        results[name] = evaluate_accuracy(paths, s, name)

    stages.begin("loss", "held-out loss: mean token NLL on the answers of the held-out problems")
    from transformers import AutoTokenizer

    loss = HeldOutLoss(d["test"], AutoTokenizer.from_pretrained(paths.model("fft")), s.max_seq_length)
    for name in tqdm(MODELS, desc="held-out loss", unit="model"):
        results[name]["heldout_loss"] = loss(load_model(paths.model(name)), name)

    stages.begin("curves", "held-out loss along FFT and MFT, mask changes per layer (from the checkpoints)")
    curves = training_curves(paths, loss, s, seed)

    stages.begin("report", "results table and plots")
    # results.json holds only what the seed decides (two runs with one seed give the same file);
    # timings.json the wall-clock times.
    summary = {"seed": seed, "quick": quick, "settings": asdict(s), "models": results, "masks": masks,
               "curves": curves}
    with tqdm(total=3, desc="results", unit="file") as bar:
        (root / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
        bar.update()
        table = report.write_table(root, summary)
        bar.update()
        plot = report.write_plots(paths, summary)
        bar.update()
    timings = {"stage_seconds": stages.times, "total_seconds": stages.finish()}
    (root / "timings.json").write_text(json.dumps(timings, indent=1) + "\n")
    echo("\n" + table)
    echo(f"plots: {plot}\ntook {timings['total_seconds']:.0f} s; everything is in {root}")
    return {**summary, **timings, "plot": str(plot)}
