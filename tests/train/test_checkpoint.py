"""Checkpoints in one process: layout on disk, exit codes, NaN skipping, crash safety, bad input, TensorBoard."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
from synthetic_data import in_memory_data
from tiny_config import tiny_config

from ssa_megatron.train import checkpoint, trainer as trainer_module
from ssa_megatron.train.checkpoint import CheckpointError, checkpoint_dir, read_tracker, saved_iterations
from ssa_megatron.train.trainer import Trainer, TrainingDiverged, train


def run_config(tmp_path, *, train=None, checkpoint=None, model=None, ssa=None):
    cfg = tiny_config(train={"train_iters": 6, **(train or {})}, model=model, ssa=ssa)
    return dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, **(checkpoint or {})))


def losses(result):
    return [(r.iteration, r.lm_loss, r.alignment_loss, r.grad_norm) for r in result.history]


def test_exit_interval_saves_in_megatron_layout_and_exits_with_code_3(tmp_path):
    save = str(tmp_path / "run")
    cfg = run_config(tmp_path, train={"exit_interval": 4}, checkpoint={"save": save, "save_interval": 1, "keep_last_checkpoints": 2})
    result = train(cfg, in_memory_data())
    assert (result.exit_code, result.reason, result.iteration) == (3, "exit_interval", 4)
    assert (tmp_path / "run" / "latest_checkpointed_iteration.txt").read_text() == "4\n"
    assert saved_iterations(save) == [4, 3]  # keep_last_checkpoints=2 deleted 1 and 2
    saved = checkpoint.read_run_config(checkpoint_dir(save, 4))
    assert saved.model.vocab_size == 128 and saved.train.exit_interval == 4  # the resolved run file
    status = json.loads((tmp_path / "run" / "exit_status.json").read_text())
    assert status["exit_code"] == 3 and status["reason"] == "exit_interval" and status["iteration"] == 4

    resumed = train(dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, load=save)), in_memory_data())
    assert resumed.exit_code == 0 and [r.iteration for r in resumed.history] == [5, 6]
    assert json.loads((tmp_path / "run" / "exit_status.json").read_text())["reason"] == "finished"
    assert saved_iterations(save) == [6, 5, 4]  # the loaded checkpoint is never rotated away in its run


def test_bf16_with_the_plain_optimizer_resumes_bitwise(tmp_path):
    """bf16 params (norms included) and Megatron's Float16 optimizer: save, load, same losses."""
    save = str(tmp_path / "bf16")
    base = {"dtype": "bf16", "train_iters": 4}
    straight = train(run_config(tmp_path, train=base), in_memory_data())
    first = train(run_config(tmp_path, train={**base, "exit_interval": 2}, checkpoint={"save": save, "load": save}), in_memory_data())
    second = train(run_config(tmp_path, train=base, checkpoint={"save": save, "load": save}), in_memory_data())
    assert first.exit_code == 3 and second.exit_code == 0
    assert losses(first) + losses(second) == losses(straight)


def _nan_loss_on_calls(monkeypatch, calls: set[int]):
    """Make the LM loss NaN on the given (0-based) loss-function calls, i.e. chosen micro-batches."""
    original = trainer_module._masked_mean_loss
    count = {"n": 0}

    def loss(mask, stream, per_token):
        value, logged = original(mask, stream, per_token)
        if count["n"] in calls:
            value = value * float("nan")
        count["n"] += 1
        return value, logged

    monkeypatch.setattr(trainer_module, "_masked_mean_loss", loss)


def test_a_nan_step_is_skipped_counted_and_changes_nothing(monkeypatch):
    trainer = Trainer(tiny_config(), in_memory_data())
    try:
        trainer.step()
        before = [p.detach().clone() for p in trainer.model[0].parameters()]
        scheduler_steps = trainer.scheduler.num_steps
        _nan_loss_on_calls(monkeypatch, {0})  # the first micro-batch of the next step
        record = trainer.step()
        assert record.skipped and trainer.progress.skipped_steps == 1 and trainer.consecutive_skips == 1
        assert all(torch.equal(a, b) for a, b in zip(before, trainer.model[0].parameters()))
        assert trainer.scheduler.num_steps == scheduler_steps
        monkeypatch.undo()
        assert not trainer.step().skipped and trainer.consecutive_skips == 0 and trainer.iteration == 3
    finally:
        trainer.close()


def test_consecutive_nan_steps_abort_with_a_clear_message(monkeypatch, tmp_path):
    _nan_loss_on_calls(monkeypatch, set(range(4, 1000)))  # from step 3 on
    cfg = run_config(tmp_path, train={"max_skipped_steps": 2})
    with pytest.raises(TrainingDiverged, match=r"2 consecutive steps had a NaN/inf loss or gradient .* at iteration 4"):
        train(cfg, in_memory_data())


