"""Policies: whatever writes the next assistant turn for a batch of conversations.

- `HFPolicy`: a local transformers model (+ optional PEFT adapter). One `generate` call serves every
  conversation of a turn (left-padded batch), with stop strings, greedy or sampled decoding, and a
  context guard that reports "context limit" (text None) instead of crashing. With
  `generation.prefix_cache` every prompt's KV is kept (`PrefixCache`): a conversation's next turn encodes only
  its new tokens, and the instructions a batch shares are encoded once.
- `OpenAIPolicy`: any OpenAI-compatible chat-completions endpoint (vLLM, an API) for teachers and
  baselines, with timeouts, retries with backoff, and concurrent requests.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from cmat_pipeline.config import GenerationConfig, OpenAIConfig
from cmat_pipeline.errors import CmatError, ModelPreparationError

Conversation = list[dict[str, str]]


@dataclass
class PolicyOutput:
    """One assistant turn. `text` is None when the conversation no longer fits the context."""

    text: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    """`stop` (end token or stop string) or `length` (the token limit cut it)."""


class Policy(Protocol):
    name: str

    def generate(self, conversations: Sequence[Conversation]) -> list[PolicyOutput]:
        """The next assistant turn of each conversation, in order."""


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """Text up to the first stop string (generation may run a few tokens past it)."""
    cut = len(text)
    for stop in stops:
        pos = text.find(stop)
        if pos != -1:
            cut = min(cut, pos)
    return text[:cut]


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise CmatError("model.device is 'cuda' but no CUDA GPU is visible; set model.device: auto or cpu")
    return device


class StopInCompletion:
    """Stops a row once its completion (not the prompt: transformers' `stop_strings` also match across the
    prompt's end, e.g. a stop "\n\n" after a template ending in "\n") contains a stop string."""

    def __init__(self, tokenizer: Any, stops: list[str], prompt_width: int):
        self.tokenizer, self.stops, self.width = tokenizer, stops, prompt_width

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        texts = self.tokenizer.batch_decode(input_ids[:, self.width:], skip_special_tokens=False)
        return torch.tensor([any(stop in text for stop in self.stops) for text in texts], device=input_ids.device)


PREFIX_MIN_TOKENS = 32
"""A shared prompt prefix shorter than this is not worth a cache: the batch is plainly left-padded."""


def shared_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` have in common."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Tokens every row starts with, leaving each row at least its last token (which `generate` must feed)."""
    limit = max(min(len(ids) for ids in rows) - 1, 0)
    return min([limit, *(shared_length(rows[0], ids) for ids in rows[1:])])


def model_state(model: Any) -> tuple:
    """What a prefix's KV depends on besides its tokens, cheap to read on every call: each parameter's storage
    and in-place version counter (an optimizer step, `copy_`, `load_state_dict` or `.to()` changes it), each
    PEFT layer's active, merged and disabled adapters, and train/eval mode. Blind to writes through
    `param.data` (they bypass the version counter): call `HFPolicy.reset_prefix_cache()` after those."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    params = tuple((p.data_ptr(), p._version) for p in model.parameters())
    adapters = tuple((tuple(m.active_adapters), tuple(m.merged_adapters), m.disable_adapters)
                     for m in model.modules() if isinstance(m, BaseTunerLayer))
    return id(model), model.training, params, adapters


PREFIX_CACHE_BYTES = 2 << 30
"""KV bytes `PrefixCache` keeps at most; the least recently used prompts go first."""


@dataclass
class CachedPrompt:
    """One prompt's KV (batch 1): per layer (keys, values) of shape [1, heads, len(ids), head_dim]."""

    state: tuple
    ids: tuple[int, ...]
    layers: list[tuple[Any, Any]]

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)


class PrefixCache:
    """The KV of recent prompts, most recently used last, each valid for the model state (`model_state`) it was
    computed under. Each row of a `generate` call reuses the longest prefix it shares with any stored prompt,
    so the next turn of a conversation encodes only its new tokens (the reply and the observation), and new
    conversations of a batch encode the instructions they share once. Bounded by `max_bytes`."""

    def __init__(self, max_bytes: int = PREFIX_CACHE_BYTES):
        self.max_bytes = max_bytes
        self.entries: list[CachedPrompt] = []
        self.hits = 0
        """Rows that reused at least PREFIX_MIN_TOKENS tokens of a stored prompt."""
        self.misses = 0
        """Shared prefixes encoded on their own (a batch's rows had them in common, no stored prompt did)."""
        self.unsupported = False
        """Set once the model turns out to have layers whose cache is not plain keys and values (sliding window,
        linear attention, indexers): their cache does not hold the whole prefix, or cannot take padding."""

    def clear(self) -> None:
        self.entries.clear()

    def empty(self, model: Any) -> Any:
        """A DynamicCache for `model` with nothing in it, or None (and `unsupported`) for a model whose layers
        are not plain full attention."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        if self.unsupported:
            return None
        cache = DynamicCache(config=model.config)
        if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
            self.unsupported = True
            self.clear()
            return None
        return cache

    def batched(self, model: Any, batch: Sequence[Sequence[int]], state: tuple) -> tuple[Any, list[int]] | None:
        """A DynamicCache holding row r's first n_r tokens, left-padded to the longest, and the n_r (0: the row
        reuses nothing); None when no row reuses PREFIX_MIN_TOKENS tokens or the model is `unsupported`."""
        import torch
        from transformers import DynamicCache

        if self.empty(model) is None:
            return None
        self.entries = [e for e in self.entries if e.state == state]  # stale since an update: free them now
        matches = [self._best(ids, len(ids) - 1) for ids in batch]  # generate must feed each row's last token
        self.hits += sum(n >= PREFIX_MIN_TOKENS for n, _ in matches)
        shared = common_prefix_length(batch) if len(batch) > 1 else 0
        if shared >= PREFIX_MIN_TOKENS and any(n < shared for n, _ in matches):
            entry = self._encode(model, state, batch[0][:shared])
            matches = [(shared, entry) if n < shared else (n, e) for n, e in matches]
        matches = [(n, e) if n >= PREFIX_MIN_TOKENS else (0, None) for n, e in matches]
        width = max(n for n, _ in matches)
        if width == 0:
            return None
        for _, entry in matches:
            if entry is not None:
                self._touch(entry)
        template = next(e for _, e in matches if e is not None).layers
        layers = []
        for layer, (k0, v0) in enumerate(template):
            keys, values = [], []
            for n, entry in matches:
                k, v = entry.layers[layer] if entry is not None else (k0[..., :0, :], v0[..., :0, :])
                pad = (0, 0, width - n, 0)  # left-pad the sequence dim (-2) with zeros: masked out
                keys.append(torch.nn.functional.pad(k[..., :n, :], pad))
                values.append(torch.nn.functional.pad(v[..., :n, :], pad))
            layers.append((torch.cat(keys), torch.cat(values)))
        return DynamicCache(ddp_cache_data=layers), [n for n, _ in matches]

    def store(self, batch: Sequence[Sequence[int]], cache: Any, cached: Sequence[int], width: int,
              state: tuple) -> None:
        """Keep each row's prompt KV from `cache` after `generate`: row r's prompt sits in the first `width`
        columns as [padding][its cached n_r tokens][padding][its other tokens]."""
        import torch

        cached_width = max(cached)
        for r, (ids, n) in enumerate(zip(batch, cached)):
            own = len(ids) - n
            columns = torch.tensor([*range(cached_width - n, cached_width), *range(width - own, width)],
                                   device=cache.layers[0].keys.device)
            layers = [(layer.keys[r:r + 1].index_select(2, columns), layer.values[r:r + 1].index_select(2, columns))
                      for layer in cache.layers]
            self._add(CachedPrompt(state, tuple(ids), layers))

    def _best(self, ids: Sequence[int], limit: int) -> tuple[int, CachedPrompt | None]:
        """The stored prompt sharing the longest prefix with `ids` (at most `limit` tokens) and that length."""
        best: tuple[int, CachedPrompt | None] = (0, None)
        for entry in self.entries:
            n = min(shared_length(entry.ids, ids), limit)
            if n > best[0]:
                best = (n, entry)
        return best

    def _encode(self, model: Any, state: tuple, prefix: Sequence[int]) -> CachedPrompt:
        """Encode `prefix` on its own (extending the stored prompt it shares most with) and store it."""
        import torch
        from transformers import DynamicCache

        self.misses += 1
        start, base = self._best(prefix, len(prefix) - 1)
        past = DynamicCache(ddp_cache_data=[(k[..., :start, :], v[..., :start, :]) for k, v in base.layers]) \
            if base is not None and start > 0 else self.empty(model)
        device = next(model.parameters()).device
        model(input_ids=torch.tensor([list(prefix[start:])], device=device), past_key_values=past, use_cache=True,
              logits_to_keep=1)
        entry = CachedPrompt(state, tuple(prefix), [(layer.keys, layer.values) for layer in past.layers])
        self._add(entry)
        return entry

    def _touch(self, entry: CachedPrompt) -> None:
        self.entries.remove(entry)
        self.entries.append(entry)

    def _add(self, entry: CachedPrompt) -> None:
        self.entries = [e for e in self.entries if e.ids != entry.ids or e.state != entry.state] + [entry]
        total = sum(e.nbytes for e in self.entries)
        while self.entries and total > self.max_bytes:  # least recently used first
            total -= self.entries.pop(0).nbytes


class HFPolicy:
    """A local causal LM, batched."""

    def __init__(self, model_dir: str, gen: GenerationConfig, adapter: str = "", device: str = "auto",
                 dtype: str = "float32", adapter_key: str = "evaluate.adapter"):
        """`adapter_key`: the params key `adapter` came from, named when it holds no adapter."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.gen = gen
        self.device = resolve_device(device)
        self.name = f"hf:{model_dir}" + (f"+{adapter}" if adapter else "")
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise ModelPreparationError(f"{model_dir}: no config.json; run the prepare_model stage first (`cmat prepare-model`)")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        if adapter:
            from peft import PeftModel

            if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
                raise ModelPreparationError(f"{adapter}: no PEFT adapter here (adapter_config.json); run the stage that writes it "
                                            f"(`cmat sft`, `cmat cmat`) or use the base model with --set {adapter_key}=''")
            model = PeftModel.from_pretrained(model, adapter)
        self.model = model.to(self.device).eval()
        self.prefix_cache = PrefixCache()

    @classmethod
    def from_loaded(cls, model: Any, tokenizer: Any, gen: GenerationConfig, name: str) -> "HFPolicy":
        """A policy over a model already in memory (the cmat stage rolls out the actor it is training)."""
        policy = cls.__new__(cls)
        policy.gen, policy.name, policy.model, policy.tokenizer = gen, name, model, tokenizer
        policy.device = str(next(model.parameters()).device)
        policy.prefix_cache = PrefixCache()
        return policy

    def reset_prefix_cache(self) -> None:
        """Forget every cached prompt prefix (needed only after writes through `param.data`: see `model_state`)."""
        self.prefix_cache.clear()

    def encode(self, conversation: Conversation) -> list[int]:
        ids = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def stops(self, gen: GenerationConfig) -> list[str]:
        return [s for s in [self.tokenizer.eos_token, *gen.stop] if s]

    def generate(self, conversations: Sequence[Conversation], gen: GenerationConfig | None = None) -> list[PolicyOutput]:
        """`gen` overrides the decoding settings for this call (default: the policy's own)."""
        gen = gen or self.gen
        encoded = [self.encode(c) for c in conversations]
        budget = gen.max_context_tokens - gen.max_new_tokens
        outputs: list[PolicyOutput] = [PolicyOutput(None, len(ids)) for ids in encoded]
        fitting = [i for i, ids in enumerate(encoded) if len(ids) <= budget]
        for start in range(0, len(fitting), gen.batch_size):
            chunk = fitting[start:start + gen.batch_size]
            for i, out in zip(chunk, self.generate_ids([encoded[i] for i in chunk], gen)):
                outputs[i] = out
        return outputs

    def generate_ids(self, batch: list[list[int]], gen: GenerationConfig, limits: Sequence[int] | None = None,
                     streamer: Any = None) -> list[PolicyOutput]:
        """One left-padded `generate` call over tokenized prompts (with gen.prefix_cache, each row's longest prefix
        already encoded comes from `PrefixCache`, and every prompt is kept there afterwards). `limits` caps each
        row's new tokens below gen.max_new_tokens (the server batches requests with different max_tokens); `streamer` is handed to
        `generate` (it receives every step's tokens for the whole batch)."""
        import torch

        pad = self.tokenizer.pad_token_id
        state = model_state(self.model) if gen.prefix_cache else ()
        with torch.inference_mode():
            found = self.prefix_cache.batched(self.model, batch, state) if gen.prefix_cache else None
        cache, cached = found if found is not None else (None, [0] * len(batch))
        if gen.prefix_cache and cache is None:
            cache = self.prefix_cache.empty(self.model)  # generate fills it; the prompts are stored from it below
        # Each row: [padding][its cached tokens][padding][its other tokens], mask 0/1/0/1. generate derives
        # positions from the mask's cumsum, so every token sits at the position it would have unpadded, and
        # feeds only the columns after the cache; with nothing cached this is plain left padding.
        cached_width = max(cached)
        own_width = max(len(ids) - n for ids, n in zip(batch, cached))
        width = cached_width + own_width
        rows, masks = [], []
        for ids, n in zip(batch, cached):
            gap = own_width - (len(ids) - n)
            rows.append([pad] * (cached_width - n) + ids[:n] + [pad] * gap + ids[n:])
            masks.append([0] * (cached_width - n) + [1] * n + [0] * gap + [1] * (len(ids) - n))
        input_ids = torch.tensor(rows, device=self.device)
        attention = torch.tensor(masks, device=self.device)
        sampling = gen.temperature > 0
        kwargs: dict[str, Any] = dict(
            max_new_tokens=gen.max_new_tokens, do_sample=sampling, pad_token_id=pad,
            eos_token_id=self.tokenizer.eos_token_id, streamer=streamer,
        )
        if cache is not None:
            kwargs.update(past_key_values=cache)  # generate feeds only the columns after its content
        if sampling:
            kwargs.update(temperature=gen.temperature, top_p=gen.top_p)
        else:  # silence the model's sampling defaults when greedy
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if gen.stop:
            kwargs.update(stopping_criteria=[StopInCompletion(self.tokenizer, list(gen.stop), width)])
        with torch.inference_mode():
            generated = self.model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
            if cache is not None:
                self.prefix_cache.store(batch, cache, cached, width, state)
        results = []
        ends = {pad, self.tokenizer.eos_token_id}
        stops = self.stops(gen)
        for k, (row, ids) in enumerate(zip(generated[:, width:].tolist(), batch)):
            limit = limits[k] if limits else gen.max_new_tokens
            row = row[:limit]
            # Finished rows are padded to the batch's longest: keep tokens up to the first end token.
            stop_at = next((j for j, tok in enumerate(row) if tok in ends), len(row))
            text = self.tokenizer.decode(row[:stop_at], skip_special_tokens=False)
            cut = cut_at_stop(text, stops)
            reason = "length" if stop_at == limit and cut == text else "stop"
            results.append(PolicyOutput(cut.strip(), len(ids), min(stop_at + 1, len(row)), reason))
        return results


class OpenAIPolicy:
    """An OpenAI-compatible endpoint; one request per conversation, `concurrency` in flight."""

    def __init__(self, cfg: OpenAIConfig, gen: GenerationConfig):
        from openai import OpenAI

        if not cfg.model:
            raise CmatError("openai.model is empty: name the model the endpoint serves (e.g. the vLLM --served-model-name)")
        self.cfg, self.gen = cfg, gen
        self.name = f"openai:{cfg.model}@{cfg.base_url}"
        # The client retries connection errors, timeouts, 429 and 5xx with exponential backoff.
        self.client = OpenAI(base_url=cfg.base_url, api_key=os.environ.get(cfg.api_key_env) or "EMPTY",
                             timeout=cfg.timeout_s, max_retries=cfg.max_retries)

    def _one(self, conversation: Conversation) -> PolicyOutput:
        import openai

        try:
            reply = self.client.chat.completions.create(
                model=self.cfg.model, messages=conversation, max_tokens=self.gen.max_new_tokens,
                temperature=self.gen.temperature, top_p=self.gen.top_p, stop=self.gen.stop or None,
            )
        except openai.BadRequestError as err:
            if "context" in str(err).lower() and ("length" in str(err).lower() or "limit" in str(err).lower()):
                return PolicyOutput(None)
            raise CmatError(f"{self.name}: request rejected: {err}") from None
        except (openai.APIConnectionError, openai.APITimeoutError, openai.APIStatusError) as err:
            raise CmatError(f"{self.name}: endpoint failed after {self.cfg.max_retries} retries: {err}") from None
        usage = reply.usage
        return PolicyOutput(
            reply.choices[0].message.content or "",
            usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0,
        )

    def generate(self, conversations: Sequence[Conversation]) -> list[PolicyOutput]:
        with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
            return list(pool.map(self._one, conversations))


@dataclass
class Timed:
    """Wraps a policy to account calls, replies, tokens and seconds spent generating. A wrapped policy with
    a `usage()` method (a mixture of agents: runtime/smoa.py) adds its own breakdown under "usage"."""

    policy: Policy
    calls: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    @property
    def name(self) -> str:
        return self.policy.name

    def generate(self, conversations: Sequence[Conversation]) -> list[PolicyOutput]:
        start = time.perf_counter()
        outputs = self.policy.generate(conversations)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        self.requests += len(conversations)
        self.prompt_tokens += sum(o.prompt_tokens for o in outputs)
        self.completion_tokens += sum(o.completion_tokens for o in outputs)
        return outputs

    def stats(self) -> dict[str, Any]:
        stats = {"generate_calls": self.calls, "generate_requests": self.requests, "prompt_tokens": self.prompt_tokens,
                 "completion_tokens": self.completion_tokens, "generate_seconds": round(self.seconds, 2)}
        usage = getattr(self.policy, "usage", None)
        if callable(usage):
            stats["usage"] = usage()
        return stats
