"""`distill` stage: a rationale before every action, then the most valuable samples up to a target size.

Run it:
    python -m cmat_pipeline.distill          # or: cmat distill [--set distill.target_size=2000]
1. Rationales (the paper's knowledge distillation): every DB action turn that arrives without a thought
   (e.g. from an imported dataset or a terse teacher) gets one, written by the `openai` teacher when
   `distill.rationales: openai`, else from the SQL's parse tree (rationales.py).
2. Selection (when `distill.target_size` > 0): quotas per task type, and inside each type a k-center
   greedy walk over question embeddings (diversity), bent toward samples the student finds hard when
   `distill.difficulty: student_loss` (mean loss of model.dir on the assistant tokens).
Writes to distill.out_dir: trajectories.jsonl, quarantine.jsonl (samples not selected, with the reason),
report.json, docs/ (Data Docs of the `distilled` suite), resolved_params.yaml.
"""

from __future__ import annotations

import copy
import json
import random
import re
import time
from pathlib import Path
from typing import Any, Sequence

from cmat_pipeline.config import Params, save_resolved
from cmat_pipeline.data.boundaries import EvalIndex, check_boundary, quarantine_entry, write_stage_outputs
from cmat_pipeline.data.records import read_jsonl
from cmat_pipeline.data.teachers import PREAMBLE

STAGE = "distill"
MIN_THOUGHT_CHARS = 12
RATIONALE_PROMPT = (
    "You are helping an agent that operates a MySQL database. Here is the task and the conversation so far, "
    "followed by the agent's next action. In one or two sentences, explain the reasoning that leads to this "
    "action. Reply with the explanation only.\n\nTask:\n{question}\n\nSo far:\n{history}\n\nNext action:\n{action}"
)


def thoughtless_turns(record: dict[str, Any]) -> list[int]:
    """Positions of DB assistant action turns with no real thought before `Action:`."""
    if record.get("domain") != "db":
        return []
    out = []
    for i, msg in enumerate(record["messages"][PREAMBLE:], start=PREAMBLE):
        if msg["role"] == "assistant" and "Action:" in msg["content"]:
            thought = msg["content"].split("Action:", 1)[0].strip()
            if len(thought) < MIN_THOUGHT_CHARS:
                out.append(i)
    return out


def _action_part(content: str) -> str:
    return "Action:" + content.split("Action:", 1)[1]


def _template_thought(content: str, rng: random.Random) -> str:
    from cmat_pipeline.data.rationales import explain_sql
    from cmat_pipeline.envs.dbbench import parse_action

    action = parse_action(content)
    if action.kind == "operation":
        return explain_sql(action.sql, rng)
    return "The last result answers the question, so I can give the final answer."


def add_rationales(records: list[dict[str, Any]], params: Params) -> dict[str, int]:
    """Insert a thought before every thoughtless action (in place); returns counts by source."""
    todo = [(r, i) for r in records for i in thoughtless_turns(r)]
    counts = {"template": 0, "openai": 0}
    if not todo:
        return counts
    thoughts: list[str | None] = [None] * len(todo)
    if params.distill.rationales == "openai":
        from cmat_pipeline.runtime.policy import OpenAIPolicy

        prompts = [[{"role": "user", "content": RATIONALE_PROMPT.format(
            question=r["question"], action=_action_part(r["messages"][i]["content"]),
            history="\n".join(f"{m['role']}: {m['content']}" for m in r["messages"][PREAMBLE:i]) or "(nothing yet)")}]
            for r, i in todo]
        outputs = OpenAIPolicy(params.openai, params.generation).generate(prompts)
        thoughts = [re.sub(r"\s+", " ", o.text).strip() if o.text and "Action:" not in o.text else None for o in outputs]
    rng = random.Random(0)
    for (record, i), thought in zip(todo, thoughts):
        source = "openai" if thought else "template"
        thought = thought or _template_thought(record["messages"][i]["content"], rng)
        record["messages"][i] = {"role": "assistant", "content": thought + "\n" + _action_part(record["messages"][i]["content"])}
        record["meta"] = dict(record.get("meta", {}), rationale=source)
        counts[source] += 1
    return counts


