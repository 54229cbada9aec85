"""Per-token losses on selected (assistant) positions only.

The output projection is the costly part of a small LM's forward pass (49k-token vocabulary): it is
applied only to the positions that are scored, never to prompt or observation tokens.
"""

from __future__ import annotations

from typing import Any


def masked_token_nll(model: Any, input_ids, attention_mask, target_mask):
    """Negative log-likelihood of each target token: returns (nll [n_targets], row index [n_targets]).

    `target_mask[b, t] = 1` marks token t of row b as a target (predicted from the tokens before it).
    """
    import torch

    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    select = target_mask[:, 1:].bool()
    logits = model.get_output_embeddings()(hidden[:, :-1][select]).float()
    nll = torch.nn.functional.cross_entropy(logits, input_ids[:, 1:][select], reduction="none")
    rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(select)[select]
    return nll, rows


def mean_nll_per_row(model: Any, input_ids, attention_mask, target_mask):
    """Mean target-token loss of each row (0 for a row without targets)."""
    import torch

    nll, rows = masked_token_nll(model, input_ids, attention_mask, target_mask)
    n = input_ids.shape[0]
    total = torch.zeros(n, device=nll.device).index_add_(0, rows, nll)
    count = torch.zeros(n, device=nll.device).index_add_(0, rows, torch.ones_like(nll))
    return total / count.clamp(min=1)
