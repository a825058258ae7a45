"""ERC in one page: Entropy Ratio Clipping (arXiv 2512.05591) on DAPO and GPPO, in plain torch.

Read it top to bottom; it imports nothing but torch. It is the specification: the losses erc-verl registers in
verl (`erc_verl.core.losses`, computed differently: they gate log-probs and call verl's own losses) are tested
against these functions, values and gradients.

Shapes: B responses in a mini-batch, T response tokens (right-padded), V vocabulary.
    logits          [B, T, V]   the policy's logits at each response position (temperature already applied)
    log_prob        [B, T]      log pi_theta(token), differentiable
    old_log_prob    [B, T]      log pi_old(token), from the rollout-time policy (no gradient)
    advantages      [B, T]      GRPO: the response's group-normalised reward, repeated over its tokens
    response_mask   [B, T]      1 for response tokens, 0 for padding
"""

import torch

ENTROPY_EPS = 1e-8  # the official code's epsilon in the entropy ratio
LOG_RATIO_CLAMP = 20.0  # verl clamps log(pi / pi_old) to +-20 before exp


# 1. The full-vocabulary entropy of the policy at every position: H = -sum_v p_v log p_v.
def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [...]; in float64 (this is the reference)."""
    log_p = torch.log_softmax(logits.double(), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


# 2. The entropy ratio between the current policy and the old one, token by token. The old policy's entropy is
#    measured once per step (with old_log_prob); the current one in every update forward.
def entropy_ratio(entropy: torch.Tensor, old_entropy: torch.Tensor) -> torch.Tensor:
    return (entropy + ENTROPY_EPS) / (old_entropy + ENTROPY_EPS)


# 3. The band: a token keeps its policy gradient while 1 - beta_low < rho < 1 + beta_high (paper: 0.05, 0.05).
def erc_keep(rho: torch.Tensor, beta_low: float = 0.05, beta_high: float = 0.05) -> torch.Tensor:
    return (rho > 1.0 - beta_low) & (rho < 1.0 + beta_high)


# 4. DAPO's token loss: PPO's clipped surrogate with a wider upper bound ("clip-higher", eps_high 0.28) and the
#    dual clip, which bounds the loss of a negative-advantage token at -A * c however large its ratio.
def dapo_token_loss(log_prob, old_log_prob, advantages, eps_low=0.2, eps_high=0.28, clip_c=10.0):
    ratio = torch.exp(torch.clamp(log_prob - old_log_prob, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    surrogate = torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - eps_low, 1 + eps_high))
    dual_clipped = torch.minimum(surrogate, -advantages * clip_c)
    return torch.where(advantages < 0, dual_clipped, surrogate)


# 5. GPPO's token loss (Klear-Reasoner, arXiv 2508.07629): the same values as DAPO's, but a clipped token keeps
#    a bounded gradient. The bounds are multiplied by r / sg(r), which is 1 in value and carries d log pi, so a
#    token clipped at 1 + eps contributes -A (1 + eps) grad log pi instead of nothing.
def gppo_token_loss(log_prob, old_log_prob, advantages, eps_low=0.2, eps_high=0.2, clip_c=10.0):
    ratio = torch.exp(torch.clamp(log_prob - old_log_prob, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    carrier = ratio / ratio.detach()
    bounded = torch.clamp(ratio, (1 - eps_low) * carrier, (1 + eps_high) * carrier)
    surrogate = torch.maximum(-advantages * ratio, -advantages * bounded)
    dual_clipped = torch.minimum(surrogate, -advantages * clip_c)
    return torch.where(advantages < 0, dual_clipped, surrogate)


# 6. Token-mean: every response token of the mini-batch weighs the same.
def token_mean(token_loss: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    mask = response_mask.to(token_loss.dtype)
    return (token_loss * mask).sum() / mask.sum().clamp(min=1)


# 7. ERC: a token outside the band keeps its loss value but passes no gradient (the official code's
#    `where(keep, loss, loss.detach())`); it still counts in the token-mean's denominator.
def erc_loss(token_loss: torch.Tensor, keep: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    return token_mean(torch.where(keep, token_loss, token_loss.detach()), response_mask)


# 8. What erc-verl logs per step, as fractions of the response tokens.
def erc_metrics(rho: torch.Tensor, keep: torch.Tensor, response_mask: torch.Tensor, beta_low=0.05, beta_high=0.05):
    mask = response_mask.bool()
    tokens = mask.sum().clamp(min=1)
    return {
        "actor/erc_clipfrac": ((~keep & mask).sum() / tokens).item(),
        "actor/erc_clipfrac_low": (((rho <= 1 - beta_low) & mask).sum() / tokens).item(),
        "actor/erc_clipfrac_high": (((rho >= 1 + beta_high) & mask).sum() / tokens).item(),
        "actor/entropy_ratio_mean": rho[mask].mean().item(),
        "actor/entropy_ratio_min": rho[mask].min().item(),
        "actor/entropy_ratio_max": rho[mask].max().item(),
    }


# 9. Putting it together: the loss of one mini-batch for ERC-DAPO (or ERC-GPPO with gppo_token_loss).
def erc_dapo_loss(logits, old_entropy, log_prob, old_log_prob, advantages, response_mask, beta_low=0.05,
                  beta_high=0.05, eps_low=0.2, eps_high=0.28, clip_c=10.0):
    with torch.no_grad():  # ERC only thresholds the entropy: no gradient flows through it
        rho = entropy_ratio(token_entropy(logits), old_entropy)
        keep = erc_keep(rho, beta_low, beta_high)
    token_loss = dapo_token_loss(log_prob, old_log_prob, advantages, eps_low, eps_high, clip_c)
    return erc_loss(token_loss, keep, response_mask), erc_metrics(rho, keep, response_mask, beta_low, beta_high)
