"""Batched sampling from a Hugging Face causal LM with per-token log-probs, in plain torch.

What the `hf` rollout server runs for every batch of requests, and what `erc-verl eval` samples with when there
is no vLLM. Each sampled token's log-probability is taken under ``log_softmax(logits / temperature)`` before
top-k / top-p filtering, which is what verl's actor recomputes as ``old_log_prob``.
"""

from typing import Optional

import torch


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k / nucleus filtering on already temperature-scaled logits (-1 / 1.0 mean off, as in verl's config)."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) > top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def sample(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    eos_token_ids: list[int],
    pad_token_id: int,
    generator: Optional[torch.Generator] = None,
) -> tuple[list[list[int]], list[list[float]]]:
    """Sample continuations for a batch of prompts; returns token ids and their log-probs (EOS included).

    ``temperature == 0`` is greedy (log-probs then at temperature 1).
    """
    batch = len(prompts)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        attention_mask[i, width - len(p) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)

    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1, :].float()
    next_pos = position_ids[:, -1:] + 1
    eos = torch.tensor(eos_token_ids, dtype=torch.long)
    done = torch.zeros(batch, dtype=torch.bool)
    tokens, logps = [], []
    for _ in range(max_new_tokens):
        scaled = logits / temperature if temperature > 0 else logits
        logp = torch.log_softmax(scaled, dim=-1)
        if temperature > 0:
            probs = torch.softmax(_filter_logits(scaled, top_k, top_p), dim=-1)
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            tok = scaled.argmax(-1)
        tokens.append(tok)
        logps.append(logp.gather(-1, tok[:, None]).squeeze(-1))
        done = done | torch.isin(tok, eos)
        if bool(done.all()):
            break
        attention_mask = torch.cat([attention_mask, torch.ones((batch, 1), dtype=torch.long)], dim=-1)
        out = model(
            input_ids=tok[:, None],
            attention_mask=attention_mask,
            position_ids=next_pos,
            past_key_values=past,
            use_cache=True,
        )
        past, logits = out.past_key_values, out.logits[:, -1, :].float()
        next_pos = next_pos + 1

    tokens_t, logps_t = torch.stack(tokens, 1), torch.stack(logps, 1)
    ids_out, lp_out = [], []
    for i in range(batch):
        row = tokens_t[i].tolist()
        hits = [j for j, t in enumerate(row) if t in eos_token_ids]
        end = hits[0] + 1 if hits else len(row)
        ids_out.append(row[:end])
        lp_out.append(logps_t[i, :end].tolist())
    return ids_out, lp_out
