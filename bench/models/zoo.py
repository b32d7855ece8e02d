"""The papers' models (EDA-DM Sec. 5 and its scripts, Q-Diffusion README): registered by name, loaded offline, sampled as the official
scripts sample them.

| name | weights | sampler (official script) | reference data |
|---|---|---|---|
| cifar10-ddim | google/ddpm-cifar10-32 (HF cache) | DDIM 100, eta 0, quad | CIFAR-10 train statistics |
| lsun-bedroom-ldm4 | CompVis lsun_beds256 .ckpt -> `bench.convert` | DDIM 200, eta 1.0 | LSUN-Bedroom folder |
| lsun-church-ldm8 | CompVis lsun_churches256 .ckpt -> convert | DDIM 500, eta 0 (Q-Diff.: 400) | LSUN-Church folder |
| imagenet-ldm4 | CompVis cin256-v2 .ckpt -> convert | DDIM 20, eta 0, cfg 3.0 | ImageNet folder |
| sd-v1-4 | CompVis/stable-diffusion-v1-4 (HF cache) | PLMS 50, cfg 7.5, 512x512 | MS-COCO val2014 captions |

Where a model is looked for, first hit wins: the `model_dir` argument of `load_model` (the folder itself or its
`<name>/` subfolder), then `$EDA_BENCH_MODELS/<name>`, then the hub id in the local Hugging Face cache (`HF_HOME`;
never the network). A model folder is diffusers `save_pretrained` layout: `unet/` plus `vqvae/` or `vae/` (LDMs),
`class_embedder/` (ImageNet), `text_encoder/` + `tokenizer/` (SD), and an optional `bench.json`.

Only the UNet is quantized: autoencoders, the class embedder and the CLIP text encoder stay FP inside
`DiffusionModel.decode` / `.conditioning`. Conditioning dicts use the `uncond_` prefix for classifier-free guidance
(`eda.guidance.split_guidance`). `model_availability(name)` answers "is it here?" without loading anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.errors import BenchError, UsageError, hf_download_command
from bench.models.directory import _read_unet
from bench.models.model import DiffusionModel
from bench.models.registry import register_model
from bench.models.sampling import SamplerConfig
from bench.models.schedule import alphas_cumprod_for

ENV_MODELS = "EDA_BENCH_MODELS"  # root folder holding <name>/ model folders (converted or saved)
ENV_DATA = "EDA_BENCH_DATA"  # reference images: $EDA_BENCH_DATA/<dataset>/<split>/ (bench.metrics.reference.data_dir)
ENV_CAPTIONS = "EDA_BENCH_COCO_CAPTIONS"  # captions_val2014.json (or a .txt with one prompt per line)

# CompVis samplers: uniform steps + 1 and alpha_bar_0 before the first step, as CompVis' ddim.py / plms.py.
_COMPVIS = dict(skip="uniform", offset=1, set_alpha_to_one=False)


def _eda(lam: float, radius: float, gamma: float, iters: int, batch: int, lrs: dict[str, tuple[float, float]],
         n_samples: int = 1024, tdac_batch: int | None = None, init_batch: int = 32) -> dict[str, Any]:
    """`DiffusionModel.defaults` in the layout eda.registry reads: the "eda-dm" block applies to EDA-DM (and its
    ablations), its bit-width blocks at that width only (`scripts/for_*.sh`: lamda, dense_r, add_loss,
    iters, batch, lr_w / lr_a; TDAC uses the features of the first batch_samples trajectories; activation-range
    init batch 256 CIFAR, 32 LSUN / ImageNet, 2 SD)."""
    return {"eda-dm": {"lam": lam, "radius": radius, "gamma": gamma, "iters": iters, "batch_size": batch,
                       "n_samples": n_samples, "tdac_batch": tdac_batch, "init_batch": init_batch,
                       **{b: {"lr_w": w, "lr_a": a} for b, (w, a) in lrs.items()}}}


# Q-Diffusion's LDM and SD scripts initialise ranges with scale_method 'mse' (our L_p search; the DDIM script
# uses 'max'); the activation settings per command are set in each entry below.
_QDIFF_LDM = {"w_init": "lp", "a_init": "lp"}


@dataclass(frozen=True)
class ZooEntry:
    """One paper model: where its weights come from, its noise schedule, sampler and evaluation protocol."""

    name: str
    family: str  # "pixel" | "latent" | "class" | "text"
    schedule: tuple[str, float, float]  # (beta_schedule, beta_start, beta_end), T = 1000
    sampler: SamplerConfig
    dataset: str
    reference: str  # where the metrics' reference data comes from
    reference_split: str = "train"  # bench.metrics reads $EDA_BENCH_DATA/<dataset>/<split>
    hub_id: str | None = None  # diffusers repo, read from the local HF cache only
    ckpt_url: str | None = None  # original CompVis checkpoint, converted with `python -m bench.convert`
    guidance_scale: float = 1.0
    n_eval: int = 50_000  # images per evaluation in the papers
    metrics: tuple[str, ...] = ("fid", "sfid", "is")
    samplers: dict[str, SamplerConfig] = field(default_factory=dict)  # alternative settings of other papers
    defaults: dict[str, Any] = field(default_factory=dict)
    note: str = ""


ZOO: dict[str, ZooEntry] = {e.name: e for e in [
    ZooEntry(
        "cifar10-ddim", "pixel", ("linear", 1e-4, 0.02), SamplerConfig("ddim", 100, 0.0, "quad"), "cifar10",
        f"CIFAR-10 train images in ${ENV_DATA}/cifar10/train (torch-fidelity `cifar10-train` in the papers)",
        hub_id="google/ddpm-cifar10-32",
        metrics=("fid", "is"),
        defaults=_eda(1.2, 3.0, 0.8, 5000, 32, {"W8A8": (5e-2, 1e-3), "W4A8": (5e-1, 5e-4)}, init_batch=256),
        note="the papers use pesser's EMA port of Ho et al.'s checkpoint; google/ddpm-cifar10-32 is the diffusers "
             "conversion of the same DDPM model"),
    ZooEntry(
        "lsun-bedroom-ldm4", "latent", ("scaled_linear", 0.0015, 0.0195), SamplerConfig("ddim", 200, 1.0, **_COMPVIS),
        "lsun-bedroom", f"LSUN-Bedroom images in ${ENV_DATA}/lsun-bedroom/train",
        ckpt_url="https://ommer-lab.com/files/latent-diffusion/lsun_bedrooms.zip", metrics=("fid", "sfid"),
        defaults={**_eda(1.0, 0.3, 1.0, 5000, 32, {"W8A8": (5e-4, 1e-4), "W4A8": (1e-2, 5e-3)}, tdac_batch=64),
                  # Q-Diffusion's bedroom command: --a_sym --a_min_max, no --split
                  "qdiffusion": {**_QDIFF_LDM, "a_init": "qdiff-max", "split_shortcut": False}}),
    ZooEntry(
        "lsun-church-ldm8", "latent", ("scaled_linear", 0.0015, 0.0155), SamplerConfig("ddim", 500, 0.0, **_COMPVIS),
        "lsun-church", f"LSUN-Church images in ${ENV_DATA}/lsun-church/train",
        ckpt_url="https://ommer-lab.com/files/latent-diffusion/lsun_churches.zip", metrics=("fid", "sfid"),
        samplers={"qdiffusion": SamplerConfig("ddim", 400, 0.0, **_COMPVIS)},  # Q-Diffusion README: -c 400
        defaults={**_eda(1.0, 0.3, 1.0, 5000, 32, {"W8A8": (5e-2, 1e-4), "W4A8": (5e-2, 1e-4)}, tdac_batch=64),
                  # Q-Diffusion's church command: neither --a_sym nor --a_min_max nor --split
                  "qdiffusion": {**_QDIFF_LDM, "a_symmetric": False, "split_shortcut": False}}),
    ZooEntry(
        "imagenet-ldm4", "class", ("scaled_linear", 0.0015, 0.0195), SamplerConfig("ddim", 20, 0.0, **_COMPVIS),
        "imagenet", f"ImageNet images in ${ENV_DATA}/imagenet/train (50 generated images per class)",
        ckpt_url="https://ommer-lab.com/files/latent-diffusion/nitro/cin/model.ckpt", guidance_scale=3.0,
        defaults=_eda(1.2, 3.0, 0.8, 1000, 32, {"W8A8": (1e-4, 1e-3), "W4A8": (5e-1, 1e-4)}, tdac_batch=64)),
    ZooEntry(
        "sd-v1-4", "text", ("scaled_linear", 0.00085, 0.012), SamplerConfig("plms", 50, 0.0, **_COMPVIS),
        "coco", f"MS-COCO val2014 images in ${ENV_DATA}/coco/val2014, captions (${ENV_CAPTIONS}); CLIP score "
        "(ViT-L/14, bench.metrics.clip_score)", reference_split="val2014",
        hub_id="CompVis/stable-diffusion-v1-4", guidance_scale=7.5, n_eval=10_000,
        metrics=("fid", "sfid", "clip"),
        # EDA-DM's scripts/for_coco.sh quantizes the softmax output at 8 bits (--sm_abit 8, the method default);
        # Q-Diffusion's txt2img command at 16 (--sm_abit 16), with --cali_st 25 --cali_n 128 --cali_batch_size 8,
        # L_p ('mse') ranges and no --a_sym
        defaults={**_eda(5.0, 0.3, 0.8, 1000, 2, {"W8A8": (5e-4, 1e-4), "W4A8": (3e-2, 1e-4)}, n_samples=256,
                         tdac_batch=8, init_batch=2),
                  "qdiffusion": {"cali_st": 25, "cali_n": 128, "batch_size": 8, "softmax_bits": 16,
                                 **_QDIFF_LDM, "a_symmetric": False}},
        note="EDA-DM evaluates 10k images; generated images are center-cropped and resized to 300x300 first"),
]}

# Sub-folders each family needs (first alternative that exists wins).
_PARTS = {
    "pixel": [("unet", ".")],
    "latent": [("unet",), ("vqvae", "vae")],
    "class": [("unet",), ("vqvae", "vae"), ("class_embedder",)],
    "text": [("unet",), ("vae",), ("text_encoder",), ("tokenizer",)],
}


# ---- finding the weights -----------------------------------------------------------------------------------------
def _complete(root: Path, family: str) -> bool:
    return all(any((root / p / "config.json").is_file() or (p == "tokenizer" and (root / p).is_dir())
                   for p in alts) for alts in _PARTS[family])


def _hf_cache_dir(repo_id: str) -> Path | None:
    """The snapshot of `repo_id` in the local Hugging Face cache, or None (never touches the network)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError, offline errors, a broken cache: all mean "not here"
        return None


