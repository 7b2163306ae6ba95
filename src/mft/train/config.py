"""Training settings: one dataclass, read from a YAML file plus command-line overrides.

    cfg = load_config("configs/train_configs/llama2_7b_math_local_masktune.yaml",
                      ["--model_name_or_path=output/fft_llama2-7b_math", "--masked_layers=4 5 6 7"])
    cfg.resolved_method        # "mft"
    cfg.mask_config()          # the MaskConfig the mask layer is built from
    validate_against_model(cfg)  # checks that need the model's config.json (no weights)

Key names are the published ones (open-instruct `finetune.py` / the MFT configs), so the original YAML files
and launch lines work unchanged. Ours on top: `method`, `overwrite_output_dir`, `dataset_local_cache_dir`
and the mask keys of `MaskConfig` (`sparsity_attn` / `sparsity_mlp` are accepted as aliases of
`keep_ratio_attn` / `keep_ratio_mlp`; they are KEEP ratios — see `mft.masking.config`).

Overrides: `--key=value`, `--key value` or `key=value` (`--kebab-case` too); values are read as YAML
(`--learning_rate=2e-5`, `--report_to=[wandb]`, `--masked_layers="4 5 6 7"`); a boolean key alone (`--use_lora`)
means true. The parsing and type rules are `mft.settings`' (shared by every command); the Python API is
`TrainConfig(**values)` (field names), or `TrainConfig.from_dict(values)` for the published names and aliases.

Published keys that ask for something this project does not do (pushing to the Hub, QLoRA, AI2's Beaker
jobs, ...) are listed in `UNSUPPORTED`: accepted at their harmless values, an error otherwise.

What the run folder holds and whether it is finished or resumable: `mft.run_dir`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field, fields

from mft import settings
from mft.errors import MftError
from mft.masking.config import ALIASES as MASK_ALIASES
from mft.masking.config import MaskConfig

logger = logging.getLogger(__name__)

METHODS = ("auto", "fft", "mft", "lora")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
TRACKERS = ("all", "none", "tensorboard", "wandb", "comet_ml", "clearml", "mlflow", "aim", "dvclive")
# chat_template_name: a name from mft.chat_templates.TEMPLATES, or this one to keep the tokenizer's own template.
TOKENIZER_TEMPLATE = "tokenizer"
DATA_EXTENSIONS = (".json", ".jsonl", ".parquet")

_MASK_FIELDS = {f.name: f for f in fields(MaskConfig)}


def _mask(name: str):
    """A TrainConfig field with the same default and help as MaskConfig's (one definition of each)."""
    f = _MASK_FIELDS[name]
    if f.default_factory is not dataclasses.MISSING:
        return field(default_factory=f.default_factory, metadata=f.metadata)
    return field(default=f.default, metadata=f.metadata)


def _help(text: str, split: str | None = None, **kw):
    return field(metadata={"help": text, **({"split": split} if split else {})}, **kw)


_UNKNOWN_HINT = "; see the Training section of the README"


