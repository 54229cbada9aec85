"""`mix` stage: agent trajectories + general data at `mix.general_ratio`, split into train and validation.

Run it:
    python -m cmat_pipeline.mix              # or: cmat mix [--set mix.general_ratio=0]
Table V of the paper: `mix.general_ratio` 0 is agent-only, 1 general-only, anything between both.
The split is by task group (a task and its augmented copies land on the same side), deterministic in
`mix.seed`. Both files pass the strict `train` / `val` suites (train also checks every agent task type's
share among the agent samples against `mix.type_share`). The dataset card gathers counts by type, domain,
source and teacher, length histograms, and every upstream stage's rejection reasons.
Writes to mix.out_dir: train.jsonl, val.jsonl, card.json (DVC metrics), card.md, lengths.png, docs/,
resolved_params.yaml.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

from cmat_pipeline.config import Params, save_resolved
from cmat_pipeline.data.boundaries import EvalIndex, check_boundary
from cmat_pipeline.data.records import read_jsonl, record_chars, write_jsonl
from cmat_pipeline.errors import DataError


def group_of(record: dict[str, Any]) -> str:
    meta = record.get("meta") or {}
    return str(meta.get("group") or meta.get("augmented_from") or meta.get("task_id") or record["id"])


def in_validation(group: str, fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}:{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def mix_records(agent: list[dict], general: list[dict], ratio: float, seed: int) -> tuple[list[dict], dict[str, Any]]:
    """Agent records plus enough general ones for `ratio` (capped by what exists; never repeated).
    ratio 1 is the general-only arm of the paper's Table V: every general record and no agent record."""
    if ratio >= 1:
        if not general:
            raise DataError("mix: mix.general_ratio=1 (general only) but the general stage produced no samples")
        agent, wanted = [], len(general)
    else:
        wanted = round(ratio / (1 - ratio) * len(agent)) if ratio else 0
    rng = random.Random(seed)
    chosen = rng.sample(general, min(wanted, len(general)))
    mixed = agent + chosen
    achieved = len(chosen) / len(mixed) if mixed else 0.0
    return mixed, {"agent_used": len(agent), "general_wanted": wanted, "general_used": len(chosen),
                   "general_ratio": round(achieved, 4)}