def _candidates(entry: ZooEntry, model_dir: str | os.PathLike | None) -> list[Path]:
    out = []
    if model_dir is not None:
        out += [Path(model_dir) / entry.name, Path(model_dir)]
    if os.environ.get(ENV_MODELS):
        out.append(Path(os.environ[ENV_MODELS]) / entry.name)
    return out


def _missing_message(entry: ZooEntry, looked: list[Path]) -> str:
    where = ", ".join(str(p) for p in looked) or f"(no model_dir, ${ENV_MODELS} unset)"
    target = f"${ENV_MODELS}/{entry.name} (or a folder passed as load_model(..., model_dir=...))"  # no CLI flag
    ckpts = [p for d in looked if d.is_dir() for p in d.glob("*.ckpt")]
    if ckpts:
        return (f"{entry.name}: found {ckpts[0]} but no converted model; run `python -m bench.convert {entry.name} "
                f"{ckpts[0]} {ckpts[0].parent}` and try again")
    if entry.hub_id:
        return (f"{entry.name} is not available offline: download the diffusers repo {entry.hub_id} into the Hugging "
                f"Face cache (`{hf_download_command()} {entry.hub_id}` with HF_HOME set as when running), or save "
                f"it with save_pretrained into {target}; looked in {where} and the HF cache")
    return (f"{entry.name} is not available offline: download {entry.ckpt_url}, take model.ckpt and convert it with "
            f"`python -m bench.convert {entry.name} model.ckpt DIR` with DIR = {target}; looked in {where}")


