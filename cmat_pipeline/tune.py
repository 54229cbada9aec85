"""`cmat` stage: CMAT actor-critic tuning of the SFT policy with the Checker in the loop (paper eqs. 3-8).

Run it:
    python -m cmat_pipeline.tune                 # reads params.yaml (also `cmat cmat`, `dvc repro cmat`)
    cmat cmat --set cmat.iterations=1 --set cmat.episodes=4          # a smoke run
    cmat cmat --set cmat.veto=false              # ablations: veto, value_function, memory, kl_coef=0,
                                                 # reflection_loss_weight=0 (see docs/BENCHMARKS.md)

Each iteration:
  1. the User samples `cmat.episodes` training tasks (cmat.domains: dbbench tasks of mix.out_dir/train.jsonl,
     AgentBench OS training tasks in a sandbox, KG questions over a SPARQL store; curriculum by success);
  2. the Assistant (actor) plays them, batched: every active episode's turn in one `generate` call; the
     Checker verifies each action before it runs (a veto blocks it, shows the feedback, costs veto_reward);
     recalled lessons from long-term memory lead each question;
  3. failed or vetoed episodes get a self-reflection, stored in memory.sqlite (eqs. 6-7);
  4. rewards r_t = feedback_weight * checker reward + task success on the last turn; the critic V(s_t)
     (own adapter + value head) gives TD(0)/GAE advantages (eq. 4) and learns by TD (eq. 5);
  5. the actor takes a clipped policy-gradient step on each turn's tokens weighted by its advantage
     (eq. 3), with a KL penalty to the SFT reference and a supervised term on corrected actions (eq. 8):
     the episode's own fixes, and the Checker's correction of a failed episode's first wrong turn.
A checkpoint (actor, critic, optimisers, memory, User statistics, iteration) is written after every
iteration; run the stage again after a kill and it continues from the last complete iteration, which
replays the interrupted one exactly (per-iteration seeds), so no update is repeated or lost.

Writes to cmat.out_dir: the actor adapter (evaluate's default adapter), critic/, memory.sqlite,
metrics.json (DVC metrics), plots/*.tsv (per-iteration curves), rollouts/iter-N.jsonl, resolved_params.yaml.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from cmat_pipeline.config import Params, save_resolved
from cmat_pipeline.errors import ConfigError, DataError

log = logging.getLogger(__name__)

MARKER = ".cmat_tune"
CHECKPOINT_PREFIX, CHECKPOINT_DONE = "iter-", "state.json"
REFLECTION_TOKENS = 48
PLOTTED = ("mean_reward", "success_rate", "value_loss", "kl", "clip_fraction", "veto_rate", "memory_size",
           "rollout_tokens_per_second", "update_tokens_per_second", "episodes_per_minute")


# ------------------------------------------------------------------------------------- task pool


def load_task_pool(params: Params) -> list[dict[str, Any]]:
    """Every task the User may pose, from each of cmat.domains: never an evaluation split."""
    loaders = {"db": load_db_pool, "os": load_os_pool, "kg": load_kg_pool}
    return [entry for domain in loaders if domain in params.cmat.domains for entry in loaders[domain](params)]


def load_db_pool(params: Params) -> list[dict[str, Any]]:
    """dbbench entries the User may pose: never an evaluation split."""
    cfg = params.cmat
    source = Path(cfg.tasks) if cfg.tasks else Path(params.mix.out_dir) / "train.jsonl"
    if not source.is_file():
        raise DataError(f"{source}: task pool not found (cmat.tasks; '' reads mix.out_dir/train.jsonl: run the mix stage)")
    evaluation = {Path(p).resolve() for p in [params.evaluate.tasks, *params.filter.decontaminate]}
    if source.resolve() in evaluation or "standard" in source.name:
        raise ConfigError(f"cmat.tasks: {source} is an evaluation split; CMAT trains on training tasks only")
    entries, seen, not_tasks, repeated = [], set(), 0, 0
    for lineno, line in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{source}:{lineno}: not valid JSON: {err}") from None
        entry = row.get("task") if cfg.tasks == "" else row
        if not isinstance(entry, dict) or "table" not in entry:
            if cfg.tasks:
                raise DataError(f"{source}:{lineno}: not a dbbench task (no `table`)")
            not_tasks += 1  # general instructions, imported conversations: training data, not playable tasks
            continue
        key = (entry.get("description"), json.dumps(entry.get("table"), sort_keys=True))
        if key in seen:
            repeated += 1
            continue
        seen.add(key)
        entries.append(entry)
    if not entries:
        raise DataError(f"{source}: holds no dbbench tasks for the User to pose")
    log.info("cmat: task pool %s: %d tasks; %d rows hold no playable dbbench task, %d repeat a task", source,
             len(entries), not_tasks, repeated)
    return entries


def load_os_pool(params: Params) -> list[dict[str, Any]]:
    """AgentBench os_interaction training tasks as pool entries {"domain": "os", "type": ["os"], "task": OSTask}.
    Unsupported tasks (a script file that is not shipped) and copies of an evaluation task are left out, counted."""
    from cmat_pipeline.data.records import normalize_question
    from cmat_pipeline.envs.os_interaction import load_os_tasks

    source, evaluation = Path(params.cmat.os_tasks), Path(params.os.tasks)
    if not source.is_file():
        raise DataError(f"{source}: OS task pool not found (cmat.os_tasks)")
    if source.resolve() == evaluation.resolve() or "standard" in source.name:
        raise ConfigError(f"cmat.os_tasks: {source} is an evaluation split (os.tasks); CMAT trains on training tasks only")
    held_out = ({normalize_question(t.description) for t in load_os_tasks(evaluation, params.os.scripts_dir)}
                if evaluation.is_file() else set())
    tasks = load_os_tasks(source)
    playable = [t for t in tasks if not t.unsupported]
    entries = [{"domain": "os", "type": ["os"], "task": t} for t in playable
               if normalize_question(t.description) not in held_out]
    if not entries:
        raise DataError(f"{source}: holds no playable OS task for the User to pose")
    log.info("cmat: OS task pool %s: %d tasks; %d unsupported here, %d also in the evaluation split %s", source,
             len(entries), len(tasks) - len(playable), len(playable) - len(entries), evaluation)
    return entries


def load_kg_pool(params: Params) -> list[dict[str, Any]]:
    """KG training questions as pool entries {"domain": "kg", "type": ["kg"], "task": KGTask}: the embedded graph's
    training questions (cmat.kg_tasks '') or a KG task file, without any question of the KG evaluation."""
    from cmat_pipeline.data.records import normalize_question
    from cmat_pipeline.envs.kg import generated_tasks, load_kg_tasks, training_tasks

    source, evaluation = params.cmat.kg_tasks, params.kg.tasks
    if not source and params.kg.endpoint:
        raise ConfigError(f"cmat.kg_tasks: '' poses the embedded graph's questions, but kg.endpoint is "
                          f"{params.kg.endpoint}; set cmat.kg_tasks to a KG training file for that endpoint")
    if source and ((evaluation and Path(source).resolve() == Path(evaluation).resolve())
                   or Path(source).stem in ("dev", "std", "test") or "standard" in Path(source).name):
        raise ConfigError(f"cmat.kg_tasks: {source} is an evaluation split (kg.tasks, or AgentBench's dev/std); "
                          "CMAT trains on training questions only")
    held_out = load_kg_tasks(evaluation) if evaluation else generated_tasks()
    held = {normalize_question(t.question) for t in held_out}
    tasks = load_kg_tasks(source) if source else training_tasks()
    entries = [{"domain": "kg", "type": ["kg"], "task": t} for t in tasks if normalize_question(t.question) not in held]
    if not entries:
        raise DataError(f"{source or 'the embedded graph'}: holds no KG question for the User to pose")
    log.info("cmat: KG task pool %s: %d questions, %d also in the evaluation", source or "embedded graph",
             len(entries), len(tasks) - len(entries))
    return entries


# ------------------------------------------------------------------------------------- rewards


def turn_rewards(result: dict[str, Any], cfg: Any) -> list[float]:
    """r_t per assistant turn: the Checker's feedback (veto penalty) plus the outcome after the last turn."""
    rewards = [cfg.feedback_weight * float(turn.get("reward", 0.0)) for turn in result["turns"]]
    if rewards:
        rewards[-1] += cfg.success_reward if result["correct"] else cfg.failure_reward
    return rewards


