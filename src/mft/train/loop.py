"""The training job: FFT, MFT or LoRA on one device, DDP, or DeepSpeed ZeRO-2/3, under `accelerate launch`.

    cfg = load_config("configs/train_configs/llama2_7b_math_local_masktune.yaml", ["--output_dir=out"])
    train(cfg)

`train` names its steps in the order they happen: check everything that can be checked without weights
(`_preflight`), load data (`_data`) and model and set the method up (`_model`), prepare (`_prepare`),
resume (`_resume`), the optimizer steps (`_steps`), save (`_finish`). What differs between fft, mft and lora
is one `mft.train.methods.Method` record, looked up once. What each method writes:

- fft / lora: `output_dir` is a `from_pretrained` folder (safetensors shards + tokenizer); LoRA is merged.
- mft: `output_dir` holds `masks.safetensors` (the mask the model uses at the end of training, bit for bit),
  `mft_run.json` (base model, mask settings, per-rank mask digests) — no copy of the weights. Bake it with
  `mft apply --mask_model_name_or_path OUTPUT_DIR --output_dir OUTPUT_DIR/mask_applied`.
- all: `train_config.yaml` (resolved settings), `train_log.jsonl` (one line per logged step),
  `checkpoints/step_N/`, with `save_model_snapshots` `snapshots/step_N/` (a loadable model, or MFT's mask file:
  see `_save_snapshot`, `list_checkpoints`) and, written last, `run_complete.json`.

Gradient clipping is 1.0 unless `clip_grad_norm` says otherwise, with or without DeepSpeed (`_gradient_clipping`),
as in every published run.

Checkpoints hold what is trained (MFT: the scores only, never the frozen weights), the optimizer, the
scheduler, every RNG and the data position; re-running the same command resumes from the newest complete
one and reproduces an uninterrupted run bit for bit.

Under DeepSpeed the scores live in bf16 inside the model while the optimizer keeps fp32 master copies. The
masks are computed from those fp32 masters (`safe_get_full_fp32_param`, identical on every rank) after
every optimizer step, so bf16 ties never decide a mask and every rank holds the same one. (The authors' fork
sorts the bf16 scores in every forward instead; `score_dtype: bfloat16` without DeepSpeed selects from bf16
scores, see the README's fidelity table.)
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mft.errors import MftError
from mft.train import guard
from mft.run_dir import (CHECKPOINTS, FINISHED_MARKER, SNAPSHOT_INFO, SNAPSHOTS, TRAIN_LOG, TRAINER_STATE,
                         check_output_dir, latest_checkpoint, mark_finished)
from mft.train.config import TrainConfig, load_model_config, validate_against_model
from mft.train.methods import Method, method_of

logger = logging.getLogger("mft.train")


# -- setup ---------------------------------------------------------------------------------------------------
def _accelerator(cfg: TrainConfig):
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    handlers = []
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Without CUDA, processes talk over gloo (DeepSpeed on CPU otherwise gets the world size wrong).
        backend = None if torch.cuda.is_available() else "gloo"
        handlers.append(InitProcessGroupKwargs(backend=backend, timeout=timedelta(seconds=cfg.timeout)))
    trackers = [t for t in cfg.report_to if t != "none"] if cfg.with_tracking else None
    return Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps, log_with=trackers or None,
                       project_dir=cfg.output_dir, kwargs_handlers=handlers)


def _deepspeed_config(accelerator) -> dict | None:
    plugin = accelerator.state.deepspeed_plugin
    return plugin.deepspeed_config if plugin is not None else None


def _preflight(cfg: TrainConfig) -> str:
    """Every check before the data and the model load; returns check_output_dir's verdict.

    The selection is checked on a skeleton built from the model's config alone (`config.json` of the run's
    `model_revision`, with its `trust_remote_code`; on the meta device): no weight file is read or downloaded.
    Only the masked-base check (MFT without allow_masked_base, `guard.check_mask_base`) reads weights: the
    tensors to be masked, to count their exact zeros."""
    state = check_output_dir(cfg.output_dir, cfg.overwrite_output_dir)
    guard.check_inputs(cfg)
    model_config = load_model_config(cfg)
    validate_against_model(cfg, model_config)
    if cfg.resolved_method == "mft":
        from mft.masking.select import coverage_table, select_targets
        from mft.models import skeleton_from_config

        skeleton = skeleton_from_config(model_config, trust_remote_code=cfg.trust_remote_code)
        targets = select_targets(skeleton, cfg.mask_config())
        logger.info("mask selection (language model decoder layers %s, subnet_mode %s):\n%s",
                    cfg.mask_config().masked_layers, cfg.mask_config().subnet_mode, coverage_table(targets))
        guard.check_mask_base(cfg, skeleton, targets)
    return state


def _load_model(cfg: TrainConfig, method: Method, accelerator, ds_config):
    from mft.models import load_pretrained
    from mft.precision import training_dtype

    # Frozen-weight methods need no fp32 master weights: load them in the training precision directly.
    dtype = torch.float32
    if accelerator.mixed_precision == "bf16" and (method.frozen_weights or ds_config is not None):
        dtype = torch.bfloat16
    dtype = training_dtype(accelerator, dtype, cfg.model_name_or_path, deepspeed=ds_config is not None)
    # what the forward computes in: the autocast / DeepSpeed precision where one is on, else the weights' dtype
    amp = {"bf16": "bfloat16", "fp16": "float16"}.get(accelerator.mixed_precision)
    computed = amp if amp and (ds_config is not None or accelerator.native_amp) else str(dtype).removeprefix("torch.")
    attn = "sdpa"
    if cfg.use_flash_attn:
        try:
            import flash_attn  # noqa: F401

            attn = "flash_attention_2"
        except ImportError:
            logger.warning("use_flash_attn: flash-attn is not installed; using PyTorch SDPA attention")
    model = load_pretrained(cfg.model_name_or_path, revision=cfg.model_revision, dtype=dtype,
                            attn_implementation=attn, trust_remote_code=cfg.trust_remote_code)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model, computed


def _grow_embeddings(cfg: TrainConfig, model, tokenizer, main: bool) -> None:
    """After load_tokenizer added tokens: grow the input embeddings and lm_head to len(tokenizer) rows, rounded
    up to a multiple of 8 with `add_pad_token` (the published runs: LLaMA-2 32,000 + <pad> -> 32,008), only when
    the model has fewer rows (as the original). New rows are initialised as transformers does (the mean and
    covariance of the old rows)."""
    rows = model.get_input_embeddings().num_embeddings  # the full count, also for ZeRO-3-partitioned weights
    if len(tokenizer) <= rows:
        return
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8 if cfg.add_pad_token else None)
    if main:
        logger.info("tokenizer: added %s; embeddings grown from %d to %d rows", tokenizer.pad_token, rows,
                    model.get_input_embeddings().num_embeddings)


def _gradient_clipping(cfg: TrainConfig, ds_config: dict | None) -> float:
    """The max gradient norm the run clips to (0.0: off). Unset `clip_grad_norm`: 1.0, the value of every
    published run (DeepSpeed's `gradient_clipping: auto`, which accelerate fills with 1.0); under DeepSpeed a
    number in its config file is kept. Set, `clip_grad_norm` wins on every path; under DeepSpeed it is written
    into `ds_config` (before `accelerator.prepare`), so DeepSpeed clips to it."""
    if cfg.clip_grad_norm is not None:
        clip = max(float(cfg.clip_grad_norm), 0.0)
        if ds_config is not None:
            ds_config["gradient_clipping"] = clip
        return clip
    if ds_config is not None:
        value = ds_config.get("gradient_clipping", "auto")
        if value == "auto":
            ds_config["gradient_clipping"] = value = 1.0
        return max(float(value), 0.0)
    return 1.0


def _optimizer(cfg: TrainConfig, model, ds_config):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith("bias") or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if ds_config and "optimizer" in ds_config:  # the DeepSpeed file defines its own optimizer
        from accelerate.utils import DummyOptim

        return DummyOptim(groups, lr=cfg.learning_rate)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=cfg.fused_optimizer or None)


def _shard_optimizer_state(cfg: TrainConfig, method: Method, optimizer, accelerator, ds_config):
    """The MFT layout without DeepSpeed (issue 12): frozen weights replicated in their training precision under
    plain DDP (no gradients, no master copies, nothing gathered), the scores' gradients all-reduced by DDP,
    and their AdamW state sharded over the processes (`ZeroRedundancyOptimizer`: each rank steps its shard
    and broadcasts the new scores, so every rank holds the same scores and computes the same masks).
    Returns `optimizer` unchanged for one process, DeepSpeed, other methods or `shard_optimizer_state: false`."""
    if (ds_config is not None or accelerator.num_processes == 1 or not cfg.shard_optimizer_state
            or not method.shard_optimizer_state or not isinstance(optimizer, torch.optim.AdamW)):
        return optimizer
    from torch.distributed.optim import ZeroRedundancyOptimizer

    class ShardedAdamW(ZeroRedundancyOptimizer):
        """`state_dict()` is called on every rank at the same points (accelerate's prepare and save_state).
        Once it has stepped, it is a collective that consolidates the full state on rank 0 (the rank that
        writes it; the others return their local view, which nobody writes). `load_state_dict` takes the
        full state and keeps each rank's shard."""

        stepped = False

        def step(self, *args, **kwargs):
            self.stepped = True
            return super().step(*args, **kwargs)

        def state_dict(self):
            if not self.stepped:  # nothing to consolidate yet (accelerate's prepare round-trips the state)
                return torch.optim.Optimizer.state_dict(self)
            self.consolidate_state_dict(to=0)
            return super().state_dict() if torch.distributed.get_rank() == 0 else torch.optim.Optimizer.state_dict(self)

    accepted = inspect.signature(torch.optim.AdamW).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted and k != "differentiable"}
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
    if accelerator.is_main_process:
        logger.info("MFT layout: DDP, frozen weights replicated; the scores' AdamW state sharded over %d processes",
                    accelerator.num_processes)
    return ShardedAdamW(groups, optimizer_class=torch.optim.AdamW, **defaults)


class EpochSampler(torch.utils.data.Sampler):
    """A fresh permutation per epoch from (seed, epoch) alone, so a resumed run sees the same order."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())

    def __len__(self) -> int:
        return self.n


# -- checkpoints ---------------------------------------------------------------------------------------------
def _save_checkpoint(accelerator, cfg, state: dict, ds: bool) -> None:
    path = Path(cfg.output_dir) / CHECKPOINTS / f"step_{state['completed_steps']}"
    # DeepSpeed: leave the frozen weights out of the module state; plain: a save hook keeps trainables only.
    accelerator.save_state(str(path), **({"exclude_frozen_parameters": True} if ds else {}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # atomically: its presence marks the checkpoint complete, so a kill must not leave it half-written
        tmp = path / f".{TRAINER_STATE}.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, path / TRAINER_STATE)
        if cfg.keep_last_n_checkpoints > 0:
            done = sorted((p for p in path.parent.glob("step_*") if (p / TRAINER_STATE).exists()),
                          key=lambda p: int(p.name.split("_")[1]))
            for old in done[: -cfg.keep_last_n_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def checkpoint_due(every, completed_steps: int, batches_in_epoch: int, batches_per_epoch: int,
                   accumulation: int) -> bool:
    """Whether the optimizer step just completed is a checkpoint: `every` is checkpointing_steps (N: every N
    steps; "epoch": the epoch's last step; "epoch/K": the steps ceil(j * S / K), j = 1..K, of each epoch of S
    steps, so the last one ends the epoch)."""
    if every is None:
        return False
    if isinstance(every, int):
        return completed_steps % every == 0
    if every == "epoch":
        return batches_in_epoch == batches_per_epoch
    k = int(every.split("/")[1])
    steps_per_epoch = math.ceil(batches_per_epoch / accumulation)
    step_in_epoch = math.ceil(batches_in_epoch / accumulation)
    return step_in_epoch in {math.ceil(j * steps_per_epoch / k) for j in range(1, k + 1)}


def _save_snapshot(accelerator, cfg, method: Method, model, tokenizer, state: dict) -> Path:
    """snapshots/step_N/: a from_pretrained folder (FFT; LoRA merged) or the mask file and mft_run.json (MFT),
    written under a temporary name and renamed when complete. Never pruned."""
    root = Path(cfg.output_dir) / SNAPSHOTS
    final = root / f"step_{state['completed_steps']}"
    partial = root / f".{final.name}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    base = cfg.model_name_or_path
    info = {"method": method.name, "steps": state["completed_steps"], "epoch": state["epoch"],
            "base_model": str(Path(base).resolve()) if Path(base).is_dir() else base}
    method.save(accelerator, cfg, model, tokenizer, info, partial, snapshot_info=SNAPSHOT_INFO)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
    accelerator.wait_for_everyone()
    return final


def _trainable_only_hooks(accelerator, model) -> None:
    """Without DeepSpeed, accelerate saves the whole state dict; keep what trains (e.g. MFT scores only)."""
    def save_hook(models, weights, output_dir):
        trainable = {n for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
        for state in weights:
            for key in [k for k in state if k not in trainable]:
                del state[key]

    accelerator.register_save_state_pre_hook(save_hook)


def _rewind_log(path: Path, completed_steps: int) -> None:
    """On resume, drop log lines of steps after the checkpoint (they will be logged again)."""
    if path.exists():
        text = path.read_text()
        if not text.endswith("\n"):  # a kill cut the last line short: drop it
            text = text[: text.rfind("\n") + 1]
        lines = [ln for ln in text.splitlines() if ln and json.loads(ln)["step"] <= completed_steps]
        path.write_text("".join(ln + "\n" for ln in lines))


# -- the job -------------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    model: torch.nn.Module  # the trained model as it is in memory (unwrapped; MFT: still with its mask layers)


def train(cfg: TrainConfig) -> TrainResult:
    """Run the job `cfg` describes (see the module docstring)."""
    _setup_logging()
    method = method_of(cfg)
    out_state = _preflight(cfg)
    accelerator = _accelerator(cfg)
    ds_config = _deepspeed_config(accelerator)
    if accelerator.is_main_process:  # the compute dtype line (mft.precision.compute_dtype), once
        logging.getLogger("mft.precision").setLevel(logging.INFO)
    final_dir = Path(cfg.output_dir)
    guard.check_resume(cfg, out_state, accelerator)  # read-only; before the data work
    cfg, tokenizer, num_added, loader = _data(cfg, out_state, accelerator)
    model, compute_dtype = _model(cfg, method, accelerator, ds_config, tokenizer, num_added)
    run = _prepare(cfg, method, accelerator, ds_config, model, loader, tokenizer)
    _resume(run)
    method.after_step(run.unwrapped, run.ds)
    _steps(run)
    return _finish(run, final_dir, compute_dtype)


@dataclass
class _Run:
    """What the steps of `train` share once the model is prepared, and where the run stands."""

    cfg: TrainConfig
    method: Method
    accelerator: Any
    model: torch.nn.Module  # as prepared (DDP, DeepSpeed engine, or the model itself)
    unwrapped: torch.nn.Module
    optimizer: Any
    loader: Any
    tokenizer: Any
    ds: bool  # under DeepSpeed
    clip: float  # max gradient norm (0: off)
    out: Path
    scheduler: Any
    steps_per_epoch: int
    max_steps: int
    epochs: int
    # where the run stands: steps done, the epoch it is in and the batches of it already seen (resume)
    completed_steps: int = 0
    start_epoch: int = 0
    skip_batches: int = 0

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


@dataclass
class _Window:
    """What the micro-batches since the last log record add up to."""

    loss: Any = 0.0
    batches: int = 0
    tokens: int = 0
    start: float = field(default_factory=time.perf_counter)


def _setup_logging() -> None:
    from mft.progress import quiet_libraries_off_terminal

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    quiet_libraries_off_terminal()
    logger.setLevel(logging.INFO)
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed")
    logging.getLogger("mft.train.data").setLevel(logging.INFO)


def _data(cfg: TrainConfig, out_state: str, accelerator):
    """(cfg, tokenizer, tokens it added, data loader). A bad row is refused before the run folder records
    anything; then the output folder is opened (overwrite: a folder beside the old, which the returned cfg
    names) and the seed set."""
    from accelerate.utils import set_seed

    from mft.train.data import Collator, build_train_dataset, load_tokenizer

    tokenizer, num_added = load_tokenizer(cfg)
    dataset, _ = build_train_dataset(cfg, tokenizer, main_process_first=accelerator.local_main_process_first)
    cfg = guard.open_output(cfg, out_state, accelerator)  # overwrite: a folder beside the old
    set_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.per_device_train_batch_size,
                                         sampler=EpochSampler(len(dataset), cfg.seed),
                                         collate_fn=Collator(tokenizer.pad_token_id))
    return cfg, tokenizer, num_added, loader


def _model(cfg: TrainConfig, method: Method, accelerator, ds_config, tokenizer, num_added: int):
    """(the loaded model made into what `method` trains, the compute dtype); FFT grows the embeddings first
    when the tokenizer gained a pad token."""
    main = accelerator.is_main_process
    model, compute_dtype = _load_model(cfg, method, accelerator, ds_config)
    if num_added:
        if method.frozen_weights:
            raise MftError(f"the tokenizer of {cfg.tokenizer_name or cfg.model_name_or_path} has neither a pad nor "
                           f"an EOS token, and {method.name} cannot grow the frozen embeddings; add a pad token when "
                           "fine-tuning the base model")
        _grow_embeddings(cfg, model, tokenizer, main)
        model.config.pad_token_id = tokenizer.pad_token_id  # the saved config.json names the added <pad>
    model, description = method.setup(cfg, model)
    if main:
        logger.info(description)
    return model, compute_dtype


def _prepare(cfg: TrainConfig, method: Method, accelerator, ds_config, model, loader, tokenizer) -> _Run:
    """Optimizer and clipping, accelerate's prepare, the number of steps and the learning-rate schedule."""
    from transformers import get_scheduler

    main = accelerator.is_main_process
    optimizer = torch_optimizer = _shard_optimizer_state(cfg, method, _optimizer(cfg, model, ds_config), accelerator,
                                                         ds_config)
    clip = _gradient_clipping(cfg, ds_config)
    if main:
        logger.info("gradient clipping: %s", f"max norm {clip:g}" if clip > 0 else "off")
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    ds = ds_config is not None
    if not ds:
        _trainable_only_hooks(accelerator, model)
    steps_per_epoch = math.ceil(len(loader) / cfg.gradient_accumulation_steps)
    max_steps = cfg.max_train_steps or cfg.num_train_epochs * steps_per_epoch
    epochs = math.ceil(max_steps / steps_per_epoch)
    every = cfg.checkpointing_steps
    if main and isinstance(every, str) and "/" in every and int(every.split("/")[1]) > steps_per_epoch:
        logger.warning("checkpointing_steps %s: an epoch has only %d optimizer steps, so a checkpoint follows "
                       "every step", every, steps_per_epoch)
    # Stepped once per optimizer step by this loop (not by accelerate, which would step it once per process).
    # DeepSpeed keeps using this optimizer's param groups, so the schedule reaches it too.
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer=torch_optimizer,
                              num_warmup_steps=int(cfg.warmup_ratio * max_steps), num_training_steps=max_steps)
    accelerator.register_for_checkpointing(scheduler)
    return _Run(cfg, method, accelerator, model, accelerator.unwrap_model(model), optimizer, loader, tokenizer, ds,
                clip, Path(cfg.output_dir), scheduler, steps_per_epoch, max_steps, epochs)


