"""The cmat stage on a tiny random model: the real recipe, its Checker veto, its update, resume and memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cmat_pipeline.config import Params, build
from cmat_pipeline.envs.dbbench import task_from_entry
from cmat_pipeline.errors import ConfigError
from cmat_pipeline.tune import CMATRecipe, corrected_turns, load_task_pool, turn_rewards

TIMING = ("seconds", "per_second", "per_minute")


@pytest.fixture(scope="module")
def sft_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter on the tiny model, standing in for the sft stage's output."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"]))
    out = tmp_path_factory.mktemp("sft")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    from cmat_pipeline.data.dbgen import generate_db_tasks

    path = tmp_path_factory.mktemp("pool") / "tasks.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in generate_db_tasks(12, 0, "cmat-tests")))
    return path


def make_params(tiny_model_dir, sft_adapter, task_file, out: Path, **cmat) -> Params:
    cfg = {"init_adapter": str(sft_adapter), "tasks": str(task_file), "iterations": 1, "episodes": 2,
           "max_new_tokens": 8, "out_dir": str(out)} | cmat
    return build(Params, {"model": {"dir": str(tiny_model_dir)},
                          "generation": {"batch_size": 4, "max_new_tokens": 8}, "cmat": cfg})


class Scripted:
    """A policy that plays fixed turns: the k-th assistant turn of an episode is texts[k] (the last repeats)."""

    name = "scripted"

    def __init__(self, *texts: str):
        self.texts = texts

    def generate(self, conversations, gen=None):
        from cmat_pipeline.runtime.policy import PolicyOutput

        from cmat_pipeline.chat_format import fixed_protocol_turns

        # protocol turns ("Ok.", the OS one-shot example) are not the episode's own
        turns = [sum(m["role"] == "assistant" for m in c[fixed_protocol_turns(c):]) for c in conversations]
        return [PolicyOutput(self.texts[min(k, len(self.texts) - 1)], 1, 1) for k in turns]


def op(sql: str) -> str:
    return f"I change the table.\nAction: Operation\n```sql\n{sql}\n```"


def lessons_in(recipe) -> list[tuple[str, str]]:
    return sorted(recipe.memory.conn.execute("SELECT question, reflection FROM reflections"))


def without_timing(history):
    return [{k: v for k, v in m.items() if not any(t in k for t in TIMING)} for m in history]


# ---------------------------------------------------------------------------------- the whole stage


def test_stage_writes_a_loadable_actor_critic_memory_and_curves(tiny_model_dir, sft_adapter, task_file, tmp_path):
    from cmat_pipeline.runtime.policy import HFPolicy

    params = make_params(tiny_model_dir, sft_adapter, task_file, tmp_path / "out", iterations=2)
    metrics = CMATRecipe(params, progress=False).run()
    out = tmp_path / "out"
    assert metrics["iterations"] == 2 and metrics["episodes"] == 4
    assert json.loads((out / "metrics.json").read_text())["history"] == metrics["history"]
    assert (out / "critic" / "adapter_config.json").is_file() and (out / "critic" / "value_head.pt").is_file()
    assert not (out / "checkpoints").exists()  # only kept while a run can still resume
    assert sorted(p.name for p in (out / "rollouts").iterdir()) == ["iter-1.jsonl", "iter-2.jsonl"]
    for name in ("mean_reward", "success_rate", "value_loss", "kl", "veto_rate", "memory_size"):
        rows = (out / "plots" / f"{name}.tsv").read_text().splitlines()
        assert rows[0] == f"iteration\t{name}" and len(rows) == 3
    # The random model writes no valid action: the Checker vetoes, and memory holds the lessons.
    assert metrics["history"][0]["veto_rate"] > 0 and metrics["history"][-1]["memory_size"] >= 1
    policy = HFPolicy(str(tiny_model_dir), params.generation, adapter=str(out))  # evaluate's loader
    assert policy.generate([[{"role": "user", "content": "hi"}]])[0].text is not None


def test_evaluation_splits_are_refused_as_task_pools(tiny_model_dir, sft_adapter, db_dev_file, tmp_path):
    params = make_params(tiny_model_dir, sft_adapter, db_dev_file, tmp_path / "out")
    params.evaluate.tasks = str(db_dev_file)
    with pytest.raises(ConfigError, match="evaluation split"):
        load_task_pool(params)


def test_a_ptuning_adapter_is_a_clear_error(tiny_model_dir, task_file, tmp_path):
    folder = tmp_path / "pt"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "P_TUNING"}))
    recipe = CMATRecipe(make_params(tiny_model_dir, folder, task_file, tmp_path / "out"), progress=False)
    with pytest.raises(ConfigError, match="cmat.init_adapter: .* P_TUNING adapter"):
        recipe.run()


# ---------------------------------------------------------------------------------- Checker in the loop


@pytest.mark.parametrize("veto", [True, False])
def test_destructive_statement_is_vetoed_before_it_reaches_the_database(tiny_model_dir, sft_adapter, task_file,
                                                                          tmp_path, veto):
    recipe = CMATRecipe(make_params(tiny_model_dir, sft_adapter, task_file, tmp_path / "out", veto=veto,
                                    memory=False), progress=False)
    recipe.setup()
    try:
        entry = next(e for e in recipe.pool if e["type"][0] == "UPDATE")
        table = entry["table"]["table_name"]
        recipe.policy = Scripted(op(f"DELETE FROM `{table}`"), "Done.\nAction: Answer\nFinal Answer: []")  # no WHERE
        results, _ = recipe.rollout(0, tasks=[entry])
        untouched = recipe.backend.open(task_from_entry(entry, 0, "pool").table)
        original_hash = untouched.table_hash()
        untouched.close()
    finally:
        recipe.cleanup(success=False)
    first = results[0]["turns"][0]
    assert "destructive" in first["issues"] and first["reward"] == -0.5
    assert first["vetoed"] is veto
    # Vetoed: the DELETE never ran, the table is as it was. Without the veto (ablation) it ran.
    assert (results[0]["answer"] == original_hash) is veto
    if veto:
        assert results[0]["messages"][4]["content"].startswith("Checker: ")


# ---------------------------------------------------------------------------------- learning


def test_rewards_and_corrected_turns_of_a_hand_made_episode():
    cfg = build(Params, {"cmat": {"feedback_weight": 0.5, "success_reward": 1.0}}).cmat
    result = {"correct": True, "turns": [
        {"action": "operation", "vetoed": True, "reward": -0.5},
        {"action": "operation", "vetoed": False, "reward": 0.0, "observation": "1054 (42S22): Unknown column"},
        {"action": "operation", "vetoed": False, "reward": 0.0, "observation": "[(3,)]"},
        {"action": "answer", "vetoed": False, "reward": 0.0}]}
    assert turn_rewards(result, cfg) == [-0.25, 0.0, 0.0, 1.0]
    assert corrected_turns(result) == [1, 2]  # the turn after the veto, the turn after the SQL error
    assert corrected_turns(result | {"correct": False}) == []


def test_checker_corrects_the_first_turn_that_left_the_gold_plan(task_file):
    from cmat_pipeline.cmat.corrections import correction
    from cmat_pipeline.envs.dbbench import SYSTEM_PROMPT, FIRST_REPLY

    entry = next(e for e in map(json.loads, task_file.read_text().splitlines()) if e["type"][0] == "other")
    task = task_from_entry(entry, 0, "pool")
    gold = task.gold_sql[0]
    head = [{"role": "user", "content": SYSTEM_PROMPT}, {"role": "assistant", "content": FIRST_REPLY},
            {"role": "user", "content": task.question}]
    wrong = {"role": "assistant", "content": op("SELECT 1")}
    vetoed = {"correct": False, "turns": [{"action": "operation", "vetoed": True}],
              "messages": [*head, wrong, {"role": "user", "content": "Checker: no"}]}
    fixed = correction(vetoed, task)
    assert fixed["turn"] == 0 and fixed["messages"][:3] == head
    assert fixed["messages"][3]["content"].endswith(f"```sql\n{gold.strip()}\n```")
    # The gold statement ran, then a wrong answer: the correction is the answer from its result.
    ran = {"correct": False, "turns": [{"action": "operation", "vetoed": False, "sql": gold + ";"},
                                       {"action": "answer", "vetoed": False}],
           "messages": [*head, {"role": "assistant", "content": op(gold)}, {"role": "user", "content": "[('42',)]"},
                        {"role": "assistant", "content": 'Action: Answer\nFinal Answer: ["7"]'}]}
    fixed = correction(ran, task)
    assert fixed["turn"] == 1 and len(fixed["messages"]) == 6
    assert fixed["messages"][-1]["content"].endswith('Final Answer: ["42"]')
    assert correction(ran | {"correct": True}, task) is None  # a solved task needs no correction


@pytest.mark.parametrize("episode_fits", [True, False])
def test_update_learns_the_checkers_correction_of_a_failed_episode(tiny_model_dir, sft_adapter, task_file, tmp_path,
                                                                   episode_fits):
    from cmat_pipeline.chat_format import encode_chat

    params = make_params(tiny_model_dir, sft_adapter, task_file, tmp_path / "out", actor_lr=3e-3, kl_coef=0.0,
                         ppo_epochs=3, reflection_loss_weight=1.0, memory=False)
    recipe = CMATRecipe(params, progress=False)
    recipe.setup()
    try:
        entry = next(e for e in recipe.pool if e["type"][0] not in ("INSERT", "UPDATE", "DELETE"))
        failed = _episode(recipe, entry, "I do not know.")
        target = failed["correction"]["messages"]
        ids, mask = recipe._encoded_correction(failed["correction"])
        assert mask.sum() > 0 and mask.sum() < len(encode_chat(recipe.tokenizer, target).input_ids)
        episode_tokens = len(encode_chat(recipe.tokenizer, failed["messages"]).input_ids)
        assert ids.shape[1] < episode_tokens  # the correction stops at the first wrong turn: shorter
        if not episode_fits:  # too long for the policy gradient, short enough for its correction
            recipe.cfg.max_seq_len = ids.shape[1]
        before = float(recipe.net.token_logps(ids, mask, grad=False).sum())
        stats = recipe.update([failed])
        after = float(recipe.net.token_logps(ids, mask, grad=False).sum())
    finally:
        recipe.cleanup(success=False)
    assert target[-1]["content"].endswith(f"```sql\n{task_from_entry(entry, 0, 'p').gold_sql[0].strip()}\n```")
    assert stats["checker_corrections"] == 1 and stats["reflection_loss"] is not None
    assert stats["episodes_trained"] == int(episode_fits) and stats["episodes_too_long"] == int(not episode_fits)
    assert stats["corrections_of_untrained_episodes"] == int(not episode_fits)
    assert (stats["kl"] is None) == (not episode_fits)  # no policy-gradient term without a trainable episode
    assert after > before


def _episode(recipe, entry, response):
    """One finished episode of `entry` in which the actor wrote `response`."""
    recipe.policy = Scripted(response)
    results, _ = recipe.rollout(0, tasks=[entry])
    return results[0]


def _logp(recipe, result):
    from cmat_pipeline.chat_format import encode_chat

    enc = encode_chat(recipe.tokenizer, result["messages"])
    ids, mask = torch.tensor([enc.input_ids]), torch.tensor([enc.assistant_mask])
    return float(recipe.net.token_logps(ids, mask, grad=False).sum())


@pytest.mark.parametrize("value_function", [True, False])
def test_update_makes_rewarded_turns_likelier_and_penalised_ones_rarer(tiny_model_dir, sft_adapter, task_file,
                                                                        tmp_path, value_function):
    params = make_params(tiny_model_dir, sft_adapter, task_file, tmp_path / "out", actor_lr=3e-3, kl_coef=0.0,
                         ppo_epochs=3, minibatch_episodes=2, value_function=value_function, memory=False,
                         corrections=False)  # the policy gradient alone
    recipe = CMATRecipe(params, progress=False)
    recipe.setup()
    try:
        entry = next(e for e in recipe.pool if e["type"][0] not in ("INSERT", "UPDATE", "DELETE"))
        good = _episode(recipe, entry, "Action: Answer\nFinal Answer: [\"x\"]")  # answered: no veto
        bad = _episode(recipe, entry, "I do not know.")                          # invalid format: vetoed
        good["correct"] = True  # as if "x" were right: success reward on its last turn
        before = [_logp(recipe, good), _logp(recipe, bad)]
        stats = recipe.update([good, bad])
        after = [_logp(recipe, good), _logp(recipe, bad)]
    finally:
        recipe.cleanup(success=False)
    assert stats["episodes_trained"] == 2
    assert after[0] > before[0] and after[1] < before[1]
    assert (stats["value_loss"] is not None) is value_function


def test_kl_penalty_and_clipping_are_reported_once_the_actor_moves(tiny_model_dir, sft_adapter, task_file, tmp_path):
    params = make_params(tiny_model_dir, sft_adapter, task_file, tmp_path / "out", actor_lr=5e-2, kl_coef=0.1,
                         ppo_epochs=2, minibatch_episodes=1, memory=False)
    recipe = CMATRecipe(params, progress=False)
    recipe.setup()
    try:
        entry = recipe.pool[0]
        episodes = [_episode(recipe, entry, "Action: Answer\nFinal Answer: [\"1\"]"), _episode(recipe, entry, "no")]
        stats = recipe.update(episodes)
    finally:
        recipe.cleanup(success=False)
    # The first minibatch is on-policy (ratio 1, actor = reference); the later ones see a moved actor.
    assert stats["kl"] > 0 and 0 < stats["clip_fraction"] <= 1


# ---------------------------------------------------------------------------------- resume and memory


def test_killed_run_resumes_without_repeating_or_losing_updates(tiny_model_dir, sft_adapter, task_file, tmp_path):
    def params(out):
        return make_params(tiny_model_dir, sft_adapter, task_file, out, iterations=2, actor_lr=1e-3, critic_lr=1e-3,
                           max_vetoes=1)  # short episodes: a fast test

    whole = CMATRecipe(params(tmp_path / "whole"), progress=False)
    whole.setup()
    whole.train()
    reference = whole.net.trainable_state()
    whole_memory = lessons_in(whole)
    whole.cleanup(success=False)

    class Killed(Exception):
        pass

    killed = CMATRecipe(params(tmp_path / "killed"), progress=False)
    real_update = killed.update
    calls = []

    def update_then_die(results):
        calls.append(1)
        if len(calls) == 2:  # in iteration 2, after its rollouts and reflections, before its update lands
            raise Killed()
        return real_update(results)

    killed.update = update_then_die
    with pytest.raises(Killed):
        killed.run()
    assert (tmp_path / "killed" / "checkpoints" / "iter-1" / "state.json").is_file()

    resumed = CMATRecipe(params(tmp_path / "killed"), progress=False)
    resumed.setup()
    assert resumed.start_iteration == 1
    resumed.train()
    state = resumed.net.trainable_state()
    memory = lessons_in(resumed)
    resumed.cleanup(success=False)
    assert without_timing(resumed.history) == without_timing(whole.history)
    assert state.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(state[name], reference[name], rtol=1e-5, atol=1e-6)
    assert memory == whole_memory and memory  # the interrupted iteration's lessons were not stored twice
    assert (tmp_path / "killed" / "checkpoints" / "rollouts" / "iter-1.jsonl").is_file()  # kept across the kill

    # A run can be extended: the same config with more iterations continues from the last checkpoint.
    longer = CMATRecipe(params(tmp_path / "whole"), progress=False)
    longer.cfg.iterations = 3  # the uninterrupted run left its iteration-2 checkpoint (cleanup(success=False))
    longer.setup()
    assert longer.start_iteration == 2
    longer.train()
    longer.cleanup(success=False)
    assert [m["iteration"] for m in longer.history] == [1, 2, 3]


def test_memory_round_trip_write_persist_recall_into_prompts(tiny_model_dir, sft_adapter, task_file, tmp_path):
    from cmat_pipeline.cmat.memory import ReflectionMemory
    from cmat_pipeline.envs.sql_backends import SQLiteBackend
    from cmat_pipeline.evaluate import play

    recipe = CMATRecipe(make_params(tiny_model_dir, sft_adapter, task_file, tmp_path / "out"), progress=False)
    recipe.setup()
    try:
        entry = recipe.pool[0]
        failed = _episode(recipe, entry, "I am not sure what to do.")  # vetoed, then invalid format
        counts = recipe.reflect([failed])
        again = _episode(recipe, entry, "Still not sure.")
    finally:
        recipe.cleanup(success=False)
    assert counts["self"] + counts["template"] == 1
    assert "Lessons from earlier tasks:" in again["messages"][2]["content"]
    stored = ReflectionMemory(tmp_path / "out" / "memory.sqlite")  # persisted: a new process sees it
    task = task_from_entry(entry, 0, "pool")
    lessons = stored.recall(task.question, task.type, k=2)
    assert lessons and lessons[0] in again["messages"][2]["content"]
    # evaluate.memory: the same recall leads the question at evaluation time
    results = play([task], Scripted("Action: Answer\nFinal Answer: [1]"), SQLiteBackend(5.0, 800), 5, 1,
                   progress=False, memory=stored, memory_k=2)
    stored.close()
    assert lessons[0] in results[0]["messages"][2]["content"]


# ---------------------------------------------------------------------------------- the OS domain


def _os_task(description: str, count: int) -> dict:
    """An os_interaction training entry: `count` files in ~/exp, the example counts them (integer-match)."""
    files = " ".join(f"~/exp/f{i}" for i in range(count))
    return {"description": description, "create": {"init": {"code": f"mkdir -p ~/exp && touch {files}"}},
            "evaluation": {"check": [None, {"file": "check/integer-match.py"}], "example": {"code": "ls ~/exp | wc -l"}}}


def bash(code: str) -> str:
    return f"Think: I run it.\n\nAct: bash\n\n```bash\n{code}\n```"


@pytest.fixture
def os_params(tiny_model_dir, sft_adapter, task_file, tmp_path) -> Params:
    pool, held_out = tmp_path / "os_training.json", tmp_path / "os_dev.json"
    pool.write_text(json.dumps([_os_task("How many files are in ~/exp?", 3),
                                _os_task("Count the files in the exp folder of your home.", 2)]))
    held_out.write_text(json.dumps([_os_task("count the files in the  exp folder of your home", 2)]))
    params = make_params(tiny_model_dir, sft_adapter, task_file, tmp_path / "out", domains=["os"],
                         os_tasks=str(pool), memory=True)
    params.os.tasks = str(held_out)
    return params


def test_os_tasks_are_played_in_the_sandbox_with_the_shell_checker_in_the_loop(os_params):
    from cmat_pipeline.cmat.memory import LESSONS
    from tests.conftest import require_bwrap

    require_bwrap()
    recipe = CMATRecipe(os_params, progress=False)
    recipe.setup()
    try:
        # The evaluation split's task (same description, case, spacing and punctuation aside) is not in the pool.
        assert [e["task"].description for e in recipe.pool] == ["How many files are in ~/exp?"]
        assert recipe.backend is None  # no database without dbbench tasks
        recipe.policy = Scripted(bash("rm -rf /"), bash("ls ~/exp | wc -l"), "Think: done.\n\nAct: answer(3)")
        results, _ = recipe.rollout(0, tasks=recipe.pool)
        result = results[0]
        lessons = recipe.reflect(results)
        stats = recipe.update(results)
        stored = lessons_in(recipe)
    finally:
        recipe.cleanup(success=False)
    vetoed, ran, answered = result["turns"]
    assert vetoed["vetoed"] and "destructive" in vetoed["issues"] and vetoed["reward"] == -0.5
    assert "command" not in vetoed and result["messages"][8]["content"].startswith("Checker: ")  # rm never ran
    assert ran["exit_code"] == 0 and ran["observation"].strip().endswith("3") and answered["action"] == "answer"
    assert result["correct"] and result["domain"] == "os" and result["type"] == "os"
    assert corrected_turns(result) == [1]  # the command accepted after the veto is eq. 8's target
    assert turn_rewards(result, recipe.cfg) == [-0.5, 0.0, 1.0]
    # The vetoed episode leaves the OS lesson for its issue; the update trains on the OS conversation.
    assert lessons == {"self": 0, "template": 1} and stored[0][1] == LESSONS["os"]["destructive"]
    assert stats["episodes_trained"] == 1 and stats["corrected_turns"] == 1


def test_checker_corrects_a_failed_os_episode_with_the_example_solution(os_params):
    from cmat_pipeline.cmat.corrections import os_correction
    from cmat_pipeline.envs.os_interaction import OBSERVATION, task_from_entry
    from tests.conftest import failed_episode

    task = task_from_entry(_os_task("How many files are in ~/exp?", 3), 0, "pool")
    opening = task.initial_messages()

    def failed(*turns):
        return failed_episode(opening, *turns)

    wrong_command = os_correction(failed((bash("ls /"), OBSERVATION + "bin"), ("Act: answer(1)", None)), task)
    assert wrong_command["turn"] == 0 and wrong_command["messages"][:-1] == opening
    assert wrong_command["messages"][-1]["content"].endswith("```bash\nls ~/exp | wc -l\n```")
    wrong_answer = os_correction(failed((bash("ls ~/exp  | wc -l"), OBSERVATION + "3"),
                                        ("Act: answer(2)", None)), task)
    assert wrong_answer["turn"] == 1 and wrong_answer["messages"][-1]["content"].endswith("Act: answer(3)")
    assert os_correction(failed((bash("ls ~/exp | wc -l"), "x")) | {"correct": True}, task) is None


def test_the_os_evaluation_split_is_refused_as_a_task_pool(os_params):
    os_params.cmat.os_tasks = os_params.os.tasks
    with pytest.raises(ConfigError, match="cmat.os_tasks: .* evaluation split"):
        load_task_pool(os_params)


def test_unknown_cmat_domain_is_a_clear_error():
    with pytest.raises(ConfigError, match="cmat.domains"):
        build(Params, {"cmat": {"domains": ["db", "webshop"]}})


# ---------------------------------------------------------------------------------- the KG domain


@pytest.fixture
def kg_params(tiny_model_dir, sft_adapter, task_file, tmp_path) -> Params:
    return make_params(tiny_model_dir, sft_adapter, task_file, tmp_path / "out", domains=["kg"], memory=True)


def kg_act(call: str) -> str:
    return f"Thought: I take the next step.\nAction: {call}"


def test_kg_questions_are_played_with_the_kg_checker_in_the_loop(kg_params):
    from cmat_pipeline.cmat.memory import LESSONS
    from cmat_pipeline.envs.kg import generated_tasks, training_tasks

    recipe = CMATRecipe(kg_params, progress=False)
    recipe.setup()
    try:
        evaluation = {t.question for t in generated_tasks()}
        assert [e["task"].question for e in recipe.pool] == [t.question for t in training_tasks()]
        assert not evaluation & {e["task"].question for e in recipe.pool} and recipe.backend is None
        task = recipe.pool[0]  # who directed The Quiet Harbor?
        recipe.policy = Scripted(kg_act("get_neighbors(The Quiet Harbor, film.film.directed_by)"),  # too early
                                 kg_act("get_relations(The Quiet Harbor)"),
                                 kg_act("get_neighbors(The Quiet Harbor, film.film.directed_by)"),
                                 "Thought: #0 is the final answer to the question.\nFinal Answer: #0")
        results, _ = recipe.rollout(0, tasks=[task])
        result = results[0]
        lessons = recipe.reflect(results)
        stats = recipe.update(results)
        stored = lessons_in(recipe)
    finally:
        recipe.cleanup(success=False)
    vetoed, relations, neighbors, answered = result["turns"]
    assert vetoed["vetoed"] and vetoed["issues"] == ["unseen_relation"] and vetoed["reward"] == -0.5
    assert "get_relations(m.0fil00) first" in vetoed["feedback"]
    assert relations["observation"].startswith("Observation: [") and neighbors["observation"].endswith("people.person")
    assert answered["action"] == "answer" and result["prediction"] == sorted(task["task"].answers)
    assert result["correct"] and result["domain"] == "kg" and result["type"] == "kg"
    assert corrected_turns(result) == [1]  # the call accepted after the veto is eq. 8's target
    assert turn_rewards(result, recipe.cfg) == [-0.5, 0.0, 0.0, 1.0]
    # The Assistant's reflection here is an answer, not a lesson: the template for the veto's issue is stored.
    assert lessons == {"self": 0, "template": 1} and stored[0][1] == LESSONS["kg"]["unseen_relation"]
    assert stats["episodes_trained"] == 1 and stats["corrected_turns"] == 1


def test_a_failed_kg_episode_gets_the_checkers_correction_in_the_update(kg_params):
    kg_params.kg.max_rounds = 2  # short enough to train on: the correction is part of the episode's example
    recipe = CMATRecipe(kg_params, progress=False)
    recipe.setup()
    try:
        recipe.policy = Scripted(kg_act("get_relations(The Quiet Harbor)"),
                                 kg_act("get_neighbors(The Quiet Harbor, film.film.release_year)"))  # not a relation
        results, _ = recipe.rollout(0, tasks=recipe.pool[:1])
        stats = recipe.update(results)
    finally:
        recipe.cleanup(success=False)
    result = results[0]
    assert not result["correct"] and result["outcome"] == "task_limit_exceeded"
    assert [t["vetoed"] for t in result["turns"]] == [False, True, True, True, False]  # max_vetoes: 3
    assert result["correction"]["turn"] == 1
    assert result["correction"]["messages"][-1]["content"].endswith(
        "Action: get_neighbors(The Quiet Harbor, film.film.directed_by)")
    assert stats["checker_corrections"] == 1


def test_kg_evaluation_questions_are_refused_as_a_pool(kg_params, tmp_path):
    from cmat_pipeline.envs.kg import generated_tasks, task_entry

    evaluation = tmp_path / "kg_eval.json"
    evaluation.write_text(json.dumps([task_entry(t) for t in generated_tasks()]))
    kg_params.kg.tasks = kg_params.cmat.kg_tasks = str(evaluation)
    with pytest.raises(ConfigError, match="cmat.kg_tasks: .* evaluation split"):
        load_task_pool(kg_params)
    kg_params.kg.tasks, kg_params.cmat.kg_tasks = "", ""
    kg_params.kg.endpoint = "http://kb.example:3001/sparql"
    with pytest.raises(ConfigError, match="cmat.kg_tasks: '' poses the embedded graph's questions"):
        load_task_pool(kg_params)