def split(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    train, val = [], []
    for record in records:
        (val if in_validation(group_of(record), fraction, seed) else train).append(record)
    if records and (not train or not val):
        raise DataError(f"mix: {len(records)} samples cannot be split into non-empty train and validation sets "
                        f"with mix.val_fraction={fraction}; collect more data or change the fraction")
    return train, val


def upstream_rejections(params: Params) -> dict[str, dict[str, int]]:
    """Quarantine reasons of every stage that ran, from their report.json files."""
    reports = {"filter": params.filter.out_dir, "augment": params.augment.out_dir,
               "distill": params.distill.out_dir, "general": params.mix.general_dir}
    out = {}
    for stage, folder in reports.items():
        path = Path(folder) / "report.json"
        if path.exists():
            out[stage] = json.loads(path.read_text()).get("quarantine_reasons", {})
    return out


def _bin_width(longest: int, bins: int = 12) -> int:
    """The smallest round width (1, 2 or 5 times a power of ten) that fits 0..`longest` into `bins` bins."""
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * 10**exponent * bins > longest:
                return mantissa * 10**exponent
        exponent += 1


def length_histogram(lengths: list[int], width: int) -> dict[str, int]:
    """Samples per character-count bin, "lo-hi" keys in order (the card's numeric length histogram)."""
    counts = Counter(n // width for n in lengths)
    bins = range(min(counts, default=0), max(counts, default=-1) + 1)
    return {f"{b * width}-{(b + 1) * width - 1}": counts[b] for b in bins}


def build_card(train: list[dict], val: list[dict], mix_stats: dict[str, Any], params: Params) -> dict[str, Any]:
    def counts(rows: list[dict], key: str) -> dict[str, int]:
        return dict(sorted(Counter(str(r.get(key)) for r in rows).items()))

    lengths = [record_chars(r) for r in train]
    turns = [sum(m["role"] == "assistant" for m in r["messages"]) for r in train]
    return {
        "train": len(train), "val": len(val), **mix_stats,
        "by_type": counts(train, "task_type"), "by_domain": counts(train, "domain"),
        "by_source": dict(sorted(Counter(str(r.get("source")).split(":")[0] for r in train).items())),
        "by_teacher": counts(train, "teacher"), "val_by_type": counts(val, "task_type"),
        "chars": {"min": min(lengths, default=0), "mean": round(sum(lengths) / max(len(lengths), 1), 1),
                  "max": max(lengths, default=0)},
        "length_histogram": length_histogram(lengths, _bin_width(max(lengths, default=0))),
        "assistant_turns": dict(sorted(Counter(turns).items())),
        "rejections": upstream_rejections(params),
    }


def render_card(card: dict[str, Any]) -> str:
    def table(title: str, data: dict) -> list[str]:
        return [f"### {title}", "", "| key | count |", "|---|---|", *[f"| {k} | {v} |" for k, v in data.items()], ""]

    lines = ["# Dataset card", "",
             f"train: **{card['train']}** samples, validation: **{card['val']}** "
             f"({card['agent_used']} agent samples; general share {card['general_ratio']}, {card['general_used']} "
             f"of {card['general_wanted']} wanted).", "",
             f"Characters per sample: min {card['chars']['min']}, mean {card['chars']['mean']}, max {card['chars']['max']}.",
             "", "![lengths](lengths.png)", ""]
    for title, key in (("By task type", "by_type"), ("By domain", "by_domain"), ("By source", "by_source"),
                       ("By teacher", "by_teacher"), ("Characters per sample", "length_histogram"),
                       ("Assistant turns per sample", "assistant_turns")):
        lines += table(title, card[key])
    for stage, reasons in card["rejections"].items():
        lines += table(f"Quarantined by `{stage}`", reasons or {"(none)": 0})
    return "\n".join(lines)


def plot_lengths(train: list[dict], target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.hist([record_chars(r) for r in train], bins=40, color="tab:blue")
    left.set_xlabel("characters per sample")
    left.set_ylabel("samples")
    right.hist([sum(m["role"] == "assistant" for m in r["messages"]) for r in train], bins=range(1, 12),
               color="tab:green", align="left")
    right.set_xlabel("assistant turns per sample")
    fig.tight_layout()
    fig.savefig(target, dpi=100)
    plt.close(fig)


def mix(params: Params) -> dict[str, Any]:
    """Write train/val files and the dataset card; returns the card."""
    from cmat_pipeline.data.expectations import SuiteSpec

    cfg, start = params.mix, time.perf_counter()
    out = Path(cfg.out_dir)
    agent = read_jsonl(Path(params.distill.out_dir) / "trajectories.jsonl")
    general_file = Path(cfg.general_dir) / "general.jsonl"
    general = read_jsonl(general_file) if cfg.general_ratio and general_file.exists() else []
    if cfg.general_ratio and not general_file.exists():
        raise DataError(f"{general_file}: missing; run the `general` stage first (mix.general_ratio > 0)")
    mixed, stats = mix_records(agent, general, cfg.general_ratio, cfg.seed)
    train, val = split(mixed, cfg.val_fraction, cfg.seed)
    keys = EvalIndex.from_files(params.filter.decontaminate).frozen_keys()
    common = dict(max_chars=params.filter.max_chars, eval_question_keys=keys)
    check_boundary(train, SuiteSpec("train", type_share=tuple(cfg.type_share), **common), out / "docs", f"{out}/train.jsonl")
    check_boundary(val, SuiteSpec("val", **common), out / "docs", f"{out}/val.jsonl")
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "val.jsonl", val)
    card = build_card(train, val, stats, params)
    card["wall_seconds"] = round(time.perf_counter() - start, 2)
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (out / "card.md").write_text(render_card(card))
    plot_lengths(train, out / "lengths.png")
    save_resolved(params, out)
    return card


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from cmat_pipeline.cli import stage_args

    params, _ = stage_args(__doc__.splitlines()[0], argv)
    card = mix(params)
    print(json.dumps({k: card[k] for k in ("train", "val", "general_ratio", "by_type")}))
    return card


if __name__ == "__main__":
    import sys

    from cmat_pipeline.cli import main as cli_main

    sys.exit(cli_main(["mix", *sys.argv[1:]]))