def _resume(run: _Run) -> None:
    """From `resume_from_checkpoint` or the newest complete checkpoint, if there is one: the trained tensors,
    optimizer, scheduler, RNGs and the position in the data; the log rewound to it."""
    cfg, accelerator = run.cfg, run.accelerator
    checkpoint = Path(cfg.resume_from_checkpoint) if cfg.resume_from_checkpoint else latest_checkpoint(cfg.output_dir)
    if checkpoint is None:
        return
    guard.check_checkpoint(checkpoint, run.unwrapped)
    accelerator.load_state(str(checkpoint), **({"load_module_strict": False} if run.ds else {"strict": False}))
    state = json.loads((checkpoint / TRAINER_STATE).read_text())
    run.completed_steps, run.start_epoch, run.skip_batches = (state["completed_steps"], state["epoch"],
                                                              state["batches_in_epoch"])
    if run.skip_batches >= len(run.loader):
        run.start_epoch, run.skip_batches = run.start_epoch + 1, 0
    guard.PROGRESS["step"] = run.completed_steps
    if run.completed_steps >= run.max_steps:  # killed after its last checkpoint: nothing left to train
        run.start_epoch = run.epochs
    if run.main:
        logger.info("resuming from %s (step %d)", checkpoint, run.completed_steps)
        _rewind_log(run.out / TRAIN_LOG, run.completed_steps)


