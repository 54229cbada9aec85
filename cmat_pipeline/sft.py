"""`sft` stage: supervised fine-tuning of model.dir on the mixed train set (LoRA, P-Tuning or full).

Run it:
    python -m cmat_pipeline.sft                          # reads params.yaml; embedded default: ~10-15 min on CPU
    cmat sft --set sft.max_steps=3                       # a smoke run
    cmat sft --set sft.method=ptuning --set sft.learning_rate=3e-3
On GPUs (CUDA torch installed, `cmat params --profile gpu > params.yaml`), through `accelerate launch`:
    accelerate launch --config_file infra/accelerate/single_gpu.yaml -m cmat_pipeline.sft
    accelerate launch --config_file infra/accelerate/multi_gpu_ddp.yaml --num_processes 8 -m cmat_pipeline.sft
    (infra/accelerate/fsdp.yaml, deepspeed_zero2.yaml and deepspeed_zero3.yaml the same way)
The effective batch is per_device_batch_size x grad_accum_steps x GPUs.

Reads mix.out_dir/train.jsonl and val.jsonl (records.py: `messages` in the environment's protocol) and
writes to sft.out_dir: the PEFT adapter (`lora`, `ptuning`; loads with `PeftModel.from_pretrained`, so
HFPolicy, and vLLM for LoRA) or a whole model (`full`: evaluate it with `--set model.dir=<out_dir>
--set evaluate.adapter=''`), the tokenizer, metrics.json (DVC metrics), plots/*.tsv (train loss, val
loss, learning rate per step), resolved_params.yaml. Checkpoints go to out_dir/checkpoints every
sft.save_steps steps; run the stage again after a kill and it resumes from the last complete one with
the same data order, ending where an uninterrupted run ends. Checkpoints of a different config or data
are discarded, and deleted after a successful run unless sft.keep_checkpoints.

Design:
- HF `Trainer`, not TRL's `SFTTrainer`: the loss mask comes from `encode_chat` (assistant turns through the
  model's own chat template; TRL's assistant-only loss needs `{% generation %}` markers SmolLM2's template
  lacks) and batching from our length-bucketing sampler; TRL would re-tokenize and bring its own
  collators, which only gets in the way. Trainer gives checkpoint/resume (RNG, optimizer, scheduler, data
  position), DDP/FSDP/DeepSpeed through accelerate, bf16 and gradient checkpointing.
- Loss only on assistant tokens (labels -100 elsewhere), and the output projection (49k-token vocabulary)
  is applied to those positions only, as runtime/scoring.py does: a hook on the output embedding selects
  them inside the model's forward (so DDP/FSDP still see a plain forward call).
- Length bucketing: a batch sampler groups similar lengths (shuffled buckets, sorted, cut into batches,
  batch order shuffled; deterministic in seed + epoch, so a resumed run sees the same order) and each
  batch is padded to its own longest sequence. metrics.json reports the share of pad tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from cmat_pipeline.chat_format import encode_chat
from cmat_pipeline.config import Params, SFTConfig, save_resolved
from cmat_pipeline.data.records import read_jsonl
from cmat_pipeline.errors import ConfigError, DataError

log = logging.getLogger("cmat.sft")

IGNORE = -100
BUCKET_BATCHES = 64  # batches per length bucket: large enough for tight batches, small enough to keep order random
MARKER = ".cmat_sft"  # marks a folder this stage owns (and may clear)
CHECKPOINTS = "checkpoints"
FINGERPRINT = "fingerprint.json"
# Settings that do not change the training trajectory: a checkpoint stays valid when only these change.
NOT_FINGERPRINTED = ("out_dir", "keep_checkpoints", "save_steps", "eval_steps", "val_samples")


# ----------------------------------------------------------------------------------------- data


@dataclasses.dataclass
class EncodedSplit:
    """Tokenized examples ({input_ids, labels}) of one file and what happened on the way."""

    path: str
    examples: list[dict[str, list[int]]]
    records: int = 0
    overlong: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_target: int = 0

    def stats(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("records", "overlong", "truncated", "dropped_overlong", "dropped_no_target")} | {
            "sequences": len(self.examples), "tokens": sum(len(e["input_ids"]) for e in self.examples),
            "target_tokens": sum(sum(t != IGNORE for t in e["labels"]) for e in self.examples)}


def encode_file(tokenizer: Any, path: str | Path, max_seq_len: int, overlong: str, limit: int = 0) -> EncodedSplit:
    """Encode every record's `messages`; labels are the token ids on assistant tokens, -100 elsewhere."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; run the data pipeline up to `mix` first (`dvc repro mix`)")
    records = read_jsonl(path)
    split = EncodedSplit(str(path), [], records=len(records[:limit] if limit else records))
    for lineno, record in enumerate(records[:limit] if limit else records, start=1):
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{path}:{lineno}: record has no `messages` list")
        enc = encode_chat(tokenizer, messages)
        ids, mask = enc.input_ids, enc.assistant_mask
        if len(ids) > max_seq_len:
            split.overlong += 1
            if overlong == "drop":
                split.dropped_overlong += 1
                continue
            ids, mask = ids[:max_seq_len], mask[:max_seq_len]
            split.truncated += 1
        if not any(mask[1:]):  # position 0 is never predicted
            split.dropped_no_target += 1
            continue
        split.examples.append({"input_ids": ids, "labels": [t if m else IGNORE for t, m in zip(ids, mask)]})
    if not split.examples:
        raise DataError(
            f"{path}: no assistant tokens to train on after masking ({split.records} records, "
            f"{split.dropped_overlong} dropped as longer than sft.max_seq_len={max_seq_len}, "
            f"{split.dropped_no_target} without assistant tokens); the file needs assistant turns")
    return split


