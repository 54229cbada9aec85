"""Sparse Mixture-of-Agents (SMoA, arXiv 2411.03284) as a policy; dense MoA and the single agent are the
same code path, chosen by `smoa.mode`.

Each assistant turn, for every active conversation at once:
  1. layer 1: every proposer replies in its own role (a role note ahead of AgentBench's prompt);
     layers 2..L: every proposer also sees the previous layer's kept replies as references;
  2. the judge scores the replies (the SQL Checker: a vetoed reply scores 0; or a model asked for a
     0-10 rating; or both) and `sparse` keeps the top_k, `dense` keeps them all;
  3. the moderator (`sparse` only) ends a conversation's layers once its kept replies take the same
     normalised action (same SQL, or the same final answer);
  4. the aggregator writes the final turn in the environment's action format: the best kept reply, or a
     model's synthesis of the kept replies (the best kept reply if that synthesis is not an action;
     a conversation stopped on agreement takes its agreed reply without an aggregator call).
Role notes and references are added to copies of the conversation sent to a proposer; the episode's own
messages (and so every recorded trajectory) keep AgentBench's protocol exactly.

One generate call per proposer per layer serves every conversation still in play (plus one per layer
for a model judge and one for a model aggregator). Every role is wrapped in `Timed`; each returned
output carries the tokens spent on its conversation, and `usage()` reports calls, replies and tokens
per role and per turn, layers run and early stops (evaluate's metrics.json includes it under "usage").

    policy = build_smoa_policy(params, tasks)        # tasks: the DBTasks whose conversations it plays
    Timed(policy).stats()["usage"]["roles"]          # calls and tokens of every proposer, judge, aggregator
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from cmat_pipeline.envs.dbbench import DBTask, parse_action
from cmat_pipeline.errors import CmatError
from cmat_pipeline.runtime.policy import Conversation, Policy, PolicyOutput, Timed

if TYPE_CHECKING:
    from cmat_pipeline.cmat.checker import SQLChecker
    from cmat_pipeline.config import Params

PREAMBLE = 3  # AgentBench's prompt, "Ok.", the question
ROLE_NOTE = "Role note: you are {role}. Keep exactly to the reply format described below.\n"
REFERENCES_NOTE = ("\n\n[Replies other agents proposed for this turn. They may be wrong: use them to write your own "
                   "best reply, in the required format.]\n{replies}")
AGGREGATE_NOTE = ("\n\n[Replies several agents proposed for this turn. Check them critically and write the single "
                  "best reply: your thought, then exactly one Action in the required format.]\n{replies}")
JUDGE_NOTE = ("\n\n[You are now a judge, not the agent. A reply proposed for the next turn:]\n{reply}\n[Rate how likely "
              "this reply is correct and follows the required format, from 0 (wrong) to 10 (surely right). "
              "Reply with `Score: N` only.]")
SCORE_RE = re.compile(r"Score:\s*(\d+(?:\.\d+)?)|(\d+(?:\.\d+)?)")


# ------------------------------------------------------------------------------------- prompts


def with_role(conversation: Conversation, role: str) -> Conversation:
    """The conversation with a role note ahead of its first turn (AgentBench's prompt follows unchanged)."""
    if not role:
        return conversation
    first = dict(conversation[0], content=ROLE_NOTE.format(role=role) + conversation[0]["content"])
    return [first, *conversation[1:]]


def _listed(replies: Sequence[str]) -> str:
    return "\n\n".join(f"Reply {i}:\n{reply}" for i, reply in enumerate(replies, 1))


def with_note(conversation: Conversation, note: str) -> Conversation:
    """The conversation with `note` appended to its last turn, the environment's (user) turn being answered."""
    if conversation[-1]["role"] != "user":
        raise CmatError(f"smoa: a conversation must end with the environment's (user) turn, got {conversation[-1]['role']!r}")
    return [*conversation[:-1], dict(conversation[-1], content=conversation[-1]["content"] + note)]


def with_references(conversation: Conversation, replies: Sequence[str]) -> Conversation:
    return with_note(conversation, REFERENCES_NOTE.format(replies=_listed(replies))) if replies else conversation


# ------------------------------------------------------------------------------------- actions


def normalise_sql(sql: str) -> str:
    """One spelling per statement (sqlglot's MySQL rendering), so replies that differ in layout agree."""
    import sqlglot

    try:
        return sqlglot.parse_one(sql, read="mysql").sql("mysql")
    except Exception:  # unparseable SQL still agrees with the same text
        return re.sub(r"\s+", " ", sql.strip().rstrip(";"))


def action_key(text: str | None) -> str | None:
    """A reply's normalised action (`sql:...` or `answer:...`); None when it is not a valid action."""
    action = parse_action(text or "")
    if action.kind == "operation":
        return "sql:" + normalise_sql(action.sql)
    if action.kind == "answer":
        try:
            value = ast.literal_eval(action.answer.strip())
        except (ValueError, SyntaxError):
            return "answer:" + action.answer.strip()
        items = value if isinstance(value, (list, tuple)) else [value]
        return "answer:" + json.dumps(sorted(str(v) for v in items))  # AgentBench compares answers as sets
    return None


def executed_statements(conversation: Conversation) -> list[str]:
    """SQL this episode already ran without error (Checker vetoes and database errors changed nothing)."""
    done = []
    for reply, observation in zip(conversation[PREAMBLE::2], conversation[PREAMBLE + 1::2]):
        action = parse_action(reply["content"])
        if action.kind == "operation" and observation["content"].startswith("["):
            done.append(action.sql)
    return done


# ------------------------------------------------------------------------------------- judges


@dataclass
class Candidate:
    """One proposer's reply in one layer, with the judge's score and its normalised action."""

    text: str | None
    proposer: int
    score: float = 0.0
    key: str | None = None


class Judge(Protocol):
    name: str
    parts: tuple[Any, ...]  # the judges it is made of (itself, or a checker and a model)

    def score(self, conversations: Sequence[Conversation], replies: Sequence[str]) -> list[tuple[float, PolicyOutput | None]]:
        """A score in [0, 1] for each (conversation, reply), and the model output it cost (None: free)."""


class CheckerJudge:
    """The SQL Checker as judge: 1 for a clean action, 0.8 with a warning (e.g. no rows), 0 for a veto."""

    name = "checker"

    def __init__(self, checker: SQLChecker, tasks: Sequence[DBTask]):
        self.checker = checker
        self.by_question = {task.question: task for task in tasks}
        self.checks = 0
        self.parts = (self,)

    def task_of(self, conversation: Conversation) -> DBTask:
        question = conversation[PREAMBLE - 1]["content"]
        if question not in self.by_question:
            raise CmatError(f"smoa judge: no task for the question {question[:80]!r}; pass every task the policy "
                            "will play to build_smoa_policy")
        return self.by_question[question]

    def score(self, conversations, replies):
        out = []
        for conversation, reply in zip(conversations, replies):
            self.checks += 1
            verdict = self.checker.check(self.task_of(conversation), reply, executed_statements(conversation))
            out.append((0.0 if verdict.vetoed else 0.8 if verdict.issues else 1.0, None))
        return out


def parse_score(text: str | None) -> float | None:
    """A judge model's rating in [0, 1], or None when it gave no number."""
    match = SCORE_RE.search(text or "")
    if not match:
        return None
    return min(max(float(match.group(1) or match.group(2)) / 10.0, 0.0), 1.0)


class ModelJudge:
    """A model prompted as judge; all replies of a layer are rated in one generate call."""

    name = "model"

    def __init__(self, policy: Timed):
        self.policy = policy
        self.unparsed = 0
        self.parts = (self,)

    def score(self, conversations, replies):
        prompts = [with_note(c, JUDGE_NOTE.format(reply=r)) for c, r in zip(conversations, replies)]
        outputs = self.policy.generate(prompts) if prompts else []
        scores = [parse_score(o.text) for o in outputs]
        self.unparsed += sum(s is None for s in scores)
        return [(s if s is not None else 0.0, o) for s, o in zip(scores, outputs)]


class CheckedModelJudge:
    """Vetoed replies score 0 without a model call; the model rates the rest."""

    name = "checker+model"

    def __init__(self, checker: CheckerJudge, model: ModelJudge):
        self.checker, self.model = checker, model
        self.parts = (checker, model)

    def score(self, conversations, replies):
        out = self.checker.score(conversations, replies)
        passed = [i for i, (s, _) in enumerate(out) if s > 0]
        for i, rated in zip(passed, self.model.score([conversations[i] for i in passed], [replies[i] for i in passed])):
            out[i] = rated
        return out


# ------------------------------------------------------------------------------------- the mixture


@dataclass
class Proposer:
    policy: Policy
    role: str = ""


def agree(kept: Sequence[Candidate]) -> bool:
    """The moderator's test: at least two kept replies, all with the same valid action."""
    return len(kept) >= 2 and kept[0].key is not None and all(c.key == kept[0].key for c in kept)


class SMoAPolicy:
    """n proposers x L layers, a judge, a moderator and an aggregator behind the `Policy` protocol."""

    def __init__(self, proposers: Sequence[Proposer], *, mode: str = "sparse", layers: int = 2, top_k: int = 2,
                 judge: Judge | None = None, moderator: str = "action", aggregator: Policy | None = None):
        if not proposers:
            raise CmatError("smoa: at least one proposer is needed")
        if mode not in ("single", "dense", "sparse"):
            raise CmatError(f"smoa.mode: {mode!r} is not one of single, dense, sparse")
        self.mode, self.top_k, self.moderator = mode, top_k, moderator
        self.layers = 1 if mode == "single" else layers
        active = proposers[:1] if mode == "single" else proposers
        self.proposers = [Proposer(Timed(p.policy), p.role) for p in active]
        self.aggregator = Timed(aggregator) if aggregator is not None and mode != "single" else None
        self.judge = judge if mode != "single" else None
        if self.judge is None and self._needs_judge(last_layer=True):
            raise CmatError(f"smoa: mode {mode} needs a judge (smoa.judge) to rank replies")
        roles = "+".join(p.policy.name for p in self.proposers)
        self.name = (f"smoa:{mode}(n={len(self.proposers)},L={self.layers},k={top_k},"
                     f"judge={self.judge.name if self.judge else '-'},agg={'model' if self.aggregator else 'best'})[{roles}]")
        self.turn_log: list[dict[str, Any]] = []
        self.counts = Counter()

    def _needs_judge(self, last_layer: bool) -> bool:
        """Sparse ranks every layer; dense only needs an order to pick the final reply without an aggregator."""
        if self.mode == "sparse":
            return True
        return self.mode == "dense" and last_layer and self.aggregator is None

    # ---------------------------------------------------------------- one turn

    def generate(self, conversations: Sequence[Conversation]) -> list[PolicyOutput]:
        before = self._role_totals()
        cost = [[0, 0] for _ in conversations]  # prompt, completion tokens spent on each conversation
        kept: list[list[Candidate]] = [[] for _ in conversations]
        settled = [False] * len(conversations)  # the moderator stopped it on agreement
        live = list(range(len(conversations)))
        layers_run = 0
        for layer in range(self.layers):
            fresh = self._propose(conversations, live, kept, cost)
            if self.judge is not None and self._needs_judge(last_layer=layer == self.layers - 1):
                self._score(conversations, fresh, cost)
            layers_run += len(live)
            still = []
            for i in live:
                usable = [c for c in fresh[i] if c.text is not None]
                if not usable:  # nothing fit the context this layer: the previous layer's replies stand
                    continue
                votes = Counter(c.key for c in usable if c.key is not None)
                ranked = sorted(usable, key=lambda c: (-c.score, -votes.get(c.key, 0), c.proposer))
                kept[i] = ranked[:self.top_k] if self.mode == "sparse" else ranked
                if self.mode == "sparse" and self.moderator == "action" and agree(kept[i]):
                    settled[i] = True
                    if layer < self.layers - 1:
                        self.counts["early_stops"] += 1
                    continue
                still.append(i)
            live = still
            if not live:
                break
        texts = self._aggregate(conversations, kept, settled, cost)
        self._log_turn(len(conversations), layers_run, before, cost)
        return [PolicyOutput(text, p, c) for text, (p, c) in zip(texts, cost)]

    def _propose(self, conversations, live, kept, cost) -> dict[int, list[Candidate]]:
        fresh: dict[int, list[Candidate]] = {i: [] for i in live}
        for index, proposer in enumerate(self.proposers):
            prompts = [with_references(with_role(conversations[i], proposer.role), [c.text for c in kept[i]])
                       for i in live]
            for i, out in zip(live, proposer.policy.generate(prompts) if prompts else []):
                cost[i][0] += out.prompt_tokens
                cost[i][1] += out.completion_tokens
                fresh[i].append(Candidate(out.text, index, key=action_key(out.text)))
        return fresh

    def _score(self, conversations, fresh, cost) -> None:
        items = [(i, c) for i, cands in fresh.items() for c in cands if c.text is not None]
        scored = self.judge.score([conversations[i] for i, _ in items], [c.text for _, c in items])
        for (i, candidate), (score, out) in zip(items, scored):
            candidate.score = score
            if out is not None:
                cost[i][0] += out.prompt_tokens
                cost[i][1] += out.completion_tokens

    def _aggregate(self, conversations, kept, settled, cost) -> list[str | None]:
        texts = [k[0].text if k else None for k in kept]
        if self.aggregator is None:
            return texts
        todo = [i for i, k in enumerate(kept) if k and not settled[i]]
        prompts = [with_note(conversations[i], AGGREGATE_NOTE.format(replies=_listed([c.text for c in kept[i]])))
                   for i in todo]
        for i, out in zip(todo, self.aggregator.generate(prompts) if prompts else []):
            cost[i][0] += out.prompt_tokens
            cost[i][1] += out.completion_tokens
            if action_key(out.text) is not None:
                texts[i] = out.text
            else:  # a synthesis the environment would reject: the judge's best reply instead
                self.counts["aggregator_fallbacks"] += 1
        return texts

    # ---------------------------------------------------------------- accounting

    def roles(self) -> dict[str, Timed]:
        """Every model role, by name (the checker judge spends no tokens and is counted in usage())."""
        out = {f"proposer{i}": p.policy for i, p in enumerate(self.proposers)}
        for part in self._judge_parts(ModelJudge):
            out["judge"] = part.policy
        if self.aggregator is not None:
            out["aggregator"] = self.aggregator
        return out

    def _judge_parts(self, kind: type) -> list[Any]:
        return [part for part in (self.judge.parts if self.judge else ()) if isinstance(part, kind)]

    def _role_totals(self) -> dict[str, tuple[int, int, int, int]]:
        return {name: (t.calls, t.requests, t.prompt_tokens, t.completion_tokens) for name, t in self.roles().items()}

    def _log_turn(self, conversations: int, layers_run: int, before, cost) -> None:
        after = self._role_totals()
        self.counts["turns"] += 1
        self.counts["conversation_turns"] += conversations
        self.counts["conversation_layers"] += layers_run
        self.turn_log.append({
            "conversations": conversations, "conversation_layers": layers_run,
            "calls": {name: after[name][0] - before[name][0] for name in after},
            "prompt_tokens": sum(p for p, _ in cost), "completion_tokens": sum(c for _, c in cost),
        })

    def usage(self) -> dict[str, Any]:
        """Cost so far: totals, each role's Timed stats, and one entry per turn (evaluate reports it)."""
        roles = {name: t.stats() for name, t in self.roles().items()}
        return {
            "mode": self.mode, **{k: self.counts[k] for k in ("turns", "conversation_turns", "conversation_layers",
                                                             "early_stops", "aggregator_fallbacks")},
            "calls": sum(r["generate_calls"] for r in roles.values()),
            "requests": sum(r["generate_requests"] for r in roles.values()),
            "prompt_tokens": sum(r["prompt_tokens"] for r in roles.values()),
            "completion_tokens": sum(r["completion_tokens"] for r in roles.values()),
            "checker_checks": sum(part.checks for part in self._judge_parts(CheckerJudge)),
            "judge_unparsed": sum(part.unparsed for part in self._judge_parts(ModelJudge)),
            "roles": roles, "per_turn": self.turn_log,
        }


# ------------------------------------------------------------------------------------- from params


def with_temperature(policy: Policy, temperature: float | None) -> Policy:
    """The same model (weights and client shared) decoding at another temperature."""
    gen = getattr(policy, "gen", None)
    if temperature is None or (gen is not None and gen.temperature == temperature):
        return policy
    if gen is None:
        raise CmatError(f"smoa: policy {policy.name} has no generation settings to set temperature {temperature} on")
    clone = copy.copy(policy)
    clone.gen = dataclasses.replace(gen, temperature=temperature)
    clone.name = f"{policy.name}@T={temperature}"
    return clone


def build_smoa_policy(params: Params, tasks: Sequence[DBTask], backbones: dict[str, Policy] | None = None) -> SMoAPolicy:
    """The mixture `params.smoa` describes, for conversations of `tasks` (the Checker judge needs them).

    `backbones` may supply the `model` / `openai` policies (already loaded, or scripted in tests); the
    others are built from params once and shared by every role that names them."""
    from cmat_pipeline.runtime.policy import HFPolicy, OpenAIPolicy

    cfg = params.smoa
    loaded: dict[str, Policy] = dict(backbones or {})

    def backbone(kind: str) -> Policy:
        if kind not in loaded:
            loaded[kind] = (OpenAIPolicy(params.openai, params.generation) if kind == "openai" else
                            HFPolicy(params.model.dir, params.generation, adapter=cfg.adapter,
                                     device=params.model.device, dtype=params.model.dtype))
        return loaded[kind]

    chosen = cfg.proposers[:1] if cfg.mode == "single" else cfg.proposers
    proposers = [Proposer(with_temperature(backbone(p.policy), p.temperature), p.role) for p in chosen]
    judge = aggregator = None
    if cfg.mode != "single":
        judge = _build_judge(params, tasks, lambda: with_temperature(backbone(cfg.judge_policy), 0.0))
        if cfg.aggregator == "model":
            aggregator = backbone(cfg.aggregator_policy)
    return SMoAPolicy(proposers, mode=cfg.mode, layers=cfg.layers, top_k=cfg.top_k, judge=judge,
                      moderator=cfg.moderator, aggregator=aggregator)


def _build_judge(params: Params, tasks: Sequence[DBTask], judge_model) -> Judge:
    from cmat_pipeline.cmat.checker import SQLChecker
    from cmat_pipeline.envs.sql_backends import SQLiteBackend

    kind = params.smoa.judge
    if kind == "model":
        return ModelJudge(Timed(judge_model()))
    checker = CheckerJudge(SQLChecker(SQLiteBackend(params.db.statement_timeout_s, params.db.max_observation_chars)),
                           tasks)
    return checker if kind == "checker" else CheckedModelJudge(checker, ModelJudge(Timed(judge_model())))
