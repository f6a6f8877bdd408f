"""Selectors declare what they can do, and every check derives from that: the batch size a
selector needs, whether its targets can be cached or extracted, whether it serves other
teachers, and which selectors the instruments compare. A selector registered here, outside the
package, is held to the same rules as the built-in ones."""

from dataclasses import dataclass

import pytest

from conftest import tiny_config
from kava.config import ConfigError
from kava.distill import compression
from kava.distill.compression import SELECTORS, RKVSelector, SelectRequest, get_selector, register
from kava.distill.extract import extract
from kava.distill.targets import check_targets, kv_selector, source_name
from kava.distill.targets.cache import check_config as check_cache_config


def _cfg(method: str, **train):
    cfg = tiny_config(train={"batch_size": 4, **train})
    cfg.loss.compression = method  # set after validation: a name only this test registers
    return cfg


@pytest.fixture
def batchy():
    """A selector that makes its targets from the batch, registered for one test."""

    @dataclass
    class Batchy(RKVSelector):
        name: str = "test_batchy"
        whole_batch = True

    register("test_batchy")(Batchy)
    yield "test_batchy"
    SELECTORS.pop("test_batchy")


@pytest.mark.parametrize("method", list(SELECTORS))
def test_each_check_follows_the_declared_capabilities(method, tmp_path):
    sel = get_selector(method)
    cfg = _cfg(method, batch_size=1)
    if sel.whole_batch:
        with pytest.raises(ConfigError, match="train.batch_size.*at least 2 examples"):
            check_targets(cfg)
    else:
        check_targets(cfg)
    cached = _cfg(method)
    cached.loss.teacher_cache = str(tmp_path / "cache")
    if sel.cacheable:
        check_targets(cached)
        check_cache_config(cached)
    else:
        with pytest.raises(ConfigError, match="loss.compression.*cannot be read from loss.teacher_cache"):
            check_targets(cached)
        with pytest.raises(ConfigError, match="cannot be cached"):
            check_cache_config(cached)
    others = _cfg(method)
    others.teachers.models = tiny_config(teachers={"models": [{"name_or_path": "tiny"}]}).teachers.models
    if sel.own_teacher_only:
        with pytest.raises(ConfigError, match="own teacher; it cannot be combined with teachers.models"):
            check_targets(others)
    else:
        check_targets(others)
    assert (source_name(_cfg(method, mode="kava")) == "counterfactual") == sel.second_pass


def test_the_capabilities_of_the_built_in_selectors():
    whole_batch = {n for n in SELECTORS if get_selector(n).whole_batch}
    assert whole_batch == {"shuffled", "slot_mean", "gaussian"}
    assert {n for n in SELECTORS if not get_selector(n).cacheable} == whole_batch | {"counterfactual", "oracle"}
    assert {n for n in SELECTORS if get_selector(n).own_teacher_only} == {"counterfactual", "oracle"}
    from kava.distill.instruments import INDEX_SELECTORS

    assert set(INDEX_SELECTORS) == set(SELECTORS) - whole_batch - {"mean_pool", "counterfactual"}
    assert compression.METHODS == ("none", *SELECTORS) and compression.METHODS[1] == "rkv"


def test_a_selector_registered_outside_the_package_meets_the_same_checks(batchy, tmp_path):
    assert isinstance(get_selector(batchy, 0.3), RKVSelector) and get_selector(batchy, 0.3).lam == 0.3
    with pytest.raises(ConfigError, match="test_batchy selector makes an example's targets from the rest of its batch"):
        check_targets(_cfg(batchy, batch_size=1))
    cached = _cfg(batchy)
    cached.loss.teacher_cache = str(tmp_path / "cache")
    with pytest.raises(ConfigError, match="'test_batchy' reads the rest of its batch and cannot be read"):
        check_targets(cached)
    with pytest.raises(ConfigError, match="'test_batchy' makes its targets from more than"):
        extract(_cfg(batchy), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_extraction_refuses_every_selector_that_cannot_be_cached(tmp_path):
    for method in ("oracle", "counterfactual", "shuffled"):
        with pytest.raises(ConfigError, match=f"'{method}' makes its targets from more than"):
            extract(_cfg(method), tmp_path / method)


def test_register_refuses_a_second_selector_of_one_name():
    with pytest.raises(ValueError, match="'rkv' is already registered"):
        register("rkv", lambda lam: RKVSelector(lam=lam))
    assert get_selector("rkv").name == "rkv"


def test_no_kv_loss_means_no_selector_and_no_selector_checks():
    cfg = _cfg("shuffled", batch_size=1)
    cfg.loss.alpha_kv = 0.0
    assert kv_selector(cfg) is None
    check_targets(cfg)  # the shuffled control needs two examples only where it is used


def test_a_request_carries_every_argument_a_selector_reads():
    import torch

    g = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 2, 6, 4, generator=g)
    cot = torch.tensor([[False, True, True, True, True, False], [False, True, True, False, False, False]])
    r = SelectRequest(keys, keys, None, cot, None, budget=3)
    idx, valid = get_selector("right_crop").select(r)
    assert idx[0, 0].tolist() == [1, 2, 3] and valid[0].all()
    assert idx[1, 0].tolist()[:2] == [1, 2] and valid[1, 0].tolist() == [True, True, False]
    c = get_selector("mean_pool").compress(r)
    assert c.indices is None and c.keys.shape == (2, 2, 3, 4)