def resolve_model_dir(name: str, model_dir: str | os.PathLike | None = None) -> Path:
    """The local folder holding `name` (see the module docstring for the search order); BenchError if none."""
    entry = zoo_entry(name)
    looked = _candidates(entry, model_dir)
    for d in looked:
        if d.is_dir() and _complete(d, entry.family):
            return d
    if entry.hub_id and (snap := _hf_cache_dir(entry.hub_id)) is not None and _complete(snap, entry.family):
        return snap
    raise BenchError(_missing_message(entry, looked))


def _need_transformers(name: str) -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise BenchError(f"{name} needs the CLIP text encoder from transformers: pip install -e '.[sd]'") from None


def _captions_file() -> Path:
    if os.environ.get(ENV_CAPTIONS):
        return Path(os.environ[ENV_CAPTIONS])
    from bench.metrics.reference import data_dir

    return data_dir() / "coco" / "annotations" / "captions_val2014.json"


def model_availability(name: str, model_dir: str | os.PathLike | None = None) -> tuple[bool, str]:
    """(True, folder) if `name` can be loaded offline, else (False, what to download and where to put it).
    Loads nothing; `python -m bench.run --grid full --dry-run` lists models with it."""
    if name not in ZOO:
        from bench.models.registry import available_models, registered_availability

        if name in available_models():
            return registered_availability(name)
        return False, f"unknown model {name!r}"
    try:
        path = resolve_model_dir(name, model_dir)
        if ZOO[name].family == "text":
            _need_transformers(name)
            cap = _captions_file()
            if not cap.is_file():
                return False, (f"{name}: the MS-COCO val2014 captions are missing; download annotations_trainval2014"
                               f".zip from cocodataset.org and set ${ENV_CAPTIONS} to captions_val2014.json")
    except BenchError as e:
        return False, str(e)
    return True, str(path)