def test_a_crash_mid_save_leaves_the_previous_checkpoint_as_latest(monkeypatch, tmp_path):
    save = str(tmp_path / "run")
    cfg = run_config(tmp_path, checkpoint={"save": save, "load": save, "save_interval": 2})
    real_save = checkpoint.dist_checkpointing.save

    def crashing_save(state, path, **kwargs):
        if path.endswith("iter_0000004"):
            (checkpoint_dir(save, 4) / "__0_0.distcp").write_bytes(b"half a shard")
            raise RuntimeError("node lost power")
        return real_save(state, path, **kwargs)

    monkeypatch.setattr(checkpoint.dist_checkpointing, "save", crashing_save)
    with pytest.raises(RuntimeError, match="node lost power"):
        train(cfg, in_memory_data())
    assert read_tracker(save) == 2
    monkeypatch.undo()
    straight = train(run_config(tmp_path), in_memory_data())
    resumed = train(cfg, in_memory_data())
    assert [r.iteration for r in resumed.history] == [3, 4, 5, 6]
    assert losses(resumed) == losses(straight)[2:]


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one_with_a_warning(tmp_path, caplog):
    save = str(tmp_path / "run")
    cfg = run_config(tmp_path, checkpoint={"save": save, "save_interval": 2})
    full = train(cfg, in_memory_data())
    shard = next(checkpoint_dir(save, 6).glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated by a full disk
    resume = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, load=save, save=str(tmp_path / "next")))
    with caplog.at_level(logging.WARNING, logger="ssa_megatron.train"):
        resumed = train(resume, in_memory_data())
    assert "iter_0000006 cannot be loaded: shard file" in caplog.text and "truncated" in caplog.text
    assert [r.iteration for r in resumed.history] == [5, 6]
    assert losses(resumed) == losses(full)[4:]


def test_load_refuses_a_checkpoint_of_another_shape_naming_the_fields(tmp_path):
    save = str(tmp_path / "run")
    train(run_config(tmp_path, train={"train_iters": 1}, checkpoint={"save": save}), in_memory_data())
    other = run_config(tmp_path, model={"hidden_size": 64, "num_layers": 2}, checkpoint={"load": save})
    with pytest.raises(CheckpointError, match=r"model.num_layers: checkpoint 4, this run 2; model.hidden_size: checkpoint 32, this run 64"):
        Trainer(other, in_memory_data())
    sparse = run_config(tmp_path, ssa={"training_mode": "sparse"}, checkpoint={"load": save})
    with pytest.raises(CheckpointError, match="ssa.training_mode: checkpoint ssa, this run sparse .*--finetune"):
        Trainer(sparse, in_memory_data())
    tuned = train(dataclasses.replace(sparse, checkpoint=dataclasses.replace(sparse.checkpoint, finetune=True)), in_memory_data())
    assert [r.iteration for r in tuned.history][0] == 1  # finetune: iteration, optimizer and data start at 0


def test_a_missing_load_directory_is_an_error_unless_it_is_also_the_save_directory(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=r"checkpoint.load=.*nowhere: no latest_checkpointed_iteration.txt there \(the directory does not exist\)"):
        checkpoint.plan_load(run_config(tmp_path, checkpoint={"load": missing}))
    assert checkpoint.plan_load(run_config(tmp_path, checkpoint={"load": missing, "save": missing})) is None
    train(run_config(tmp_path, train={"train_iters": 1}, checkpoint={"save": missing}), in_memory_data())
    with pytest.raises(CheckpointError, match=r"ckpt_step=7: .*iter_0000007 does not exist; saved iterations: \[1\]"):
        checkpoint.plan_load(run_config(tmp_path, checkpoint={"load": missing, "ckpt_step": 7}))


def test_tensorboard_event_files_hold_the_training_validation_and_checkpoint_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = tmp_path / "tb"
    cfg = run_config(tmp_path, train={"train_iters": 4, "eval_interval": 2, "tensorboard_dir": str(board)},
                     checkpoint={"save": str(tmp_path / "run")})
    train(cfg, in_memory_data())
    events = EventAccumulator(str(board))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/lm loss", "train/alignment loss", "train/grad norm", "train/learning rate", "train/sparse fraction",
                "train/tokens per second per GPU", "train/TFLOP/s per GPU", "train/skipped steps",
                "alignment/layer_01", "alignment/layer_04", "valid/lm loss (full attention)",
                "valid/lm loss (sparse attention)", "checkpoint/save seconds"):
        assert tag in tags, (tag, sorted(tags))
    assert any(tag.startswith("train/lm loss (") for tag in tags)  # per-stream LM loss
    assert [e.step for e in events.Scalars("train/lm loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("valid/lm loss (sparse attention)")] == [2, 4]


def test_asynchronous_saves_commit_the_tracker_and_resume_bitwise(tmp_path):
    """Megatron's async save: tensors written in a background process, the tracker after every rank."""
    save = str(tmp_path / "async")
    straight = train(run_config(tmp_path), in_memory_data())
    cfg = run_config(tmp_path, train={"exit_interval": 4},
                     checkpoint={"save": save, "load": save, "save_interval": 2, "async_save": True})
    first = train(cfg, in_memory_data())
    assert first.exit_code == 3 and read_tracker(save) == 4 and saved_iterations(save) == [4, 2]
    assert checkpoint.damage(checkpoint_dir(save, 4)) is None
    second = train(cfg, in_memory_data())
    assert losses(first) + losses(second) == losses(straight)


def test_ctrl_c_with_a_save_directory_saves_and_exits_3_and_a_second_one_aborts(monkeypatch, tmp_path):
    import signal

    save = str(tmp_path / "run")
    real_step = Trainer.step
    presses = {2: 1, 4: 2}  # after iteration 2: one Ctrl-C; in the second run, after iteration 4: two

    def step_then_press(self):
        record = real_step(self)
        for _ in range(presses.get(record.iteration, 0)):
            signal.raise_signal(signal.SIGINT)
        return record

    monkeypatch.setattr(Trainer, "step", step_then_press)
    cfg = run_config(tmp_path, checkpoint={"save": save, "load": save})
    first = train(cfg, in_memory_data())
    assert (first.exit_code, first.reason, read_tracker(save)) == (3, "signal SIGINT", 2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, in_memory_data())
    assert read_tracker(save) == 2  # aborted before any new save: the latest is still whole
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
