import dataclasses

import pytest

from lserve_hf import LServeConfig


def test_defaults_follow_the_spec():
    c = LServeConfig().resolved(max_context=131072)     # a long-context model gets the published values
    assert (c.streaming_sparsity, c.prefill_sink, c.prefill_local, c.decode_sink, c.decode_local) == (0.5, 128, 8192, 128, 256)
    assert (c.page_size, c.logical_page_size, c.token_budget, c.selector_interval, c.dense_layers) == (64, 16, 4096, 4, ())
    assert c.pages_per_selection == 64
    assert LServeConfig().resolved(None).token_budget == 4096      # unknown context: published


def test_defaults_scale_down_for_short_context_models():
    c = LServeConfig().resolved(max_context=8192)
    assert (c.token_budget, c.prefill_local) == (512, 1024)
    assert LServeConfig(token_budget=1024).resolved(8192).token_budget == 1024   # a set value stays
    assert LServeConfig().resolved(256).token_budget == 4 * 64                    # at least 4 pages
    with pytest.raises(ValueError, match="resolve"):
        LServeConfig().pages_per_selection


@pytest.mark.parametrize("kwargs, words", [
    (dict(streaming_sparsity=1.5), ["streaming_sparsity", "[0, 1]"]),
    (dict(streaming_sparsity=-0.1), ["streaming_sparsity"]),
    (dict(token_budget=1000), ["token_budget=1000", "page_size=64", "token_budget=1024"]),
    (dict(token_budget=32), ["token_budget=32", "multiple"]),
    (dict(page_size=48, logical_page_size=32), ["page_size=48", "logical_page_size=32"]),
    (dict(decode_local=0), ["decode_local"]),
    (dict(prefill_sink=-1), ["prefill_sink"]),
    (dict(selector_interval=0), ["selector_interval"]),
    (dict(dense_layers=(-1,)), ["dense_layers"]),
    (dict(backend="cuda"), ["backend", "triton"]),
    (dict(offload="host", hbm_pages=70000), ["hbm_pages=70000", "65535", "lower it"]),
])
def test_invalid_fields_name_the_field_and_the_fix(kwargs, words):
    with pytest.raises(ValueError) as err:
        LServeConfig(**kwargs)
    for w in words:
        assert w in str(err.value)


@pytest.mark.parametrize("kwargs, words", [
    (dict(selector_interval=2.5), ["selector_interval=2.5", "integer"]),
    (dict(token_budget="512"), ["token_budget='512'", "integer"]),
    (dict(decode_local=True), ["decode_local=True", "integer"]),
    (dict(dense_layers="01"), ["dense_layers='01'", "tuple"]),
    (dict(dense_layers=(0.0,)), ["dense_layers", "integer"]),
    (dict(cuda_graphs="no"), ["cuda_graphs='no'", "True or False"]),
    (dict(streaming_sparsity="half"), ["streaming_sparsity='half'", "number"]),
    (dict(prefill_chunk_size=1.5), ["prefill_chunk_size", "integer"]),
])
def test_wrong_types_are_refused_by_name(kwargs, words):
    with pytest.raises(TypeError) as err:
        LServeConfig(**kwargs)
    for w in words:
        assert w in str(err.value)


def test_config_is_immutable_and_replace_validates():
    c = LServeConfig(token_budget=512)
    with pytest.raises(dataclasses.FrozenInstanceError, match="replace"):
        c.token_budget = 1024
    assert dataclasses.replace(c, token_budget=1024).token_budget == 1024
    with pytest.raises(ValueError, match="token_budget"):
        dataclasses.replace(c, token_budget=1000)
    import numpy as np
    assert LServeConfig(decode_local=np.int64(128), dense_layers=[1, 0]).dense_layers == (1, 0)