def _steps(run: _Run) -> None:
    """The optimizer steps from where the run stands to `max_steps`: micro-batches, clipping, the method's
    after_step, a log record every `logging_steps`, checkpoints (and snapshots) when due."""
    from mft.progress import progress

    cfg, accelerator, model, method = run.cfg, run.accelerator, run.model, run.method
    tracker = method.tracker(run.unwrapped) if method.tracker is not None else None
    if cfg.with_tracking:
        accelerator.init_trackers(cfg.exp_name, config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                        for k, v in cfg.to_dict().items()})
    if run.main:
        logger.info("%d optimizer steps (%d epochs x %d), %d processes x %d sequences x %d accumulation",
                    run.max_steps, run.epochs, run.steps_per_epoch, accelerator.num_processes,
                    cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps)
    bar = progress(total=run.max_steps, initial=run.completed_steps, desc=f"{method.name} training",
                   disable=not run.main, unit="step")
    model.train()
    window = _Window()
    grad_norm = None
    for epoch in range(run.start_epoch, run.epochs):
        run.loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(run.loader, run.skip_batches) if run.skip_batches else run.loader
        batches_in_epoch = run.skip_batches
        run.skip_batches = 0
        for batch in batches:
            with accelerator.accumulate(model):
                loss = _loss(model, batch, cfg.reduce_loss)
                accelerator.backward(loss)
                if accelerator.sync_gradients and run.clip > 0 and not run.ds:  # DeepSpeed clips by its config
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), run.clip)
                run.optimizer.step()
                run.optimizer.zero_grad()
            batches_in_epoch += 1
            window.loss += loss.detach().float()
            window.batches += 1
            window.tokens += int(batch["attention_mask"].sum())
            if not accelerator.sync_gradients:
                continue
            run.scheduler.step()
            method.after_step(run.unwrapped, run.ds)
            run.completed_steps += 1
            guard.PROGRESS["step"] = run.completed_steps
            if cfg.logging_steps and run.completed_steps % cfg.logging_steps == 0:
                _log_step(run, epoch, window, grad_norm, tracker, bar)
                window = _Window()
            bar.update(1)  # after set_postfix: a log line carries this step's loss
            if checkpoint_due(cfg.checkpointing_steps, run.completed_steps, batches_in_epoch, len(run.loader),
                              cfg.gradient_accumulation_steps):
                state = {"completed_steps": run.completed_steps, "epoch": epoch, "batches_in_epoch": batches_in_epoch}
                _save_checkpoint(accelerator, cfg, state, run.ds)
                if cfg.save_model_snapshots:
                    _save_snapshot(accelerator, cfg, method, model, run.tokenizer, state)
            if run.completed_steps >= run.max_steps:
                break
        if run.completed_steps >= run.max_steps:
            break
    bar.close()


