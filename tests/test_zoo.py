"""bench.models.zoo: every paper-model family loads through the registry's real path from a folder of tiny random models
of the same structure (save_pretrained, no network), samples with the official sampler kind, and runs calibration
+ a method + sampling + metrics end to end."""

import json
import string

import pytest
import torch

from bench.errors import BenchError
from bench.models import available_models, load_model
from eda.guidance import split_guidance
from bench.models.sampling import SamplerConfig, sample_batch, timesteps
from bench.models.schedule import alphas_cumprod_for
from bench.models.zoo import ENV_CAPTIONS, ENV_MODELS, ZOO, model_availability

torch.set_num_threads(2)

try:
    import transformers  # noqa: F401

    HAVE_TRANSFORMERS = True
except ImportError:
    HAVE_TRANSFORMERS = False
needs_transformers = pytest.mark.skipif(not HAVE_TRANSFORMERS,
                                        reason="SD needs transformers (CLIP text encoder): pip install -e '.[sd]'")

# Tiny CompVis-style UNet configs (bench.models.compvis.build_unet builds the same diffusers classes as the real presets).
TINY_UNETS = {
    "lsun-bedroom-ldm4": dict(image_size=8, in_channels=3, out_channels=3, model_channels=32,
                              attention_resolutions=(2,), num_res_blocks=1, channel_mult=(1, 2), num_head_channels=16),
    "lsun-church-ldm8": dict(image_size=8, in_channels=4, out_channels=4, model_channels=32,
                             attention_resolutions=(1, 2), num_res_blocks=1, channel_mult=(1, 2), num_heads=2,
                             use_scale_shift_norm=True, resblock_updown=True),
    "imagenet-ldm4": dict(image_size=8, in_channels=3, out_channels=3, model_channels=32, attention_resolutions=(2,),
                          num_res_blocks=1, channel_mult=(1, 2), num_heads=1, context_dim=16),
}
TINY_VQ = dict(kind="vq", embed_dim=3, n_embed=16, z_channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=1,
               resolution=16)
TINY_KL = dict(kind="kl", embed_dim=4, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=16)
CAPTIONS = ["a cat on a mat", "two dogs", "a red bus in the street", "a plate of food", "a bedroom"]


def _save_pixel(root):
    from tests.conftest import make_tiny_unet

    # The hub repo google/ddpm-cifar10-32 keeps the UNet at the folder root.
    make_tiny_unet(channels=3).save_pretrained(root)


def _save_compvis(root, name):
    from safetensors.torch import save_file

    from bench.models.compvis import build_autoencoder, build_unet

    torch.manual_seed(0)
    u = TINY_UNETS[name]
    build_unet(u).save_pretrained(root / "unet")
    fs = TINY_KL if name == "lsun-church-ldm8" else TINY_VQ
    build_autoencoder(fs, 0.5).save_pretrained(root / ("vae" if fs["kind"] == "kl" else "vqvae"))
    meta = {"schedule": list(ZOO[name].schedule), "scale_factor": 0.5}
    if u.get("num_heads", -1) > 0 and not u.get("context_dim"):
        meta["attention_heads"] = u["num_heads"]
    (root / "bench.json").write_text(json.dumps(meta))
    if name == "imagenet-ldm4":
        (root / "class_embedder").mkdir()
        save_file({"weight": torch.randn(11, 16)}, str(root / "class_embedder" / "embedding.safetensors"))
        (root / "class_embedder" / "config.json").write_text(json.dumps({"num_classes": 11, "embed_dim": 16}))


def _save_sd(root):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                         block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32, attention_head_dim=2,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).save_pretrained(root / "unet")
    AutoencoderKL(block_out_channels=(16, 32), latent_channels=4, norm_num_groups=8, layers_per_block=1,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  sample_size=16, scaling_factor=0.18215).save_pretrained(root / "vae")
    # A handwritten CLIP BPE vocabulary: BOS, EOS and the letters (word-final and not), no merges.
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77).save_pretrained(root / "tokenizer")
    CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                 pad_token_id=1)).save_pretrained(root / "text_encoder")


def save_tiny(name, root):
    """A tiny random model of `name`'s family in the folder layout the zoo loads."""
    root.mkdir(parents=True, exist_ok=True)
    if name == "cifar10-ddim":
        _save_pixel(root)
    elif name == "sd-v1-4":
        _save_sd(root)
    else:
        _save_compvis(root, name)
    return root


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No model root, no captions, an empty HF cache: nothing is available unless a test puts it there."""
    monkeypatch.delenv(ENV_MODELS, raising=False)
    monkeypatch.delenv("EDA_BENCH_DATA", raising=False)
    monkeypatch.setenv(ENV_CAPTIONS, str(tmp_path / "captions_val2014.json"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "captions_val2014.json").write_text(json.dumps(
        {"annotations": [{"image_id": i, "id": i, "caption": c} for i, c in enumerate(CAPTIONS)]}))
    return tmp_path


FAMILIES = ["cifar10-ddim", "lsun-bedroom-ldm4", "lsun-church-ldm8", "imagenet-ldm4",
            pytest.param("sd-v1-4", marks=needs_transformers)]


def _short(model, steps=3):
    """The model's own sampler kind and CompVis offsets with fewer steps (fast tests)."""
    s = model.sampler
    return SamplerConfig(s.kind, steps, s.eta, s.skip, s.offset, s.set_alpha_to_one)