class PadCollator:
    """Pads each batch to its own longest sequence (right padding; labels padded with -100)."""

    def __init__(self, pad_id: int, multiple_of: int = 1):
        self.pad_id, self.multiple_of = pad_id, multiple_of

    def __call__(self, features: Sequence[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        width = -(-width // self.multiple_of) * self.multiple_of
        ids, attention, labels = [], [], []
        for f in features:
            pad = width - len(f["input_ids"])
            ids.append(f["input_ids"] + [self.pad_id] * pad)
            attention.append([1] * len(f["input_ids"]) + [0] * pad)
            labels.append(f["labels"] + [IGNORE] * pad)
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(attention), "labels": torch.tensor(labels)}


class LengthBucketBatchSampler:
    """Batches of similar-length sequences in a shuffled order, the same for the same (seed, epoch).

    Per epoch: shuffle all indices, cut them into buckets of `BUCKET_BATCHES` batches, sort each bucket by
    length, cut it into batches, shuffle the batches. With `group_by_length=False` the batches are simply
    consecutive slices of the shuffled indices (the random-batch baseline).
    """

    drop_last = False  # read by accelerate's BatchSamplerShard

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, group_by_length: bool = True):
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed
        self.group_by_length, self.epoch = group_by_length, 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer (also when it resumes) before each epoch's iteration."""
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        rng = random.Random(f"{self.seed}:{self.epoch}")
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        if not self.group_by_length:
            return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        size = self.batch_size * BUCKET_BATCHES
        batches = []
        for start in range(0, len(order), size):
            bucket = sorted(order[start:start + size], key=lambda i: self.lengths[i])
            batches += [bucket[i:i + self.batch_size] for i in range(0, len(bucket), self.batch_size)]
        # Full batches in random order; the one short batch (if any) last, where accelerate expects it.
        full = [b for b in batches if len(b) == self.batch_size]
        rng.shuffle(full)
        return full + [b for b in batches if len(b) < self.batch_size]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)


