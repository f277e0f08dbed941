"""Every input Transformers accepts: a patched model gives the dense answer (where its config says
it must) or an error that names the fix. Transformers-style checks on tiny Llama, Mistral and
Qwen2 models, each against the unpatched model."""

import copy
import io
import logging
import threading

import numpy as np
import pytest
import torch

from conftest import tiny_llama
from lserve_hf import LServeCache, LServeConfig, patch_model, unpatch_model

MODELS = [("llama", {}), ("mistral", dict(sliding_window=64)), ("qwen2", dict(use_sliding_window=False))]
DENSE = LServeConfig(streaming_sparsity=0)
SMALL = dict(page_size=16, logical_page_size=4, token_budget=32, prefill_sink=2, prefill_local=6,
             decode_sink=2, decode_local=8)
PATTERN = [[0.9, 0.1], [0.2, 0.8]]            # one streaming head in each layer


def ids_of(B, S, seed=0):
    return torch.randint(1, 100, (B, S), generator=torch.Generator().manual_seed(seed))


def logits(model, **kw):
    with torch.no_grad():
        return model(**kw).logits


# -- masks in forwards ---------------------------------------------------------------------------

def _masks(B, S):
    right = torch.ones(B, S, dtype=torch.long)
    right[0, -4:] = 0
    holes = torch.ones(B, S, dtype=torch.long)
    holes[1, 5:8] = 0
    return {"right padding": right, "holes": holes}


@pytest.mark.parametrize("model_type, extra", MODELS)
@pytest.mark.parametrize("use_cache", [False, True])
def test_2d_masks_in_forwards_equal_dense(model_type, extra, use_cache):
    model = tiny_llama(model_type=model_type, **extra)
    ids = ids_of(2, 20)
    for name, mask in _masks(2, 20).items():
        unpatch_model(model)
        want = logits(model, input_ids=ids, attention_mask=mask, use_cache=use_cache)
        patch_model(model, DENSE)
        got = logits(model, input_ids=ids, attention_mask=mask, use_cache=use_cache)
        real = mask.bool()
        assert torch.allclose(got[real], want[real], atol=1e-5), name


@pytest.mark.parametrize("model_type, extra", MODELS)
def test_custom_4d_masks_equal_dense(model_type, extra):
    model = tiny_llama(model_type=model_type, **extra)
    ids = ids_of(2, 16)
    allowed = torch.ones(16, 16).tril().bool()
    allowed[8:, :4] = False                                  # queries past 8 do not see the first 4 keys
    bool_mask = allowed.view(1, 1, 16, 16).expand(2, 1, 16, 16)
    float_mask = torch.zeros(2, 1, 16, 16).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    for mask in (bool_mask, float_mask):
        unpatch_model(model)
        want = logits(model, input_ids=ids, attention_mask=mask, use_cache=False)
        patch_model(model, DENSE)
        got = logits(model, input_ids=ids, attention_mask=mask, use_cache=False)
        assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("model_type, extra", MODELS)
def test_packed_sequences_are_kept_apart(model_type, extra):
    """position_ids restarting at 0, no mask, no cache (how training packs): dense equals the
    unpatched model, and with streaming heads each packed sequence gets what it gets alone."""
    model = tiny_llama(model_type=model_type, **extra)
    a, b = ids_of(1, 11, 1), ids_of(1, 13, 2)
    packed = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(11), torch.arange(13)]).view(1, -1)
    want = logits(model, input_ids=packed, position_ids=pos, use_cache=False)
    patch_model(model, DENSE)
    assert torch.allclose(logits(model, input_ids=packed, position_ids=pos, use_cache=False), want, atol=1e-5)
    patch_model(model, LServeConfig(streaming_sparsity=0.5, **SMALL), PATTERN)
    got = logits(model, input_ids=packed, position_ids=pos, use_cache=False)
    alone = torch.cat([logits(model, input_ids=a, use_cache=False), logits(model, input_ids=b, use_cache=False)], 1)
    assert torch.allclose(got, alone, atol=1e-5)


