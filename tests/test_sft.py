"""The sft stage on the tiny model: methods, loss mask, bucketing, resume, errors (fast, CPU)."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch
import yaml

from cmat_pipeline.config import GenerationConfig, Params, build, load_params
from cmat_pipeline.errors import ConfigError, DataError
from cmat_pipeline.sft import (IGNORE, LengthBucketBatchSampler, PadCollator, SFTRecipe, TargetOnlyHead, encode_file,
                               padding_fraction, prepare_out_dir, sft, target_token_loss)

SYSTEM = "I will ask you a question, then you should help me operate a MySQL database with SQL to answer it."


def conversation(i: int) -> list[dict[str, str]]:
    """A short dbbench-style conversation; i varies its length (1-3 actions) and contents."""
    turns = [{"role": "user", "content": SYSTEM * (1 + i % 2)}, {"role": "assistant", "content": "Ok."},
             {"role": "user", "content": f"How many rows does table t{i % 4} have?"}]
    for k in range(i % 3):
        turns += [{"role": "assistant", "content": f"Action: Operation\n```sql\nSELECT COUNT(*) FROM t{i % 4} WHERE id > {k};\n```"},
                  {"role": "user", "content": f"[({k + 3},)]"}]
    return turns + [{"role": "assistant", "content": f"Action: Answer\nFinal Answer: [{i % 4 + 3}]"}]


def write_data(folder: Path, train: list[dict], val: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("val", val)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """16 training conversations (a tiny repeated set) and 4 validation ones."""
    rows = [{"messages": conversation(i)} for i in range(16)]
    return write_data(tmp_path_factory.mktemp("data"), rows, rows[:4])


def make_params(model_dir: Path, data: Path, out: Path, **sft: object) -> Params:
    cfg = {"max_steps": 8, "learning_rate": 1e-2, "warmup_steps": 1, "save_steps": 4, "eval_steps": 4,
           "lora": {"r": 8, "alpha": 16}, "out_dir": str(out)} | sft
    return build(Params, {"model": {"dir": str(model_dir)}, "mix": {"out_dir": str(data)}, "sft": cfg})


def losses(out: Path) -> list[float]:
    rows = (out / "plots" / "train_loss.tsv").read_text().split("\n")[1:]
    return [float(r.split("\t")[1]) for r in rows if r]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


# ---------------------------------------------------------------------------------- methods


def test_lora_trains_and_loads_with_peft_and_hfpolicy(tiny_model_dir, data_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cmat_pipeline.runtime.policy import HFPolicy
    from cmat_pipeline.sft import main

    out = tmp_path / "lora"
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(make_params(tiny_model_dir, data_dir, out, max_steps=12).to_dict()))
    metrics = main(["--params", str(params_file), "--no-progress"])  # the stage entry point
    curve = losses(out)
    assert len(curve) == 12 and sum(curve[-3:]) / 3 < curve[0] - 0.2, curve
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == metrics and saved["steps"] == 12 and saved["tokens_per_second"] > 0
    assert saved["val_loss"] < curve[0] and 0 <= saved["padding_pct"] < 50
    assert saved["train_data"]["sequences"] == 16 and saved["train_data"]["overlong"] == 0
    for name in ("train_loss", "val_loss", "learning_rate"):
        assert (out / "plots" / f"{name}.tsv").read_text().startswith("step\t")
    assert len((out / "plots" / "val_loss.tsv").read_text().splitlines()) == 1 + 3  # steps 4, 8, 12
    assert (out / "tokenizer.json").exists() and not (out / "checkpoints").exists()
    assert load_params(out / "resolved_params.yaml") == load_params(params_file)

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out))
    assert any("lora_A" in name for name, _ in model.named_parameters())
    policy = HFPolicy(str(tiny_model_dir), GenerationConfig(max_new_tokens=4), adapter=str(out), device="cpu")
    assert policy.generate([conversation(0)[:3]])[0].text is not None


def test_ptuning_trains_and_loads(tiny_model_dir, data_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cmat_pipeline.runtime.policy import HFPolicy

    out = tmp_path / "ptuning"
    metrics = sft(make_params(tiny_model_dir, data_dir, out, method="ptuning", max_steps=4, eval_steps=0,
                              ptuning={"num_virtual_tokens": 4, "encoder_hidden_size": 16}), progress=False)
    assert metrics["steps"] == 4 and metrics["val_loss"] > 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "P_TUNING" and config["num_virtual_tokens"] == 4
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out))
    policy = HFPolicy(str(tiny_model_dir), GenerationConfig(max_new_tokens=4), adapter=str(out), device="cpu")
    assert policy.generate([conversation(1)[:3]])[0].text is not None


def test_full_fine_tuning_writes_a_model(tiny_model_dir, data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    sft(make_params(tiny_model_dir, data_dir, out, method="full", max_steps=3, learning_rate=1e-3, eval_steps=0),
        progress=False)
    assert not (out / "adapter_config.json").exists()
    tuned, base = AutoModelForCausalLM.from_pretrained(out), AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert tuned.config.use_cache  # generation after training needs its KV cache back
    assert not torch.equal(tuned.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)


# ------------------------------------------------------------------------------ loss and data


def test_labels_are_exactly_the_assistant_turns(tokenizer, data_dir):
    split = encode_file(tokenizer, data_dir / "train.jsonl", 1024, "drop")
    records = [json.loads(line) for line in (data_dir / "train.jsonl").read_text().splitlines()]
    for example, record in zip(split.examples, records, strict=True):
        decoded = tokenizer.decode([t for t in example["labels"] if t != IGNORE])
        expected = "".join(m["content"] + tokenizer.eos_token for m in record["messages"] if m["role"] == "assistant")
        assert decoded == expected
        assert SYSTEM not in decoded and "How many rows" not in decoded


@pytest.mark.parametrize("method", ["full", "ptuning"])  # p-tuning prepends virtual tokens to the hidden states
def test_target_only_loss_equals_the_full_causal_lm_loss(tiny_model_dir, tokenizer, data_dir, method):
    from transformers import AutoModelForCausalLM

    from cmat_pipeline.sft import wrap_model

    cfg = build(Params, {"sft": {"method": method, "ptuning": {"num_virtual_tokens": 3, "encoder_hidden_size": 8}}}).sft
    model = wrap_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), cfg).eval()
    examples = encode_file(tokenizer, data_dir / "train.jsonl", 1024, "drop").examples[:3]
    batch = PadCollator(tokenizer.pad_token_id)(examples)
    with torch.no_grad():
        reference = model(**batch).loss
        head = TargetOnlyHead(model)
        with head.only(batch["labels"]):
            outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    n_targets = int((batch["labels"][:, 1:] != IGNORE).sum())
    assert outputs.logits.shape == (n_targets, len(tokenizer))  # only target positions were projected
    assert torch.allclose(target_token_loss(outputs, batch["labels"]), reference, atol=1e-5)


def test_length_bucketing_cuts_padding_and_is_deterministic():
    rng = random.Random(0)
    lengths = [rng.choice([rng.randint(120, 300), rng.randint(450, 1000)]) for _ in range(500)]
    bucketed = LengthBucketBatchSampler(lengths, 8, seed=3)
    randomly = LengthBucketBatchSampler(lengths, 8, seed=3, group_by_length=False)
    waste_bucketed, waste_random = padding_fraction(bucketed.batches(), lengths), padding_fraction(randomly.batches(), lengths)
    assert waste_bucketed < waste_random / 3, (waste_bucketed, waste_random)
    batches = bucketed.batches()
    assert sorted(i for b in batches for i in b) == list(range(500)) and len(batches) == len(bucketed)
    assert batches == LengthBucketBatchSampler(lengths, 8, seed=3).batches()  # same seed and epoch, same order
    bucketed.set_epoch(1)
    assert bucketed.batches() != batches
    assert [len(b) for b in batches][:-1] == [8] * (len(batches) - 1)  # only the last batch may be short


def test_pad_collator_pads_to_the_longest_in_the_batch():
    batch = PadCollator(pad_id=2)([{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [5], "labels": [IGNORE]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, IGNORE, IGNORE]]


# ------------------------------------------------------------------------------------ resume


def test_killed_run_resumes_to_the_same_loss_curve(tiny_model_dir, data_dir, tmp_path):
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 7:
                raise KeyboardInterrupt("killed at step 7")

    # 16 sequences / batch 4 = 4 steps per epoch: the resumed run restarts mid-epoch 2, with LoRA dropout on.
    common = dict(max_steps=9, save_steps=3, eval_steps=4, lora={"r": 8, "alpha": 16, "dropout": 0.1})
    straight = sft(make_params(tiny_model_dir, data_dir, tmp_path / "straight", **common), progress=False)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        sft(make_params(tiny_model_dir, data_dir, out, **common), progress=False, callbacks=[Kill()])
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    resumed = sft(make_params(tiny_model_dir, data_dir, out, **common), progress=False)
    assert resumed["resumed_from_step"] == 6 and resumed["steps"] == 9
    assert losses(out) == pytest.approx(losses(tmp_path / "straight"), abs=1e-5)
    assert resumed["val_loss"] == pytest.approx(straight["val_loss"], abs=1e-5)


def test_checkpoints_of_another_config_are_discarded_and_foreign_folders_refused(tmp_path):
    out = tmp_path / "sft"
    (out / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (out / "checkpoints" / "fingerprint.json").write_text("run-a")
    (out / ".cmat_sft").touch()
    assert prepare_out_dir(out, "run-a") == out / "checkpoints" / "checkpoint-4"
    (out / "checkpoints" / "checkpoint-8").mkdir()  # killed while saving: no trainer_state.json
    assert prepare_out_dir(out, "run-a") == out / "checkpoints" / "checkpoint-4"
    assert not (out / "checkpoints" / "checkpoint-8").exists()
    assert prepare_out_dir(out, "run-b") is None
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not written by the sft stage"):
        prepare_out_dir(foreign, "run-a")


# ------------------------------------------------------------------------------------ errors


def test_no_assistant_tokens_is_a_data_error_naming_the_file(tiny_model_dir, tmp_path):
    users_only = [{"messages": [{"role": "user", "content": "hello"}]}] * 3
    data = write_data(tmp_path / "data", users_only, users_only)
    with pytest.raises(DataError, match=rf"{data / 'train.jsonl'}: no assistant tokens to train on"):
        SFTRecipe(make_params(tiny_model_dir, data, tmp_path / "out")).setup()


@pytest.mark.parametrize("action", ["drop", "truncate"])
def test_overlong_sequences_are_counted_and_handled(tiny_model_dir, data_dir, tokenizer, tmp_path, caplog, action):
    lengths = [len(e["input_ids"]) for e in encode_file(tokenizer, data_dir / "train.jsonl", 10_000, "drop").examples]
    limit = sorted(lengths)[len(lengths) // 2]
    over = sum(n > limit for n in lengths)
    recipe = SFTRecipe(make_params(tiny_model_dir, data_dir, tmp_path / "out", max_seq_len=limit, overlong=action))
    with caplog.at_level(logging.WARNING, logger="cmat.sft"):
        recipe.setup()
    stats = recipe.train_split.stats()
    assert stats["overlong"] == over and stats["sequences"] == (16 - over if action == "drop" else 16)
    assert stats["dropped_overlong" if action == "drop" else "truncated"] == over
    assert max(len(e["input_ids"]) for e in recipe.train_split.examples) <= limit
    assert f"{over} of 16 sequences are longer than sft.max_seq_len={limit}" in caplog.text
    recipe.cleanup(success=False)


def test_unknown_lora_target_lists_the_models_linear_modules(tiny_model_dir, data_dir, tmp_path):
    params = make_params(tiny_model_dir, data_dir, tmp_path / "out", lora={"target_modules": ["q_proj", "qkv_proj"]})
    with pytest.raises(ConfigError, match=r"no module 'qkv_proj'; its linear modules are .*down_proj.*q_proj"):
        SFTRecipe(params).setup()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
@pytest.mark.parametrize("option", [{"mixed_precision": "bf16"}, {"mixed_precision": "fp16"}, {"device": "cuda"}])
def test_gpu_options_on_cpu_are_config_errors(tiny_model_dir, data_dir, tmp_path, option):
    with pytest.raises(ConfigError, match="CUDA GPU"):
        SFTRecipe(make_params(tiny_model_dir, data_dir, tmp_path / "out", **option)).setup()


@pytest.mark.parametrize("sft_cfg, fragment", [
    ({"device": "cpu", "mixed_precision": "bf16"}, "sft.mixed_precision: bf16 needs a CUDA GPU"),
    ({"max_steps": 30, "warmup_steps": 30}, "sft.warmup_steps: must be >= 0 and below sft.max_steps (30)"),
    ({"method": "prefix"}, "sft.method: 'prefix' is not allowed; choose one of 'lora', 'ptuning', 'full'"),
    ({"lora": {"dropout": 1.0}}, "sft.lora.dropout: must be in [0, 1)"),
    ({"overlong": "wrap"}, "sft.overlong: 'wrap' is not allowed"),
])
def test_sft_config_is_validated(sft_cfg, fragment):
    with pytest.raises(ConfigError) as err:
        build(Params, {"sft": sft_cfg})
    assert fragment in str(err.value)


# --------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_lora_on_gpu(tiny_model_dir, data_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "gpu"
    metrics = sft(make_params(tiny_model_dir, data_dir, out, max_steps=6, mixed_precision="bf16", device="cuda",
                              gradient_checkpointing=True), progress=False)
    assert metrics["device"] == "cuda" and metrics["steps"] == 6 and metrics["val_loss"] > 0
    assert losses(out)[-1] < losses(out)[0]
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out))