def zoo_entry(name: str) -> ZooEntry:
    if name not in ZOO:
        raise UsageError(f"unknown paper model {name!r}; expected one of {', '.join(ZOO)}")
    return ZOO[name]


# ---- loading -----------------------------------------------------------------------------------------------------
def _part(root: Path, *names: str) -> Path:
    for n in names:
        if (root / n).is_dir():
            return root / n
    raise BenchError(f"{root} has none of {', '.join(n + '/' for n in names)}; re-save or re-convert the model")


def _meta(root: Path) -> dict[str, Any]:
    f = root / "bench.json"
    try:
        return json.loads(f.read_text()) if f.is_file() else {}
    except json.JSONDecodeError as e:
        raise BenchError(f"corrupt {f} ({e.msg}); re-run `python -m bench.convert`") from None


def apply_attention_heads(unet: torch.nn.Module, heads: int | None) -> None:
    """CompVis UNets with a fixed head count (church: num_heads=8) at every width; UNet2DModel only takes a fixed
    head *dim*, so the head count is stored in bench.json and set on each Attention after loading."""
    if not heads:
        return
    from diffusers.models.attention_processor import Attention

    for m in unet.modules():
        if isinstance(m, Attention):
            m.heads = heads
            m.scale = (m.inner_dim // heads) ** -0.5


def _load(cls_name: str, path: Path):
    import diffusers

    try:
        return getattr(diffusers, cls_name).from_pretrained(path, local_files_only=True)
    except Exception as e:  # a truncated or mismatched file: one line, no hub-client traceback
        raise BenchError(f"could not load the {cls_name} in {path}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''}; re-save or re-convert it") from None


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _decoder(vae: torch.nn.Module, unet: torch.nn.Module, scale: float, batch: int = 16):
    """latents -> images in [-1, 1], FP, on the UNet's device (load_model moves the UNet), returned on CPU."""

    @torch.no_grad()
    def decode(z: torch.Tensor) -> torch.Tensor:
        dev = _device_of(unet)
        vae.to(dev)
        outs = [vae.decode(z[i:i + batch].to(dev, torch.float32) / scale).sample.cpu()
                for i in range(0, len(z), batch)]
        return torch.cat(outs) if outs else z

    return decode


def _base(entry: ZooEntry, unet, root: Path, source: str, **kw) -> DiffusionModel:
    meta = _meta(root)
    apply_attention_heads(unet, meta.get("attention_heads"))
    sched, b0, b1 = meta.get("schedule", entry.schedule)
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)[0]
    return DiffusionModel(
        name=entry.name, unet=unet.eval(), alphas_cumprod=alphas_cumprod_for(sched, 1000, b0, b1),
        sampler=entry.sampler, sample_shape=(cfg.in_channels, size, size), dataset=entry.dataset,
        guidance_scale=entry.guidance_scale, source=source,
        defaults={**entry.defaults, "n_eval": entry.n_eval, "metrics": entry.metrics, "reference": entry.reference,
                  "reference_split": entry.reference_split,
                  "samplers": {k: v for k, v in entry.samplers.items()}}, **kw)


def load_zoo_model(name: str, model_dir: str | os.PathLike | None = None, guidance_scale: float | None = None,
                   captions: str | os.PathLike | None = None) -> DiffusionModel:
    """Load a paper model offline (BenchError naming what to download if it is not here)."""
    entry = zoo_entry(name)
    if entry.family == "text":
        _need_transformers(name)
    root = resolve_model_dir(name, model_dir)
    unet = _read_unet(_part(root, "unet") if (root / "unet").is_dir() else root)
    src = str(root)
    if entry.family == "pixel":
        model = _base(entry, unet, root, src)
    elif entry.family == "latent":
        model = _latent(entry, unet, root, src)
    elif entry.family == "class":
        model = _class_conditional(entry, unet, root, src)
    else:
        model = _text(entry, unet, root, src, captions)
    if guidance_scale is not None:
        model.guidance_scale = float(guidance_scale)
    return model


def _autoencoder(root: Path, unet):
    meta = _meta(root)
    if (root / "vqvae").is_dir():
        vae = _load("VQModel", root / "vqvae")
    else:
        vae = _load("AutoencoderKL", _part(root, "vae"))
    scale = float(meta.get("scale_factor", getattr(vae.config, "scaling_factor", 1.0) or 1.0))
    return vae.eval().requires_grad_(False), scale


