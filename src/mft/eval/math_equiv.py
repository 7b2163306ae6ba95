"""MATH answer checking as the authors' protocol does it: Minerva normalization, symbolic equivalence, flex.

The Minerva normalization is the procedure of Lewkowycz et al. (2022), appendix D, as olmes 0.1.0 ran it
(through lm-eval 0.4.3). Current lm-eval releases have since changed it (word-boundary unit removal, tuple
commas, an equal-strings shortcut), which moves scores, so the 2022 procedure is written out here; the
Hendrycks pieces (`\\boxed{}` extraction, `strip_string` equality) are unchanged upstream and come from
lm-eval as a library.
"""

from __future__ import annotations

import functools
import re
import signal
import threading

INVALID_ANSWER = "[invalidanswer]"
SYMPY_TIMEOUT_S = 5.0

# Appendix D, verbatim facts of the procedure: replaced in this order, then removed in this order.
SUBSTITUTIONS = [
    ("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
    (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"),
]
REMOVED_EXPRESSIONS = [
    "square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units", "\\ldots",
    "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters",
    "meals", "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}",
    "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;",
    ",\\!", "{,}", '"', "\\dots",
]
# Unwrapping (math mode, \text, \textbf, \overline, \boxed), then the \fracab / \sqrta shorthand repair.
UNWRAP_PATTERNS = [
    (r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$"),
    (r"(\\text\{)(.*?)(\})", "\\2"),
    (r"(\\textbf\{)(.*?)(\})", "\\2"),
    (r"(\\overline\{)(.*?)(\})", "\\2"),
    (r"(\\boxed\{)(.*)(\})", "\\2"),
    (r"(frac)([^{])(.)", "frac{\\2}{\\3}"),
    (r"(sqrt)([^{])", "sqrt{\\2}"),
]
FINAL_ANSWER_RE = re.compile(r"Final Answer: The final answer is(.*?). I hope it is correct.")


def minerva_answer(text: str) -> str:
    """The raw answer of a Minerva-style solution, or INVALID_ANSWER when it has no final-answer sentence."""
    match = FINAL_ANSWER_RE.search(text + "I hope it is correct.")
    return match.group(1).strip() if match else INVALID_ANSWER


def normalize_final_answer(answer: str) -> str:
    """Minerva normalization (appendix D): last `=` side, substitutions, unit removal, unwrapping."""
    answer = answer.split("=")[-1]
    for before, after in SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for expression in REMOVED_EXPRESSIONS:
        answer = answer.replace(expression, "")
    for pattern, replacement in UNWRAP_PATTERNS:
        answer = re.sub(pattern, replacement, answer)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():  # 100,000 -> 100000
        answer = answer.replace(",", "")
    return answer


def last_boxed_content(text: str) -> str | None:
    """What the last `\\boxed{...}` (or `\\fbox{...}`) of `text` holds, or None."""
    from lm_eval.tasks.hendrycks_math.utils import last_boxed_only_string, remove_boxed

    boxed = last_boxed_only_string(text)
    if boxed is None:
        return None
    try:
        return remove_boxed(boxed)
    except AssertionError:  # `\fbox{...}`: not a `\boxed` the remover accepts
        return None


def gold_answer(doc: dict) -> str:
    """Normalized gold: the dataset's `answer` field where it has one (MATH-500), else the last box."""
    raw = doc.get("answer")
    if raw is None:
        raw = last_boxed_content(doc["solution"]) or ""
    return normalize_final_answer(str(raw))


class _SympyTimeout(BaseException):
    """Raised by the alarm; a BaseException so that sympy's own `except Exception` cannot swallow it."""


def _on_alarm(signum, frame):
    raise _SympyTimeout()


@functools.lru_cache(maxsize=65536)
def symbolic_equal(a: str, b: str, timeout_s: float = SYMPY_TIMEOUT_S) -> bool:
    """`simplify(parse_latex(a) - parse_latex(b)) == 0` within `timeout_s`; any failure means not equal.

    The limit is a real-time alarm, so this must run on a process's main thread (the scoring pool's
    workers and the main process both do).
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("symbolic_equal needs the main thread (it uses SIGALRM for its time limit)")
    import sympy
    from sympy.parsing.latex import parse_latex

    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        return bool(sympy.simplify(parse_latex(a) - parse_latex(b)) == 0)
    except _SympyTimeout:
        return False
    except Exception:  # parse errors, TypeErrors of relations, sympy internals: "not equal"
        return False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def hendrycks_equal(a: str, b: str) -> bool:
    """String equality after the Hendrycks MATH `strip_string` normalization."""
    from lm_eval.tasks.hendrycks_math.utils import is_equiv

    return bool(is_equiv(a, b))


def flex_candidates(output: str) -> list[str]:
    """The answers olmes' flex metric tries, primary first: Minerva, last box, last `$..$`, whole text."""
    candidates = []
    minerva = normalize_final_answer(minerva_answer(output))
    if minerva != INVALID_ANSWER:
        candidates.append(minerva)
    boxed = last_boxed_content(output)
    if boxed is not None:
        candidates.append(normalize_final_answer(boxed))
    if not candidates:
        dollars = [i for i, char in enumerate(output) if char == "$"]
        if len(dollars) > 1:
            candidates.append(normalize_final_answer(output[dollars[-2] + 1 : dollars[-1]]))
    if not candidates:
        candidates.append(normalize_final_answer(output))
    return candidates


def score_math(output: str, gold: str) -> dict:
    """`exact_match` (Minerva answer, symbolic) and `exact_match_flex` (any candidate, either way)."""
    answer = normalize_final_answer(minerva_answer(output))
    exact = answer != INVALID_ANSWER and symbolic_equal(answer, gold)
    candidates = flex_candidates(output)
    # Same result as olmes' per-candidate "symbolic or string" test; the cheap string test goes first.
    flex = exact or any(hendrycks_equal(c, gold) for c in candidates) or any(
        symbolic_equal(c, gold) for c in candidates
    )
    return {"exact_match": int(exact), "exact_match_flex": int(flex), "model_answer": candidates[0]}


def warm_up() -> None:
    """Import sympy's LaTeX parser and lm-eval once, so forked scoring workers inherit them."""
    from lm_eval.tasks.hendrycks_math import utils  # noqa: F401
    from sympy.parsing.latex import parse_latex

    parse_latex("1")
