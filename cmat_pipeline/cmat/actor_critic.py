"""The Assistant (actor), its frozen SFT reference and the Checker's value function on one base model.

Three LoRA adapters share the base weights (peft multi-adapter): `default` is the actor (starts as the SFT
adapter, trained; saved at the top of the stage's folder so `evaluate` and vLLM load it like the sft
adapter), `reference` is a frozen copy of the SFT adapter for the KL penalty, and `critic` is the value
function's own adapter with a linear value head on the last hidden state of each turn-level state s_t
(the conversation up to the first token of assistant turn t). With no SFT adapter the actor is a new
LoRA and the reference is the base model (adapters disabled).

Scoring is per episode (one sequence, batch 1): no padding, and activations of a 2k-token conversation
fit a CPU's memory.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

from cmat_pipeline.errors import ConfigError

ACTOR, REFERENCE, CRITIC = "default", "reference", "critic"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def lora_targets(adapter_dir: str) -> list[str]:
    """The SFT adapter's target modules; a non-LoRA adapter is a ConfigError (the actor must be LoRA)."""
    config_file = Path(adapter_dir) / "adapter_config.json"
    if not config_file.is_file():
        raise ConfigError(f"cmat.init_adapter: {adapter_dir} has no adapter_config.json; run the sft stage first "
                          "(`cmat sft`) or set cmat.init_adapter: '' to start from the base model")
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "LORA":
        raise ConfigError(f"cmat.init_adapter: {adapter_dir} is a {config.get('peft_type')} adapter; the cmat stage "
                          "tunes a LoRA actor (run sft with sft.method: lora, or set cmat.init_adapter: '')")
    targets = config.get("target_modules")
    return sorted(targets) if isinstance(targets, (list, set)) else list(DEFAULT_TARGETS)


class ActorCritic:
    """Actor, reference and critic adapters on one base model, and the value head."""

    def __init__(self, model_dir: str, init_adapter: str, critic_rank: int, device: str, seed: int):
        import torch
        from peft import LoraConfig, PeftModel, get_peft_model
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        torch.manual_seed(seed)  # init of a new actor LoRA and of the critic
        if init_adapter:
            targets = lora_targets(init_adapter)
            model = PeftModel.from_pretrained(base, init_adapter, adapter_name=ACTOR, is_trainable=True)
            model.load_adapter(init_adapter, adapter_name=REFERENCE, is_trainable=False)
        else:
            targets = list(DEFAULT_TARGETS)
            model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules=targets))
        model.add_adapter(CRITIC, LoraConfig(task_type="CAUSAL_LM", r=critic_rank, lora_alpha=2 * critic_rank,
                                             target_modules=targets))
        self.has_reference = bool(init_adapter)
        self.model = model.to(device).eval()  # eval throughout: no dropout, so PPO's ratio is exactly 1 on-policy
        self.value_head = torch.nn.Linear(base.config.hidden_size, 1).to(device)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)  # V = 0 until the critic has learned something
        self.use(ACTOR)

    # -- adapters
    def use(self, name: str) -> None:
        self.model.set_adapter(name)  # peft also makes only this adapter's weights require grad

    @contextlib.contextmanager
    def adapter(self, name: str) -> Iterator[None]:
        self.use(name)
        try:
            yield
        finally:
            self.use(ACTOR)

    def parameters(self, name: str) -> list[Any]:
        params = [p for n, p in self.model.named_parameters() if f".{name}." in n]
        return params + list(self.value_head.parameters()) if name == CRITIC else params

    def trainable_state(self) -> dict[str, Any]:
        """Actor and critic weights (what a checkpoint must hold; the base and the reference never change)."""
        state = {n: p.detach().clone() for n, p in self.model.named_parameters() if f".{ACTOR}." in n or f".{CRITIC}." in n}
        state.update({f"value_head.{k}": v.detach().clone() for k, v in self.value_head.state_dict().items()})
        return state

    def load_trainable_state(self, state: dict[str, Any]) -> None:
        import torch

        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                if name.startswith("value_head."):
                    continue
                if name not in params:
                    raise ConfigError(f"checkpoint holds {name}, which this model does not have; "
                                      "delete cmat.out_dir/checkpoints to start over")
                params[name].copy_(value)
        self.value_head.load_state_dict({k.removeprefix("value_head."): v for k, v in state.items()
                                         if k.startswith("value_head.")})

    # -- scoring
    def token_logps(self, input_ids, target_mask, grad: bool):
        """Log-probability of each target token (row-major order) under the active adapter."""
        import torch

        from cmat_pipeline.runtime.scoring import masked_token_nll

        with torch.set_grad_enabled(grad):
            nll, _ = masked_token_nll(self.model, input_ids, torch.ones_like(input_ids), target_mask)
        return -nll

    def reference_logps(self, input_ids, target_mask):
        import torch

        with torch.no_grad():
            if self.has_reference:
                with self.adapter(REFERENCE):
                    return self.token_logps(input_ids, target_mask, grad=False)
            with self.model.disable_adapter():
                return self.token_logps(input_ids, target_mask, grad=False)

    def values(self, input_ids, state_ends: Sequence[int]):
        """V(s_t) for each turn: the value head on the critic adapter's hidden state at s_t's last token."""
        with self.adapter(CRITIC):
            hidden = self.model.get_decoder()(input_ids=input_ids).last_hidden_state
            return self.value_head(hidden[0, list(state_ends)]).squeeze(-1)

    # -- saving
    def save(self, out: Path, tokenizer: Any) -> None:
        """The actor at the top of `out` (a plain PEFT LoRA folder) and the critic in out/critic."""
        import shutil

        import torch

        self.model.save_pretrained(str(out), selected_adapters=[ACTOR])
        staging = out / ".critic-staging"
        self.model.save_pretrained(str(staging), selected_adapters=[CRITIC])
        shutil.rmtree(out / "critic", ignore_errors=True)
        (staging / CRITIC).rename(out / "critic")
        shutil.rmtree(staging)
        torch.save(self.value_head.state_dict(), out / "critic" / "value_head.pt")
        tokenizer.save_pretrained(str(out))