def test_right_padding_with_streaming_heads_equals_the_unpadded_prompt():
    model = patch_model(tiny_llama(), LServeConfig(streaming_sparsity=0.5, **SMALL), PATTERN)
    ids = ids_of(1, 20)
    mask = torch.ones(1, 24, dtype=torch.long)
    mask[0, 20:] = 0
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    got = logits(model, input_ids=padded, attention_mask=mask, use_cache=False)
    assert torch.allclose(got[:, :20], logits(model, input_ids=ids, use_cache=False), atol=1e-5)


def test_a_new_token_with_mask_zero_is_refused():
    model = patch_model(tiny_llama(), DENSE)
    ids = ids_of(1, 10)
    cache = LServeCache(model)
    logits(model, input_ids=ids, past_key_values=cache)
    with pytest.raises(ValueError, match="attention_mask 0"):
        logits(model, input_ids=ids[:, :1], attention_mask=torch.tensor([[1] * 10 + [0]]), past_key_values=cache)


# -- copies, pickles, configs --------------------------------------------------------------------

def test_deepcopy_and_pickle_of_a_patched_model_are_patched():
    model = patch_model(tiny_llama(), LServeConfig(streaming_sparsity=0.5, **SMALL), PATTERN)
    ids = ids_of(1, 40)
    want = logits(model, input_ids=ids)
    twin = copy.deepcopy(model)
    unpatch_model(model)                          # the copy must not depend on the original
    assert type(twin).__name__ == "LServeLlamaForCausalLM"
    assert torch.equal(logits(twin, input_ids=ids), want)
    buf = io.BytesIO()
    torch.save(twin, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(logits(loaded, input_ids=ids), want)
    assert not torch.equal(logits(model, input_ids=ids), want)     # the original is dense again


def test_patching_never_writes_into_the_users_config():
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    users = model.config
    patch_model(model, DENSE)
    assert users._attn_implementation == "sdpa" and model.config is not users
    other = AutoModelForCausalLM.from_config(users)                  # built from the user's config
    assert other.config._attn_implementation == "sdpa"
    logits(other, input_ids=ids_of(1, 5))
    # a model built from the patched model's config says what is missing instead of crashing deep inside
    odd = AutoModelForCausalLM.from_config(model.config)
    with pytest.raises(RuntimeError, match="patch_model"):
        logits(odd, input_ids=ids_of(1, 5))
    patch_model(odd, DENSE)
    unpatch_model(odd)
    assert odd.config._attn_implementation == "sdpa"


def test_set_attn_implementation_lserve_without_patching_says_so():
    model = tiny_llama()
    model.set_attn_implementation("lserve")
    with pytest.raises(RuntimeError, match="patch_model"):
        logits(model, input_ids=ids_of(1, 5))


def test_a_cache_after_unpatch_or_from_another_patch_is_refused():
    model = patch_model(tiny_llama(), DENSE)
    ids = ids_of(1, 12)
    cache = LServeCache(model)
    logits(model, input_ids=ids, past_key_values=cache)
    patch_model(model, LServeConfig(streaming_sparsity=0, token_budget=64))
    with pytest.raises(ValueError, match="another patch"):
        logits(model, input_ids=ids[:, :1], past_key_values=cache)
    unpatch_model(model)
    with pytest.raises(RuntimeError, match="unpatched"):
        logits(model, input_ids=ids[:, :1], past_key_values=cache)


def test_patching_during_a_forward_in_another_thread_is_refused():
    model = patch_model(tiny_llama(), DENSE)
    model._lserve.active = 1                  # as while another thread runs a forward
    with pytest.raises(RuntimeError, match="another thread"):
        patch_model(model, DENSE)
    with pytest.raises(RuntimeError, match="another thread"):
        unpatch_model(model)
    model._lserve.active = 0
    errors = []
    threads = [threading.Thread(target=lambda: errors.append(logits(model, input_ids=ids_of(1, 9)))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 2 and model._lserve.active == 0


# -- generation ---------------------------------------------------------------------------------

def test_generate_without_cache_says_once_that_it_recomputes(caplog):
    model = patch_model(tiny_llama(), DENSE)
    with caplog.at_level(logging.WARNING, logger="lserve_hf"):
        with torch.no_grad():
            model.generate(ids_of(1, 8), max_new_tokens=2, do_sample=False, use_cache=False)
    assert any("use_cache=False" in r.message for r in caplog.records)


def test_static_cache_request_is_said_once(caplog):
    model = patch_model(tiny_llama(), DENSE)
    with caplog.at_level(logging.WARNING, logger="lserve_hf"):
        with torch.no_grad():
            out = model.generate(ids_of(1, 8), max_new_tokens=2, do_sample=False, cache_implementation="static",
                                 return_dict_in_generate=True)
    assert isinstance(out.past_key_values, LServeCache)
    assert any("static" in r.message for r in caplog.records)


def test_huge_max_new_tokens_reserves_a_bounded_pool():
    from lserve_hf.cache import RESERVE_NEW_TOKENS

    model = patch_model(tiny_llama(), DENSE)
    cache = LServeCache(model, max_length=10 ** 8)
    logits(model, input_ids=ids_of(1, 30), past_key_values=cache)
    assert cache.layers[0].pool.capacity <= 30 + RESERVE_NEW_TOKENS + 64


@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_prompt_lookup_decoding_gives_the_greedy_tokens(sparsity):
    """Assisted decoding (prompt lookup) verifies drafts in multi-token forwards and crops the
    rejected ones: the tokens of plain greedy decoding, unpatched at sparsity 0 and patched with
    streaming heads (within the budget, where both read the same keys)."""
    model = tiny_llama()
    text = ids_of(1, 12, 5)
    ids = torch.cat([text, text, text[:, :6]], 1)             # repeats, so lookups find drafts
    kw = dict(max_new_tokens=20, do_sample=False)
    cfg = LServeConfig(streaming_sparsity=sparsity, page_size=16, logical_page_size=4, token_budget=512,
                       prefill_sink=4, prefill_local=16, decode_sink=4, decode_local=16)
    with torch.no_grad():
        plain = model.generate(ids, **kw)
        patch_model(model, cfg, PATTERN)
        if sparsity:
            plain = model.generate(ids, **kw)
        looked = model.generate(ids, prompt_lookup_num_tokens=4, **kw)
    assert torch.equal(looked, plain)


def test_crop_gives_back_what_a_chunk_overwrote():
    """crop(-n) after a multi-token append leaves the stores of a cache that never saw the n
    tokens, streaming rings included."""
    cfg = LServeConfig(streaming_sparsity=0.5, page_size=16, logical_page_size=4, token_budget=16,
                       prefill_sink=2, prefill_local=8, decode_sink=2, decode_local=8)
    model = patch_model(tiny_llama(), cfg, PATTERN)
    ids = ids_of(2, 40)
    a, b = LServeCache(model), LServeCache(model)
    a.activate_past_recording()
    logits(model, input_ids=ids[:, :30], past_key_values=a)
    logits(model, input_ids=ids[:, 30:36], past_key_values=a)
    a.crop(-5)
    logits(model, input_ids=ids[:, :31], past_key_values=b)
    assert a.get_seq_length() == b.get_seq_length() == 31 and torch.equal(a.lengths, b.lengths)
    for x, y in zip(a.layers, b.layers):
        L = 31
        assert torch.allclose(x.pool.pool_k[:, :, :L], y.pool.pool_k[:, :, :L], atol=1e-6)
        assert torch.allclose(x.pool.kmax[:, :, :8], y.pool.kmax[:, :, :8], atol=1e-6)
        assert torch.isinf(x.pool.kmax[:, :, 8:]).all()           # pages past the length are empty again
        assert torch.allclose(x.streaming.ring_k, y.streaming.ring_k, atol=1e-6)
    nxt = ids[:, 31:32]
    assert torch.allclose(logits(model, input_ids=nxt, past_key_values=a),
                          logits(model, input_ids=nxt, past_key_values=b), atol=1e-5)


# -- outputs -----------------------------------------------------------------------------------

def test_output_attentions_equal_eager_weights():
    model = tiny_llama()
    ids = ids_of(1, 14)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        want = model(ids, output_attentions=True).attentions
        gen_want = model.generate(ids, max_new_tokens=2, do_sample=False, output_attentions=True,
                                  return_dict_in_generate=True).attentions
    patch_model(model, DENSE)
    with torch.no_grad():
        got = model(ids, output_attentions=True).attentions
        gen_got = model.generate(ids, max_new_tokens=2, do_sample=False, output_attentions=True,
                                 return_dict_in_generate=True).attentions
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5)
    for step_got, step_want in zip(gen_got, gen_want):
        for g, w in zip(step_got, step_want):
            assert g.shape == w.shape and torch.allclose(g, w, atol=1e-5)


def test_attention_dropout_applies_in_training():
    model = tiny_llama(attention_dropout=0.5)
    patch_model(model, DENSE)
    model.train()
    ids = ids_of(1, 12)
    torch.manual_seed(0)
    a = model(ids, use_cache=False).logits
    b = model(ids, use_cache=False).logits
    assert not torch.allclose(a, b)
    model.eval()
    unpatch_model(model)
    want = logits(model, input_ids=ids)
    patch_model(model, DENSE)
    assert torch.allclose(logits(model, input_ids=ids), want, atol=1e-5)


def test_layer_keys_say_where_the_kv_lives():
    model = patch_model(tiny_llama(), DENSE)
    out = model(ids_of(1, 6))
    with pytest.raises(AttributeError, match="streaming"):
        out.past_key_values.layers[0].keys


# -- clear errors --------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern, words", [
    ([[0.1, 0.2], [0.3]], "rectangular"),
    ([["a", "b"], ["c", "d"]], "rectangular"),
    ({"layer0": [0.1, 0.2]}, "not dict"),
    (torch.empty(0, 2), "not empty"),
    (np.full((2, 2), np.nan), "NaN"),
])
def test_bad_head_patterns_are_named(pattern, words):
    with pytest.raises((ValueError, TypeError), match=words):
        patch_model(tiny_llama(), LServeConfig(), head_pattern=pattern)