def padding_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Share of pad tokens when each batch is padded to its longest sequence."""
    real = sum(lengths[i] for b in batches for i in b)
    total = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - real / total if total else 0.0


# ------------------------------------------------------------------------------------- model bits


class TargetOnlyHead:
    """Forward pre-hook on the output embedding: project only the positions whose next token is a target.

    The model then returns logits of shape [n_targets, vocab] in row-major (batch, position) order, which
    `target_token_loss` pairs with the shifted labels. Left-pads the selection when the model prepends
    virtual tokens (P-Tuning).
    """

    def __init__(self, model: Any):
        self.select = None
        model.get_output_embeddings().register_forward_pre_hook(self._pre_hook)

    def _pre_hook(self, module: Any, args: tuple) -> tuple | None:
        if self.select is None:
            return None
        import torch.nn.functional as F

        hidden, select = args[0], self.select
        if hidden.shape[1] > select.shape[1]:
            select = F.pad(select, (hidden.shape[1] - select.shape[1], 0))
        return (hidden[select], *args[1:])

    @contextlib.contextmanager
    def only(self, labels: Any) -> Iterator[None]:
        """Within the block, forward passes compute logits only where labels[:, t + 1] is a target."""
        import torch.nn.functional as F

        self.select = F.pad(labels[:, 1:] != IGNORE, (0, 1))
        try:
            yield
        finally:
            self.select = None


def target_token_loss(outputs: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
    """Summed NLL of the target tokens over the accumulated batch's target count (Trainer's GA-exact loss)."""
    import torch.nn.functional as F

    targets = labels[:, 1:][labels[:, 1:] != IGNORE]
    nll = F.cross_entropy(outputs.logits.float(), targets, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else targets.numel()
    return nll / max(count, 1) if isinstance(count, int) else nll / count.clamp(min=1)


def linear_module_names(model: Any) -> list[str]:
    import torch

    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def check_lora_targets(model: Any, targets: Sequence[str]) -> None:
    """A target that matches no module is a ConfigError listing what the model has."""
    if list(targets) == ["all-linear"]:
        return
    names = [name for name, _ in model.named_modules()]
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in names):
            raise ConfigError(f"sft.lora.target_modules: the model has no module {target!r}; its linear modules are "
                              f"{', '.join(linear_module_names(model))} (or use ['all-linear'])")


def wrap_model(model: Any, cfg: SFTConfig) -> Any:
    """The trainable model for `cfg.method` (PEFT wrapper, or the model itself for `full`)."""
    if cfg.method == "full":
        return model
    from peft import LoraConfig, PromptEncoderConfig, get_peft_model

    if cfg.method == "lora":
        check_lora_targets(model, cfg.lora.target_modules)
        targets = cfg.lora.target_modules
        peft_cfg = LoraConfig(task_type="CAUSAL_LM", r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                              lora_dropout=cfg.lora.dropout,
                              target_modules="all-linear" if targets == ["all-linear"] else list(targets))
    else:
        peft_cfg = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.ptuning.num_virtual_tokens,
                                       encoder_hidden_size=cfg.ptuning.encoder_hidden_size)
    return get_peft_model(model, peft_cfg)


def resolve_device(cfg: SFTConfig) -> str:
    """cpu or cuda; GPU-only settings without a GPU are a ConfigError."""
    import torch

    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise ConfigError("sft.device is 'cuda' but no CUDA GPU is visible; set sft.device: auto (or cpu)")
    device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and cuda) else "cpu"
    if cfg.mixed_precision != "no" and device == "cpu":
        raise ConfigError(f"sft.mixed_precision: {cfg.mixed_precision} needs a CUDA GPU and this run is on CPU "
                          "(no GPU visible or sft.device: cpu); set sft.mixed_precision: no")
    return device


# ------------------------------------------------------------------------------------- trainer


class ThroughputMeter:
    """Real (non-pad) and padded tokens of the training micro-batches, and time spent in optimizer steps."""

    def __init__(self) -> None:
        self.real = self.padded = 0
        self.seconds = 0.0
        self.steps: list[tuple[int, int, float]] = []  # (real tokens, padded tokens, seconds) per optimizer step
        self._step_start = 0.0
        self._step_real = self._step_padded = 0

    def count(self, attention_mask: Any) -> None:
        self._step_real += int(attention_mask.sum())
        self._step_padded += attention_mask.numel()

    def begin(self) -> None:
        self._step_start = time.perf_counter()

    def end(self) -> None:
        took = time.perf_counter() - self._step_start
        self.steps.append((self._step_real, self._step_padded, took))
        self.real += self._step_real
        self.padded += self._step_padded
        self.seconds += took
        self._step_real = self._step_padded = 0


def make_trainer_class():
    """The Trainer subclass (built lazily: transformers is imported only when training)."""
    from torch.utils.data import DataLoader
    from transformers import Trainer, TrainerCallback

    class MeterCallback(TrainerCallback):
        def __init__(self, meter: ThroughputMeter):
            self.meter = meter

        def on_step_begin(self, args, state, control, **kwargs):
            self.meter.begin()

        def on_step_end(self, args, state, control, **kwargs):
            self.meter.end()

    class BucketedTrainer(Trainer):
        """Trainer with length-bucketed batches, target-only logits and a throughput meter."""

        def __init__(self, *args: Any, group_by_length: bool = True, **kwargs: Any):
            super().__init__(*args, compute_loss_func=target_token_loss, **kwargs)
            self.group_by_length = group_by_length
            self.head = TargetOnlyHead(self.model)
            self.meter = ThroughputMeter()
            self.add_callback(MeterCallback(self.meter))

        def get_train_dataloader(self) -> DataLoader:
            lengths = [len(e["input_ids"]) for e in self.train_dataset]
            sampler = LengthBucketBatchSampler(lengths, self.args.per_device_train_batch_size,
                                               self.args.data_seed, self.group_by_length)
            loader = DataLoader(self.train_dataset, batch_sampler=sampler, collate_fn=self.data_collator,
                                num_workers=self.args.dataloader_num_workers,
                                pin_memory=self.args.dataloader_pin_memory)
            return self.accelerator.prepare(loader)

        def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
            self.meter.count(inputs["attention_mask"])
            return super().training_step(model, inputs, num_items_in_batch)

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            with self.head.only(inputs["labels"]):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    return BucketedTrainer


def training_args(cfg: SFTConfig, output_dir: Path, device: str, progress: bool) -> Any:
    from transformers import TrainingArguments

    checkpointing = {}
    if cfg.gradient_checkpointing:  # renamed activation_checkpointing in transformers 5.x
        name = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
            else "gradient_checkpointing"
        checkpointing = {name: True, f"{name}_kwargs": {"use_reentrant": False}}
    return TrainingArguments(
        output_dir=str(output_dir), max_steps=cfg.max_steps, per_device_train_batch_size=cfg.per_device_batch_size,
        per_device_eval_batch_size=cfg.per_device_batch_size, gradient_accumulation_steps=cfg.grad_accum_steps,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        bf16=cfg.mixed_precision == "bf16", fp16=cfg.mixed_precision == "fp16",
        logging_steps=1, eval_strategy="steps" if cfg.eval_steps else "no", eval_steps=cfg.eval_steps or None,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=2,
        seed=cfg.seed, data_seed=cfg.seed, use_cpu=device == "cpu", report_to="none", disable_tqdm=not progress,
        remove_unused_columns=False, label_names=["labels"], prediction_loss_only=True,
        dataloader_pin_memory=device == "cuda", ddp_find_unused_parameters=False, **checkpointing,
    )


# ----------------------------------------------------------------------------- checkpoints, files


def fingerprint(params: Params) -> str:
    """Identity of a training run: what must match for a checkpoint to be resumed."""
    cfg = {k: v for k, v in dataclasses.asdict(params.sft).items() if k not in NOT_FINGERPRINTED}
    model_dir, data_dir = Path(params.model.dir), Path(params.mix.out_dir)
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    update_with_folder(digest, model_dir)
    for name in ("train.jsonl", "val.jsonl"):
        digest.update(hashlib.sha256((data_dir / name).read_bytes()).digest())
    return digest.hexdigest()


def update_with_folder(digest: Any, folder: Path) -> None:
    """A model or adapter folder's identity: weights by size (hashing GBs is slow), small json files by content."""
    for f in sorted(folder.glob("*")):
        if f.is_file():
            digest.update(f"{f.name}:{f.stat().st_size}".encode())
            if f.suffix == ".json":
                digest.update(f.read_bytes())