def _latent(entry, unet, root, src) -> DiffusionModel:
    vae, scale = _autoencoder(root, unet)
    return _base(entry, unet, root, src, decode=_decoder(vae, unet, scale))


def _class_conditional(entry, unet, root, src) -> DiffusionModel:
    """cin256-v2: a ClassEmbedder (nn.Embedding(1001, 512), class 1000 = unconditional) feeds cross-attention
    with a length-1 context; the embedding stays FP outside the UNet (CompVis cond_stage_model)."""
    from safetensors.torch import load_file

    vae, scale = _autoencoder(root, unet)
    emb_file = root / "class_embedder" / "embedding.safetensors"
    if not emb_file.is_file():
        raise BenchError(f"missing {emb_file}; re-run `python -m bench.convert {entry.name} model.ckpt {root}`")
    table = load_file(str(emb_file))["weight"].float()
    n_classes = table.shape[0] - 1

    def conditioning(n: int, seed: int) -> dict[str, torch.Tensor]:
        # Balanced classes (the papers sample 50 per class), in a seeded order per block of n_classes.
        g = torch.Generator().manual_seed(seed)
        blocks = [torch.randperm(n_classes, generator=g) for _ in range((n + n_classes - 1) // n_classes)]
        labels = torch.cat(blocks)[:n] if blocks else torch.zeros(0, dtype=torch.long)
        return {"encoder_hidden_states": table[labels][:, None, :],
                "uncond_encoder_hidden_states": table[n_classes].expand(n, 1, -1)}

    return _base(entry, unet, root, src, decode=_decoder(vae, unet, scale), conditioning=conditioning)


def read_captions(path: str | os.PathLike) -> list[str]:
    """MS-COCO captions_val2014.json (annotations[].caption) or a text file with one prompt per line."""
    p = Path(path)
    if not p.is_file():
        raise BenchError(f"captions file {p} not found; download annotations_trainval2014.zip from cocodataset.org "
                         f"and point ${ENV_CAPTIONS} at captions_val2014.json")
    if p.suffix == ".json":
        try:
            return [a["caption"].strip() for a in json.loads(p.read_text())["annotations"]]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise BenchError(f"{p} is not a COCO captions file (expected annotations[].caption)") from None
    return [line.strip() for line in p.read_text().splitlines() if line.strip()]


def _text(entry, unet, root, src, captions) -> DiffusionModel:
    """SD v1.4: CLIP ViT-L/14 text encoder (FP) -> last hidden state [n, 77, 768] as cross-attention context;
    unconditional = the empty prompt (CompVis txt2img `model.get_learned_conditioning(batch_size * [""])`)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    vae, scale = _autoencoder(root, unet)
    try:
        tok = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        enc = CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True).eval().requires_grad_(False)
    except Exception as e:
        raise BenchError(f"could not load the CLIP tokenizer/text encoder in {root}: {type(e).__name__}; "
                         "re-download the model") from None
    cache: dict[str, list[str]] = {}

    def prompts(n: int, seed: int) -> list[str]:
        # EDA-DM's coco_prompt.get_prompts shuffles the val2014 captions; we shuffle with the seed.
        if "all" not in cache:
            cache["all"] = read_captions(captions or _captions_file())
        pool = cache["all"]
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()
        return [pool[order[i % len(pool)]] for i in range(n)]

    @torch.no_grad()
    def encode(texts: list[str]) -> torch.Tensor:
        dev = _device_of(unet)
        enc.to(dev)
        outs = []
        for i in range(0, len(texts), 64):
            ids = tok(texts[i:i + 64], padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(dev)
            outs.append(enc(ids).last_hidden_state.float().cpu())
        return torch.cat(outs)

    def conditioning(n: int, seed: int) -> dict[str, torch.Tensor]:
        cond = encode(prompts(n, seed)) if n else torch.zeros(0, tok.model_max_length, enc.config.hidden_size)
        return {"encoder_hidden_states": cond, "uncond_encoder_hidden_states": encode([""]).expand(n, -1, -1)}

    return _base(entry, unet, root, src, decode=_decoder(vae, unet, scale, batch=4), conditioning=conditioning,
                 prompts=prompts)


def _register(name: str) -> None:
    @register_model(name)
    def _loader(model_dir=None, **kwargs) -> DiffusionModel:
        return load_zoo_model(name, model_dir=model_dir, **kwargs)

    _loader.__doc__ = f"{name}: {ZOO[name].reference}"


for _name in ZOO:
    _register(_name)
