"""What the evaluation commands (`evaluate`, `evaluate-os`, `evaluate-kg`, `checker-eval`) share: the policy a
params section names, and the output folder every evaluation writes.

    policy = section_policy(params, "kg", oracle=lambda: KGOraclePolicy(tasks))
    write_eval_outputs(Path(cfg.out_dir), params, metrics, results, report_markdown)

Used as a library only (no command of its own).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

from cmat_pipeline.config import Params, save_resolved
from cmat_pipeline.runtime.policy import Policy


def section_policy(params: Params, section: str, **own: Callable[[], Policy]) -> Policy:
    """The policy params.<section>.policy names: `own[kind]()` for a kind only this command has (an oracle,
    `smoa`, `copy`); `openai`: the `openai` endpoint; anything else: the local model in model.dir with
    params.<section>.adapter ('' = the base model)."""
    cfg = getattr(params, section)
    kind, adapter = cfg.policy, cfg.adapter
    if kind in own:
        return own[kind]()
    if kind == "openai":
        from cmat_pipeline.runtime.policy import OpenAIPolicy

        return OpenAIPolicy(params.openai, params.generation)
    from cmat_pipeline.runtime.policy import HFPolicy

    return HFPolicy(params.model.dir, params.generation, adapter=adapter, device=params.model.device,
                    dtype=params.model.dtype, adapter_key=f"{section}.adapter")


def write_eval_outputs(out: Path, params: Params, metrics: dict[str, Any], results: Sequence[dict[str, Any]],
                       report: str, rows_name: str = "trajectories.jsonl") -> None:
    """metrics.json, one row per episode (`rows_name`), report.md and resolved_params.yaml under `out`."""
    from cmat_pipeline.data.records import write_jsonl

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_jsonl(out / rows_name, results)
    (out / "report.md").write_text(report)
    save_resolved(params, out)
