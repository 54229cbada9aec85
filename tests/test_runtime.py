import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cmat_pipeline.config import GenerationConfig, OpenAIConfig, load_params
from cmat_pipeline.envs.dbbench import load_tasks
from cmat_pipeline.errors import CmatError, ModelPreparationError
from cmat_pipeline.evaluate import evaluate
from cmat_pipeline.runtime.policy import HFPolicy, OpenAIPolicy, PolicyOutput, cut_at_stop
from cmat_pipeline.runtime.rollout import run_episodes


class CountingEpisode:
    def __init__(self, turns: int):
        self.turns, self.messages, self.done = turns, [{"role": "user", "content": "hi"}], False

    def step(self, response):
        self.messages.append({"role": "assistant", "content": response})
        self.done = len(self.messages) > self.turns

    def result(self):
        return {"turns": len(self.messages) - 1}


class ScriptedPolicy:
    name = "scripted"

    def __init__(self):
        self.batches = []

    def generate(self, conversations):
        self.batches.append(len(conversations))
        return [PolicyOutput("ok") for _ in conversations]


def test_one_generate_call_serves_every_active_episode():
    policy = ScriptedPolicy()
    lengths = [1, 3, 2, 1, 1, 2]
    results = run_episodes((lambda n=n: CountingEpisode(n) for n in lengths), policy, concurrency=4)
    assert [r["turns"] for r in results] == lengths  # results keep the input order
    assert max(policy.batches) == 4 and sum(policy.batches) == sum(lengths)
    assert len(policy.batches) < sum(lengths)  # batched, not one call per turn


def test_cut_at_stop():
    assert cut_at_stop("abc<|im_end|>junk", ["<|im_end|>", "zz"]) == "abc"
    assert cut_at_stop("abc", ["<|im_end|>"]) == "abc"


# ------------------------------------------------------------------------------ local HF policy


@pytest.fixture(scope="module")
def conversations():
    return [
        [{"role": "user", "content": "Say hi."}],
        [{"role": "user", "content": "What is SQL? Explain in one long sentence please."}],
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, {"role": "user", "content": "z"}],
    ]


def test_batched_generation_equals_one_at_a_time(tiny_model_dir, conversations):
    gen = GenerationConfig(max_new_tokens=12, batch_size=3, max_context_tokens=512)
    policy = HFPolicy(str(tiny_model_dir), gen, device="cpu")
    batched = policy.generate(conversations)
    single = [policy.generate([c])[0] for c in conversations]
    assert [o.text for o in batched] == [o.text for o in single]
    assert all(o.completion_tokens >= 1 and o.prompt_tokens > 5 for o in batched)


def test_context_guard_reports_context_limit(tiny_model_dir, conversations):
    gen = GenerationConfig(max_new_tokens=8, batch_size=2, max_context_tokens=64)
    policy = HFPolicy(str(tiny_model_dir), gen, device="cpu")
    long = [{"role": "user", "content": "word " * 200}]
    out = policy.generate([conversations[0], long])
    assert out[0].text is not None and out[1].text is None and out[1].prompt_tokens > 64


def test_missing_adapter_says_how_to_fix(tiny_model_dir, tmp_path):
    with pytest.raises(ModelPreparationError, match="run the stage that writes it"):
        HFPolicy(str(tiny_model_dir), GenerationConfig(), adapter=str(tmp_path / "sft"), device="cpu")


def test_missing_model_dir_says_how_to_fix(tmp_path):
    with pytest.raises(ModelPreparationError, match="run the prepare_model stage"):
        HFPolicy(str(tmp_path), GenerationConfig())


