"""`mft apply` never destroys its inputs, refuses to mask a masked checkpoint, and answers faults in one line."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from mft.cli import main
from mft.errors import MftError
from mft.masking import apply as A
from mft.masking.files import MaskSet, read_masks, write_masks

from tests.masking.test_apply import learned_masks, load_all, no_leftovers, original_mft_checkpoint


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (relative path -> hex): 'nothing changed' is equality of two digests."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


L1 = ["--use_l1_mask", "--masked_layers", "1 2", "--sparsity_attn", "0.9", "--sparsity_mlp", "0.9"]


@pytest.mark.parametrize("where", ["base", "parent_of_base"])
def test_overwrite_output_that_is_or_contains_the_base_is_refused(saved_model, tmp_path, capsys, where):
    base = copy_model(saved_model("llama"), tmp_path / "models" / "fft")
    (tmp_path / "models" / "other_run.txt").write_text("unrelated")
    before = digest(tmp_path / "models")
    out = base if where == "base" else tmp_path / "models"
    assert main(["apply", "--base_model_name_or_path", str(base), *L1, "--output_dir", str(out), "--overwrite"]) == 1
    err = capsys.readouterr().err
    relation = "is" if where == "base" else "contains"
    assert f"--output_dir {out} {relation} the base model {base}" in err
    assert digest(tmp_path / "models") == before and no_leftovers(tmp_path / "models") and no_leftovers(tmp_path)


def test_output_equal_to_the_mask_run_or_parent_of_its_recorded_base_is_refused(saved_model, tmp_path, capsys):
    base = copy_model(saved_model("llama"), tmp_path / "output" / "fft")
    run = tmp_path / "output" / "mft_run"
    write_masks(run / "masks.safetensors", learned_masks(base, seed=3))
    (run / A.RUN_INFO).write_text(json.dumps({"base_model": str(base)}))
    before = digest(tmp_path / "output")
    # the run folder itself (even --only_save_masks would replace its masks.safetensors)
    for extra in ([], ["--only_save_masks"]):
        assert main(["apply", "--mask_model_name_or_path", str(run), "--output_dir", str(run), "--overwrite",
                     *extra]) == 1
        assert f"--output_dir {run} is the mask model {run}" in capsys.readouterr().err
    # a folder holding the base model the run records (not named on the command line)
    assert main(["apply", "--mask_model_name_or_path", str(run), "--output_dir", str(tmp_path / "output"),
                 "--overwrite"]) == 1
    assert (f"--output_dir {tmp_path / 'output'} contains the mask model {run}" in capsys.readouterr().err)
    other = tmp_path / "elsewhere"
    run2 = other / "run2"
    shutil.copytree(run, run2)
    assert main(["apply", "--mask_model_name_or_path", str(run2), "--output_dir", str(tmp_path / "output"),
                 "--overwrite"]) == 1
    assert (f"contains the base model recorded in the mask run {base}" in capsys.readouterr().err)
    assert digest(tmp_path / "output") == before
    # the published layout stays allowed: a new folder inside the run
    assert main(["apply", "--mask_model_name_or_path", str(run), "--output_dir", str(run / "mask_applied"),
                 "--quiet"]) == 0
    assert (run / "mask_applied" / "model.safetensors").exists()


def test_a_failed_overwrite_leaves_the_old_output_intact(saved_model, tmp_path, monkeypatch, capsys):
    base = saved_model("llama", shard_kb=40)
    out = tmp_path / "out"
    assert main(["apply", "--base_model_name_or_path", str(base), *L1, "--output_dir", str(out), "--quiet"]) == 0
    before = digest(out)

    def disk_full(*args):  # this machine's disk cannot be filled for a test: the write fails as a full disk does
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out) + ".shard")

    monkeypatch.setattr(A, "_mask_in_place", disk_full)
    assert main(["apply", "--base_model_name_or_path", str(base), "--random_masks", "--masked_layers", "1",
                 "--output_dir", str(out), "--overwrite", "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"mft apply: error: cannot write {out}.shard: No space left on device (ENOSPC); free space " \
                      "there or choose another output folder"
    assert "Traceback" not in "\n".join(err)
    assert digest(out) == before and no_leftovers(tmp_path)


def test_leftovers_of_a_killed_run_are_removed_and_reported(saved_model, tmp_path, capsys):
    from mft.paths import TEMP_MARKER

    base = saved_model("llama")
    out = tmp_path / "out"
    dead = tmp_path / ".out.tmp-999999999-0badc0de"  # no such process, and the marker this tool writes
    (dead / "half").mkdir(parents=True)
    (dead / "half" / "model.safetensors").write_bytes(b"partial")
    (dead / TEMP_MARKER).write_text("x")
    live = tmp_path / f".out.tmp-{os.getppid()}-12345678"  # a running process's: left alone
    live.mkdir()
    (live / TEMP_MARKER).write_text("x")
    assert main(["apply", "--base_model_name_or_path", str(base), *L1, "--output_dir", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"note: removed {dead}, the temporary output of an interrupted earlier run" in err
    assert not dead.exists() and live.exists()
    assert (out / "model.safetensors").exists() and not (out / TEMP_MARKER).exists()


def test_a_users_hidden_siblings_are_never_deleted(saved_model, tmp_path, capsys):
    """break6 #2: `.outL.old-backup` (a folder) and `.outL.tmp-mine` (a file) of the user's were deleted as
    leftovers; so would be a marker-less folder with a dead pid and the exact pattern."""
    base = saved_model("llama")
    out = tmp_path / "outL"
    backup = tmp_path / ".outL.old-backup"
    backup.mkdir()
    (backup / "notes.txt").write_text("mine")
    mine = tmp_path / ".outL.tmp-mine"
    mine.write_text("mine\n")
    unmarked = tmp_path / ".outL.tmp-999999999-0badc0de"  # our pattern, dead pid, but no marker: not ours
    unmarked.mkdir()
    (unmarked / "data.bin").write_bytes(b"keep")
    before = digest(tmp_path)
    assert main(["apply", "--base_model_name_or_path", str(base), *L1, "--output_dir", str(out), "--quiet"]) == 0
    assert (backup / "notes.txt").read_text() == "mine" and mine.read_text() == "mine\n"
    assert (unmarked / "data.bin").read_bytes() == b"keep"
    after = digest(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("outL/")} == before
    assert "removed" not in capsys.readouterr().err


def test_an_interrupted_swap_is_restored_or_kept_never_deleted(saved_model, tmp_path, capsys):
    """break6 #2: killed between swap_into_place's two renames, the only complete old output is
    `.<out>.old-PID-tag`; the next run restored nothing and deleted it."""
    base = saved_model("llama")
    out = tmp_path / "out"
    assert main(["apply", "--base_model_name_or_path", str(base), *L1, "--output_dir", str(out), "--quiet"]) == 0
    first = digest(out)
    old = tmp_path / ".out.old-999999999-0badc0de"  # the state a kill between the renames leaves (dead pid)
    os.replace(out, old)
    assert main(["apply", "--base_model_name_or_path", str(base), *L1, "--output_dir", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"note: restored {out} from {old}, left aside by an interrupted earlier run" in err
    assert "already exists and is not empty" in err  # restored, it is an existing output again
    assert digest(out) == first and not old.exists()
    # with the output in place (killed after the second rename), the aside copy is kept and reported
    shutil.copytree(out, old)
    assert main(["apply", "--base_model_name_or_path", str(base), *L1, "--output_dir", str(out), "--overwrite",
                 "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"note: kept {old}: an earlier run left it aside while replacing {out}" in err
    assert digest(old) == first and digest(out) == first


@pytest.mark.parametrize("source", [L1, ["--random_masks", "--masked_layers", "1 2"], "learned"])
def test_masking_an_already_masked_checkpoint_is_refused(saved_model, tmp_path, capsys, source):
    base = saved_model("llama")
    run = tmp_path / "run"
    write_masks(run / "masks.safetensors", learned_masks(base, seed=4))
    (run / A.RUN_INFO).write_text(json.dumps({"base_model": str(base)}))
    applied = run / "mask_applied"
    assert main(["apply", "--mask_model_name_or_path", str(run), "--output_dir", str(applied), "--quiet"]) == 0
    args = (["--mask_model_name_or_path", str(run)] if source == "learned" else source)
    out = tmp_path / "baseline"
    assert main(["apply", "--base_model_name_or_path", str(applied), *args, "--output_dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{applied} is already masked: it holds mft_masks.json, the record of learned masks applied to {base}" in err
    assert "pass --allow_masked_base if this is intended" in err and not out.exists()

    # without the record, the zeros give it away: each masked matrix holds exactly int(0.1 n) zeros
    (applied / A.APPLY_INFO).unlink()
    assert main(["apply", "--base_model_name_or_path", str(applied), *args, "--output_dir", str(out)]) == 1
    err = capsys.readouterr().err
    zeros = int(0.1 * 32 * 32)  # q_proj of the tiny llama: 32 x 32, keep 0.9
    assert zeros == 102 and ("model.layers.1.self_attn.q_proj already holds 102 exact zeros of 1024 (9.96%); a "
                             "trained dense weight holds next to none, and 11 or more mean a baked mask") in err
    # break6 #4: a new mask pruning more than the baked one (keep 0.5 / 0.8 on 0.9) compounded unnoticed
    for lower in (["--sparsity_attn", "0.5", "--sparsity_mlp", "0.5"], ["--sparsity_attn", "0.8"]):
        assert main(["apply", "--base_model_name_or_path", str(applied), "--random_masks", "--masked_layers", "1",
                     *lower, "--output_dir", str(out)]) == 1
        assert "model.layers.1.self_attn.q_proj already holds 102 exact zeros of 1024 (9.96%)" in \
            capsys.readouterr().err and not out.exists()
    # told that it is intended: the compounded masks are applied
    assert main(["apply", "--base_model_name_or_path", str(applied), *args, "--output_dir", str(out),
                 "--allow_masked_base", "--quiet"]) == 0
    if source == L1:  # L1 on the masked weights re-selects the zeros: the output equals its input
        assert all(torch.equal(a, b) for a, b in zip(load_all(out).values(), load_all(applied).values()))


def test_original_checkpoint_without_mask_settings_is_an_error(saved_model, tmp_path, capsys):
    base = saved_model("llama")
    ckpt = tmp_path / "mft_ckpt"
    original_mft_checkpoint(base, ckpt, keep_attn=0.7, keep_mlp=0.7)
    config = json.loads((ckpt / "config.json").read_text())
    for key in ("sparsity_attn", "sparsity_mlp", "subnet_type"):
        config.pop(key)
    (ckpt / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert main(["apply", "--base_model_name_or_path", str(base), "--mask_model_name_or_path", str(ckpt),
                 "--output_dir", str(out)]) == 1
    assert (f"{ckpt} is an original MFT checkpoint, but its config.json lacks the mask settings subnet_type, "
            "sparsity_attn, sparsity_mlp") in capsys.readouterr().err
    # --masked_layers that the scores contradict is refused, not ignored
    assert main(["apply", "--base_model_name_or_path", str(base), "--mask_model_name_or_path", str(ckpt),
                 "--subnet_type", "local", "--sparsity_attn", "0.7", "--sparsity_mlp", "0.7",
                 "--masked_layers", "0", "--output_dir", str(out)]) == 1
    assert f"--masked_layers 0 does not match {ckpt}: its scores are in layers 1 2" in capsys.readouterr().err
    assert not out.exists()
    # the settings given on the command line: used, exactly
    assert main(["apply", "--base_model_name_or_path", str(base), "--mask_model_name_or_path", str(ckpt),
                 "--subnet_type", "local", "--sparsity_attn", "0.7", "--sparsity_mlp", "0.7",
                 "--output_dir", str(out), "--save_masks", "--quiet"]) == 0
    kept = read_masks(out / "masks.safetensors").masks["model.layers.1.self_attn.q_proj"]
    assert int(kept.sum()) == 1024 - int(0.3 * 1024)


def test_masking_a_tied_lm_head_is_refused(saved_model, tmp_path, capsys):
    base = saved_model("llama", tie_word_embeddings=True)
    config = json.loads((base / "config.json").read_text())
    shape = (config["vocab_size"], config["hidden_size"])
    masks = tmp_path / "lm_head.safetensors"
    write_masks(masks, MaskSet({"lm_head": torch.rand(shape, generator=torch.Generator().manual_seed(0)) < 0.9}))
    assert main(["apply", "--base_model_name_or_path", str(base), "--masks_file", str(masks),
                 "--output_dir", str(tmp_path / "out")]) == 1
    assert ("cannot mask lm_head: its weight is tied to the input embedding (tie_word_embeddings is true)"
            in capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_output_under_a_file_and_read_only_places_are_named(saved_model, tmp_path, capsys, monkeypatch):
    base = saved_model("llama")
    (tmp_path / "afile").write_text("x")
    assert main(["apply", "--base_model_name_or_path", str(base), *L1, "--output_dir",
                 str(tmp_path / "afile" / "out")]) == 1
    assert (f"cannot create --output_dir {tmp_path / 'afile' / 'out'}: {tmp_path / 'afile'} is a file, not a folder "
            "(ENOTDIR)") in capsys.readouterr().err

    # A read-only file system cannot be mounted here (and root ignores permission bits): statvfs reports it.
    real = os.statvfs

    class ReadOnly:
        def __init__(self, res):
            self.res = res

        def __getattr__(self, name):
            return getattr(self.res, name)

        @property
        def f_flag(self):
            return self.res.f_flag | os.ST_RDONLY

    monkeypatch.setattr(os, "statvfs", lambda p: ReadOnly(real(p)))
    assert main(["apply", "--base_model_name_or_path", str(base), *L1, "--output_dir", str(tmp_path / "ro")]) == 1
    assert (f"cannot write --output_dir {tmp_path / 'ro'}: {tmp_path} is on a read-only file system (EROFS)"
            in capsys.readouterr().err)


def test_ctrl_c_is_one_line(saved_model, tmp_path, capsys, monkeypatch):
    base = saved_model("llama")
    out = tmp_path / "out"

    def ctrl_c(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(A, "_copy_side_files", ctrl_c)
    assert main(["apply", "--base_model_name_or_path", str(base), *L1, "--output_dir", str(out), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"mft apply: interrupted; nothing was written to {out} (any earlier "
                                            "output there is unchanged); re-run the same command to start again")
    assert not out.exists() and no_leftovers(tmp_path)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_files_follow_the_umask(saved_model, tmp_path, umask):
    base = saved_model("llama", shard_kb=40)
    old = os.umask(umask)
    try:
        assert main(["apply", "--base_model_name_or_path", str(base), *L1, "--output_dir", str(tmp_path / "out"),
                     "--save_masks", "--quiet"]) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert len(modes) > 5 and set(modes.values()) == {0o666 & ~umask}
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask


def test_code_carrying_pickles_are_refused_without_suggesting_to_run_them(saved_model, tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("this ran",))

    base = saved_model("llama")
    evil = tmp_path / "masks.pt"
    torch.save({"model.layers.1.mlp.up_proj": Evil()}, evil)
    assert main(["apply", "--base_model_name_or_path", str(base), "--masks_file", str(evil),
                 "--output_dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"refusing to load {evil}: it is a pickle holding more than tensors" in err and "it names print" in err
    # a legacy .bin checkpoint carrying code
    ckpt = tmp_path / "bin_ckpt"
    ckpt.mkdir()
    shutil.copy(base / "config.json", ckpt / "config.json")
    torch.save({"model.embed_tokens.weight": Evil()}, ckpt / "pytorch_model.bin")
    assert main(["apply", "--base_model_name_or_path", str(ckpt), *L1, "--output_dir", str(tmp_path / "out")]) == 1
    err += capsys.readouterr().err
    assert f"refusing to load {ckpt / 'pytorch_model.bin'}: it is a pickle holding more than tensors" in err
    assert "weights_only=False" not in err and "this ran" not in err and "Traceback" not in err


def test_only_save_masks_never_replaces_another_runs_mask_file_without_overwrite(saved_model, tmp_path, capsys):
    """break6 #1: `--only_save_masks` into a copy of a learned run's folder replaced its masks.safetensors."""
    base = saved_model("llama")
    run = tmp_path / "mftB"
    write_masks(run / "masks.safetensors", learned_masks(base, seed=4))
    (run / A.RUN_INFO).write_text(json.dumps({"base_model": str(base), "source": "learned"}))
    before = digest(run)
    random = ["--base_model_name_or_path", str(base), "--random_masks", "--masked_layers", "1 2",
              "--sparsity_attn", "0.5", "--sparsity_mlp", "0.5", "--only_save_masks", "--output_dir", str(run)]
    assert main(["apply", *random, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"output folder {run} already exists and is not empty; pass --overwrite to replace it" in err
    assert digest(run) == before and no_leftovers(run) and no_leftovers(tmp_path)
    # told to: only the mask file is replaced (renamed into place), the run record is kept
    assert main(["apply", *random, "--overwrite", "--quiet"]) == 0
    after = digest(run)
    assert after["masks.safetensors"] != before["masks.safetensors"]
    assert after[A.RUN_INFO] == before[A.RUN_INFO] and sorted(after) == sorted(before) and no_leftovers(run)
    assert read_masks(run / "masks.safetensors").source == "random"
    # an empty or new folder needs no flag
    assert main(["apply", *random[:-1], str(tmp_path / "new"), "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["masks.safetensors"]


def test_overwrite_refuses_to_delete_evaluation_results_inside_the_output(saved_model, tmp_path, capsys):
    """break8 #12, apply's side: `mft eval` (and the launchers) write results into the model folder
    (`mask_applied/eval_output`); `mft apply --overwrite` of that folder would delete them without a word.
    Refused before any work, naming them; the folder is left byte for byte. --only_save_masks replaces only the
    mask file, so it is not refused for them."""
    base = copy_model(saved_model("llama"), tmp_path / "fft")
    out = tmp_path / "mask_applied"
    assert main(["apply", "--base_model_name_or_path", str(base), *L1, "--output_dir", str(out), "--quiet"]) == 0
    (out / "eval_output").mkdir()
    (out / "eval_output" / "metrics.json").write_text('{"metrics": []}')
    before = digest(out)
    assert main(["apply", "--base_model_name_or_path", str(base), *L1, "--output_dir", str(out), "--overwrite",
                 "--quiet"]) == 1
    err = capsys.readouterr().err
    assert (f"--overwrite would replace {out}, which holds evaluation results written into it (eval_output/): "
            f"replacing the folder would delete them. Move them out of {out} (or delete them) and run again") in err
    assert digest(out) == before and no_leftovers(tmp_path)
    with pytest.raises(MftError, match=r"--overwrite would replace .*holds evaluation results .*\(eval_output/\)"):
        A.apply_masks(base, learned_masks(base), out, overwrite=True, progress=False)  # the Python API as well
    assert digest(out) == before and no_leftovers(tmp_path)
    # moved away, the overwrite goes ahead
    shutil.move(str(out / "eval_output"), str(tmp_path / "kept_results"))
    assert main(["apply", "--base_model_name_or_path", str(base), *L1, "--output_dir", str(out), "--overwrite",
                 "--quiet"]) == 0
    assert (tmp_path / "kept_results" / "metrics.json").exists() and not (out / "eval_output").exists()
