import pytest

from lserve_hf import LServeConfig


def test_defaults_follow_the_spec():
    c = LServeConfig()
    assert (c.streaming_sparsity, c.prefill_sink, c.prefill_local, c.decode_sink, c.decode_local) == (0.5, 128, 8192, 128, 256)
    assert (c.page_size, c.logical_page_size, c.token_budget, c.selector_interval, c.dense_layers) == (64, 16, 4096, 4, ())
    assert c.pages_per_selection == 64


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
])
def test_invalid_fields_name_the_field_and_the_fix(kwargs, words):
    with pytest.raises(ValueError) as err:
        LServeConfig(**kwargs)
    for w in words:
        assert w in str(err.value)