ACTING = ("operation", "answer", "bash", "finish", "tool")  # turn actions of dbbench, OS and KG episodes


def _turn_failed(turn: dict[str, Any]) -> bool:
    """A vetoed turn, an SQL statement that errored, a shell command that exited non-zero, a KG call that failed."""
    if turn.get("vetoed"):
        return True
    if "exit_code" in turn:
        return turn["exit_code"] != 0
    if turn.get("action") == "tool":  # KG: a call that ran is observed, a failed one gets an error message
        return not turn["observation"].startswith("Observation:")
    return "observation" in turn and not turn["observation"].startswith("[")


def corrected_turns(result: dict[str, Any]) -> list[int]:
    """Turns of a correct episode that fixed the turn before (a veto, an SQL error, a failed command): eq. 8's
    targets."""
    if not result["correct"]:
        return []
    turns = result["turns"]
    return [t for t in range(1, len(turns))
            if _turn_failed(turns[t - 1]) and not turns[t].get("vetoed") and turns[t]["action"] in ACTING]


# ------------------------------------------------------------------------------------- recipe


NOT_FINGERPRINTED = ("out_dir", "iterations")  # iterations: no iteration depends on the total, so a run can be extended
OS_EVALUATION_ONLY = ("tasks", "scripts_dir", "policy", "adapter", "limit", "out_dir")  # the rest shapes OS episodes
KG_EPISODE = ("endpoint", "namespace", "max_rounds", "timeout_s")  # what shapes KG episodes (tasks: the pool)


