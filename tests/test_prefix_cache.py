"""generation.prefix_cache: reusing kept prompts' KV (a conversation's previous turn, the prefix a batch shares)
gives the same greedy turns as encoding every row in full, with and without LoRA adapters, with rows of different
cached lengths in one batch, under the memory bound, and is never reused after the weights or the adapter change.

Run: .venv/bin/python -m pytest tests/test_prefix_cache.py
"""

import dataclasses

import pytest
import torch

from cmat_pipeline.config import GenerationConfig
from cmat_pipeline.runtime.policy import PREFIX_MIN_TOKENS, HFPolicy, common_prefix_length

SYSTEM = ("You are an agent that answers questions about a MySQL table. Think step by step, then either run one "
          "SQL statement in a ```sql block or give the final answer after 'Final Answer:'. Never invent columns; "
          "look at the table first when unsure. Keep every reply short and to the point.")
QUESTIONS = ["How many rows?", "Which player scored the most goals in the 1998 season, and for which club?",
             "List the names, please.",
             "What is the average age of the members who joined after 2010 and live in Paris?"]
OFF = GenerationConfig(max_new_tokens=10, batch_size=8, max_context_tokens=1024, prefix_cache=False)
ON = dataclasses.replace(OFF, prefix_cache=True)


@pytest.fixture(scope="module")
def sharp_model(tiny_model_dir):
    """The tiny random Llama with larger weights: its greedy turns depend on the prompt (the default init
    answers "\\n" to everything, which would make any equality test pass)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


@pytest.fixture()
def policy(sharp_model, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.padding_side = "left"
    return HFPolicy.from_loaded(sharp_model, tokenizer, OFF, "sharp")


@pytest.fixture(scope="module")
def conversations():
    return [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in QUESTIONS]


def lora(model, seed: int):
    """A LoRA on `model` as the cmat actor has (a PeftModelForCausalLM) whose B is random (the default init
    makes it a no-op)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(model, config)


def texts(outputs):
    return [o.text for o in outputs]


def test_common_prefix_length_leaves_every_row_a_token():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert common_prefix_length([[7, 8, 9]]) == 2
    assert common_prefix_length([[1], [1, 2]]) == 0
    assert common_prefix_length([[1, 2], [3, 2]]) == 0


def test_prefix_cache_gives_the_same_greedy_turns(policy, conversations):
    encoded = [policy.encode(c) for c in conversations]
    assert common_prefix_length(encoded) >= PREFIX_MIN_TOKENS
    assert len({len(ids) for ids in encoded}) == len(encoded)  # different suffix lengths: padding in the middle
    off = policy.generate(conversations)
    assert len(set(texts(off))) > 1 and all(off_text for off_text in texts(off))  # the test can tell turns apart
    on = policy.generate(conversations, ON)
    assert texts(on) == texts(off)
    assert [o.completion_tokens for o in on] == [o.completion_tokens for o in off]
    assert (policy.prefix_cache.hits, policy.prefix_cache.misses) == (0, 1)
    again = policy.generate(conversations[1:], ON)  # each row reuses its own kept prompt
    assert texts(again) == texts(off)[1:] and policy.prefix_cache.hits == 3 and policy.prefix_cache.misses == 1


def test_sampled_turns_match_seed_for_seed(policy, conversations):
    sampled = dataclasses.replace(OFF, temperature=1.0, top_p=0.95, max_new_tokens=16)
    policy.generate(conversations[:2], dataclasses.replace(sampled, prefix_cache=True))  # cache the prefix first
    torch.manual_seed(5)
    off = policy.generate(conversations, sampled)
    torch.manual_seed(5)
    on = policy.generate(conversations, dataclasses.replace(sampled, prefix_cache=True))
    assert texts(on) == texts(off)
    assert policy.prefix_cache.hits == 4 and policy.prefix_cache.misses == 1  # 2 own prompts, 2 shared prefixes


def cached_lengths(policy) -> list[list[int]]:
    """Records, per `generate` call, how many tokens of each row came from the cache."""
    calls, batched = [], policy.prefix_cache.batched

    def spy(model, batch, state):
        found = batched(model, batch, state)
        calls.append(found[1] if found else [0] * len(batch))
        return found

    policy.prefix_cache.batched = spy
    return calls


def next_turn(conversation, reply, question):
    return conversation + [{"role": "assistant", "content": reply or "x"}, {"role": "user", "content": question}]