@dataclass
class TrainConfig:
    """Every setting of a training run. Defaults are the published MFT settings where they make sense."""

    # --- what to train -------------------------------------------------------------------------------
    method: str = _help("auto, fft, mft or lora. auto: subnet_mode set -> mft, use_lora -> lora, else fft "
                        "(the original's rule)", default="auto")
    model_name_or_path: str | None = _help("Hugging Face model id or local folder to start from "
                                           "(for MFT: the FFT checkpoint)", default=None)
    model_revision: str | None = _help("branch, tag or commit of model_name_or_path", default=None)
    tokenizer_name: str | None = _help("tokenizer id or folder; default: model_name_or_path", default=None)
    tokenizer_revision: str | None = _help("revision of the tokenizer; default: model_revision when "
                                           "tokenizer_name is unset", default=None)
    use_slow_tokenizer: bool = _help("load the slow (Python / SentencePiece) tokenizer where the model has one, "
                                     "as the published configs do; labels then come from the token counts of "
                                     "the rendered prefixes (needs the sentencepiece package for LLaMA)",
                                     default=False)
    add_pad_token: bool = _help("a tokenizer without a pad token gets a new <pad> token and FFT grows the "
                                "embeddings and lm_head to the next multiple of 8 rows (the published runs: "
                                "LLaMA-2 32,000 -> 32,008); false pads with EOS and keeps the shapes. The "
                                "frozen-weight methods (MFT, LoRA) always pad with EOS", default=False)
    trust_remote_code: bool = _help("allow model/tokenizer code from the Hub repository", default=False)
    use_flash_attn: bool = _help("load the model with flash_attention_2 (needs the flash-attn package and a GPU)",
                                 default=False)
    gradient_checkpointing: bool = _help("recompute activations in backward: less memory, ~30 % slower",
                                         default=False)

    # --- data --------------------------------------------------------------------------------------
    dataset_name: str | None = _help("one Hugging Face dataset (train split) or local file", default=None)
    dataset_config_name: str | None = _help("configuration name of dataset_name", default=None)
    dataset_mixer: dict | None = _help("{source: amount}: an int > 1 takes that many rows, a number <= 1 that "
                                       "fraction, of the source shuffled with seed (as the original; counts and "
                                       "fractions do not mix, and among counts 1 is one row); sources "
                                       "are Hub names or local "
                                       ".json/.jsonl/.parquet files", default=None)
    dataset_mixer_list: list[str] | None = _help("the same as a flat list: [source, amount, source, amount, ...]",
                                                 default=None)
    dataset_mix_dir: str | None = _help("if set, the mixed (untokenized) training data is written there as "
                                        "train_mix.jsonl for inspection", default=None)
    train_file: str | None = _help("one local .json/.jsonl/.parquet file of {\"messages\": [...]} rows",
                                   default=None)
    max_train_samples: int | None = _help("train on only the first N tokenized examples of the mix "
                                          "(debugging; as the original)",
                                          default=None)
    max_seq_length: int = _help("truncate tokenized examples to this many tokens", default=4096)
    preprocessing_num_workers: int | None = _help("processes for tokenization", default=None)
    overwrite_cache: bool = _help("tokenize again even if a cached result exists", default=False)
    dataset_local_cache_dir: str | None = _help("where tokenized datasets are cached; default mft's cache "
                                                "folder ($MFT_CACHE_DIR, else ~/.cache/mft), subfolder tokenized/", default=None)
    chat_template_name: str = _help("chat template: tulu (published) or 'tokenizer' for the tokenizer's own",
                                    default="tulu")
    add_bos: bool = _help("prepend the BOS token to every example (the tulu template has none)", default=False)
    strict_roles: bool = _help("refuse rows with roles other than system/user/assistant or with an assistant "
                               "turn right after another; false (the original) renders other roles as the "
                               "template does (tulu: nothing) and trains consecutive assistant turns",
                               default=False)

    # --- optimisation ------------------------------------------------------------------------------
    per_device_train_batch_size: int = _help("sequences per device per micro-batch", default=1)
    gradient_accumulation_steps: int = _help("micro-batches per optimizer step (global batch = "
                                             "per_device x accumulation x processes)", default=1)
    learning_rate: float = _help("peak learning rate of AdamW", default=2e-5)
    lr_scheduler_type: str = _help("learning-rate schedule: " + ", ".join(LR_SCHEDULERS), default="linear")
    warmup_ratio: float = _help("fraction of the steps spent warming up linearly", default=0.03)
    weight_decay: float = _help("AdamW weight decay", default=0.0)
    num_train_epochs: int = _help("passes over the training data", default=2)
    max_train_steps: int | None = _help("stop after this many optimizer steps (overrides num_train_epochs)",
                                        default=None)
    reduce_loss: str = _help("mean (over label tokens of the batch) or sum", default="mean")
    clip_grad_norm: float | None = _help("clip the gradient norm to this; <= 0 is off. Unset: 1.0, as every "
                                         "published run (under DeepSpeed: the config file's gradient_clipping, "
                                         "'auto' = 1.0); set, it wins on every path, DeepSpeed included",
                                         default=None)
    fused_optimizer: bool = _help("use the fused AdamW kernel", default=True)
    shard_optimizer_state: bool = _help("MFT without DeepSpeed on several processes (DDP): shard the scores' AdamW "
                                        "state over the processes (torch ZeroRedundancyOptimizer)", default=True)
    seed: int = _help("random seed: data order, score initialisation", default=42)
    timeout: int = _help("seconds the processes wait for each other (long tokenization)", default=1800)

    # --- LoRA (baseline) ---------------------------------------------------------------------------
    use_lora: bool = _help("train LoRA adapters on the seven projections, merged on save", default=False)
    lora_rank: int = _help("LoRA rank", default=64)
    lora_alpha: float = _help("LoRA alpha", default=16.0)
    lora_dropout: float = _help("LoRA dropout", default=0.1)

    # --- MFT (mft.masking.config.MaskConfig; sparsity_attn / sparsity_mlp are aliases of keep_ratio_*) --
    subnet_mode: str | None = _help("attn, mlp or both; setting it selects MFT (method: auto). Unset with "
                                    "method: mft means both", default=None)
    masked_layers: list[int] = _mask("masked_layers")
    subnet_type: str = _mask("subnet_type")
    keep_ratio_attn: float = _mask("keep_ratio_attn")
    keep_ratio_mlp: float = _mask("keep_ratio_mlp")
    threshold_attn: float = _mask("threshold_attn")
    threshold_mlp: float = _mask("threshold_mlp")
    target_modules: list[str] = _mask("target_modules")
    score_init: str = _mask("score_init")
    score_init_std: float = _mask("score_init_std")
    score_dtype: str = _mask("score_dtype")

    # --- output, checkpoints, logging ----------------------------------------------------------------
    output_dir: str = _help("run folder: final model or masks, checkpoints, resolved config", default="output/")
    overwrite_output_dir: bool = _help("start over: replace what output_dir holds (a finished or interrupted run). "
                                       "The new run is written beside it and replaces it only once finished; "
                                       "refused when output_dir is or contains an input", default=False)
    allow_masked_base: bool = _help("MFT: allow a model_name_or_path that is already masked (holds mft_masks.json "
                                    "or the pruned fraction of exact zeros); refused otherwise", default=False)
    checkpointing_steps: int | str | None = _help("save a checkpoint every N optimizer steps, at the end of "
                                                  "each epoch ('epoch') or K times per epoch ('epoch/K', as the "
                                                  "original's epoch/3)", default=None)
    save_model_snapshots: bool = _help("with each checkpoint also write snapshots/step_N/: a loadable model "
                                       "folder (FFT, LoRA merged) or the mask file (MFT), never pruned; list "
                                       "them with `mft checkpoints OUTPUT_DIR`", default=False)
    keep_last_n_checkpoints: int = _help("checkpoints kept in output_dir; -1 keeps all", default=3)
    resume_from_checkpoint: str | None = _help("checkpoint folder to resume from (the loop otherwise "
                                               "resumes from the latest complete one by itself)", default=None)
    logging_steps: int | None = _help("log loss and learning rate every N optimizer steps", default=1)
    with_tracking: bool = _help("send metrics to the trackers in report_to", default=False)
    report_to: list[str] = _help("trackers: " + ", ".join(TRACKERS) + " (default tensorboard: 'all' would "
                                 "include wandb, which needs a login or WANDB_MODE=offline); a string may separate "
                                 "them by commas", split=r"[\s,]+", default_factory=lambda: ["tensorboard"])
    exp_name: str = _help("experiment name: the trackers' project (wandb's project, tensorboard's subfolder of "
                          "output_dir)", default="mft")

    def __post_init__(self):
        settings.coerce_fields(self)  # each field to its annotated type, or MftError naming key, type, value
        self.validate()

    @classmethod
    def from_dict(cls, values: dict, where: str = "in the settings given") -> "TrainConfig":
        """From a mapping with the published key names, read as a YAML file is: `sparsity_*` aliases,
        `UNSUPPORTED` keys at their harmless values; an unknown key raises MftError naming the nearest."""
        merged: dict = {}
        settings.merge(merged, values, where, cls, MASK_ALIASES, UNSUPPORTED, _UNKNOWN_HINT)
        return cls(**merged)

    # ------------------------------------------------------------------------------------------------
    @property
    def resolved_method(self) -> str:
        """fft, mft or lora: `method` when explicit, else the original's rule."""
        if self.method != "auto":
            return self.method
        if self.subnet_mode is not None:
            return "mft"
        return "lora" if self.use_lora else "fft"

    def mask_config(self) -> MaskConfig:
        """The MaskConfig of this run (validated; subnet_mode defaults to both)."""
        values = {name: getattr(self, name) for name in _MASK_FIELDS}
        values["subnet_mode"] = self.subnet_mode or "both"
        return MaskConfig(**values)

    def data_sources(self) -> list[tuple[str, float]]:
        """[(source, amount)] in order, from whichever of the four data keys is set. amount: an int is a row
        count, a float <= 1 a fraction (1.0 = all rows). open-instruct's get_datasets rule: if any amount is
        above 1, all are counts and each must be written as an integer (then 1 means one row); a mix of counts
        and fractions raises MftError naming the fractions. A source named twice in dataset_mixer_list raises
        (the original keeps the last amount silently)."""
        if self.dataset_mixer:
            key, pairs = "dataset_mixer", [(str(k), v) for k, v in self.dataset_mixer.items()]
        elif self.dataset_mixer_list:
            items = self.dataset_mixer_list
            key, pairs = "dataset_mixer_list", [(str(items[i]), items[i + 1]) for i in range(0, len(items), 2)]
        elif self.dataset_name:
            return [(self.dataset_name, 1.0)]
        elif self.train_file:
            return [(self.train_file, 1.0)]
        else:
            return []
        seen = set()
        for source, _ in pairs:
            if source in seen:
                raise MftError(f"{key} names {source!r} twice; give each source once, with one amount")
            seen.add(source)
        amounts = [_amount(key, source, value) for source, value in pairs]
        if any(a > 1 for a in amounts):
            fractions = [f"{source}: {value}" for source, value in pairs if not _written_as_int(value)]
            if fractions:
                raise MftError(f"{key} mixes row counts (amounts above 1) with amounts not written as whole "
                               f"numbers ({', '.join(fractions)}); as in open-instruct, either every amount is a "
                               "whole row count (then 1 is one row) or every one a fraction <= 1")
            amounts = [int(a) for a in amounts]
        return [(source, a) for (source, _), a in zip(pairs, amounts)]

    def to_dict(self) -> dict:
        """Every field, with `method` resolved (what the run actually does)."""
        out = {f.name: _copy(getattr(self, f.name)) for f in fields(self)}
        out["method"] = self.resolved_method
        return out

    def save(self, path: str) -> None:
        """Write the resolved config as YAML; `load_config(path, [])` gives this config back."""
        import yaml

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            yaml.safe_dump(self.to_dict(), fh, sort_keys=False, allow_unicode=True)

    # ------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Every check that needs no model and no data rows. Raises MftError."""
        _choice("method", self.method, METHODS)
        _choice("lr_scheduler_type", self.lr_scheduler_type, LR_SCHEDULERS)
        _choice("reduce_loss", self.reduce_loss, ("mean", "sum"))
        from mft.chat_templates import TEMPLATES

        _choice("chat_template_name", self.chat_template_name, (*TEMPLATES, TOKENIZER_TEMPLATE))
        for tracker in self.report_to:
            _choice("report_to", tracker, TRACKERS)
        if not self.model_name_or_path:
            raise MftError("model_name_or_path is required: a Hugging Face model id or a local model folder")
        if not self.output_dir:
            raise MftError("output_dir is required")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
                     "max_seq_length", "timeout", "lora_rank"):
            _positive(name, getattr(self, name))
        for name in ("max_train_steps", "max_train_samples", "logging_steps", "preprocessing_num_workers"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        if self.keep_last_n_checkpoints == 0 or self.keep_last_n_checkpoints < -1:
            raise MftError(f"keep_last_n_checkpoints must be -1 (keep all) or >= 1; got {self.keep_last_n_checkpoints}")
        if isinstance(self.checkpointing_steps, int):
            _positive("checkpointing_steps", self.checkpointing_steps)
        if self.save_model_snapshots and self.checkpointing_steps is None:
            raise MftError("save_model_snapshots writes a snapshot with each checkpoint, but checkpointing_steps "
                           "is unset; set it (N, epoch or epoch/K)")
        if not self.learning_rate > 0:
            raise MftError(f"learning_rate must be > 0; got {self.learning_rate}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise MftError(f"warmup_ratio must be in [0, 1]; got {self.warmup_ratio}")
        if self.weight_decay < 0:
            raise MftError(f"weight_decay must be >= 0; got {self.weight_decay}")
        if not self.lora_alpha > 0:
            raise MftError(f"lora_alpha must be > 0; got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise MftError(f"lora_dropout must be in [0, 1); got {self.lora_dropout}")
        if self.resume_from_checkpoint and not os.path.isdir(self.resume_from_checkpoint):
            raise MftError(f"resume_from_checkpoint: no such folder {self.resume_from_checkpoint!r}")
        self._validate_method()
        self._validate_data()

    def _validate_method(self) -> None:
        mask = self.mask_config()  # validates keep ratios, modes, patterns
        method = self.resolved_method
        if self.method == "auto" and self.subnet_mode is not None and self.use_lora:
            raise MftError("both subnet_mode (MFT) and use_lora (LoRA) are set; keep one, or say which with "
                           "method: mft / method: lora")
        if method == "mft":
            if self.use_lora:
                raise MftError("method mft and use_lora: true contradict each other; drop use_lora")
            if mask.is_empty:
                raise MftError("MFT needs something to mask: set masked_layers (e.g. \"4 5 6 7\") or target_modules")
            return
        if method == "fft" and self.use_lora:
            raise MftError("method fft and use_lora: true contradict each other; drop one")
        if self.subnet_mode is not None:
            raise MftError(f"subnet_mode is set ({self.subnet_mode!r}), which asks for MFT, but method is "
                           f"{method}; remove subnet_mode (--subnet_mode=null) or use method: mft")
        if not mask.is_empty:
            raise MftError(f"masked_layers / target_modules are set but the run is {method}, not MFT, so they would "
                           "be ignored; add subnet_mode: both (or method: mft), or remove them")

    def _validate_data(self) -> None:
        given = [k for k in ("dataset_name", "dataset_mixer", "dataset_mixer_list", "train_file") if getattr(self, k)]
        if not given:
            raise MftError("no training data: set one of dataset_mixer, dataset_mixer_list, dataset_name or "
                           "train_file (a local .json/.jsonl/.parquet file of {\"messages\": [...]} rows)")
        if len(given) > 1:
            raise MftError(f"{' and '.join(given)} are both set; use one data source (override the other with "
                           f"--{given[0]}=null)")
        if self.dataset_mixer_list and len(self.dataset_mixer_list) % 2:
            raise MftError(f"dataset_mixer_list must alternate source and amount, got an odd number of items: "
                           f"{self.dataset_mixer_list}")
        for source, _ in self.data_sources():
            kind = source_kind(source)
            if self.train_file and kind != "file":
                raise MftError(f"train_file must be a local .json, .jsonl or .parquet file; got {source!r}")


# --------------------------------------------------------------------------------------------------------
# Published keys we accept without implementing them. Value: (values that ask for nothing we lack, or None
# for "any value: it only matters together with another unsupported key"; what to do instead).
UNSUPPORTED: dict[str, tuple[tuple | None, str]] = {
    "use_qlora": ((False,), "QLoRA is not implemented; use use_lora: true (bf16 LoRA) or MFT"),
    "use_8bit_optimizer": ((False,), "8-bit optimizers are not supported; MFT already has no optimizer state "
                                     "for the frozen weights"),
    "push_to_hub": ((False,), "uploading is not built in; run `huggingface-cli upload REPO OUTPUT_DIR` afterwards"),
    "save_to_hub": ((None,), "uploading is not built in; run `huggingface-cli upload REPO OUTPUT_DIR` afterwards"),
    "hf_entity": (None, ""), "hf_repo_id": (None, ""), "hf_repo_revision": (None, ""), "hf_repo_url": (None, ""),
    "hf_metadata_dataset": (None, ""),
    "try_launch_beaker_eval_jobs": ((False,), "AI2 Beaker jobs are not available; run `mft eval` on the output"),
    "try_auto_save_to_beaker": (None, ""),
    "gs_bucket_path": ((None,), "uploading to Google Cloud Storage is not built in"),
    "oe_eval_tasks": ((None, []), "AI2 oe-eval jobs are not available; run `mft eval` on the output"),
    "oe_eval_max_length": (None, ""),
    "use_liger_kernel": ((False,), "Liger kernels are not supported"),
    "load_balancing_loss": ((False,), "the MoE load-balancing loss is not implemented"),
    "load_balancing_weight": (None, ""),
    "cache_dataset_only": ((False,), "not implemented; the first run tokenizes and caches the data"),
    "add_seed_and_date_to_exp_name": (None, ""),
    "run_name": (None, ""),
    "config_name": ((None,), "a separate model config is not supported; put config.json in the model folder"),
    "additional_model_arguments": ((None, {}), "extra from_pretrained arguments are not supported"),
    # later open-instruct versions
    "dataset_mixer_list_splits": ((["train"], "train"), "only the train split of each source is read"),
    "dataset_transform_fn": ((["sft_tulu_tokenize_and_truncate_v1", "sft_tulu_filter_v1"],),
                             "tokenization is fixed: chat template, assistant-only labels, truncation, filter"),
    "dataset_target_columns": (None, ""), "dataset_cache_mode": (None, ""), "dataset_config_hash": (None, ""),
    "dataset_skip_cache": ((False,), "use overwrite_cache: true to tokenize again"),
    "do_not_randomize_output_dir": (None, ""),
    # documented by open-instruct, without an effect here
    "low_cpu_mem_usage": ((False, True), "transformers 5 always loads weights straight into an empty model, "
                                         "whatever this says"),
    "wandb_project_name": (("mft",), "the trackers' project is exp_name (accelerate gives every tracker one "
                                     "project name); set exp_name"),
    "wandb_entity": ((None,), "set the WANDB_ENTITY environment variable (wandb reads it) instead"),
}


def load_config(path: str | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read `path` (YAML; None for overrides only), apply `overrides`, validate, return the config."""
    return TrainConfig(**settings.read_settings(TrainConfig, path, overrides, aliases=MASK_ALIASES,
                                                unsupported=UNSUPPORTED, hint=_UNKNOWN_HINT))


def parse_overrides(args: list[str]) -> dict:
    """`["--lr=1", "--use_lora", "--masked_layers", "4 5", "seed=3"]` -> {key: value} for TrainConfig's keys
    (`mft.settings.parse_overrides`)."""
    return settings.parse_overrides(args, settings.override_kinds(TrainConfig, UNSUPPORTED), MASK_ALIASES)


def load_model_config(cfg: TrainConfig):
    """The run's model config (`AutoConfig` of model_name_or_path at model_revision, with trust_remote_code): a
    local config.json, or for a hub id that one file, never the weights. Raises MftError when it cannot be read."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(cfg.model_name_or_path, revision=cfg.model_revision,
                                          trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise MftError(f"cannot read the model config of {cfg.model_name_or_path!r}: {exc}") from None


def validate_against_model(cfg: TrainConfig, model_config=None) -> None:
    """Checks that need the model's config only (AutoConfig, no weights): masked layers exist, the context fits.

    `model_config`: a transformers PretrainedConfig; `load_model_config(cfg)` when None.
    """
    if model_config is None:
        model_config = load_model_config(cfg)
    text_config = getattr(model_config, "get_text_config", lambda: model_config)()
    n_layers = getattr(text_config, "num_hidden_layers", None)
    if cfg.resolved_method == "mft" and n_layers is not None:
        bad = [i for i in cfg.masked_layers if i >= n_layers]
        if bad:
            raise MftError(f"masked_layers {bad} out of range: {cfg.model_name_or_path} has {n_layers} decoder "
                           f"layers, numbered 0 to {n_layers - 1}")
    max_pos = getattr(text_config, "max_position_embeddings", None)
    if max_pos is not None and cfg.max_seq_length > max_pos:
        logger.warning("max_seq_length %d exceeds the model's max_position_embeddings %d",
                       cfg.max_seq_length, max_pos)


def source_kind(source: str) -> str:
    """"file" (local .json/.jsonl/.parquet, must exist), "dir" (local folder) or "hub" (dataset id).

    Raises MftError for a missing local file or an unsupported file type.
    """
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        return "dir"
    ext = os.path.splitext(path)[1].lower()
    if ext in DATA_EXTENSIONS:
        if not os.path.isfile(path):
            raise MftError(f"dataset file not found: {source}")
        return "file"
    looks_local = os.path.isfile(path) or source.startswith(("/", "./", "../", "~")) or ext in _OTHER_DATA_EXTS
    if looks_local:
        if os.path.isfile(path) or ext in _OTHER_DATA_EXTS:
            raise MftError(f"unsupported data file type {ext or '(none)'!r} for {source}; expected "
                           f"{', '.join(DATA_EXTENSIONS)} holding rows with a \"messages\" list")
        raise MftError(f"dataset path not found: {source}")
    return "hub"


def field_help() -> list[tuple[str, str, object, str]]:
    """[(key, type, default, help)] for every TrainConfig key, in declaration order (for --help texts)."""
    return settings.field_help(TrainConfig)


# --------------------------------------------------------------------------------------------------------
_OTHER_DATA_EXTS = (".csv", ".tsv", ".txt", ".arrow", ".gz", ".zip", ".xlsx", ".xml", ".tar")


def _written_as_int(value) -> bool:
    """True for 3 or '3', False for 3.0, '3.0' or 0.5 (open-instruct reads list amounts with '.' as floats)."""
    if isinstance(value, str):
        try:
            int(value.strip())
        except ValueError:
            return False
        return True
    return isinstance(value, int) and not isinstance(value, bool)


def _amount(key: str, source, value) -> float | int:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise MftError(f"{key}: the amount of {source!r} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise MftError(f"{key}: the amount of {source!r} must be a row count (> 1) or a fraction in (0, 1]; "
                       f"got {value!r}")
    if value > 1:
        if float(value) != int(value):
            raise MftError(f"{key}: the amount of {source!r} is {value}: above 1 it counts rows and must be a "
                           "whole number")
        return int(value)
    return float(value)


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise MftError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def _positive(name: str, value) -> None:
    if not value >= 1:
        raise MftError(f"{name} must be a positive integer; got {value!r}")


def _copy(value):
    if isinstance(value, list):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    return value