def test_evaluate_end_to_end_on_tiny_model(tiny_model_dir, db_dev_file, tmp_path):
    out = tmp_path / "eval"
    params = load_params(
        _params_file(tmp_path),
        [f"model.dir={tiny_model_dir}", f"evaluate.tasks={db_dev_file}", "evaluate.limit=4", "evaluate.adapter=",
         f"evaluate.out_dir={out}", "generation.max_new_tokens=16", "generation.batch_size=4", "model.device=cpu"],
    )
    metrics = evaluate(params, progress=False)
    assert metrics["tasks"] == 4 and sum(metrics["outcomes"].values()) == 4
    assert metrics["generate_calls"] >= 1
    lines = (out / "trajectories.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[0])["messages"][0]["content"].startswith("\nI will ask you")
    assert json.loads((out / "metrics.json").read_text())["overall_cat_accuracy"] == metrics["overall_cat_accuracy"]
    assert (out / "report.png").stat().st_size > 1000 and "overall_cat_accuracy" in (out / "report.md").read_text()
    assert load_params(out / "resolved_params.yaml") == params  # the resolved config sits next to the outputs


def _params_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("{}\n")
    return path


# ------------------------------------------------------------------------------ OpenAI-compatible policy


class FakeEndpoint(BaseHTTPRequestHandler):
    failures_left = 1  # the first request fails with 503, then the client retries

    def log_message(self, *args):
        pass

    def _send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if FakeEndpoint.failures_left > 0:
            FakeEndpoint.failures_left -= 1
            return self._send(503, {"error": {"message": "busy"}})
        last = request["messages"][-1]["content"]
        if "TOO LONG" in last:
            return self._send(400, {"error": {"message": "This model's maximum context length is 4096 tokens",
                                              "type": "invalid_request_error"}})
        if request["model"] != "served":
            return self._send(404, {"error": {"message": "model not found"}})
        return self._send(200, {
            "id": "x", "object": "chat.completion", "created": 0, "model": "served",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": f"echo: {last}"}}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
        })


@pytest.fixture()
def endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeEndpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeEndpoint.failures_left = 1
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_openai_policy_retries_and_reports_context_limit(endpoint):
    cfg = OpenAIConfig(base_url=endpoint, model="served", max_retries=2, timeout_s=5)
    policy = OpenAIPolicy(cfg, GenerationConfig(max_new_tokens=8))
    out = policy.generate([[{"role": "user", "content": "a"}], [{"role": "user", "content": "TOO LONG"}]])
    assert out[0].text == "echo: a" and out[0].prompt_tokens == 7 and out[0].completion_tokens == 3
    assert out[1].text is None


def test_openai_policy_errors_are_clear(endpoint):
    with pytest.raises(CmatError, match="openai.model is empty"):
        OpenAIPolicy(OpenAIConfig(base_url=endpoint), GenerationConfig())
    policy = OpenAIPolicy(OpenAIConfig(base_url=endpoint, model="other", max_retries=1), GenerationConfig())
    with pytest.raises(CmatError, match="openai:other@.*model not found"):
        policy.generate([[{"role": "user", "content": "a"}]])
    dead = OpenAIPolicy(OpenAIConfig(base_url="http://127.0.0.1:9/v1", model="served", max_retries=0, timeout_s=2),
                        GenerationConfig())
    with pytest.raises(CmatError, match="endpoint failed after 0 retries"):
        dead.generate([[{"role": "user", "content": "a"}]])


def test_active_episodes_are_closed_when_the_policy_fails():
    class Failing:
        name = "failing"

        def generate(self, conversations):
            raise RuntimeError("boom")

    closed = []
    with pytest.raises(RuntimeError, match="boom"):
        run_episodes((lambda: CountingEpisode(2) for _ in range(3)), Failing(), concurrency=2, close=closed.append)
    assert len(closed) == 2  # both started episodes released; the third never started


def test_masked_token_nll_matches_full_cross_entropy(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from cmat_pipeline.runtime.scoring import mean_nll_per_row

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    targets = torch.zeros_like(ids)
    targets[0, 6:] = 1
    targets[1, 10:] = 1
    with torch.no_grad():
        got = mean_nll_per_row(model, ids, torch.ones_like(ids), targets)
        logits = model(input_ids=ids).logits
    want = [torch.nn.functional.cross_entropy(logits[0, 5:11], ids[0, 6:]),
            torch.nn.functional.cross_entropy(logits[1, 9:11], ids[1, 10:])]
    assert torch.allclose(got, torch.stack(want), atol=1e-4)


def test_protocol_ok_turn_is_context_not_target(tiny_model_dir):
    from transformers import AutoTokenizer

    from cmat_pipeline.chat_format import encode_chat
    from cmat_pipeline.envs.dbbench import FIRST_REPLY, SYSTEM_PROMPT

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    action = "Count them.\nAction: Operation\n```sql\nSELECT COUNT(*) FROM t;\n```"
    messages = [{"role": "user", "content": SYSTEM_PROMPT}, {"role": "assistant", "content": FIRST_REPLY},
                {"role": "user", "content": "How many rows?"}, {"role": "assistant", "content": action}]
    enc = encode_chat(tokenizer, messages)
    assert tokenizer.decode([t for t, m in zip(enc.input_ids, enc.assistant_mask) if m]) == action + tokenizer.eos_token
    other = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": FIRST_REPLY}]  # not the protocol
    enc = encode_chat(tokenizer, other)
    assert tokenizer.decode([t for t, m in zip(enc.input_ids, enc.assistant_mask) if m]) == FIRST_REPLY + tokenizer.eos_token