def test_one_conversation_only_encodes_its_new_tokens(policy, conversations):
    calls = cached_lengths(policy)
    first = policy.generate(conversations[:1], ON)
    longer = next_turn(conversations[0], first[0].text, "And the second one?")
    assert texts(policy.generate([longer], ON)) == texts(policy.generate([longer]))
    assert calls == [[0], [len(policy.encode(conversations[0]))]]  # the whole previous prompt is reused
    assert (policy.prefix_cache.hits, policy.prefix_cache.misses) == (1, 0) and len(policy.prefix_cache.entries) == 2


def test_batched_turns_reuse_each_conversations_own_prompt(policy, conversations):
    first = policy.generate(conversations, ON)
    assert texts(first) == texts(policy.generate(conversations))
    second = [next_turn(c, o.text, f"Now for row {i}, please.") for i, (c, o) in enumerate(zip(conversations, first))]
    calls = cached_lengths(policy)
    on = policy.generate(second, ON)
    assert texts(on) == texts(policy.generate(second))
    assert calls == [[len(policy.encode(c)) for c in conversations]]  # rows of different cached lengths
    assert policy.prefix_cache.hits == 4 and policy.prefix_cache.misses == 1  # only turn 1's shared prefix


def test_rows_with_and_without_a_cached_prefix_share_a_batch(policy, conversations):
    first = policy.generate(conversations[:1], ON)
    batch = [next_turn(conversations[0], first[0].text, "Go on."), [{"role": "user", "content": "Say hi."}]]
    calls = cached_lengths(policy)
    assert texts(policy.generate(batch, ON)) == texts(policy.generate(batch))
    assert calls == [[len(policy.encode(conversations[0])), 0]]


def test_the_memory_bound_evicts_the_least_recently_used(policy, conversations):
    policy.generate(conversations[:1], ON)
    one = policy.prefix_cache.entries[0].nbytes
    policy.prefix_cache.max_bytes = int(one * 1.5)  # room for about one prompt
    assert texts(policy.generate(conversations, ON)) == texts(policy.generate(conversations))
    cache = policy.prefix_cache
    assert len(cache.entries) == 1 and sum(e.nbytes for e in cache.entries) <= cache.max_bytes
    assert cache.entries[0].ids == tuple(policy.encode(conversations[-1]))  # the most recent prompt stays


def test_short_prompts_are_left_padded_and_kept(policy):
    short = [[{"role": "user", "content": "Say hi."}], [{"role": "user", "content": "What is SQL, in a sentence?"}]]
    assert common_prefix_length([policy.encode(c) for c in short]) < PREFIX_MIN_TOKENS
    assert texts(policy.generate(short, ON)) == texts(policy.generate(short))
    assert policy.prefix_cache.misses == 0 and policy.prefix_cache.hits == 0
    assert [e.ids for e in policy.prefix_cache.entries] == [tuple(policy.encode(c)) for c in short]  # for next turns


def test_prefix_cache_with_lora_adapters(sharp_model, tiny_model_dir, conversations):
    from transformers import AutoTokenizer

    model = lora(sharp_model, seed=2)
    try:
        model.add_adapter("other", dataclasses.replace(model.peft_config["default"]))
        torch.manual_seed(3)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".other." in name:
                    p.normal_(0, 0.5)
        policy = HFPolicy.from_loaded(model, AutoTokenizer.from_pretrained(tiny_model_dir), OFF, "lora")
        policy.tokenizer.padding_side = "left"
        turns = {}
        for adapter in ["default", "other", "default"]:
            model.set_adapter(adapter)
            turns[adapter] = texts(policy.generate(conversations))
            assert texts(policy.generate(conversations, ON)) == turns[adapter], adapter
        assert turns["default"] != turns["other"]  # switching adapters must not reuse the other one's prefix
        with model.disable_adapter():
            assert texts(policy.generate(conversations, ON)) == texts(policy.generate(conversations))
    finally:
        model.unload()  # give the module-scoped model back without LoRA layers


def test_prefix_is_not_reused_after_the_weights_change(sharp_model, tiny_model_dir, conversations):
    from transformers import AutoTokenizer

    model = lora(sharp_model, seed=4)
    try:
        policy = HFPolicy.from_loaded(model, AutoTokenizer.from_pretrained(tiny_model_dir), OFF, "lora")
        policy.tokenizer.padding_side = "left"
        before = texts(policy.generate(conversations, ON))
        lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
        optimizer = torch.optim.SGD(lora_params, lr=1.0)
        for p in lora_params:
            p.grad = torch.randn_like(p)
        optimizer.step()  # an actor update, as the cmat stage makes between rollouts
        after = texts(policy.generate(conversations))
        assert after != before  # the update changes the turns, so a stale prefix would show
        assert texts(policy.generate(conversations, ON)) == after
        assert policy.prefix_cache.hits == 0 and policy.prefix_cache.misses == 2
    finally:
        model.unload()
