"""Benchmark: SFT training throughput, the sft stage's trainer vs a plain HF Trainer, side by side.

Run (after the data pipeline has written train.jsonl; keep the machine otherwise idle):
    .venv/bin/python bench/sft_throughput.py --model artifacts/model --train artifacts/data/final/train.jsonl --steps 8
    .venv/bin/python bench/sft_throughput.py --model tiny --steps 8      # quick check on the tiny random model
Both runs train the same LoRA (sft.lora in --params) on the same base model, over the same sequences
(steps x batch-size conversations drawn from --train with --seed, each seen once) with the same batch size,
learning rate and device:
  (a) `sft_stage`: the sft stage's trainer: length-bucketed batches, per-batch padding, logits only on
      assistant tokens;
  (b) `plain_trainer`: `transformers.Trainer` with random batches padded to their longest sequence by
      DataCollatorForSeq2Seq and the model's own loss.
Prints (and writes to --out/report.json) the real (non-pad) tokens per second of each, their padding share
and the ratio a/b. Only time inside optimizer steps counts; an untimed forward/backward warms up first.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from cmat_pipeline.chat_format import encode_chat
from cmat_pipeline.config import Params, load_params, profile_params
from cmat_pipeline.data.records import read_jsonl, write_jsonl
from cmat_pipeline.sft import IGNORE, SFTRecipe, ThroughputMeter, encode_file, resolve_device, wrap_model


def pick_sequences(train: Path, tokenizer: Any, n: int, max_seq_len: int, seed: int, into: Path) -> None:
    """n records of `train` that fit max_seq_len, drawn with `seed`, written as train.jsonl and val.jsonl."""
    records = read_jsonl(train)
    random.Random(seed).shuffle(records)
    chosen = []
    for record in records:
        if len(chosen) == n:
            break
        enc = encode_chat(tokenizer, record["messages"])
        if len(enc.input_ids) <= max_seq_len and enc.assistant_tokens:
            chosen.append(record)
    if len(chosen) < n:
        raise SystemExit(f"{train}: only {len(chosen)} records fit {max_seq_len} tokens; lower --steps or --batch-size")
    write_jsonl(into / "train.jsonl", chosen)
    write_jsonl(into / "val.jsonl", chosen[:2])


def summary(meter: ThroughputMeter) -> dict[str, Any]:
    return {"tokens_per_second": round(meter.real / meter.seconds, 2), "real_tokens": meter.real,
            "padded_tokens": meter.padded, "padding_pct": round(100 * (1 - meter.real / meter.padded), 2),
            "seconds": round(meter.seconds, 2), "steps": len(meter.steps)}


def run_sft_stage(params: Params) -> dict[str, Any]:
    recipe = SFTRecipe(params, progress=False)
    recipe.setup()
    try:
        recipe.train()
        return summary(recipe.trainer.meter)
    finally:
        recipe.cleanup(success=False)


def run_plain_trainer(params: Params, out: Path) -> dict[str, Any]:
    """The baseline: stock Trainer, RandomSampler, DataCollatorForSeq2Seq, the model's own loss."""
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainerCallback, TrainingArguments, set_seed)

    cfg, meter = params.sft, ThroughputMeter()
    tokenizer = AutoTokenizer.from_pretrained(params.model.dir)
    examples = encode_file(tokenizer, Path(params.mix.out_dir) / "train.jsonl", cfg.max_seq_len, "drop").examples
    for e in examples:
        e["attention_mask"] = [1] * len(e["input_ids"])
    set_seed(cfg.seed)
    model = wrap_model(AutoModelForCausalLM.from_pretrained(params.model.dir, dtype=torch.float32), cfg)
    model.config.use_cache = False
    pad = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE)

    def collate(features: list[dict]) -> dict:
        batch = pad(features)
        meter.count(batch["attention_mask"])
        return batch

    class Timer(TrainerCallback):
        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            meter.begin()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            meter.end()

    args = TrainingArguments(
        output_dir=str(out), max_steps=cfg.max_steps, per_device_train_batch_size=cfg.per_device_batch_size,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_steps,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=cfg.seed,
        use_cpu=resolve_device(cfg) == "cpu", remove_unused_columns=False)
    Trainer(model=model, args=args, train_dataset=examples, data_collator=collate, callbacks=[Timer()]).train()
    return summary(meter)


def warm_up(model_dir: str) -> None:
    """One untimed forward/backward so thread pools and allocators are up before either run is timed."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(resolve_device(profile_params().sft))
    ids = torch.randint(0, model.config.vocab_size, (2, 256), device=model.device)
    model(input_ids=ids, labels=ids).loss.backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="artifacts/model", help="model folder, or `tiny` for the tiny random model")
    parser.add_argument("--train", default="artifacts/data/final/train.jsonl")
    parser.add_argument("--params", default="params.yaml", help="sft.lora, learning rate, seed come from here")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0, help="which sequences are drawn from --train")
    parser.add_argument("--out", default="artifacts/bench/sft_throughput")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = args.model
        if args.model == "tiny":
            from cmat_pipeline.prepare_model import prepare_model

            model_dir = str(prepare_model("tiny-random", tmp / "tiny", seed=0))
        pick_sequences(Path(args.train), AutoTokenizer.from_pretrained(model_dir), args.steps * args.batch_size,
                       args.max_seq_len, args.seed, tmp / "data")
        overrides = [f"model.dir={model_dir}", f"mix.out_dir={tmp / 'data'}", f"sft.out_dir={tmp / 'sft'}",
                     f"sft.max_steps={args.steps}", f"sft.per_device_batch_size={args.batch_size}",
                     "sft.grad_accum_steps=1", "sft.warmup_steps=0", "sft.eval_steps=0", f"sft.save_steps={args.steps + 1}",
                     f"sft.max_seq_len={args.max_seq_len}", "sft.val_samples=2"]
        params = load_params(args.params, overrides) if Path(args.params).exists() else \
            load_params(_write_default(tmp), overrides)
        warm_up(model_dir)
        runs = {"sft_stage": run_sft_stage(params), "plain_trainer": run_plain_trainer(params, tmp / "plain")}
    report = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
        f"{'cuda' if torch.cuda.is_available() else 'cpu'}", "model": args.model, "train": args.train,
        "sequences": args.steps * args.batch_size, "batch_size": args.batch_size, "steps": args.steps, **runs,
        "speedup": round(runs["sft_stage"]["tokens_per_second"] / runs["plain_trainer"]["tokens_per_second"], 2),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def _write_default(tmp: Path) -> Path:
    from cmat_pipeline.config import dump_params

    path = tmp / "params.yaml"
    path.write_text(dump_params(profile_params()))
    return path


if __name__ == "__main__":
    main()