def test_paper_models_are_registered():
    assert set(ZOO) <= set(available_models())
    assert ZOO["cifar10-ddim"].sampler == SamplerConfig("ddim", 100, 0.0, "quad")
    assert ZOO["lsun-bedroom-ldm4"].sampler.eta == 1.0 and ZOO["lsun-bedroom-ldm4"].sampler.steps == 200
    assert ZOO["lsun-church-ldm8"].sampler.steps == 500 and ZOO["lsun-church-ldm8"].samplers["qdiffusion"].steps == 400
    assert ZOO["imagenet-ldm4"].guidance_scale == 3.0 and ZOO["sd-v1-4"].guidance_scale == 7.5
    assert ZOO["sd-v1-4"].sampler.kind == "plms" and ZOO["sd-v1-4"].sampler.steps == 50
    # CompVis DDIM: uniform + 1 -> 996..1 for 200 steps (CompVis `make_ddim_timesteps`)
    seq = timesteps(ZOO["lsun-bedroom-ldm4"].sampler)
    assert seq[0] == 1 and seq[-1] == 996 and len(seq) == 200


@pytest.mark.parametrize("name", list(ZOO))
def test_missing_model_is_one_line_error_naming_the_download(isolated, name):
    ok, msg = model_availability(name)
    assert not ok and "\n" not in msg
    assert (ZOO[name].hub_id or ZOO[name].ckpt_url) in msg or "transformers" in msg
    with pytest.raises(BenchError) as e:
        load_model(name, model_dir=isolated / "nothing-here")
    assert "\n" not in str(e.value)


def test_unconverted_checkpoint_points_to_the_converter(isolated):
    d = isolated / "models" / "lsun-church-ldm8"
    d.mkdir(parents=True)
    (d / "model.ckpt").write_bytes(b"")
    ok, msg = model_availability("lsun-church-ldm8", model_dir=isolated / "models")
    assert not ok and "bench.convert" in msg


@pytest.mark.parametrize("name", FAMILIES)
def test_family_loads_from_model_dir_and_samples(isolated, name):
    save_tiny(name, isolated / "models" / name)
    ok, where = model_availability(name, model_dir=isolated / "models")
    assert ok, where
    model = load_model(name, model_dir=isolated / "models")
    entry = ZOO[name]
    assert model.sampler == entry.sampler and model.dataset == entry.dataset
    assert torch.allclose(model.alphas_cumprod, alphas_cumprod_for(*entry.schedule[:1], 1000, *entry.schedule[1:]))
    x0 = model.generate(2, seed=0, sampler=_short(model))
    assert x0.shape == (2, *model.sample_shape) and torch.isfinite(x0).all()
    img = model.to_images(x0)
    assert img.shape[0] == 2 and img.shape[1] == 3 and img.abs().max() <= 1
    if entry.family in ("latent", "class", "text"):
        assert img.shape[-1] == 2 * model.sample_shape[-1]  # the tiny autoencoders downsample by 2
    if entry.family in ("class", "text"):
        cond = model.conditioning(3, 0)
        kw, un = split_guidance(cond)
        assert set(kw) == {"encoder_hidden_states"} and un is not None and len(kw["encoder_hidden_states"]) == 3
        assert not torch.equal(model.conditioning(3, 1)["encoder_hidden_states"], kw["encoder_hidden_states"])


def test_env_var_root_is_found(isolated, monkeypatch):
    save_tiny("cifar10-ddim", isolated / "root" / "cifar10-ddim")
    monkeypatch.setenv(ENV_MODELS, str(isolated / "root"))
    ok, where = model_availability("cifar10-ddim")
    assert ok and where.endswith("cifar10-ddim")


def test_church_head_count_is_reapplied(isolated):
    from diffusers.models.attention_processor import Attention

    save_tiny("lsun-church-ldm8", isolated / "m")
    model = load_model("lsun-church-ldm8", model_dir=isolated / "m")
    heads = {m.heads for m in model.unet.modules() if isinstance(m, Attention)}
    assert heads == {2}


def test_classifier_free_guidance_matches_the_formula(isolated):
    save_tiny("imagenet-ldm4", isolated / "m")
    model = load_model("imagenet-ldm4", model_dir=isolated / "m")
    cond = model.conditioning(2, 0)
    x, t = torch.randn(2, *model.sample_shape), torch.tensor([10, 500])
    with torch.no_grad():
        got = model.eps_fn(cond=cond)(x, t)
        e_c = model.unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample
        e_u = model.unet(x, t, encoder_hidden_states=cond["uncond_encoder_hidden_states"]).sample
    assert torch.allclose(got, e_u + 3.0 * (e_c - e_u), atol=1e-4)
    xin, _, kw = model.unet_inputs(x, t, cond)
    assert xin.shape[0] == 4 and torch.equal(kw["encoder_hidden_states"][2:], cond["encoder_hidden_states"])


