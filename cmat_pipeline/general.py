"""`general` stage: the general-instruction data mixed into training (keeps the model's general ability).

Run it:
    python -m cmat_pipeline.general          # or: cmat general [--set mix.general_file=my_chats.jsonl]
With `mix.general_file` set, that file (ShareGPT / OpenAI messages; json, jsonl or parquet) is imported.
Without it, the base model answers `mix.self_distill_prompts` built-in general prompts (self-distillation:
training on its own answers holds its general behaviour in place while it learns agent tasks); answers
cut at `mix.general_max_new_tokens` are quarantined rather than taught.
Writes to mix.general_dir: general.jsonl, quarantine.jsonl, report.json, resolved_params.yaml. It depends on
the model and these params only, so changing agent data does not rerun it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

from cmat_pipeline.config import Params, save_resolved
from cmat_pipeline.data.boundaries import quarantine_entry, write_stage_outputs
from cmat_pipeline.data.records import make_record
from cmat_pipeline.runtime.policy import Policy

STAGE = "general"


def builtin_prompts() -> list[str]:
    text = resources.files("cmat_pipeline.data").joinpath("general_prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def self_distill(params: Params, policy: Policy | None = None) -> tuple[list[dict], list[dict]]:
    """The model's answers to the built-in prompts; answers cut by the token limit are quarantined."""
    from cmat_pipeline.runtime.policy import HFPolicy

    cfg = params.mix
    gen = dataclasses.replace(params.generation, max_new_tokens=cfg.general_max_new_tokens, temperature=0.0)
    policy = policy or HFPolicy(params.model.dir, gen, device=params.model.device, dtype=params.model.dtype)
    prompts = builtin_prompts()[:cfg.self_distill_prompts]
    kept, cut = [], []
    for start in range(0, len(prompts), gen.batch_size):
        batch = prompts[start:start + gen.batch_size]
        outputs = policy.generate([[{"role": "user", "content": p}] for p in batch])
        for prompt, output in zip(batch, outputs):
            answer = (output.text or "").strip()
            record = make_record(domain="general", source="self-distill", teacher=getattr(policy, "name", "model"),
                                 task_type="general", question=prompt, outcome="completed", correct=bool(answer),
                                 reward=1.0 if answer else 0.0,
                                 messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])
            if not answer:
                cut.append(quarantine_entry(STAGE, "empty answer", record))
            elif output.completion_tokens >= gen.max_new_tokens:
                cut.append(quarantine_entry(STAGE, f"answer cut at mix.general_max_new_tokens={gen.max_new_tokens}", record))
            else:
                kept.append(record)
    return kept, cut


def import_general(path: str) -> tuple[list[dict], list[dict]]:
    from cmat_pipeline.data.importers import import_conversations

    records, rejected = import_conversations(path, domain="general")
    return records, [quarantine_entry(STAGE, r.reason, r.raw, r.where) for r in rejected]


def general(params: Params, policy: Policy | None = None) -> dict[str, Any]:
    """Build general.jsonl; returns the report."""
    cfg, start = params.mix, time.perf_counter()
    out = Path(cfg.general_dir)
    if cfg.general_file:
        kept, rejected = import_general(cfg.general_file)
        source, rows_in = cfg.general_file, len(kept) + len(rejected)
    else:
        kept, rejected = self_distill(params, policy)
        source, rows_in = "self-distillation", min(cfg.self_distill_prompts, len(builtin_prompts()))
    out.mkdir(parents=True, exist_ok=True)
    report = write_stage_outputs(out, kept, rejected, {"source": source,
                                                       "wall_seconds": round(time.perf_counter() - start, 2)},
                                 rows_in=rows_in, kept_name="general.jsonl")
    save_resolved(params, out)
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from cmat_pipeline.cli import stage_args

    params, _ = stage_args(__doc__.splitlines()[0], argv)
    report = general(params)
    print(json.dumps({k: report[k] for k in ("source", "kept", "quarantined")}))
    return report


if __name__ == "__main__":
    import sys

    from cmat_pipeline.cli import main as cli_main

    sys.exit(cli_main(["general", *sys.argv[1:]]))
