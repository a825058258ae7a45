"""Short, seeded supervised warm start: RL on a random policy has no reward signal.

Teacher-forced cross-entropy on the answer tokens of chat-formatted (question, ``\\boxed{answer}``) pairs drawn
from the RL training split only, so the held-out split measures generalisation. It stops once the policy's
*sampled* accuracy, at the temperature RL samples with, reaches ``stop_accuracy`` on calibration prompts: a slice
of the training split the warm start never trains on. The policy then knows the rule but still samples wrong
digits often, which leaves RL room to improve, and every seed starts RL from the same accuracy: when a small
transformer "gets" the rule varies by hundreds of steps with the seed, so a fixed step count or loss does not.
"""

import random
from dataclasses import dataclass

import torch

from erc_verl.demo.task import answer_text, compute_score, question
from erc_verl.platform.sampler import sample


@dataclass(frozen=True)
class WarmStartSpec:
    max_steps: int = 3000
    stop_accuracy: float = 0.35  # sampled accuracy on the calibration prompts
    temperature: float = 2.0  # the rollout's: the accuracy RL starts from
    n_calibration: int = 256  # training-split prompts the warm start measures on and never trains on
    check_every: int = 50
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0


def encode_pair(tokenizer, expr: str, value: int) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) tokenised exactly as verl's rollout sees them (chat template, EOS-terminated)."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question(expr)}], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    answer_ids = tokenizer.encode(answer_text(value), add_special_tokens=False) + [tokenizer.eos_token_id]
    return prompt_ids, answer_ids


def _batch(tokenizer, pairs: list[tuple[list[int], list[int]]]):
    width = max(len(p) + len(a) for p, a in pairs)
    input_ids = torch.full((len(pairs), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (p, a) in enumerate(pairs):
        ids = p + a
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, len(p) : len(ids)] = torch.tensor(a)
        attention_mask[i, : len(ids)] = 1
    return input_ids, attention_mask, labels


def sampled_accuracy(model, tokenizer, exprs: list[tuple[str, int]], temperature: float, seed: int) -> float:
    """Share of `exprs` answered right by one sample each, with the `hf` rollout's sampler and the task's scorer."""
    pairs = [encode_pair(tokenizer, *e) for e in exprs]
    generator = torch.Generator().manual_seed(seed)
    responses, _ = sample(
        model,
        [p for p, _ in pairs],
        max_new_tokens=max(len(a) for _, a in pairs) + 2,
        temperature=temperature,
        top_k=-1,
        top_p=1.0,
        eos_token_ids=[tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
        generator=generator,
    )
    right = [
        compute_score(None, tokenizer.decode(r, skip_special_tokens=True), str(v))["acc"]
        for r, (_, v) in zip(responses, exprs)
    ]
    return sum(right) / len(right)


def warm_start(model, tokenizer, train_exprs: list[tuple[str, int]], spec: WarmStartSpec, verbose: bool = True):
    """Train `model` in place until its sampled accuracy on the calibration prompts (the first `n_calibration` of
    `train_exprs`) reaches `spec.stop_accuracy`, at most `spec.max_steps` steps. Returns {steps, loss, accuracy}."""
    if not 0 < spec.n_calibration < len(train_exprs):
        raise ValueError(
            f"erc_verl.demo.warm_start.n_calibration={spec.n_calibration}: must be in [1, {len(train_exprs) - 1}]"
        )
    calibration, pool = train_exprs[: spec.n_calibration], train_exprs[spec.n_calibration :]
    torch.manual_seed(spec.seed)
    rng = random.Random(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    model.train()
    smoothed, accuracy, step = None, 0.0, 0
    while step < spec.max_steps:
        pairs = [encode_pair(tokenizer, *rng.choice(pool)) for _ in range(spec.batch_size)]
        input_ids, attention_mask, labels = _batch(tokenizer, pairs)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        smoothed = loss.item() if smoothed is None else 0.9 * smoothed + 0.1 * loss.item()
        if step % spec.check_every == 0 or step == spec.max_steps:
            model.eval()
            accuracy = sampled_accuracy(model, tokenizer, calibration, spec.temperature, spec.seed)
            model.train()
            if verbose:
                print(
                    f"[erc-verl] warm start: step {step} loss {smoothed:.3f} sampled accuracy {accuracy:.1%} "
                    f"(stop at {spec.stop_accuracy:.0%})",
                    flush=True,
                )
            if accuracy >= spec.stop_accuracy:
                break
    if verbose and accuracy < spec.stop_accuracy:
        print(f"[erc-verl] warm start: {spec.stop_accuracy:.0%} not reached in {step} steps; RL starts lower",
              flush=True)
    model.eval()
    return {"steps": step, "loss": smoothed, "accuracy": accuracy}
