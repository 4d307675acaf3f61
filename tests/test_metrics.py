"""Metrics: jsonl rows, resume without duplicates, rank-0-only output, ETA, summary.json."""

import json

import pytest
import torch

from launcher import metrics
from launcher.metrics import EtaEstimator, MetricsLogger, format_eta, write_summary


def train_metrics(loss: float = 3.0) -> dict:
    return {"loss": loss, "lr": 0.01, "tokens_per_s": 12345.6}


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def logger(tmp_path, rank: int = 0, **kwargs) -> MetricsLogger:
    return MetricsLogger(tmp_path, rank, tensorboard=False, total_steps=100, **kwargs)


def test_each_logged_step_is_one_flushed_json_row(tmp_path):
    log = logger(tmp_path)
    log.log_train(10, train_metrics(), step_time_s=0.5)
    log.log_eval(10, {"eval_loss": 3.5, "eval_ppl": 33.1})
    rows = read_rows(tmp_path / "metrics.jsonl")  # readable before close: flushed
    log.close()
    assert rows[0]["step"] == 10 and rows[0]["loss"] == 3.0 and rows[0]["tokens_per_s"] == 12345.6
    assert rows[1]["step"] == 10 and rows[1]["eval_ppl"] == 33.1
    assert all("time" in row for row in rows)


def test_tensor_values_are_written_as_numbers(tmp_path):
    log = logger(tmp_path)
    log.log_train(1, {**train_metrics(), "loss": torch.tensor(2.5)}, step_time_s=0.1)
    log.close()
    assert read_rows(tmp_path / "metrics.jsonl")[0]["loss"] == 2.5


def test_training_rows_must_carry_the_contract_keys(tmp_path):
    log = logger(tmp_path)
    with pytest.raises(ValueError, match="tokens_per_s"):
        log.log_train(1, {"loss": 1.0, "lr": 0.1}, step_time_s=0.1)
    log.close()


def test_resume_drops_rows_after_the_checkpoint_step(tmp_path):
    log = logger(tmp_path)
    for step in (10, 20, 30):
        log.log_train(step, train_metrics(), step_time_s=0.1)
    log.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 40, "lo')  # a row torn by the crash

    log = logger(tmp_path, resume_step=20)
    log.log_train(30, train_metrics(loss=2.0), step_time_s=0.1)
    log.close()
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert [row["step"] for row in rows] == [10, 20, 30]
    assert rows[-1]["loss"] == 2.0


def test_fresh_run_starts_an_empty_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 5}\n')
    logger(tmp_path).close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_other_ranks_write_and_print_nothing(tmp_path, capsys):
    log = logger(tmp_path, rank=1)
    log.log_train(1, train_metrics(), step_time_s=0.1)
    log.close()
    assert list(tmp_path.iterdir()) == []
    assert capsys.readouterr().out == ""


def test_log_all_ranks_gives_each_rank_its_own_file_and_prefix(tmp_path, capsys):
    log = logger(tmp_path, rank=1, log_all_ranks=True)
    log.log_train(1, train_metrics(), step_time_s=0.1)
    log.close()
    assert [row["step"] for row in read_rows(tmp_path / "metrics-rank1.jsonl")] == [1]
    assert not (tmp_path / "metrics.jsonl").exists()
    assert capsys.readouterr().out.startswith("[rank 1] step 1/100")


def test_progress_line(tmp_path, capsys):
    log = logger(tmp_path)
    log.log_train(10, train_metrics(), step_time_s=9.0)  # start-up, left out of the ETA
    log.log_train(20, train_metrics(), step_time_s=2.0)
    log.log_eval(20, {"eval_loss": 3.25, "eval_ppl": 25.79})
    log.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("step 10/100 (10.0%) loss 3.0000 lr 1.000e-02 tok/s 12,346 "
                        "eta --:--:--")
    assert lines[1] == ("step 20/100 (20.0%) loss 3.0000 lr 1.000e-02 tok/s 12,346 "
                        "eta 00:02:40")  # 80 steps x 2 s
    assert lines[2] == "eval step 20/100: eval_loss 3.2500 eval_ppl 25.7900"


def test_tensorboard_writes_event_files_on_rank_0(tmp_path):
    log = MetricsLogger(tmp_path, 0, tensorboard=True, total_steps=10)
    log.log_train(1, train_metrics(), step_time_s=0.1)
    log.close()
    assert list(tmp_path.glob("events.out.tfevents.*"))


@pytest.mark.parametrize(("seconds", "text"), [
    (None, "--:--:--"), (float("inf"), "--:--:--"), (0, "00:00:00"), (59.6, "00:01:00"),
    (3725, "01:02:05"), (360000, "100:00:00"),
])
def test_format_eta(seconds, text):
    assert format_eta(seconds) == text


def test_eta_skips_start_up_and_smooths_step_times():
    eta = EtaEstimator(skip=1, smoothing=0.5)
    eta.update(100.0)
    assert eta.eta_s(10) is None
    eta.update(2.0)
    eta.update(4.0)
    assert eta.seconds_per_step == 3.0
    assert eta.eta_s(10) == 30.0
    assert eta.eta_s(-1) == 0.0


def test_write_summary_replaces_the_file_atomically(tmp_path):
    write_summary(tmp_path, {"eval_loss": 3.0})
    path = write_summary(tmp_path, {"eval_loss": 2.5, "refreshes": {"layers.0.mlp": 4}})
    assert json.loads(path.read_text()) == {"eval_loss": 2.5, "refreshes": {"layers.0.mlp": 4}}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary left


def test_failed_summary_write_keeps_the_old_file(tmp_path, monkeypatch):
    write_summary(tmp_path, {"eval_loss": 3.0})

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(metrics.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_summary(tmp_path, {"eval_loss": 2.5})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"eval_loss": 3.0}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_summary_values_must_be_json(tmp_path):
    with pytest.raises(TypeError, match="not JSON"):
        write_summary(tmp_path, {"bad": object()})