def student_losses(model_dir: str, records: Sequence[dict[str, Any]], max_tokens: int = 1024,
                   batch_size: int = 8) -> list[float]:
    """Mean loss of the student on each record's assistant tokens (higher = harder for it)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cmat_pipeline.chat_format import encode_chat
    from cmat_pipeline.runtime.scoring import mean_nll_per_row

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [encode_chat(tokenizer, r["messages"]) for r in records]
    losses: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            batch = [(e.input_ids[:max_tokens], e.assistant_mask[:max_tokens]) for e in encoded[start:start + batch_size]]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in batch])
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
            target = torch.tensor([m + [0] * (width - len(m)) for _, m in batch])
            losses.extend(mean_nll_per_row(model, ids, mask, target).tolist())
    return losses


def selection_text(record: dict[str, Any]) -> str:
    """What a sample is about: a DB task's own question, without the boilerplate naming table and headers
    (it is near-identical across tasks, dilutes the embedding and costs 3x the encoding time)."""
    task = record.get("task")
    if isinstance(task, dict) and isinstance(task.get("description"), str):
        return task["description"]
    return record["question"]


def select(records: list[dict[str, Any]], params: Params) -> tuple[list[int], dict[str, Any]]:
    """Indices of the records to keep, and selection statistics."""
    import numpy as np

    from cmat_pipeline.data.similarity import TextEncoder, select_diverse

    cfg = params.distill
    if not cfg.target_size or cfg.target_size >= len(records):
        return list(range(len(records))), {"selected": len(records), "selection": "all (no target_size)"}
    embeddings = TextEncoder(cfg.embedding_model, max_length=64).encode([selection_text(r) for r in records])
    difficulty = None
    if cfg.difficulty == "student_loss":
        difficulty = np.asarray(student_losses(params.model.dir, records), dtype=np.float32)
    keep = select_diverse(embeddings, cfg.target_size, strata=[r["task_type"] for r in records],
                          difficulty=difficulty, difficulty_weight=cfg.difficulty_weight)
    stats: dict[str, Any] = {"selected": len(keep), "selection": f"diversity+{cfg.difficulty}"}
    if difficulty is not None:
        chosen = np.zeros(len(records), dtype=bool)
        chosen[keep] = True
        stats["mean_student_loss_selected"] = round(float(difficulty[chosen].mean()), 4)
        stats["mean_student_loss_dropped"] = round(float(difficulty[~chosen].mean()), 4) if (~chosen).any() else None
    return keep, stats


def distill(params: Params) -> dict[str, Any]:
    """Distill the augmented trajectories; returns the report."""
    from cmat_pipeline.data.expectations import SuiteSpec

    cfg, start = params.distill, time.perf_counter()
    out = Path(cfg.out_dir)
    records = read_jsonl(Path(params.augment.out_dir) / "trajectories.jsonl")
    rows_in = len(records)
    records = [copy.deepcopy(r) for r in records]
    rationales = add_rationales(records, params)
    keep, stats = select(records, params)
    chosen = set(keep)
    kept = [records[i] for i in keep]
    dropped = [quarantine_entry(STAGE, f"not selected: target_size {cfg.target_size}", r)
               for i, r in enumerate(records) if i not in chosen]
    evals = EvalIndex.from_files(params.filter.decontaminate)
    spec = SuiteSpec("distilled", max_chars=params.filter.max_chars,
                     require_correct=params.filter.require_correct,
                     eval_question_keys=evals.frozen_keys())
    report = write_stage_outputs(out, kept, dropped, {
        "rationales_added": rationales, **stats, "wall_seconds": round(time.perf_counter() - start, 2)},
        check=lambda rows: check_boundary(rows, spec, out / "docs", f"{out}/trajectories.jsonl"),
        rows_in=rows_in)
    save_resolved(params, out)
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from cmat_pipeline.cli import stage_args

    params, _ = stage_args(__doc__.splitlines()[0], argv)
    report = distill(params)
    print(json.dumps({k: report[k] for k in ("rows_in", "kept", "rationales_added", "selection")}))
    return report


if __name__ == "__main__":
    import sys

    from cmat_pipeline.cli import main as cli_main

    sys.exit(cli_main(["distill", *sys.argv[1:]]))
