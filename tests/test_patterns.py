import numpy as np
import pytest
import torch

from lserve_hf.heads import load_pattern, save_pattern, streaming_mask


def test_tsv_round_trip_is_identical(tmp_path):
    scores = torch.rand(5, 3, generator=torch.Generator().manual_seed(1))
    path = save_pattern(scores, tmp_path / "pat", method="test", steps=3)
    assert path.name == "full_attention_heads.tsv" and (tmp_path / "pat" / "config.json").is_file()
    assert torch.equal(load_pattern(tmp_path / "pat"), scores)
    assert torch.equal(load_pattern(path), scores)


def test_bad_files_give_clear_errors(tmp_path):
    (tmp_path / "a.tsv").write_text("0.1\t0.2\n0.3\n")
    with pytest.raises(ValueError, match="rectangular"):
        load_pattern(tmp_path / "a.tsv")
    (tmp_path / "b.tsv").write_text("0.1\t7\n")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_pattern(tmp_path / "b.tsv")
    with pytest.raises(FileNotFoundError, match="calibrate"):
        load_pattern(tmp_path / "missing")


def test_global_quantile_rule_and_deterministic_ties():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.2, 0.2], [1.0, 0.95, 0.3]])
    mask = streaming_mask(scores, 0.5)
    # round(0.5 * 9) = 5 heads stream: the lowest five, whole-model ranking (uneven per layer)
    assert mask.sum() == 5
    assert mask.tolist() == [[False, True, False], [True, True, True], [False, False, True]]
    ties = torch.full((2, 4), 0.5)
    m1, m2 = streaming_mask(ties, 0.5), streaming_mask(ties, 0.5)
    assert torch.equal(m1, m2) and m1.sum() == 4
    assert not streaming_mask(scores, 0.0).any() and streaming_mask(scores, 1.0).all()


def test_duoattention_published_patterns(shared_dir):
    folders = sorted((shared_dir / "duo_patterns").iterdir())
    assert folders
    for folder in folders:
        scores = load_pattern(folder)
        raw = np.loadtxt(folder / "full_attention_heads.tsv")
        kv_heads = 32 if "Llama-2" in folder.name else 8   # Llama-2-7B has no GQA
        assert scores.shape == raw.shape == (32, kv_heads)
        assert 0.0 <= scores.min() and scores.max() <= 1.0
        mask = streaming_mask(scores, 0.5)
        assert mask.sum() == 32 * kv_heads // 2
        per_layer = mask.sum(1)
        assert per_layer.min() < per_layer.max(), f"{folder.name}: expected uneven per-layer counts"
        # every streaming head scores no higher than every retrieval head
        assert scores[mask].max() <= scores[~mask].min()
