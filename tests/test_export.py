"""`lotus-train export`: a trained run's checkpoint becomes an HF folder of the same model."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from small_runs import small_run

from launcher.cli import main as cli
from launcher.config import config_to_dict, load_config
from launcher.data import build_data
from launcher.distributed import DistInfo
from launcher.train import run
from lotus_dist.data import load_tokenizer


@pytest.fixture(scope="module", params=["lotus", "rso"])
def trained(small_corpus, tmp_path_factory, request):
    """A finished run; rso's stops mid-period (4 steps per subspace), so its checkpoint's
    B is not zero and the export must fold it into W."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config("configs/tiny.yaml", small_run(
        *small_corpus, run_dir, "training.steps=6", "training.warmup_steps=2",
        "eval.interval=0", "eval.batches=2", "checkpoint.interval=3",
        f"optim.name={request.param}", "optim.update_proj_gap=4"))
    return cfg, run(cfg)


def test_export_reproduces_the_final_eval_loss_in_transformers(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg, summary = trained
    cli(["export", "--run", cfg.run.dir, "--out", str(tmp_path / "hf")])
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    _, evals, _ = build_data(cfg, DistInfo(rank=0, world_size=1, local_rank=0,
                                           device=torch.device("cpu")))
    loss_sum, count = 0.0, 0
    with torch.no_grad():
        for batch in evals:
            logits = model(input_ids=batch[:, :-1]).logits
            loss_sum += float(F.cross_entropy(logits.flatten(0, 1).float(),
                                              batch[:, 1:].flatten(), reduction="sum"))
            count += batch[:, 1:].numel()
    assert loss_sum / count == pytest.approx(summary["final_eval_loss"], rel=1e-5)
    assert summary["final_eval_loss"] < math.log(512)  # it learned: not the initial weights


def test_export_of_an_earlier_step_differs_from_the_newest(trained, tmp_path):
    from safetensors.torch import load_file

    cfg, _ = trained
    cli(["export", "--run", cfg.run.dir, "--out", str(tmp_path / "new")])
    cli(["export", "--run", cfg.run.dir, "--out", str(tmp_path / "old"), "--step", "3"])
    new = load_file(tmp_path / "new" / "model.safetensors")
    old = load_file(tmp_path / "old" / "model.safetensors")
    assert new.keys() == old.keys()
    assert not torch.equal(new["model.layers.0.mlp.up_proj.weight"],
                           old["model.layers.0.mlp.up_proj.weight"])


def fails_with(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exc:
        cli(argv)
    assert message in str(exc.value), str(exc.value)


def test_a_step_without_a_checkpoint_is_named_with_the_steps_that_have_one(trained, tmp_path):
    cfg, _ = trained
    fails_with(["export", "--run", cfg.run.dir, "--out", str(tmp_path / "hf"), "--step", "5"],
               "no complete checkpoint at step 5 in ")
    fails_with(["export", "--run", cfg.run.dir, "--out", str(tmp_path / "hf"), "--step", "5"],
               "(complete checkpoints: step 3, 6)")
    assert not (tmp_path / "hf").exists()


def test_the_export_holds_the_runs_tokenizer_and_config(trained, small_corpus, tmp_path):
    cfg, _ = trained
    cli(["export", "--run", cfg.run.dir, "--out", str(tmp_path / "hf")])
    out = tmp_path / "hf"
    ours = load_tokenizer(small_corpus[1])
    shipped = load_tokenizer(out / "tokenizer.json")
    text = ["Return the number of items in a container.\n\n  Two lines."]
    assert shipped.encode_batch(text) == ours.encode_batch(text)
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["eos_token"] == "</s>" == ours.tokenizer.id_to_token(ours.eos_id)
    assert tok_config["pad_token"] == "<pad>" and tok_config["unk_token"] == "<unk>"
    assert tok_config["model_max_length"] == cfg.model.max_seq_len
    generation = json.loads((out / "generation_config.json").read_text())
    model_config = json.loads((out / "config.json").read_text())
    for config in (generation, model_config):
        assert config["eos_token_id"] == ours.eos_id
        assert config["pad_token_id"] == ours.tokenizer.token_to_id("<pad>")
        assert config["bos_token_id"] is None  # documents are packed with no BOS
    recorded = load_config(out / "lotus-config.yaml")
    assert config_to_dict(recorded) == config_to_dict(cfg)


def test_transformers_loads_the_tokenizer_and_generates(trained, small_corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg, _ = trained
    cli(["export", "--run", cfg.run.dir, "--out", str(tmp_path / "hf")])
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = load_tokenizer(small_corpus[1])
    text = "Return the number of items in a container."
    assert tokenizer(text)["input_ids"] == ours.encode_batch([text])[0]
    assert tokenizer.eos_token_id == ours.eos_id
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert model.generation_config.eos_token_id == ours.eos_id
    prompt = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 4
    assert torch.equal(out[0, :prompt["input_ids"].shape[1]], prompt["input_ids"][0])


def test_a_tokenizer_that_cannot_be_found_names_the_flag(trained, tmp_path):
    cfg, _ = trained
    fails_with(["export", "--run", cfg.run.dir, "--out", str(tmp_path / "hf"), "--tokenizer",
                str(tmp_path / "missing.json")], "pass --tokenizer PATH")
    assert not (tmp_path / "hf").exists()


def test_a_folder_that_is_not_a_run_is_named(tmp_path):
    fails_with(["export", "--run", str(tmp_path), "--out", str(tmp_path / "hf")],
               "not a run directory")
