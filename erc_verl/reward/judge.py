"""Judging one response against its ground truths with math-verify: the verdict of the paper's reward.

`erc_verl.reward.math_verify_score` runs this in worker processes with hard deadlines and is what verl calls.

Scoring (KlearReasoner / ERC official code, data_source `math_longcot_math_verify`):
  - long-CoT mode: no `</think>` in the response scores `no_think_end_score` (-0.5): truncated or unfinished
    reasoning; otherwise only the text after the last `</think>` is judged;
  - math-verify extracts the answer (`parse`); its extracted string equal to a ground truth is correct at once,
    else `verify` against `parse("\\boxed{<ground truth>}")` decides: +1 / -1.
  - `rules="official"` stops there (exactly the official verdicts, 5 s per parse and verify); `rules="extended"`
    gives an answer math-verify extracts but cannot parse (it fails on `\\boxed{540.}`) one more parse as
    inline math (`$540.$`), and rejects structurally hopeless answers before parsing (guards.py).

Every call returns {"score": float, "acc": bool, "pred": str, "reason": str}, always these four keys (verl
stacks each key across the batch from the first item's keys). `reason` is "" for a normal verdict, else one of
REASONS, so failure kinds can be counted in metrics.

Robustness: math-verify's own timeouts use SIGALRM and only work in a main thread. The judging here sits behind
cheap structural limits (guards.py; the official rules keep only the one after parsing) and soft deadlines (a
repeating interval timer in the worker's main thread: no process restart); the pool (pool.py, driven by
math_verify_score.py) adds a hard per-item deadline, so any input whatsoever yields a result within the deadline
and nothing raises.
"""

import dataclasses
import logging
import signal
import threading
from contextlib import nullcontext
from functools import lru_cache

from math_verify import parse, verify

from erc_verl.reward.guards import (
    has_digit_run,
    largest_number_digits,
    last_boxed,
    nesting_depth,
    numeric_tower_digits,
)

logger = logging.getLogger(__name__)

THINK_END = "</think>"
PRED_MAX_CHARS = 256  # `pred` is a metric/debug field stacked over the batch: no need for a whole 1 MB answer

REASONS = {
    "no_think_end": "long-CoT mode and no </think>: truncated or unfinished reasoning",
    "no_answer": "math-verify found no answer in the text",
    "parse_error": "math-verify found an answer but could not parse it",
    "no_ground_truth": "the ground truth is empty or unusable",
    "too_long": "answer text longer than max_answer_chars",
    "too_deep": "brackets nested deeper than max_nesting_depth",
    "too_many_digits": "a run of more than max_digits digits",
    "huge_number": "a number with more than max_number_digits digits once evaluated (e.g. 10^{10^{10}})",
    "timeout": "ran past a soft or the hard deadline",
    "worker_crash": "the worker process died (crash, memory limit)",
    "error": "unexpected error while scoring",
}

# verl's reward managers pass these to every reward function when a reward-model router is configured.
_VERL_KWARGS = frozenset({"reward_router_address", "reward_model_tokenizer"})

RULES = ("official", "extended")
# the official code's math-verify timeouts: answer parse, each ground truth's parse, each verify
OFFICIAL_TIMEOUT_S = 5.0
OFFICIAL_CODE = "github.com/Kwai-Klear/ERC verl/utils/reward_score/math_dapo.py:261-339"
# fields only the extended rules read
EXTENDED_ONLY = ("inline_math_retry", "max_answer_chars", "max_nesting_depth", "max_digits", "parse_timeout_s",
                 "verify_timeout_s")


def _help(text: str) -> dict:
    return {"help": text}