def complete_checkpoints(folder: Path, prefix: str = "checkpoint-", last_file: str = "trainer_state.json") -> list[Path]:
    """<prefix>N folders whose `last_file` (written last) exists, oldest first."""
    found = [p for p in folder.glob(prefix + "*") if p.name.split("-")[-1].isdigit()]
    return sorted((p for p in found if (p / last_file).exists()), key=lambda p: int(p.name.split("-")[-1]))


def prepare_out_dir(out: Path, run_id: str, stage: str = "sft", marker: str = MARKER,
                    prefix: str = "checkpoint-", last_file: str = "trainer_state.json") -> Path | None:
    """Claim `out` for `stage`, drop checkpoints of another run and stale outputs; returns the checkpoint to resume."""
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()) and not (out / marker).exists():
        raise ConfigError(f"{stage}.out_dir: {out} is not empty and was not written by the {stage} stage; "
                          "choose a new folder or empty it")
    ckpts = out / CHECKPOINTS
    saved = ckpts / FINGERPRINT
    if ckpts.exists() and (not saved.exists() or saved.read_text() != run_id):
        log.warning("%s: %s holds checkpoints of another config or data; starting over", stage, ckpts)
        shutil.rmtree(ckpts)
    for child in out.iterdir():  # a new run replaces the previous outputs (a method change leaves none behind)
        if child.name not in (CHECKPOINTS, marker):
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    (out / marker).touch()
    ckpts.mkdir(exist_ok=True)
    saved.write_text(run_id)
    done = complete_checkpoints(ckpts, prefix, last_file)
    for partial in set(ckpts.glob(prefix + "*")) - set(done):  # killed while saving
        shutil.rmtree(partial)
    return done[-1] if done else None


