"""Cheap structural limits that spare math-verify the inputs it cannot finish in reasonable time.

Each check costs microseconds to milliseconds and fires only on inputs no real answer looks like; measured on
math-verify 0.9.0 (2 cores): bare nested braces cost 0.3 s of parsing at depth 4 and 12 s (parse + verify) at
depth 16, `10^{10^{10}}` parses in milliseconds but `verify` then evaluates the integer (minutes, gigabytes),
200k digits take 0.8 s to parse.
"""

import math
import re
from functools import lru_cache

import sympy

_BRACKETS = re.compile(r"\\[{}]|[{}()\[\]]")


def nesting_depth(text: str) -> int:
    """Deepest nesting of brackets of any kind, `{ ( [` against `} ) ]` (one counter: intervals such as `(1, 2]`
    mix them); escaped `\\{` `\\}` are set delimiters of the text, not TeX groups, and are skipped."""
    depth = deepest = 0
    for match in _BRACKETS.finditer(text):
        token = match.group()
        if token in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif token in "})]":
            depth = max(depth - 1, 0)  # unbalanced text: a stray closer must not hide deeper nesting after it
    return deepest


@lru_cache(maxsize=8)
def _digit_run_re(max_digits: int) -> re.Pattern:
    return re.compile(r"\d{%d}" % (max_digits + 1))


def has_digit_run(text: str, max_digits: int) -> bool:
    """True when `text` holds more than `max_digits` consecutive digits."""
    return _digit_run_re(max_digits).search(text) is not None


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (None when there is none or it never closes)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    for match in re.finditer(r"[{}]", text[start:]):
        depth += 1 if match.group() == "{" else -1
        if depth == 0:
            return text[start + len("\\boxed{") : start + match.start()]
    return None


_TEXT_TOWER = re.compile(r"(\d+(?:\.\d+)?)((?:\^-?\d+(?:\.\d+)?)+)|(\d+)(!+)")


def numeric_tower_digits(latex: str) -> float:
    """Most digits a power tower (`10^{10^{10}}`, `9^{9^9}`) or factorial (`100000000!`, `10!!!`) written with
    plain numbers in `latex` would have: `largest_number_digits`' estimate, read from the text in microseconds
    (math-verify needs 0.1-2 s just to parse such towers)."""
    flat = re.sub(r"[{}\s]", "", latex)  # 10^{10^{10}} -> 10^10^10: the grouping of a tower is right-nested anyway
    largest = 0.0
    for match in _TEXT_TOWER.finditer(flat):
        if match.group(1) is not None:  # a ^ b ^ c ...: right-associative, evaluated top-down in log space
            numbers = [match.group(1), *match.group(2)[1:].split("^")]
            value = abs(float(numbers[-1]))
            digits = math.log10(value) if value else 0.0
            for base in map(lambda b: abs(float(b)), reversed(numbers[:-1])):
                digits = value * abs(math.log10(base)) if base not in (0.0, 1.0) else 0.0
                value = 10.0**digits if digits < 300 else math.inf
        else:  # n!!!: each ! turns the value v into about v^v
            value = float(match.group(3))
            digits = math.log10(value) if value else 0.0
            for _ in match.group(4):
                digits = value * digits if value < math.inf else math.inf
                value = 10.0**digits if digits < 300 else math.inf
        largest = max(largest, digits)
    return largest


def _log10_int(n: int) -> float:
    return math.log10(abs(n)) if n else 0.0  # math.log10 takes ints of any size


def _log10_magnitude(expr) -> float | None:
    """Upper estimate of log10 |value| of a numeric sympy expression, without evaluating it; None when `expr`
    is not a plain number built from + * ^, factorial and binomial (symbols, functions, sets...)."""
    if isinstance(expr, sympy.Rational):  # Integer included; a fraction costs as much as its larger part
        return max(_log10_int(expr.p), _log10_int(expr.q))
    if isinstance(expr, sympy.Float):
        mantissa, exponent = expr._mpf_[1], expr._mpf_[2]  # value = mantissa * 2**exponent
        return abs(mantissa.bit_length() + exponent) * math.log10(2) if mantissa else 0.0
    if isinstance(expr, (sympy.Add, sympy.Mul)):
        parts = [_log10_magnitude(arg) for arg in expr.args]
        if any(p is None for p in parts):
            return None
        return max(parts) + math.log10(len(parts)) if isinstance(expr, sympy.Add) else sum(parts)
    if isinstance(expr, sympy.Pow):
        base, exponent = _log10_magnitude(expr.base), _log10_magnitude(expr.exp)
        if base is None or exponent is None:
            return None
        # |b^e| = 10^(|e| * log10|b|); |e| <= 10^exponent. Past 10^300 the product overflows: call it infinite.
        return math.inf if exponent > 300 else base * 10.0**exponent
    if isinstance(expr, sympy.factorial):
        n = _log10_magnitude(expr.args[0])
        if n is None:
            return None
        return math.inf if n > 300 else (n + 1) * 10.0**n  # n! <= n^n
    if isinstance(expr, sympy.binomial):
        n, k = (_log10_magnitude(arg) for arg in expr.args)
        if n is None or k is None:
            return None
        return math.inf if min(n, k) > 300 else n * 10.0 ** min(n, k)  # C(n, k) <= n^min(k, n-k)
    return None


def largest_number_digits(expr) -> float:
    """Most decimal digits any numeric sub-expression of `expr` would have once evaluated (0 when none)."""
    if not isinstance(expr, sympy.Basic):
        return 0.0
    largest = 0.0
    for node in sympy.preorder_traversal(expr):
        if isinstance(node, (sympy.Pow, sympy.factorial, sympy.binomial, sympy.Mul)):
            magnitude = _log10_magnitude(node)
            if magnitude is not None:
                largest = max(largest, magnitude)
    return largest
