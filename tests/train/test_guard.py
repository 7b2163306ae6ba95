"""`mft train` keeps its inputs, resumes only the run it started, refuses masked bases, answers faults in one line."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mft.cli import main
from mft.errors import MftError
from mft.masking.files import read_masks
from mft.train import guard, loop
from mft.train.config import FINISHED_MARKER

from tests.train.test_loop import workspace  # noqa: F401 (a fixture)


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def args_for(workspace, out: Path, *extra: str) -> list[str]:
    return ["train", f"--model_name_or_path={workspace['base']}", f"--train_file={workspace['data']}",
            f"--output_dir={out}", "--max_seq_length=64", "--per_device_train_batch_size=4",
            "--gradient_accumulation_steps=2", "--report_to=[none]", "--seed=1",
            f"--dataset_local_cache_dir={workspace['root'] / 'cache'}", *extra]


MFT = ["--subnet_mode=both", "--masked_layers=1 2", "--learning_rate=0.05", "--warmup_ratio=0",
       "--max_train_steps=6", "--checkpointing_steps=2"]


def train_main(argv: list[str]) -> int:
    """`mft train` in this process with a fresh accelerate state."""
    from accelerate.state import AcceleratorState, GradientState

    try:
        return main(argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def test_overwrite_never_deletes_a_base_model_inside_output_dir(workspace, capsys):
    runs = workspace["root"] / "runs"
    base = runs / "llama_base"
    shutil.copytree(workspace["base"], base)
    (runs / "unrelated_run").mkdir()
    (runs / "unrelated_run" / "notes.txt").write_text("keep me")
    before = digest(runs)
    code = train_main(["train", f"--model_name_or_path={base}", f"--train_file={workspace['data']}",
                       f"--output_dir={runs}", "--overwrite_output_dir", "--report_to=[none]"])
    assert code == 1
    assert f"output_dir {runs} contains the model_name_or_path {base}: writing the output there would delete or " \
           "change that input" in capsys.readouterr().err
    assert digest(runs) == before
    # FFT into its own model folder: refused even without the flag
    assert train_main(["train", f"--model_name_or_path={base}", f"--train_file={workspace['data']}",
                       f"--output_dir={base}", "--report_to=[none]"]) == 1
    assert f"output_dir {base} is the model_name_or_path {base}" in capsys.readouterr().err
    assert digest(runs) == before


def test_a_folder_that_is_not_a_run_is_not_resumed_into(workspace, capsys):
    out = workspace["root"] / "someone_elses"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert train_main(args_for(workspace, out)) == 1
    assert (f"output_dir {out} is not empty (notes.txt) and holds no mft run (train_config.yaml)"
            in capsys.readouterr().err)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.slow  # several training runs end to end
def test_interrupt_resume_only_with_the_same_settings_and_start_over(workspace, capsys, caplog, monkeypatch):
    root = workspace["root"]
    reference = root / "reference"
    assert train_main(args_for(workspace, reference, *MFT)) == 0
    capsys.readouterr()

    # Ctrl-C during step 4 (three steps done, newest checkpoint step 2): one line, exit status 130
    out = root / "interrupted"
    real_loss = loop._loss

    def ctrl_c_at_step_4(*args):
        if guard.PROGRESS.get("step") == 3:
            raise KeyboardInterrupt
        return real_loss(*args)

    monkeypatch.setattr(loop, "_loss", ctrl_c_at_step_4)
    assert train_main(args_for(workspace, out, *MFT)) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == ("mft train: interrupted at step 3 (newest checkpoint: step_2); re-run the "
                                            "same command to resume")
    assert "Traceback" not in err
    monkeypatch.setattr(loop, "_loss", real_loss)
    before = digest(out)

    # other layers and learning rate: refused, naming each key old -> new; nothing touched
    changed = [a for a in MFT if not a.startswith(("--masked_layers", "--learning_rate"))]
    assert train_main(args_for(workspace, out, *changed, "--masked_layers=1", "--learning_rate=0.01")) == 1
    err = capsys.readouterr().err
    assert f"{out} holds an interrupted run started with other settings, so it cannot be resumed: " in err
    assert "learning_rate: 0.05 -> 0.01; masked_layers: [1, 2] -> [1]." in err
    assert "pass --overwrite_output_dir to start over" in err
    assert digest(out) == before

    # a key that cannot change the result may differ: it resumes, to bit-identical masks
    assert train_main(args_for(workspace, out, *MFT, "--logging_steps=2")) == 0
    assert f"resuming from {out / 'checkpoints' / 'step_2'} (step 2)" in caplog.text
    ref, res = read_masks(reference / "masks.safetensors"), read_masks(out / "masks.safetensors")
    assert ref.masks.keys() == res.masks.keys() and all(torch.equal(ref.masks[n], res.masks[n]) for n in ref.masks)
    # files follow the umask (safetensors writes 0600 by itself), checkpoints included
    mode = 0o666 & ~guard_umask()
    assert {p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()} == {mode}

    # a checkpoint of another run (other layers) is refused by the strict check, not loaded partially
    other = root / "other_layers"
    assert train_main(args_for(workspace, other, *[a for a in MFT if not a.startswith("--masked_layers")],
                                "--masked_layers=0", f"--resume_from_checkpoint={out / 'checkpoints' / 'step_4'}")) == 1
    err = capsys.readouterr().err
    assert f"checkpoint {out / 'checkpoints' / 'step_4'} does not fit this run: missing model.layers.0." in err
    assert "unexpected model.layers.1." in err

    # the explicit flag starts over with the new settings; the old run is replaced only at the end
    assert train_main(args_for(workspace, out, *[a for a in MFT if not a.startswith("--masked_layers")],
                                "--masked_layers=1", "--overwrite_output_dir")) == 0
    masks = read_masks(out / "masks.safetensors")
    assert sorted({n.split(".")[2] for n in masks.masks}) == ["1"]
    assert "masked_layers:\n- 1\n" in (out / "train_config.yaml").read_text()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_2", "step_4", "step_6"]
    assert not [p for p in root.iterdir() if p.name.startswith(".interrupted.")]


def guard_umask() -> int:
    from mft.paths import current_umask

    return current_umask()


@pytest.mark.slow  # several training runs end to end
def test_a_failed_overwrite_keeps_the_old_run_and_the_next_run_clears_its_leftover(workspace, capsys, monkeypatch):
    root = workspace["root"]
    out = root / "finished_once"
    assert train_main(args_for(workspace, out, *MFT)) == 0
    before = digest(out)

    def disk_full(path, info=None):  # a full disk cannot be made here: the last write fails as it would
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(path, FINISHED_MARKER))

    monkeypatch.setattr(loop, "mark_finished", disk_full)
    capsys.readouterr()
    assert train_main(args_for(workspace, out, *MFT, "--overwrite_output_dir", "--learning_rate=0.02")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"mft train: error: cannot write {root}/.finished_once.tmp-{os.getpid()}-train/"
                              f"{FINISHED_MARKER}: No space left on device (ENOSPC)")
    assert digest(out) == before  # the old run, untouched
    leftover = root / f".finished_once.tmp-{os.getpid()}-train"
    assert leftover.is_dir()

    monkeypatch.undo()
    assert train_main(args_for(workspace, out, *MFT, "--overwrite_output_dir", "--learning_rate=0.02")) == 0
    assert f"note: removed {leftover}, the temporary output of an interrupted earlier run" in capsys.readouterr().err
    assert not leftover.exists() and digest(out) != before and (out / FINISHED_MARKER).exists()


@pytest.mark.slow  # several training runs end to end
def test_mft_on_a_masked_checkpoint_is_refused(workspace, capsys):
    run_dir = workspace["root"] / "for_baking"
    assert train_main(args_for(workspace, run_dir, *MFT)) == 0
    applied = run_dir / "mask_applied"
    assert main(["apply", "--mask_model_name_or_path", str(run_dir), "--output_dir", str(applied), "--quiet"]) == 0
    capsys.readouterr()
    out = workspace["root"] / "mft_on_masked"
    argv = args_for(workspace, out, *MFT)
    argv[1] = f"--model_name_or_path={applied}"
    assert train_main(argv) == 1
    err = capsys.readouterr().err
    assert f"{applied} is already masked: it holds mft_masks.json, the record of learned masks applied to" in err
    assert "set allow_masked_base: true if this is intended" in err and not out.exists()


def test_tied_lm_head_is_refused(workspace, saved_model, capsys):
    tied = saved_model("llama", tie_word_embeddings=True)
    out = workspace["root"] / "tied"
    argv = args_for(workspace, out, "--subnet_mode=both", "--masked_layers=[]", "--target_modules=[lm_head]")
    argv[1] = f"--model_name_or_path={tied}"
    assert train_main(argv) == 1
    assert "cannot mask lm_head: its weight is tied to the input embedding" in capsys.readouterr().err
    assert not out.exists()


def test_bad_inputs_get_one_line(workspace, capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = (workspace["data"].read_text().splitlines())
    broken = '{"messages": [{"role": "user", "content": "hi"}'  # the closing "]}" is missing
    bad.write_text("\n".join(lines[:2] + [broken] + lines[2:]) + "\n")
    argv = args_for(workspace, tmp_path / "out")
    argv[2] = f"--train_file={bad}"
    assert train_main(argv) == 1
    assert len(broken) + 1 == 48
    assert (f"{bad}, line 3: not valid JSON (Expecting ',' delimiter at column 48); every line must hold one "
            in capsys.readouterr().err)

    no_tok = tmp_path / "model_without_tokenizer"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(workspace["base"] / name, no_tok / name)
    argv = args_for(workspace, tmp_path / "out")
    argv[1] = f"--model_name_or_path={no_tok}"
    assert train_main(argv) == 1
    assert (f"no tokenizer files in {no_tok}: expected tokenizer.json (or tokenizer.model, or vocab.json + "
            "merges.txt); it holds config.json, model.safetensors" in capsys.readouterr().err)
    (no_tok / "vocab.json").write_text("{}")
    assert train_main(argv) == 1
    assert f"the tokenizer in {no_tok} is incomplete: merges.txt is missing" in capsys.readouterr().err

    (tmp_path / "afile").write_text("x")
    assert train_main(args_for(workspace, tmp_path / "afile" / "run")) == 1
    assert (f"cannot create output_dir {tmp_path / 'afile' / 'run'}: {tmp_path / 'afile'} is a file, not a folder "
            "(ENOTDIR)" in capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_checkpoint_check_names_missing_unexpected_and_reshaped(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    model[1].requires_grad_(False)
    save_file({"0.weight": torch.zeros(2, 3), "0.bias": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    guard.check_checkpoint(tmp_path, model)  # exactly the trained tensors: fine
    save_file({"0.weight": torch.zeros(3, 3), "1.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(MftError, match=r"does not fit this run: missing 0.bias \(1\); unexpected 1.weight \(1\); "
                                       r"other shape 0.weight \(1\)"):
        guard.check_checkpoint(tmp_path, model)


def test_recorded_config_differences_ignore_what_cannot_change_the_result(workspace):
    from mft.train.config import load_config

    cfg = load_config(None, [f"--model_name_or_path={workspace['base']}", f"--train_file={workspace['data']}",
                             "--output_dir=x", "--learning_rate=1e-4"])
    recorded = {**cfg.to_dict(), "learning_rate": 2e-5, "logging_steps": 50, "report_to": ["wandb"],
                "model_name_or_path": str(workspace["base"]) + "/", "output_dir": "elsewhere"}
    recorded.pop("seed")  # a key an older run did not record counts as its default (42)
    assert guard.config_differences(recorded, cfg) == ["learning_rate: 2e-05 -> 0.0001"]
    cfg.seed = 7
    assert guard.config_differences(recorded, cfg) == ["learning_rate: 2e-05 -> 0.0001", "seed: 42 -> 7"]


def test_resume_refuses_changed_input_files_at_the_same_path(workspace, tmp_path):
    """break6 #3: model.safetensors (or the data file) replaced at the same path between the interrupted run and
    its resume was not noticed: the resumed run mixed two bases."""
    from mft.train.config import CONFIG_FILE, load_config

    base, data = tmp_path / "fftX", tmp_path / "data2.jsonl"
    shutil.copytree(workspace["base"], base)
    shutil.copy(workspace["data"], data)
    out = tmp_path / "run"
    cfg = load_config(None, [f"--model_name_or_path={base}", f"--train_file={data}", f"--output_dir={out}"])
    out.mkdir()
    cfg.save(str(out / CONFIG_FILE))
    recorded = guard.input_fingerprint(cfg)
    assert set(recorded) == {"model_name_or_path", f"training data {data}"}
    assert recorded["model_name_or_path"]["model.safetensors"][0] == (base / "model.safetensors").stat().st_size
    (out / guard.INPUTS_FILE).write_text(json.dumps(recorded))
    guard.check_resume(cfg, "resume", None)  # unchanged: resumes

    weights = base / "model.safetensors"
    tensors = load_file(weights)
    first = next(iter(tensors))
    tensors[first] = tensors[first] + 1  # another model of the same size
    size = weights.stat().st_size
    save_file(tensors, str(weights), metadata={"format": "pt"})
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(MftError) as err:
        guard.check_resume(cfg, "resume", None)
    msg = str(err.value)
    assert f"{out} holds an interrupted run started with other settings, so it cannot be resumed: " in msg
    assert f"model_name_or_path model.safetensors: changed ({size} -> {weights.stat().st_size} bytes" in msg
    assert f"training data {data} {data.name}: changed" in msg


def test_a_symlink_input_inside_output_dir_is_refused(workspace, capsys):
    """break6 #5: outG/mylink -> base with --output_dir=outG --overwrite_output_dir deleted the user's link and
    recorded model_name_or_path: outG/mylink, a path that no longer existed."""
    root = workspace["root"]
    out = root / "outG"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    link = out / "mylink"
    link.symlink_to(workspace["base"])
    assert train_main(["train", f"--model_name_or_path={link}", f"--train_file={workspace['data']}",
                       f"--output_dir={out}", "--overwrite_output_dir", "--report_to=[none]"]) == 1
    err = capsys.readouterr().err
    assert (f"the model_name_or_path {link} lies inside output_dir {out} (a link to "
            f"{os.path.realpath(workspace['base'])}): replacing the output would delete it") in err
    assert link.is_symlink() and (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["mylink", "notes.txt"]


def test_overwrite_refuses_to_delete_evaluation_results_inside_the_output(workspace, capsys):
    """break8 #12: results sit inside the model folder (`mft eval --output-dir RUN/eval_output`, an MFT run's
    `mask_applied/eval_output`), so `--overwrite_output_dir` would delete them silently. Refused before any
    work, naming them; the folder is left byte for byte and no temporary folder is made."""
    from mft.paths import results_inside

    out = workspace["root"] / "with_results"
    (out / "eval_output").mkdir(parents=True)
    (out / "eval_output" / "metrics.json").write_text('{"metrics": []}')
    (out / "mask_applied" / "eval_output").mkdir(parents=True)
    (out / "snapshots" / "step_2" / "mine").mkdir(parents=True)
    (out / "snapshots" / "step_2" / "mine" / "metrics.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"old weights")
    assert results_inside(out) == [out / "eval_output", out / "mask_applied" / "eval_output",
                                   out / "snapshots" / "step_2" / "mine"]
    before = digest(out)
    assert train_main(args_for(workspace, out, "--max_train_steps=1", "--overwrite_output_dir")) == 1
    err = capsys.readouterr().err
    assert (f"error: --overwrite_output_dir would replace {out}, which holds evaluation results written into it "
            "(eval_output/, mask_applied/eval_output/, snapshots/step_2/mine/): replacing the folder would delete "
            f"them. Move them out of {out} (or delete them) and run again, or choose another output folder") in err
    assert digest(out) == before and sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []
    assert "training:" not in err  # refused before any work


def test_results_inside_finds_only_evaluation_results(tmp_path):
    from mft.paths import check_overwrite_keeps_results, results_inside

    assert results_inside(tmp_path / "missing") == []
    run = tmp_path / "run"
    (run / "checkpoints" / "step_2").mkdir(parents=True)
    (run / "train_log.jsonl").write_text("{}\n")
    assert results_inside(run) == []
    check_overwrite_keeps_results(run, "--overwrite")  # nothing to keep: no error
    (run / "metrics.json").write_text("{}")
    assert results_inside(run) == [run / "metrics.json"]
    with pytest.raises(MftError, match=r"--overwrite would replace .*\(metrics.json\)"):
        check_overwrite_keeps_results(run, "--overwrite")
