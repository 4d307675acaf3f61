"""Weights & Biases (a fake ``wandb`` module) and TensorBoard HParams/text of the config."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest
import yaml
from small_runs import small_run

from launcher.config import ConfigError, config_to_dict, load_config
from launcher.metrics import MetricsLogger
from launcher.train import run


class FakeWandb(types.ModuleType):
    """Records ``wandb.init`` arguments and what the run it returns is given."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.init_kwargs: list[dict[str, Any]] = []
        self.logged: list[tuple[int, dict[str, Any]]] = []
        self.finished = 0

    def init(self, **kwargs: Any) -> FakeWandb:
        self.init_kwargs.append(kwargs)
        return self

    def log(self, data: dict[str, Any], step: int) -> None:
        self.logged.append((step, data))

    def finish(self) -> None:
        self.finished += 1


@pytest.fixture
def fake_wandb(monkeypatch) -> FakeWandb:
    module = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def test_logger_sends_rank_0s_rows_with_the_tensorboard_tags(tmp_path, fake_wandb):
    log = MetricsLogger(tmp_path, 0, tensorboard=False, total_steps=10, wandb_run=fake_wandb)
    log.log_train(5, {"loss": 3.0, "lr": 0.01, "tokens_per_s": 100.0, "note": "text"}, 0.1)
    log.log_eval(5, {"eval_loss": 3.5, "eval_ppl": 33.1})
    log.close()
    assert fake_wandb.logged == [
        (5, {"train/loss": 3.0, "train/lr": 0.01, "train/tokens_per_s": 100.0}),
        (5, {"eval/eval_loss": 3.5, "eval/eval_ppl": 33.1})]
    other = MetricsLogger(tmp_path, 1, tensorboard=False, total_steps=10, log_all_ranks=True,
                          wandb_run=fake_wandb)
    other.log_train(6, {"loss": 3.0, "lr": 0.01, "tokens_per_s": 100.0}, 0.1)
    other.close()
    assert len(fake_wandb.logged) == 2  # rank 1 writes its file, never to W&B


def test_a_run_logs_its_config_and_every_row_to_wandb(small_corpus, tmp_path, fake_wandb):
    cfg = load_config("configs/tiny.yaml", small_run(
        *small_corpus, tmp_path, "training.steps=4", "training.warmup_steps=1",
        "training.log_interval=2", "eval.interval=0", "eval.batches=1",
        "checkpoint.interval=0", "run.wandb_project=lotus-tests"))
    run(cfg)
    (kwargs,) = fake_wandb.init_kwargs
    assert kwargs["project"] == "lotus-tests" and kwargs["name"] == tmp_path.name
    assert kwargs["config"]["optim"]["rank"] == 8 and "methods" not in kwargs["config"]
    assert [step for step, _ in fake_wandb.logged] == [0, 2, 4, 4]  # eval, train, train, eval
    assert "train/tokens_per_s_per_device" in fake_wandb.logged[1][1]
    assert fake_wandb.finished == 1


def test_wandb_project_without_wandb_installed_fails_before_training(small_corpus, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    cfg = load_config("configs/tiny.yaml", small_run(*small_corpus, tmp_path,
                                                     "run.wandb_project=lotus-tests"))
    with pytest.raises(ConfigError, match=r"pip install .*\[wandb\]"):
        run(cfg)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_tensorboard_holds_the_config_as_hparams_and_text(tmp_path):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    plugin_data = pytest.importorskip("tensorboard.plugins.hparams.plugin_data_pb2")
    cfg = load_config("configs/tiny.yaml", ["optim.rank=24", f"run.dir={tmp_path}"])
    config = config_to_dict(cfg)
    MetricsLogger(tmp_path, 0, tensorboard=True, total_steps=10, config=config).close()

    events = accumulator.EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    events.Reload()
    start = plugin_data.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["optim.rank"].number_value == 24
    assert hparams["optim.name"].string_value == "lotus"
    assert hparams["optim.target_modules"].string_value == "['self_attn', 'mlp']"
    (text,) = events.Tensors("config/text_summary")
    shown = text.tensor_proto.string_val[0].decode()
    assert yaml.safe_load("\n".join(line[4:] for line in shown.splitlines())) == config