def test_imagenet_classes_are_balanced(isolated):
    save_tiny("imagenet-ldm4", isolated / "m")
    model = load_model("imagenet-ldm4", model_dir=isolated / "m")
    emb = model.conditioning(20, 3)["encoder_hidden_states"][:, 0]
    assert len({tuple(e.tolist()) for e in emb[:10]}) == 10  # 10 classes (+ 1 unconditional) in the tiny table


@needs_transformers
def test_sd_prompts_come_from_the_captions_file(isolated):
    save_tiny("sd-v1-4", isolated / "m")
    model = load_model("sd-v1-4", model_dir=isolated / "m")
    p = model.prompts(4, 0)
    assert len(p) == 4 and set(p) <= set(CAPTIONS) and p == model.prompts(4, 0)


def test_compvis_samplers_match_diffusers_schedulers():
    """Our PLMS / CompVis DDIM loop equals diffusers' PNDM (skip_prk_steps) / DDIM with steps_offset=1,
    set_alpha_to_one=False (the settings that reproduce CompVis' samplers, as CompVis' ddim.py / plms.py)."""
    from diffusers import DDIMScheduler, PNDMScheduler

    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 4, generator=g) * 0.3

    def eps_fn(x, t):
        return torch.tanh(torch.einsum("ij,bjhw->bihw", w, x) + t.float().view(-1, 1, 1, 1) / 1000)

    acp = alphas_cumprod_for("scaled_linear", 1000, 0.00085, 0.012)
    x = torch.randn(2, 4, 3, 3, generator=g)
    kw = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
              steps_offset=1)
    for kind, steps, sch in [("plms", 50, PNDMScheduler(skip_prk_steps=True, **kw)),
                             ("ddim", 20, DDIMScheduler(clip_sample=False, timestep_spacing="leading", **kw))]:
        ours = sample_batch(eps_fn, x.clone(), acp, SamplerConfig(kind, steps, 0.0, "uniform", 1, False))
        sch.set_timesteps(steps)
        y = x.clone()
        for t in sch.timesteps:
            y = sch.step(eps_fn(y, t.repeat(2)), t, y).prev_sample
        assert torch.allclose(ours, y, atol=1e-3), (kind, (ours - y).abs().max())


# ---- end to end: calibration + a method + sampling + metrics ---------------------------------------------------------
# The pixel family runs by default; the others and the full EDA-DM pipeline (TDAC + FBR reconstruction) are
# slow on a shared 2-core CPU (minutes) and carry the slow marker.
E2E = [("cifar10-ddim", "rtn"), pytest.param("sd-v1-4", "rtn", marks=[pytest.mark.slow, needs_transformers]),
       pytest.param("lsun-bedroom-ldm4", "rtn", marks=pytest.mark.slow),
       pytest.param("lsun-church-ldm8", "rtn", marks=pytest.mark.slow),
       pytest.param("imagenet-ldm4", "rtn", marks=pytest.mark.slow),
       pytest.param("cifar10-ddim", "eda-dm", marks=pytest.mark.slow),
       pytest.param("imagenet-ldm4", "eda-dm", marks=pytest.mark.slow),
       pytest.param("sd-v1-4", "eda-dm", marks=[pytest.mark.slow, needs_transformers])]


@pytest.mark.parametrize(("name", "method_name"), E2E)
def test_end_to_end_calibrate_quantize_sample_evaluate(isolated, name, method_name):
    pytest.importorskip("eda.recon", reason="the quantization core (eda.recon) has not landed yet")
    from bench.metrics.score import evaluate
    from eda.registry import get_method
    from eda.trajectories import record_trajectories

    save_tiny(name, isolated / "m")
    model = load_model(name, model_dir=isolated / "m")
    model.sampler = _short(model, 4)
    method = get_method(method_name)
    overrides = {"n_samples": 4, "init_batch": 4}
    if method_name == "eda-dm":
        overrides.update(tdac_batch=4, iters_scale=0.0004, batch_size=2)
    n, feats = method.calibration_request(model, overrides)
    traj = record_trajectories(model, n, seed=1, feature_modules=feats, batch_size=4)
    if model.conditioning is not None:  # calibration records the conditioning, guidance pairs included
        assert traj.cond is not None and any(k.startswith("uncond_") for k in traj.cond)
    res = method.quantize(model, "W8A8", traj, seed=0, overrides=overrides, progress=False)
    assert res.info["calib_size"] == 4
    fp = model.to_images(model.generate(2, seed=5))
    q = model.to_images(model.generate(2, seed=5, unet=res.unet))
    assert torch.isfinite(q).all() and q.shape == fp.shape and not torch.equal(q, fp)
    out = evaluate(q, model.dataset, metrics=(), fp_images=fp, progress=False)
    assert out["fid_vs_fp"] >= 0