def fingerprint(params: Params, pool: Sequence[dict[str, Any]]) -> str:
    """What must match for a checkpoint to be resumed: the config, the model, the init adapter, the pool."""
    cfg = {k: v for k, v in dataclasses.asdict(params.cmat).items() if k not in NOT_FINGERPRINTED}
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    digest.update(json.dumps([dataclasses.asdict(params.generation), params.db.backend, params.db.max_rounds],
                             sort_keys=True).encode())
    if "os" in params.cmat.domains:
        digest.update(json.dumps({k: v for k, v in dataclasses.asdict(params.os).items() if k not in OS_EVALUATION_ONLY},
                                 sort_keys=True).encode())
    if "kg" in params.cmat.domains:
        digest.update(json.dumps({k: getattr(params.kg, k) for k in KG_EPISODE}, sort_keys=True).encode())
    from cmat_pipeline.sft import update_with_folder

    update_with_folder(digest, Path(params.model.dir))
    if params.cmat.init_adapter:
        update_with_folder(digest, Path(params.cmat.init_adapter))
    digest.update(json.dumps(list(pool), sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _close_episode(episode: Any) -> None:
    """Release what an episode holds: its OS sandbox or its database (a KG episode holds neither)."""
    held = getattr(episode, "sandbox", None) or getattr(episode, "db", None)
    if held is not None:
        held.close()


class CMATRecipe:
    """setup -> (rollout -> reflect -> update -> save_checkpoint) x iterations -> save -> cleanup."""

    def __init__(self, params: Params, progress: bool = True,
                 after_iteration: Callable[[int, dict[str, Any]], None] = lambda i, m: None):
        self.params, self.cfg, self.progress, self.after_iteration = params, params.cmat, progress, after_iteration
        self.out = Path(self.cfg.out_dir)
        self.history: list[dict[str, Any]] = []
        self.start_iteration = 0

    # -- setup
    def setup(self) -> None:
        import torch
        from transformers import AutoTokenizer

        from cmat_pipeline.cmat.actor_critic import ACTOR, CRITIC, ActorCritic
        from cmat_pipeline.cmat.checker import SQLChecker
        from cmat_pipeline.cmat.kg_checker import KGChecker
        from cmat_pipeline.cmat.memory import ReflectionMemory
        from cmat_pipeline.cmat.osbench_checker import ShellChecker
        from cmat_pipeline.cmat.roles import User
        from cmat_pipeline.envs.sql_backends import make_backend
        from cmat_pipeline.runtime.policy import HFPolicy, resolve_device
        from cmat_pipeline.sft import CHECKPOINTS, prepare_out_dir

        cfg, model_dir = self.cfg, Path(self.params.model.dir)
        if not (model_dir / "config.json").is_file():
            raise ConfigError(f"model.dir: {model_dir} has no config.json; run the prepare_model stage first")
        self.started = time.perf_counter()
        self.pool = load_task_pool(self.params)
        resume = prepare_out_dir(self.out, fingerprint(self.params, self.pool), stage="cmat", marker=MARKER,
                                 prefix=CHECKPOINT_PREFIX, last_file=CHECKPOINT_DONE)
        self.checkpoints = self.out / CHECKPOINTS
        self.device = resolve_device(self.params.model.device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.net = ActorCritic(str(model_dir), cfg.init_adapter, cfg.critic_lora_r, self.device, cfg.seed)
        self.actor_optim = torch.optim.AdamW(self.net.parameters(ACTOR), lr=cfg.actor_lr, weight_decay=0.0)
        self.critic_optim = torch.optim.AdamW(self.net.parameters(CRITIC), lr=cfg.critic_lr, weight_decay=0.0)
        self.user = User(self.pool, cfg.curriculum)
        self.memory = ReflectionMemory(self.out / "memory.sqlite") if cfg.memory else None
        self.backend = self.checker = None  # databases only when the User poses dbbench tasks
        if "db" in cfg.domains:
            self.backend = make_backend(self.params.db)
            self.checker = SQLChecker(make_backend(self.params.db), veto_reward=cfg.veto_reward)
        self.shell_checker = ShellChecker(veto_reward=cfg.veto_reward)
        self.kg_checker = KGChecker(veto_reward=cfg.veto_reward)
        self.kg_client = None  # the SPARQL store only when the User poses KG questions
        if "kg" in cfg.domains:
            from cmat_pipeline.envs.kg import make_client

            self.kg_client = make_client(self.params.kg)
        rollout_gen = dataclasses.replace(self.params.generation, temperature=cfg.temperature,
                                          max_new_tokens=cfg.max_new_tokens)
        self.policy = HFPolicy.from_loaded(self.net.model, self.tokenizer, rollout_gen, f"cmat-actor:{model_dir}")
        if resume:
            self.load_checkpoint(resume)

    # -- rollout
    def rollout(self, iteration: int, concurrency: int | None = None,
                tasks: Sequence[dict[str, Any]] | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Play this iteration's tasks with the actor; returns the episode results and rollout stats."""
        import torch
        from tqdm import tqdm

        from cmat_pipeline.cmat.corrections import correction, kg_correction, os_correction
        from cmat_pipeline.runtime.policy import Timed
        from cmat_pipeline.runtime.rollout import run_episodes

        cfg = self.cfg
        rng = random.Random(f"{cfg.seed}:{iteration}")
        torch.manual_seed(cfg.seed * 100_003 + iteration)  # sampling: the same iteration replays exactly
        entries = list(tasks) if tasks is not None else self.user.sample(cfg.episodes, rng)
        played = [self._task(e, i) for i, e in enumerate(entries)]
        timed = Timed(self.policy)
        bar = tqdm(total=len(played), desc=f"cmat rollouts {iteration + 1}", unit="episode",
                   disable=not self.progress)
        start = time.perf_counter()
        self.net.use("default")
        try:
            results = run_episodes((self._starter(domain, task) for domain, task in played), timed,
                                   concurrency or self.params.generation.batch_size,
                                   close=_close_episode,
                                   on_result=lambda _: bar.update())
        finally:
            bar.close()
        seconds = time.perf_counter() - start
        correct_failures = cfg.corrections and cfg.reflection_loss_weight > 0
        for result in results:  # the plain question (without recalled lessons) keys long-term memory
            domain, task = played[result["index"]]
            result.update(domain=domain, type=task.type, question=task.question)
            fix = {"db": correction, "os": os_correction, "kg": kg_correction}[domain]
            result["correction"] = fix(result, task) if correct_failures else None
        stats = {"rollout_seconds": round(seconds, 2), "episodes_per_minute": round(60 * len(results) / seconds, 2),
                 "rollout_tokens_per_second": round(timed.completion_tokens / max(timed.seconds, 1e-9), 2),
                 "generate_calls": timed.calls}
        return results, stats

    @staticmethod
    def _task(entry: dict[str, Any], index: int) -> tuple[str, Any]:
        """(domain, task) of a pool entry, indexed by its position in this iteration's episodes."""
        from cmat_pipeline.envs.dbbench import task_from_entry

        if entry.get("domain") in ("os", "kg"):
            return entry["domain"], dataclasses.replace(entry["task"], index=index)
        return "db", task_from_entry(entry, index, f"task pool:item {index}")

    def _starter(self, domain: str, task: Any) -> Callable[[], Any]:
        """Starts the task's episode with its Checker in the loop (no veto: it scores actions, never blocks)."""
        from cmat_pipeline.cmat.checker import CheckedDBEpisode
        from cmat_pipeline.cmat.kg_checker import CheckedKGEpisode
        from cmat_pipeline.cmat.memory import prompt_with_lessons
        from cmat_pipeline.cmat.osbench_checker import CheckedOSEpisode
        from cmat_pipeline.evaluate_os import start_episode

        cfg = self.cfg
        checked = {"messages": prompt_with_lessons(task, self.memory, cfg.memory_k),
                   "max_vetoes": cfg.max_vetoes if cfg.veto else 0}
        if domain == "os":
            return lambda: start_episode(task, self.params.os, episode_cls=CheckedOSEpisode,
                                         checker=self.shell_checker, **checked)
        if domain == "kg":
            from cmat_pipeline.envs.kg import KGSession

            kg = self.params.kg
            return lambda: CheckedKGEpisode(task, KGSession(self.kg_client, kg.namespace), kg.max_rounds,
                                            checker=self.kg_checker, **checked)
        return lambda: CheckedDBEpisode(task, self.backend.open(task.table), self.params.db.max_rounds,
                                        checker=self.checker, **checked)

    # -- long-term memory
    def reflect(self, results: Sequence[dict[str, Any]]) -> dict[str, int]:
        """Store a lesson for every failed or vetoed episode (the Assistant's own when usable)."""
        from cmat_pipeline.cmat.roles import lesson_for, needs_reflection, reflection_request

        counts = {"self": 0, "template": 0}
        if self.memory is None:
            return counts
        failed = [r for r in results if needs_reflection(r)]
        if not failed:
            return counts
        # Greedy; a conversation too long for one more turn gets the template lesson (its text is None).
        gen = dataclasses.replace(self.params.generation, temperature=0.0, max_new_tokens=REFLECTION_TOKENS)
        outputs = self.policy.generate([reflection_request(r) for r in failed], gen)
        for result, output in zip(failed, outputs):
            lesson, source = lesson_for(result, output.text)
            if self.memory.add(result["question"], result["type"], lesson):
                counts[source] += 1
        return counts

    # -- update
    def _examples(self, results: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
        """(trainable episodes, corrections of the episodes too long to train on, how many were too long).

        A correction is its own (shorter) conversation: a long failed episode, where the Checker's fix matters
        most, still teaches its corrected action through the reflection loss."""
        import torch

        from cmat_pipeline.chat_format import encode_chat

        examples, orphans, too_long = [], [], 0
        for result in results:
            if not result["turns"]:
                continue
            enc = encode_chat(self.tokenizer, result["messages"])
            starts = enc.turn_starts()
            fix = self._encoded_correction(result.get("correction"))
            if len(enc.input_ids) > self.cfg.max_seq_len or len(starts) != len(result["turns"]):
                too_long += 1
                if fix is not None:
                    orphans.append({"correction": fix})
                continue
            ids = torch.tensor([enc.input_ids], device=self.device)
            mask = torch.tensor([enc.assistant_mask], device=self.device)
            token_turn = torch.tensor(enc.assistant_turn[1:], device=self.device)[mask[0, 1:].bool()]
            fixed = corrected_turns(result)
            examples.append({"ids": ids, "mask": mask, "token_turn": token_turn, "state_ends": [s - 1 for s in starts],
                             "rewards": turn_rewards(result, self.cfg), "fixed": fixed, "tokens": len(enc.input_ids),
                             "correction": fix})
        return examples, orphans, too_long

    def _encoded_correction(self, correction: dict[str, Any] | None) -> tuple[Any, Any] | None:
        """(ids, mask) of the Checker's corrected action in its conversation; only that action is a target."""
        import torch

        from cmat_pipeline.chat_format import encode_chat

        if correction is None:
            return None
        enc = encode_chat(self.tokenizer, correction["messages"])
        last = max(enc.assistant_turn)
        if len(enc.input_ids) > self.cfg.max_seq_len or last < 0:
            return None
        mask = [int(turn == last) for turn in enc.assistant_turn]
        return (torch.tensor([enc.input_ids], device=self.device), torch.tensor([mask], device=self.device))

    def _minibatches(self, n: int) -> list[list[int]]:
        size = self.cfg.minibatch_episodes
        return [list(range(i, min(i + size, n))) for i in range(0, n, size)]

    def update(self, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """One critic pass (TD targets) and `ppo_epochs` actor passes over this iteration's episodes."""
        import torch

        from cmat_pipeline.cmat.actor_critic import ACTOR
        from cmat_pipeline.cmat.objectives import normalize, reinforce_advantages

        cfg, net = self.cfg, self.net
        examples, orphans, too_long = self._examples(results)
        stats: dict[str, Any] = {"episodes_trained": len(examples), "episodes_too_long": too_long,
                                 "corrections_of_untrained_episodes": len(orphans)}
        if not examples and not orphans:
            return stats | {"value_loss": None, "kl": None, "clip_fraction": None, "update_tokens_per_second": None}
        start = time.perf_counter()
        for ex in examples:  # the rollout policy's and the reference's log-probs, before any step
            ex["old"] = net.token_logps(ex["ids"], ex["mask"], grad=False)
            ex["ref"] = net.reference_logps(ex["ids"], ex["mask"])  # also without the penalty: KL is reported
        value_losses = []
        if cfg.value_function:
            value_losses = self._fit_critic(examples)
        else:  # ablation: REINFORCE with the batch's mean discounted return as the baseline
            returns = [reinforce_advantages(ex["rewards"], 0.0, cfg.gamma)[0] for ex in examples]
            baseline = sum(returns) / max(len(returns), 1)
            for ex in examples:
                ex["adv"] = reinforce_advantages(ex["rewards"], baseline, cfg.gamma)
        flat = normalize([a for ex in examples for a in ex["adv"]]) if examples else []
        offset = 0
        for ex in examples:
            ex["adv_norm"] = flat[offset:offset + len(ex["adv"])].to(self.device)
            offset += len(ex["adv"])
        items = examples + orphans
        kls, clips, reflection_terms = [], [], []
        net.use(ACTOR)
        for _ in range(cfg.ppo_epochs):
            for batch in self._minibatches(len(items)):
                self.actor_optim.zero_grad()
                for i in batch:
                    loss = self._actor_item_loss(items[i], kls, clips, reflection_terms)
                    (loss / len(batch)).backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(ACTOR), cfg.max_grad_norm or float("inf"))
                self.actor_optim.step()
        seconds = time.perf_counter() - start
        tokens = sum(ex["tokens"] for ex in examples) + sum(int(o["correction"][0].shape[1]) for o in orphans)
        return stats | {
            "value_loss": round(sum(value_losses) / len(value_losses), 5) if value_losses else None,
            "kl": round(sum(kls) / len(kls), 6) if kls else None,
            "clip_fraction": round(sum(clips) / len(clips), 4) if clips else None,
            "reflection_loss": round(sum(reflection_terms) / len(reflection_terms), 5) if reflection_terms else None,
            "corrected_turns": sum(len(ex["fixed"]) for ex in examples),
            "checker_corrections": sum(ex["correction"] is not None for ex in items),
            "update_seconds": round(seconds, 2), "update_tokens_per_second": round(tokens * cfg.ppo_epochs / seconds, 2),
        }

    def _fit_critic(self, examples: list[dict[str, Any]]) -> list[float]:
        """One TD pass of the value head (eq. 5); leaves each example's per-turn advantages in ex["adv"]."""
        import torch

        from cmat_pipeline.cmat.actor_critic import CRITIC
        from cmat_pipeline.cmat.objectives import turn_advantages, value_loss

        cfg, net = self.cfg, self.net
        losses = []
        for batch in self._minibatches(len(examples)):
            self.critic_optim.zero_grad()
            for i in batch:
                ex = examples[i]
                values = net.values(ex["ids"], ex["state_ends"])
                adv, targets = turn_advantages(ex["rewards"], values.detach().tolist(), cfg.gamma, cfg.gae_lambda)
                ex["adv"] = adv
                with net.adapter(CRITIC):
                    loss = value_loss(values, targets)
                    (loss / len(batch)).backward()
                losses.append(float(loss.detach()))
            torch.nn.utils.clip_grad_norm_(net.parameters(CRITIC), cfg.max_grad_norm or float("inf"))
            self.critic_optim.step()
        return losses

    def _actor_item_loss(self, ex: dict[str, Any], kls: list[float], clips: list[float],
                         reflection_terms: list[float]) -> Any:
        """The actor loss of one item: an episode (policy gradient, its own fixes, the Checker's correction)
        or a correction alone (its episode was too long to train on). Appends the terms it reports."""
        import torch

        from cmat_pipeline.cmat.objectives import actor_loss

        cfg, net = self.cfg, self.net
        loss = torch.zeros((), device=self.device)
        if "ids" in ex:
            new = net.token_logps(ex["ids"], ex["mask"], grad=True)
            token_adv = ex["adv_norm"][ex["token_turn"]]
            out = actor_loss(new[None], ex["old"][None], ex["ref"][None], token_adv[None],
                             torch.ones_like(new)[None], clip=cfg.clip or None, kl_coef=cfg.kl_coef)
            loss = out.loss
            kls.append(out.kl)
            clips.append(out.clip_fraction)
            if cfg.reflection_loss_weight > 0 and ex["fixed"]:  # the episode's own corrections
                fixed = torch.isin(ex["token_turn"], torch.tensor(ex["fixed"], device=self.device))
                reflection = -new[fixed].mean()
                loss = loss + cfg.reflection_loss_weight * reflection
                reflection_terms.append(float(reflection.detach()))
        if cfg.reflection_loss_weight > 0 and ex["correction"] is not None:  # the Checker's
            reflection = -net.token_logps(*ex["correction"], grad=True).mean()
            loss = loss + cfg.reflection_loss_weight * reflection
            reflection_terms.append(float(reflection.detach()))
        return loss

    # -- one iteration
    def iteration(self, i: int) -> dict[str, Any]:
        results, rollout_stats = self.rollout(i)
        for result in results:
            self.user.record(result["type"], result["correct"])
        reflections = self.reflect(results)
        update_stats = self.update(results)
        turns = [t for r in results for t in r["turns"]]
        returns = [sum(turn_rewards(r, self.cfg)) for r in results]
        metrics = {
            "iteration": i + 1, "episodes": len(results),
            "mean_reward": round(sum(returns) / max(len(returns), 1), 4),
            "success_rate": round(sum(r["correct"] for r in results) / max(len(results), 1), 4),
            "success_by_domain": {d: round(sum(r["correct"] for r in results if r["domain"] == d)
                                           / sum(r["domain"] == d for r in results), 4)
                                  for d in sorted({r["domain"] for r in results})},
            "veto_rate": round(sum(bool(t.get("vetoed")) for t in turns) / max(len(turns), 1), 4),
            "memory_size": len(self.memory) if self.memory is not None else 0,
            "reflections_self": reflections["self"], "reflections_template": reflections["template"],
            "outcomes": {o: sum(r["outcome"] == o for r in results) for o in sorted({r["outcome"] for r in results})},
            **rollout_stats, **update_stats,
        }
        rollouts = self.checkpoints / "rollouts"  # beside the checkpoints, so a resumed run keeps earlier iterations'
        rollouts.mkdir(exist_ok=True)
        with (rollouts / f"iter-{i + 1}.jsonl").open("w") as f:
            for r in results:
                f.write(json.dumps({k: r.get(k) for k in ("index", "domain", "type", "outcome", "correct", "turns",
                                                          "messages", "correction")},
                                   ensure_ascii=False) + "\n")
        return metrics

    def train(self) -> None:
        """Iterations start_iteration..cmat.iterations; a checkpoint past that (a shortened run) just saves."""
        for i in range(self.start_iteration, self.cfg.iterations):
            metrics = self.iteration(i)
            self.history.append(metrics)
            log.info("cmat: iteration %d/%d %s", i + 1, self.cfg.iterations,
                     json.dumps({k: metrics.get(k) for k in ("mean_reward", "success_rate", "veto_rate", "value_loss",
                                                              "kl", "memory_size")}))
            self.save_checkpoint(i + 1)
            self.after_iteration(i + 1, metrics)

    # -- checkpoints
    def save_checkpoint(self, iteration: int) -> Path:
        """Everything a resumed run needs, written to a staging folder and renamed (a kill leaves no half)."""
        import torch

        target = self.checkpoints / f"{CHECKPOINT_PREFIX}{iteration}"
        staging = self.checkpoints / f".staging-{iteration}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        torch.save({"weights": self.net.trainable_state(), "actor_optim": self.actor_optim.state_dict(),
                    "critic_optim": self.critic_optim.state_dict(), "torch_rng": torch.get_rng_state()},
                   staging / "training.pt")
        if self.memory is not None:
            with sqlite3.connect(staging / "memory.sqlite") as copy:
                self.memory.conn.backup(copy)
        (staging / CHECKPOINT_DONE).write_text(json.dumps(
            {"iteration": iteration, "user": self.user.state(), "history": self.history}, indent=1))
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
        for old in self.checkpoints.glob(f"{CHECKPOINT_PREFIX}*"):  # only the newest is needed to resume
            if old != target:
                shutil.rmtree(old)
        return target

    def load_checkpoint(self, path: Path) -> None:
        import torch

        state = json.loads((path / CHECKPOINT_DONE).read_text())
        saved = torch.load(path / "training.pt", map_location=self.device, weights_only=False)
        self.net.load_trainable_state(saved["weights"])
        self.actor_optim.load_state_dict(saved["actor_optim"])
        self.critic_optim.load_state_dict(saved["critic_optim"])
        torch.set_rng_state(saved["torch_rng"])
        self.user.load_state(state["user"])
        self.history = state["history"]
        self.start_iteration = state["iteration"]
        if self.memory is not None:  # lessons the interrupted iteration wrote are dropped: it will be replayed
            with sqlite3.connect(path / "memory.sqlite") as source:
                source.backup(self.memory.conn)
        log.warning("cmat: resuming after iteration %d from %s", self.start_iteration, path)

    # -- outputs
    def save(self) -> dict[str, Any]:
        self.net.save(self.out, self.tokenizer)
        shutil.rmtree(self.out / "rollouts", ignore_errors=True)
        (self.checkpoints / "rollouts").rename(self.out / "rollouts")
        metrics = self.metrics()
        (self.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        plots = self.out / "plots"
        plots.mkdir(exist_ok=True)
        for name in PLOTTED:
            lines = [f"iteration\t{name}"] + [f"{m['iteration']}\t{m[name]}" for m in self.history
                                              if m.get(name) is not None]
            (plots / f"{name}.tsv").write_text("\n".join(lines) + "\n")
        save_resolved(self.params, self.out)
        return metrics

    def metrics(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        return {
            "iterations": len(self.history), "episodes": sum(m["episodes"] for m in self.history),
            "final": {k: last.get(k) for k in PLOTTED + ("episodes_trained", "reflection_loss", "corrected_turns",
                                                         "checker_corrections")},
            "success_rate_first": self.history[0]["success_rate"] if self.history else None,
            "success_rate_last": last.get("success_rate"), "wall_seconds": round(time.perf_counter() - self.started, 2),
            "device": self.device, "ablation": {"veto": self.cfg.veto, "value_function": self.cfg.value_function,
                                                "memory": self.cfg.memory, "kl": self.cfg.kl_coef > 0,
                                                "reflection_loss": self.cfg.reflection_loss_weight > 0},
            "history": self.history,
        }

    def cleanup(self, success: bool) -> None:
        """Close databases and memory; after a successful run drop the checkpoints (they only serve resuming)."""
        for closable in (getattr(self, "backend", None), getattr(getattr(self, "checker", None), "scratch", None)):
            if closable is not None:
                closable.close()
        if getattr(self, "memory", None) is not None:
            self.memory.close()
        if success:
            shutil.rmtree(self.checkpoints, ignore_errors=True)

    def run(self) -> dict[str, Any]:
        success = False
        try:
            self.setup()
            self.train()
            metrics = self.save()
            success = True
            return metrics
        finally:
            self.cleanup(success)


def tune(params: Params, progress: bool = True) -> dict[str, Any]:
    """Run the cmat stage per params.cmat and write every output; returns the metrics."""
    return CMATRecipe(params, progress).run()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from cmat_pipeline.cli import stage_args

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params, args = stage_args(__doc__.splitlines()[0], argv)
    metrics = tune(params, progress=not args.no_progress)
    print(json.dumps({"iterations": metrics["iterations"], "success_rate_first": metrics["success_rate_first"],
                      "success_rate_last": metrics["success_rate_last"], "wall_seconds": metrics["wall_seconds"]}))
    return metrics


if __name__ == "__main__":
    import sys

    from cmat_pipeline.cli import main as cli_main

    sys.exit(cli_main(["cmat", *sys.argv[1:]]))
