"""`lotus-train eval`: a run's checkpoint, or its HF export, gives the run's own eval loss."""

from __future__ import annotations

import json

import pytest
from small_runs import metric_rows, small_run

from launcher.cli import main as cli
from launcher.config import load_config
from launcher.train import run
from lotus_dist.hf_export import export_hf
from lotus_dist.hf_export import load_hf as load_hf_folder

# Evaluations every 3 steps and checkpoints at 3 and 6: each checkpoint has a recorded loss.
STEPS, EVAL_BATCHES = 6, 2


@pytest.fixture(scope="module")
def trained(small_corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config("configs/tiny.yaml", small_run(
        *small_corpus, run_dir, f"training.steps={STEPS}", "training.warmup_steps=2",
        "eval.interval=3", f"eval.batches={EVAL_BATCHES}", "checkpoint.interval=3"))
    summary = run(cfg)
    recorded = {row["step"]: row["eval_loss"] for row in metric_rows(run_dir)
                if "eval_loss" in row}
    return cfg, summary, recorded


def evaluate(capsys, *argv: str) -> dict:
    """Run `lotus-train eval ARGV` and return its JSON line; the line before says the same."""
    cli(["eval", *argv])
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert f"loss {result['eval_loss']:.4f}" in lines[-2]
    return result


def test_eval_of_the_last_checkpoint_is_the_runs_final_eval_loss(trained, capsys):
    cfg, summary, recorded = trained
    result = evaluate(capsys, "--run", cfg.run.dir)
    assert result["step"] == STEPS
    assert result["eval_loss"] == pytest.approx(summary["final_eval_loss"], abs=1e-5)
    assert result["eval_loss"] == pytest.approx(recorded[STEPS], abs=1e-5)
    assert result["eval_ppl"] == pytest.approx(summary["final_eval_ppl"], rel=1e-5)
    assert result["tokens"] == EVAL_BATCHES * cfg.training.batch_size * cfg.training.seq_len


def test_step_selects_an_earlier_checkpoint_and_batches_fewer_batches(trained, capsys):
    cfg, _, recorded = trained
    result = evaluate(capsys, "--run", cfg.run.dir, "--step", "3")
    assert result["eval_loss"] == pytest.approx(recorded[3], abs=1e-5)
    assert recorded[3] != pytest.approx(recorded[STEPS], abs=1e-3)
    one = evaluate(capsys, "--run", cfg.run.dir, "--batches", "1")
    assert one["tokens"] == cfg.training.batch_size * cfg.training.seq_len
    assert one["eval_loss"] != pytest.approx(recorded[STEPS], abs=1e-6)


def fails_with(argv: list[str], *fragments: str) -> str:
    with pytest.raises(SystemExit) as exc:
        cli(argv)
    message = str(exc.value)
    assert message.startswith("lotus-train: error: ") and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_a_missing_step_lists_the_steps_that_have_a_checkpoint(trained):
    cfg, _, _ = trained
    fails_with(["eval", "--run", cfg.run.dir, "--step", "4"],
               "no complete checkpoint at step 4", "complete checkpoints: step 3, 6")


def test_a_missing_split_is_a_one_line_error(trained):
    cfg, _, _ = trained
    fails_with(["eval", "--run", cfg.run.dir, "--split", "test"], "no 'test' files")
    fails_with(["eval", "--hf", cfg.run.dir], "is not a Hugging Face model folder")


def test_the_exported_folder_gives_the_same_loss(trained, tmp_path, capsys):
    cfg, summary, _ = trained
    cli(["export", "--run", cfg.run.dir, "--out", str(tmp_path / "hf")])
    capsys.readouterr()
    # Data settings come from the run config the export records; tokenizer from the folder.
    result = evaluate(capsys, "--hf", str(tmp_path / "hf"))
    assert result["eval_loss"] == pytest.approx(summary["final_eval_loss"], abs=1e-5)
    detected = evaluate(capsys, "--run", str(tmp_path / "hf"))  # an HF folder is recognised
    assert detected["eval_loss"] == result["eval_loss"] and detected["step"] is None


def test_a_foreign_hf_folder_needs_data_and_tokenizer(trained, small_corpus, tmp_path, capsys):
    """A folder without the recorded run config (written by export_hf alone, as any HF
    LlamaForCausalLM folder could be) evaluates with --data, --tokenizer and --set."""
    cfg, summary, _ = trained
    cli(["export", "--run", cfg.run.dir, "--out", str(tmp_path / "ours")])
    capsys.readouterr()
    export_hf(load_hf_folder(tmp_path / "ours"), tmp_path / "bare")
    fails_with(["eval", "--hf", str(tmp_path / "bare")], "pass --data and --tokenizer")
    corpus, tokenizer = small_corpus
    t = cfg.training
    result = evaluate(capsys, "--hf", str(tmp_path / "bare"), "--data", str(corpus),
                      "--tokenizer", str(tokenizer), "--batches", str(EVAL_BATCHES),
                      "--set", f"training.seq_len={t.seq_len}",
                      "--set", f"training.batch_size={t.batch_size}",
                      "--set", f"training.micro_batch_size={t.micro_batch_size}")
    assert result["eval_loss"] == pytest.approx(summary["final_eval_loss"], abs=1e-5)