def write_plots(out: Path, history: Sequence[dict[str, Any]]) -> None:
    """plots/train_loss.tsv, val_loss.tsv, learning_rate.tsv from the Trainer's log history."""
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    series = {"train_loss": ("loss", "loss"), "val_loss": ("eval_loss", "val_loss"),
              "learning_rate": ("learning_rate", "learning_rate")}
    for name, (key, column) in series.items():
        rows = {h["step"]: h[key] for h in history if key in h and "step" in h}
        lines = [f"step\t{column}"] + [f"{step}\t{value:.6g}" for step, value in sorted(rows.items())]
        (plots / f"{name}.tsv").write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------- recipe


class SFTRecipe:
    """setup -> train -> evaluate -> save -> cleanup. `run()` does all; the pieces serve tests and benchmarks."""

    def __init__(self, params: Params, progress: bool = True, callbacks: Sequence[Any] = ()):
        self.params, self.cfg, self.progress, self.callbacks = params, params.sft, progress, list(callbacks)
        self.out = Path(self.cfg.out_dir)
        self.trainer: Any = None
        self.resume_from: Path | None = None

    # -- setup
    def setup(self) -> None:
        import torch
        from accelerate import PartialState
        from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

        self.device = resolve_device(self.cfg)
        self.started = time.perf_counter()
        model_dir, data_dir = Path(self.params.model.dir), Path(self.params.mix.out_dir)
        if not (model_dir / "config.json").is_file():
            raise ConfigError(f"model.dir: {model_dir} has no config.json; run the prepare_model stage first")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token  # pad positions are masked by attention and labels
        self.train_split = self._encode(data_dir / "train.jsonl")
        self.val_split = self._encode(data_dir / "val.jsonl", limit=self.cfg.val_samples)
        state = PartialState(cpu=self.device == "cpu")
        run_id = fingerprint(self.params)
        if state.is_main_process:  # one process claims and tidies the folder, the others then read it
            prepare_out_dir(self.out, run_id)
        state.wait_for_everyone()
        done = complete_checkpoints(self.out / CHECKPOINTS)
        self.resume_from = done[-1] if done else None
        set_seed(self.cfg.seed)  # adapter init
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model.config.use_cache = False  # no KV cache while training; restored before saving
        self.model = wrap_model(model, self.cfg)
        self.trainer = self._make_trainer()

    def _encode(self, path: Path, limit: int = 0) -> EncodedSplit:
        split = encode_file(self.tokenizer, path, self.cfg.max_seq_len, self.cfg.overlong, limit)
        if split.overlong:
            log.warning("sft: %s: %d of %d sequences are longer than sft.max_seq_len=%d: %s", path, split.overlong,
                        split.records, self.cfg.max_seq_len,
                        "dropped" if self.cfg.overlong == "drop" else "truncated")
        return split

    def _make_trainer(self) -> Any:
        # Val sorted by length: sequential eval batches then pad little.
        val = sorted(self.val_split.examples, key=lambda e: len(e["input_ids"]))
        trainer_cls = make_trainer_class()
        return trainer_cls(
            model=self.model, args=training_args(self.cfg, self.out / CHECKPOINTS, self.device, self.progress),
            train_dataset=self.train_split.examples, eval_dataset=val,
            data_collator=PadCollator(self.tokenizer.pad_token_id, 8 if self.device == "cuda" else 1),
            callbacks=self.callbacks, group_by_length=self.cfg.group_by_length,
        )

    # -- train / evaluate
    def train(self) -> Any:
        if self.resume_from:
            log.warning("sft: resuming from %s", self.resume_from)
        return self.trainer.train(resume_from_checkpoint=str(self.resume_from) if self.resume_from else None)

    def evaluate(self) -> float:
        """Val loss after training (reuses the last in-training evaluation when it was at the final step)."""
        state = self.trainer.state
        last = [h for h in state.log_history if "eval_loss" in h]
        if last and last[-1].get("step") == state.global_step:
            return last[-1]["eval_loss"]
        return self.trainer.evaluate()["eval_loss"]

    # -- save
    def save(self, val_loss: float) -> dict[str, Any]:
        """Write the adapter/model, tokenizer, metrics.json, plots and resolved params; returns the metrics."""
        trainer = self.trainer
        base = trainer.accelerator.unwrap_model(trainer.model)
        getattr(base, "get_base_model", lambda: base)().config.use_cache = True
        trainer.save_model(str(self.out))
        metrics = self.metrics(val_loss)
        if trainer.is_world_process_zero():
            self.tokenizer.save_pretrained(self.out)
            write_plots(self.out, trainer.state.log_history)
            (self.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
            save_resolved(self.params, self.out)
        return metrics

    def metrics(self, val_loss: float) -> dict[str, Any]:
        import torch

        trainer, meter = self.trainer, self.trainer.meter
        # Every process counted its own batches; the run's throughput is their sum over the slowest time.
        counts = torch.tensor([meter.real, meter.padded, meter.seconds], dtype=torch.float64,
                              device=trainer.args.device)
        real, padded, _ = trainer.accelerator.reduce(counts.clone(), "sum").tolist()
        seconds = trainer.accelerator.reduce(counts[2:].clone(), "max").item()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return {
            "method": self.cfg.method, "steps": trainer.state.global_step,
            "train_loss": round(losses[-1], 5) if losses else None, "val_loss": round(val_loss, 5),
            "tokens_per_second": round(real / seconds, 2) if seconds else None,
            "train_tokens": int(real), "padding_pct": round(100 * (1 - real / padded), 2) if padded else 0.0,
            "wall_seconds": round(time.perf_counter() - self.started, 2), "train_seconds": round(seconds, 2),
            "resumed_from_step": int(self.resume_from.name.split("-")[-1]) if self.resume_from else 0,
            "trainable_params": trainable, "device": self.device, "processes": trainer.accelerator.num_processes,
            "train_data": self.train_split.stats(), "val_data": self.val_split.stats(),
            "overlong_action": self.cfg.overlong,
        }

    # -- cleanup
    def cleanup(self, success: bool) -> None:
        """Free the model; after a successful run delete the checkpoints (they only serve resuming)."""
        if success and not self.cfg.keep_checkpoints and self.trainer and self.trainer.is_world_process_zero():
            shutil.rmtree(self.out / CHECKPOINTS, ignore_errors=True)
        self.trainer = self.model = None

    def run(self) -> dict[str, Any]:
        success = False
        try:
            self.setup()
            self.train()
            metrics = self.save(self.evaluate())
            success = True
            return metrics
        finally:
            self.cleanup(success)


def sft(params: Params, progress: bool = True, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train per params.sft and write every output; returns the metrics."""
    return SFTRecipe(params, progress, callbacks).run()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from cmat_pipeline.cli import stage_args

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params, args = stage_args(__doc__.splitlines()[0], argv)
    metrics = sft(params, progress=not args.no_progress)
    from accelerate import PartialState

    if PartialState().is_main_process:  # one summary line per run, not per GPU
            print(json.dumps({k: metrics[k] for k in ("method", "steps", "train_loss", "val_loss", "tokens_per_second",
                                                  "padding_pct", "wall_seconds")}))
    return metrics


if __name__ == "__main__":
    import sys

    from cmat_pipeline.cli import main as cli_main

    sys.exit(cli_main(["sft", *sys.argv[1:]]))