@dataclasses.dataclass(frozen=True)
class MathRewardConfig:
    """Everything configurable, set through `reward.custom_reward_function.reward_kwargs`.

    Two rule sets (`rules`): "official" gives the official ERC code's verdicts exactly (the paper recipes' choice);
    "extended" adds an inline-math retry and structural guards. A limit or timeout of None disables it.
    """

    # --- Scores (the official code's reward_config.py: 1 / -1 / -0.5) ---
    correct_score: float = dataclasses.field(default=1.0, metadata=_help("score of a correct answer"))
    incorrect_score: float = dataclasses.field(
        default=-1.0, metadata=_help("score of a wrong answer, and of every failure reason except no_think_end")
    )
    no_think_end_score: float = dataclasses.field(
        default=-0.5, metadata=_help("score of a long-CoT response without </think> (truncated or unfinished)")
    )
    long_cot: bool = dataclasses.field(
        default=True, metadata=_help("judge only the text after the last </think>; none: no_think_end_score")
    )

    # --- Verdict rules ---
    rules: str = dataclasses.field(
        default="extended",
        metadata=_help(
            f"'official': exactly the official ERC code's verdicts ({OFFICIAL_CODE}): math-verify's answer, a "
            f"string match with a ground truth, else verify against \\boxed{{ground truth}}, {OFFICIAL_TIMEOUT_S:g} s "
            "for each parse and verify, no retry, and only the guard that rejects answers verify could not finish "
            "(max_number_digits). 'extended': also the inline-math retry and the structural guards below, with "
            "their own deadlines. The paper recipes use 'official'."
        ),
    )

    # --- Extended rules only ---
    inline_math_retry: bool = dataclasses.field(
        default=True,
        metadata=_help(
            "an answer math-verify extracts but cannot parse gets one more parse as inline math: `\\boxed{540.}` "
            "and `\\boxed{10\\%}` then count as 540 and 10 (the official code scores them wrong)"
        ),
    )
    max_answer_chars: int | None = dataclasses.field(
        default=100_000, metadata=_help("longer answer texts are `too_long` (math-verify parses 100k chars in ~40 ms)")
    )
    max_nesting_depth: int | None = dataclasses.field(
        default=20,
        metadata=_help("brackets of any kind nested deeper are `too_deep` (real answers stay under 10; math-verify "
                       "takes seconds from depth ~16, and the official code may still accept such an answer)"),
    )
    max_digits: int | None = dataclasses.field(
        default=4300, metadata=_help("a longer run of digits is `too_many_digits` (Python's int<->str limit)")
    )
    parse_timeout_s: float | None = dataclasses.field(
        default=2.0, metadata=_help("soft deadline of the answer's parse (the official code: 5 s)")
    )
    verify_timeout_s: float | None = dataclasses.field(
        default=5.0, metadata=_help("soft deadline of parsing and verifying against all ground truths")
    )

    # --- Both rule sets ---
    max_number_digits: float | None = dataclasses.field(
        default=100_000,
        metadata=_help(
            "an answer holding a number of more digits once evaluated (e.g. 10^{10^{10}}) is `huge_number` "
            "(verify would evaluate it: minutes and gigabytes; the official code times out and scores it wrong). "
            "The official rules check it after parsing, and only when no ground truth is that large."
        ),
    )
    hard_timeout_s: float | None = dataclasses.field(
        default=None,
        metadata=_help("hard deadline per item (the process is killed and replaced); None: the soft deadlines + 2 s"),
    )
    num_processes: int = dataclasses.field(
        default=2, metadata=_help("worker processes per reward-loop worker (verl starts reward.num_workers of those)")
    )
    memory_limit_mb: int | None = dataclasses.field(default=4096, metadata=_help("address-space limit per worker"))

    def __post_init__(self):
        if self.rules not in RULES:
            raise ValueError(f"math reward rules={self.rules!r}: must be one of {list(RULES)}")

    @property
    def official(self) -> bool:
        return self.rules == "official"

    @property
    def hard_deadline_s(self) -> float:
        if self.hard_timeout_s is not None:
            return self.hard_timeout_s
        if self.official:  # answer parse, then one ground truth's parse and verify
            return 3 * OFFICIAL_TIMEOUT_S + 2.0
        return (self.parse_timeout_s or 5.0) + (self.verify_timeout_s or 5.0) + 2.0

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> "MathRewardConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(kwargs) - fields - _VERL_KWARGS
        if unknown:
            raise TypeError(f"unknown math reward option(s) {sorted(unknown)}; known: {sorted(fields)}")
        if kwargs.get("rules") == "official":
            ignored = sorted(set(kwargs) & set(EXTENDED_ONLY))
            if ignored:
                raise TypeError(f"math reward option(s) {ignored} apply to rules='extended' only, not 'official'")
        return cls(**{k: v for k, v in kwargs.items() if k in fields})


def _result(score: float, acc: bool = False, pred: str = "", reason: str = "") -> dict:
    return {"score": float(score), "acc": bool(acc), "pred": pred[:PRED_MAX_CHARS], "reason": reason}


def failure(cfg: MathRewardConfig, reason: str, pred: str = "") -> dict:
    return _result(cfg.incorrect_score, pred=pred, reason=reason)


