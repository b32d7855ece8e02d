"""bench.metrics.clip_score on a tiny random CLIP saved with save_pretrained (no network)."""

import string

import pytest
import torch

from bench.errors import BenchError, UsageError

pytest.importorskip("transformers", reason="the CLIP score needs transformers: pip install -e '.[sd]'")

torch.set_num_threads(2)


@pytest.fixture
def tiny_clip(tmp_path):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                           num_attention_heads=4),
        projection_dim=16)
    CLIPModel(cfg).save_pretrained(tmp_path / "clip")
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77).save_pretrained(tmp_path / "clip")
    return tmp_path / "clip"


def test_clip_score_matches_a_manual_computation(tiny_clip):
    from transformers import CLIPModel, CLIPTokenizer

    from bench.metrics.clip_score import clip_score, preprocess

    imgs = torch.rand(3, 3, 40, 48) * 2 - 1
    prompts = ["a cat", "a dog on a bed", "bus"]
    out = clip_score(imgs, prompts, model_dir=tiny_clip, batch_size=2)
    model, tok = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPTokenizer.from_pretrained(tiny_clip)
    with torch.no_grad():
        i = model.get_image_features(pixel_values=preprocess(imgs, 32))
        t = model.get_text_features(**tok(prompts, padding="max_length", max_length=77, return_tensors="pt"))
        i = i if isinstance(i, torch.Tensor) else i.pooler_output
        t = t if isinstance(t, torch.Tensor) else t.pooler_output
    want = (100 * torch.nn.functional.cosine_similarity(i, t)).mean()
    assert abs(out["clip"] - float(want)) < 1e-3 and out["clip_se"] > 0


def test_clip_score_errors(tiny_clip, monkeypatch, tmp_path):
    from bench.metrics.clip_score import clip_availability, clip_score

    with pytest.raises(UsageError):
        clip_score(torch.zeros(2, 3, 8, 8), ["one"], model_dir=tiny_clip)
    monkeypatch.delenv("EDA_BENCH_CLIP", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ok, msg = clip_availability(tmp_path / "empty")
    if not ok:  # a developer machine may have the real CLIP cached
        assert "openai/clip-vit-large-patch14" in msg
        with pytest.raises(BenchError):
            clip_score(torch.zeros(2, 3, 8, 8), ["a", "b"], model_dir=tmp_path / "empty")