def test_pattern_files_binary_or_without_extension(tmp_path):
    from lserve_hf.heads import save_pattern

    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match="not a text file"):
        patch_model(tiny_llama(), LServeConfig(), head_pattern=binary)
    plain = tmp_path / "pattern"                           # a file with no extension is a file
    save_pattern(torch.tensor(PATTERN), tmp_path / "x.tsv")
    plain.write_text((tmp_path / "x.tsv").read_text())
    model = patch_model(tiny_llama(), LServeConfig(), head_pattern=plain)
    assert model._lserve.streaming.tolist() == [[False, True], [True, False]]


def test_wrong_arguments_and_inputs_are_named():
    model = tiny_llama()
    with pytest.raises(TypeError, match="head_pattern='pattern.tsv'"):
        patch_model(model, "pattern.tsv")
    patch_model(model, DENSE)
    with pytest.raises(ValueError, match="input_ids or inputs_embeds"):
        model()
    with pytest.raises(ValueError, match="batch size 3"):
        model(ids_of(2, 5), attention_mask=torch.ones(3, 5, dtype=torch.long))
    cache = LServeCache(model)
    logits(model, input_ids=ids_of(2, 5), past_key_values=cache)
    with pytest.raises(ValueError, match="2 rows"):
        logits(model, input_ids=ids_of(3, 1), past_key_values=cache)


def test_a_failed_repatch_keeps_the_old_patch():
    model = patch_model(tiny_llama(), DENSE)
    ids = ids_of(1, 10)
    want = logits(model, input_ids=ids)
    with pytest.raises(ValueError, match="calibrate"):
        patch_model(model, LServeConfig())              # 50% streaming, no pattern known: fails
    assert model._lserve.config.streaming_sparsity == 0
    assert torch.equal(logits(model, input_ids=ids), want)
