"""`cmat serve` over real HTTP on loopback, with the `openai` client: completions, streaming, batching,
errors, and cmat's own evaluate (OpenAIPolicy) against it."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import httpx
import openai
import pytest
import torch

from cmat_pipeline.config import GenerationConfig, OpenAIConfig, ServeConfig, load_params
from cmat_pipeline.evaluate import evaluate
from cmat_pipeline.runtime.policy import HFPolicy, OpenAIPolicy
from cmat_pipeline.serve import create_app, running_server, settled

REPO = Path(__file__).resolve().parents[1]
MODEL = "cmat-test"
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return HFPolicy(str(tiny_model_dir), GenerationConfig(max_new_tokens=16, max_context_tokens=1024), device="cpu")


@pytest.fixture(scope="module")
def base_url(policy):
    # A long window so that requests sent together are certainly batched together.
    cfg = ServeConfig(model_name=MODEL, adapter="", max_batch_size=8, batch_window_ms=300,
                      api_key_env="CMAT_TEST_SERVE_KEY")
    with running_server(create_app(policy, cfg)) as url:
        yield url


@pytest.fixture()
def client(base_url):
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)


def stats(base_url: str) -> dict:
    return httpx.get(base_url.removesuffix("/v1") + "/stats").json()


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_is_the_policy_output_with_usage(client, policy):
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6)
    direct = policy.generate([HELLO], dataclasses.replace(policy.gen, max_new_tokens=6))[0]
    assert reply.object == "chat.completion" and reply.model == MODEL
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content == direct.text
    # the tiny model repeats its last prompt token ("\n"), so it always runs to max_tokens
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == len(policy.encode(HELLO)) and reply.usage.completion_tokens == 6
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 6


def test_stop_string_ends_the_completion(client):
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10, stop=["\n\n"])
    assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens == 2


def test_streaming_matches_the_plain_reply(client):
    kwargs = dict(model=MODEL, messages=HELLO, max_tokens=12, temperature=1.0)  # sampled: varied text
    torch.manual_seed(7)  # the worker samples from torch's global generator
    plain = client.chat.completions.create(**kwargs)
    torch.manual_seed(7)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [plain.choices[0].finish_reason]
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) >= 2, "the text must arrive in pieces, not at once"
    assert "".join(deltas) == plain.choices[0].message.content and plain.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_concurrent_requests_share_generate_calls(client, base_url):
    before = stats(base_url)
    barrier, replies = threading.Barrier(6), {}

    def ask(k: int) -> None:
        barrier.wait()
        replies[k] = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Question number {k}" + " more" * k}], max_tokens=k + 1)

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = stats(base_url)
    assert after["requests"] - before["requests"] == 6
    assert after["batches"] - before["batches"] < 6 and after["max_batch_size_seen"] >= 2  # batched
    # each reply is its own row: its own prompt length and its own max_tokens
    for k, reply in replies.items():
        assert reply.usage.completion_tokens == k + 1 and reply.choices[0].finish_reason == "length"
    assert len({r.usage.prompt_tokens for r in replies.values()}) == 6


def test_bad_requests_get_openai_errors(client, base_url):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4", messages=HELLO)
    assert err.value.status_code == 404 and err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "hi"}])
    assert "messages.0.role" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user"}])
    assert "messages.0.content" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=HELLO, n=2)
    assert err.value.body["param"] == "n"
    for body, needle in (({"model": MODEL}, "messages: Field required"),
                         ({"model": MODEL, "messages": []}, "messages: List should have at least 1 item")):
        reply = httpx.post(base_url + "/chat/completions", json=body)
        assert reply.status_code == 400 and needle in reply.json()["error"]["message"]
    reply = httpx.post(base_url + "/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert reply.status_code == 400 and reply.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(base_url + "/nothing").json()["error"]["code"] == "not_found"


def test_context_too_long_is_context_length_exceeded(client, base_url):
    long = [{"role": "user", "content": "word " * 1200}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=long)
    assert err.value.body["code"] == "context_length_exceeded" and "1024" in err.value.body["message"]
    # cmat's own client turns it into the runtime's "context limit" (an episode outcome, not a crash)
    remote = OpenAIPolicy(OpenAIConfig(base_url=base_url, model=MODEL, max_retries=0), GenerationConfig())
    assert remote.generate([long])[0].text is None


def test_api_key_is_required_when_configured(client, base_url, monkeypatch):
    monkeypatch.setenv("CMAT_TEST_SERVE_KEY", "s3cret")
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    keyed = openai.OpenAI(base_url=base_url, api_key="s3cret", max_retries=0)
    assert keyed.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).usage.completion_tokens == 2


def test_settled_holds_back_what_can_still_change():
    stops = ["<|im_end|>", "\n\nObservation"]
    assert settled("SELECT 1 <|im", stops) == "SELECT 1"
    assert settled("abc\n\nObs", stops) == "abc"
    assert settled("caf\ufffd", stops) == "caf" and settled("done.  ", stops) == "done."


def test_evaluate_against_the_server(base_url, db_dev_file, tmp_path):
    before = stats(base_url)
    params = load_params(REPO / "params.yaml", [
        "evaluate.policy=openai", f"openai.base_url={base_url}", f"openai.model={MODEL}",
        f"evaluate.tasks={db_dev_file}", "evaluate.limit=2", f"evaluate.out_dir={tmp_path}",
        "generation.max_new_tokens=8"])
    metrics = evaluate(params, progress=False)
    assert metrics["tasks"] == 2 and sum(metrics["outcomes"].values()) == 2
    assert metrics["policy"] == f"openai:{MODEL}@{base_url}" and metrics["completion_tokens"] >= 2 * 8
    rows = [json.loads(line) for line in (tmp_path / "trajectories.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["messages"][0]["content"].lstrip().startswith("I will ask you") for r in rows)
    assert stats(base_url)["requests"] - before["requests"] >= 2


def test_agentbench_http_agent_request_shape(base_url):
    """What AgentBench's HTTPAgent posts (its agent config's body + role/content messages) and reads back
    (`response[choices][0][message][content]`); a context overflow must carry the words its rule looks for."""
    body = {"model": MODEL, "temperature": 0, "max_tokens": 4, "messages": [
        {"role": "user", "content": "the task prompt"}, {"role": "assistant", "content": "Ok."},
        {"role": "user", "content": "the question"}]}
    headers = {"Content-Type": "application/json", "Authorization": "Bearer EMPTY"}
    reply = httpx.post(base_url + "/chat/completions", json=body, headers=headers)
    assert reply.status_code == 200 and isinstance(reply.json()["choices"][0]["message"]["content"], str)
    overflow = dict(body, messages=[{"role": "user", "content": "word " * 1200}])
    reply = httpx.post(base_url + "/chat/completions", json=overflow, headers=headers)
    text = reply.text.lower()
    assert reply.status_code == 400 and "context" in text and "maximum" in text and "tokens" in text