def _as_text(value) -> str:
    """Any input as text: bytes decode leniently, None is empty, objects whose str() fails are empty."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", errors="replace")
    if value is None:
        return ""
    try:
        return str(value)
    except Exception:  # noqa: BLE001 - a broken __str__ must not take the batch down
        return ""


def ground_truths(ground_truth) -> tuple[str, ...]:
    """A ground truth (str, number, or a list of acceptable answers) as a tuple of non-empty strings."""
    items = ground_truth.tolist() if hasattr(ground_truth, "tolist") else ground_truth
    items = items if isinstance(items, (list, tuple)) else [items]
    return tuple(text for text in (_as_text(item).strip() for item in items) if text)


def prepare(solution_str, ground_truth, cfg: MathRewardConfig) -> dict | tuple[str, tuple[str, ...]]:
    """The checks that need no math: a final result, or (answer text, ground truths) still to judge."""
    text = _as_text(solution_str)
    if cfg.long_cot:
        _, sep, text = text.rpartition(THINK_END)
        if not sep:
            return _result(cfg.no_think_end_score, reason="no_think_end")
    golds = ground_truths(ground_truth)
    if not golds:
        return failure(cfg, "no_ground_truth")
    if not cfg.official and cfg.max_answer_chars is not None and len(text) > cfg.max_answer_chars:
        return failure(cfg, "too_long")
    return text, golds


class _Deadline(BaseException):
    """Raised by the soft-deadline timer. A BaseException: math-verify and sympy catch Exception (and
    math-verify its own TimeoutException) and would turn it into a silent 'incorrect'."""


# After the first expiry the timer fires again every this many seconds (or the deadline, if shorter) until the
# block exits: a raise that lands where Python swallows exceptions (a __del__, a weakref or GC callback, C code
# that clears errors) is repeated instead of lost.
SOFT_DEADLINE_REPEAT_S = 0.1


class _SoftDeadline:
    """Interrupt the block after `seconds` by raising `_Deadline` from a repeating SIGALRM interval timer, in
    the main thread only. `expiries` counts the timer's firings (tests check that a swallowed raise repeats)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.expiries = 0
        self._active = False
        self._previous = None

    def __enter__(self) -> "_SoftDeadline":
        self._previous = signal.signal(signal.SIGALRM, self._expire)
        self._active = True
        signal.setitimer(signal.ITIMER_REAL, self.seconds, min(self.seconds, SOFT_DEADLINE_REPEAT_S))
        return self

    def _expire(self, signum, frame) -> None:
        self.expiries += 1
        # Never raise inside __enter__/__exit__ themselves: a raise there would escape the with statement with
        # the timer still armed. A firing skipped there either repeats inside the block or no longer matters.
        if self._active and (frame is None or frame.f_code not in _SOFT_DEADLINE_OWN_CODE):
            raise _Deadline

    def __exit__(self, *exc_info) -> bool:
        self._active = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self._previous)
        return False


_SOFT_DEADLINE_OWN_CODE = frozenset((_SoftDeadline.__enter__.__code__, _SoftDeadline.__exit__.__code__))


def _soft_deadline(seconds: float | None):
    """A `_SoftDeadline` where one is possible; elsewhere (no deadline, or not the main thread: signals only
    reach the main thread) a no-op, and the pool's hard deadline is what bounds the block."""
    if seconds is None or threading.current_thread() is not threading.main_thread():
        return nullcontext()
    return _SoftDeadline(seconds)


def _parse_answer(text: str, inline_math_retry: bool) -> list:
    parsed = parse(text, parsing_timeout=None)
    if inline_math_retry and len(parsed) == 1 and isinstance(parsed[0], str):
        # Extracted but not parsed. math-verify 0.9.0 fails on `\boxed{540.}` yet parses `$540.$`: give the
        # extracted text one more try as inline math.
        retry = parse(f"${parsed[0]}$", parsing_timeout=None)
        if len(retry) >= 2:
            return retry
    return parsed


@lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> list:
    """Ground truths repeat across a group's samples: parse each once per process."""
    return parse(f"\\boxed{{{gold}}}", parsing_timeout=None)


def _is_huge(parsed: list, cfg: MathRewardConfig) -> bool:
    return cfg.max_number_digits is not None and any(largest_number_digits(p) > cfg.max_number_digits for p in parsed)


def _parsed_or_failure(parsed: list, cfg: MathRewardConfig) -> dict | str:
    """math-verify's result as (the answer's) text, or the failure when it found or parsed nothing."""
    if not parsed:
        return failure(cfg, "no_answer")
    if len(parsed) < 2:
        return failure(cfg, "parse_error", pred=_as_text(parsed[0]))
    return _as_text(parsed[1])