def _log_step(run: _Run, epoch: int, window: _Window, grad_norm, tracker, bar) -> None:
    """One train_log.jsonl record (and the trackers' and the bar's numbers) for the steps since the last."""
    accelerator, cfg = run.accelerator, run.cfg
    loss_mean = accelerator.gather(window.loss.reshape(1)).mean().item() / window.batches
    tokens = int(accelerator.gather(torch.tensor([window.tokens], device=accelerator.device)).sum())
    record = {"step": run.completed_steps, "epoch": epoch, "loss": loss_mean, "lr": run.scheduler.get_last_lr()[0],
              "tokens_per_s": tokens / (time.perf_counter() - window.start)}
    if grad_norm is not None:  # of the last step, before clipping
        record["grad_norm"] = float(grad_norm)
    if tracker is not None:
        record.update(tracker.stats())
    bar.set_postfix(loss=f"{loss_mean:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
    if run.main:
        with open(run.out / TRAIN_LOG, "a") as fh:
            fh.write(json.dumps(record) + "\n")
    if cfg.with_tracking:
        accelerator.log({k: v for k, v in record.items() if not isinstance(v, dict)}, step=run.completed_steps)


def _finish(run: _Run, final_dir: Path, compute_dtype: str) -> TrainResult:
    """The method's files, then run_complete.json (written last), then, for an overwrite, the new folder in
    place of the old one."""
    cfg, accelerator, method, out = run.cfg, run.accelerator, run.method, run.out
    base = cfg.model_name_or_path
    info = {"method": method.name, "steps": run.completed_steps, "gradient_clipping": run.clip,
            "compute_dtype": compute_dtype, "base_model": str(Path(base).resolve()) if Path(base).is_dir() else base}
    method.save(accelerator, cfg, run.model, run.tokenizer, info, out)
    accelerator.wait_for_everyone()
    if cfg.with_tracking:
        accelerator.end_training()
    if run.main:
        mark_finished(str(out), info)
    out = guard.finish_output(out, final_dir, run.main)  # overwrite: the new run replaces the old one only now
    if run.main:
        logger.info("done: %s", out)
        if method.next_step:
            logger.info(method.next_step.format(out=out))
    return TrainResult(out, run.completed_steps, accelerator.unwrap_model(run.model))


def _loss(model, batch, reduce_loss: str):
    if reduce_loss == "mean":
        return model(**batch).loss
    # "sum": summed over the label tokens of the micro-batch, as open-instruct's reduce_loss=sum
    labels = batch["labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                             ignore_index=-100, reduction="sum")
