"""`prompt-eval` stage (the paper's Table III): one model on AgentBench DB under prompts of different quality.

Run it:
    python -m cmat_pipeline.prompt_eval                      # reads params.yaml
    cmat prompt-eval --set evaluate.limit=20 --set evaluate.adapter=artifacts/sft
Each variant in prompt_eval.variants is one run of the evaluate stage with only evaluate.prompt changed (same
tasks, policy, decoding and scoring; the model is loaded once): `full` = AgentBench's DB prompt (high quality),
`terse` = `envs.dbbench.TERSE_PROMPT` (low quality: the action format said tersely, no rules), `none` = the
question alone. Writes prompt_eval.out_dir/<variant>/ (evaluate's outputs), metrics.json and report.md.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from cmat_pipeline.config import Params, save_resolved
from cmat_pipeline.runtime.policy import Policy

SUMMARY_KEYS = ("overall_cat_accuracy", "SELECT_accuracy", "INSERT_accuracy", "UPDATE_accuracy",
                "first_turn_valid_format", "tasks", "prompt_tokens", "generate_calls", "wall_seconds")


def prompt_eval(params: Params, policy: Policy | None = None, progress: bool = True) -> dict[str, Any]:
    """Evaluate every prompt variant; returns {variant: summary}, also written to metrics.json."""
    from cmat_pipeline.envs.dbbench import load_tasks
    from cmat_pipeline.evaluate import build_policy, evaluate

    out = Path(params.prompt_eval.out_dir)
    policy = policy or build_policy(params, load_tasks(params.evaluate.tasks, params.evaluate.limit))
    summary: dict[str, Any] = {}
    for variant in params.prompt_eval.variants:
        run = dataclasses.replace(params, evaluate=dataclasses.replace(
            params.evaluate, prompt=variant, out_dir=str(out / variant)))
        metrics = evaluate(run, policy=policy, progress=progress)
        summary[variant] = {k: metrics[k] for k in SUMMARY_KEYS} | {"outcomes": metrics["outcomes"]}
    result = {"policy": getattr(policy, "name", "?"), "task_file": params.evaluate.tasks, "variants": summary}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "report.md").write_text(render_report(result))
    save_resolved(params, out)
    return result


def render_report(result: dict[str, Any]) -> str:
    lines = ["# Prompt quality on AgentBench DB (paper Table III)", "",
             f"Policy `{result['policy']}`, tasks `{result['task_file']}`; only the opening prompt differs.", "",
             "| prompt | overall_cat | SELECT | INSERT | UPDATE | first-turn valid format % | completed | "
             "invalid format | prompt tokens / task |", "|---|---|---|---|---|---|---|---|---|"]
    for variant, s in result["variants"].items():
        per_task = round(s["prompt_tokens"] / max(s["tasks"], 1))
        lines.append(f"| {variant} | {s['overall_cat_accuracy']} | {s['SELECT_accuracy']} | {s['INSERT_accuracy']} | "
                     f"{s['UPDATE_accuracy']} | {s['first_turn_valid_format']} | {s['outcomes']['completed']} | "
                     f"{s['outcomes']['invalid_format']} | {per_task} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from cmat_pipeline.cli import stage_args

    params, args = stage_args(__doc__.splitlines()[0], argv)
    result = prompt_eval(params, progress=not args.no_progress)
    print(json.dumps({v: s["overall_cat_accuracy"] for v, s in result["variants"].items()}))
    return result


if __name__ == "__main__":
    import sys

    from cmat_pipeline.cli import main as cli_main

    sys.exit(cli_main(["prompt-eval", *sys.argv[1:]]))