def judge(answer: str, golds: tuple[str, ...], cfg: MathRewardConfig) -> dict:
    """Judge an answer text (after `prepare`) against the ground truths with math-verify, by `cfg.rules`."""
    return _judge_official(answer, golds, cfg) if cfg.official else _judge_extended(answer, golds, cfg)


def _judge_official(answer: str, golds: tuple[str, ...], cfg: MathRewardConfig) -> dict:
    """The official code's `math_verify_from_sky`, step for step, with its 5 s timeouts as soft deadlines: a
    timed-out answer parse is wrong, a timed-out ground truth is skipped (the official `except: continue`)."""
    with _soft_deadline(OFFICIAL_TIMEOUT_S):
        parsed = parse(answer, parsing_timeout=None)
    pred = _parsed_or_failure(parsed, cfg)
    if isinstance(pred, dict):
        return pred
    if pred in golds:  # the official quick string match
        return _result(cfg.correct_score, acc=True, pred=pred)
    gold_parses = []
    for gold in golds:
        try:
            with _soft_deadline(OFFICIAL_TIMEOUT_S):
                gold_parses.append(_parse_gold(gold))
        except _Deadline:
            continue
    # verify would have to evaluate a number no ground truth comes near: the official code runs out its timeout
    if _is_huge(parsed, cfg) and not any(_is_huge(gold, cfg) for gold in gold_parses):
        return failure(cfg, "huge_number", pred=pred)
    for gold_parsed in gold_parses:
        try:
            with _soft_deadline(OFFICIAL_TIMEOUT_S):
                if verify(gold_parsed, parsed, timeout_seconds=None):
                    return _result(cfg.correct_score, acc=True, pred=pred)
        except _Deadline:
            continue
    return _result(cfg.incorrect_score, pred=pred)


def _judge_extended(answer: str, golds: tuple[str, ...], cfg: MathRewardConfig) -> dict:
    """The official verdict plus the inline-math retry, and structural guards ahead of math-verify."""
    if cfg.max_nesting_depth is not None and nesting_depth(answer) > cfg.max_nesting_depth:
        return failure(cfg, "too_deep")
    if cfg.max_digits is not None and has_digit_run(answer, cfg.max_digits):
        return failure(cfg, "too_many_digits")
    boxed = last_boxed(answer)  # the answer, in practice; the parsed answer is checked again after parsing
    if cfg.max_number_digits is not None and boxed and numeric_tower_digits(boxed) > cfg.max_number_digits:
        return failure(cfg, "huge_number", pred=boxed)
    with _soft_deadline(cfg.parse_timeout_s):
        parsed = _parse_answer(answer, cfg.inline_math_retry)
    pred = _parsed_or_failure(parsed, cfg)
    if isinstance(pred, dict):
        return pred
    if pred in golds:  # the official quick string match
        return _result(cfg.correct_score, acc=True, pred=pred)
    if _is_huge(parsed[:1], cfg):
        return failure(cfg, "huge_number", pred=pred)
    with _soft_deadline(cfg.verify_timeout_s):
        for gold in golds:
            gold_parsed = _parse_gold(gold)
            if _is_huge(gold_parsed, cfg):
                continue
            if verify(gold_parsed, parsed, timeout_seconds=None):
                return _result(cfg.correct_score, acc=True, pred=pred)
    return _result(cfg.incorrect_score, pred=pred)


def judge_safely(payload: tuple[str, tuple[str, ...], MathRewardConfig]) -> dict:
    """`judge` that turns every failure into a result: the function the worker processes run."""
    answer, golds, cfg = payload
    try:
        return judge(answer, golds, cfg)
    except _Deadline:
        return failure(cfg, "timeout")
    except Exception:  # noqa: BLE001 - one bad answer (RecursionError, MemoryError...) must not fail the batch
        logger.debug("scoring failed", exc_info=True)
        return failure(cfg, "error")


def score_in_process(solution_str, ground_truth, cfg: MathRewardConfig | None = None) -> dict:
    """Score without the process pool: soft deadlines only, and only in a main thread. For trusted callers
    (tests, offline analysis); training goes through `compute_score`."""
    cfg = cfg or MathRewardConfig()
    ready = prepare(solution_str, ground_truth, cfg)
    return ready if isinstance(ready, dict) else judge_safely((*ready, cfg))
