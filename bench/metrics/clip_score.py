"""CLIP score for text-to-image samples (Stable Diffusion on MS-COCO captions), the `sd` extra.

EDA-DM evaluates SD with the clip-score package and ViT-L/14 (`scripts/test.py`): each generated image is center-cropped
and resized to 300x300, then CLIP-preprocessed, and the score is 100 * cos(image embedding, text embedding)
averaged over the images (the logit scale of CLIP is 100). Weights come from the local Hugging Face cache
(`openai/clip-vit-large-patch14`) or a folder given as `model_dir` / `$EDA_BENCH_CLIP`; never the network.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.errors import BenchError, UsageError, hf_download_command

CLIP_ID = "openai/clip-vit-large-patch14"
ENV_CLIP = "EDA_BENCH_CLIP"
# CLIP's image normalisation (OpenAI CLIP preprocess).
_MEAN = (0.48145466, 0.4578275, 0.40821073)
_STD = (0.26862954, 0.26130258, 0.27577711)


def _need_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise BenchError("the CLIP score needs transformers: pip install -e '.[sd]'") from None


def resolve_clip_dir(model_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding CLIP ViT-L/14 (config.json, weights, tokenizer); BenchError naming the download."""
    for d in [model_dir, os.environ.get(ENV_CLIP)]:
        if d and (Path(d) / "config.json").is_file():
            return Path(d)
    try:
        from huggingface_hub import snapshot_download

        snap = Path(snapshot_download(CLIP_ID, local_files_only=True))
        if (snap / "config.json").is_file():
            return snap
    except Exception:  # not in the cache (or no cache at all): same answer
        pass
    raise BenchError(f"CLIP score needs {CLIP_ID}: download it into the Hugging Face cache (`{hf_download_command()} "
                     f"{CLIP_ID}`) or save it to a folder and set ${ENV_CLIP}")


def clip_availability(model_dir: str | os.PathLike | None = None) -> tuple[bool, str]:
    """(True, folder) if the CLIP score can run offline, else (False, what to install / download)."""
    try:
        _need_transformers()
        return True, str(resolve_clip_dir(model_dir))
    except BenchError as e:
        return False, str(e)


def preprocess(images: torch.Tensor, size: int, pre_size: int = 300) -> torch.Tensor:
    """[-1, 1] images -> CLIP input: center crop + resize to pre_size (EDA-DM's center_resize_image), then resize
    the short side to `size` (bicubic), center crop, normalise."""
    x = (images.float().clamp(-1, 1) + 1) / 2
    h, w = x.shape[-2:]
    s = min(h, w)
    x = x[..., (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    x = F.interpolate(x, size=(pre_size, pre_size), mode="bicubic", align_corners=False, antialias=True)
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    mean = torch.tensor(_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def clip_score(images: torch.Tensor, prompts: list[str], model_dir: str | os.PathLike | None = None,
               device: str | torch.device = "cpu", batch_size: int = 32) -> dict[str, float]:
    """{'clip': mean of 100 cos(img, text), 'clip_se': its standard error} for images [N, 3, H, W] in [-1, 1]
    paired with their prompts."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise UsageError(f"clip_score expects RGB images [N, 3, H, W], got shape {tuple(images.shape)}")
    if len(prompts) != len(images):
        raise UsageError(f"clip_score got {len(images)} images but {len(prompts)} prompts")
    _need_transformers()
    from transformers import CLIPModel, CLIPTokenizer

    path = resolve_clip_dir(model_dir)
    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True).eval().to(device)
        tok = CLIPTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise BenchError(f"could not load CLIP from {path}: {type(e).__name__}; re-download {CLIP_ID}") from None
    size = model.config.vision_config.image_size
    max_len = min(tok.model_max_length, model.config.text_config.max_position_embeddings)
    scores = []
    for s in range(0, len(images), batch_size):
        px = preprocess(images[s:s + batch_size].to(device), size)
        ids = tok(prompts[s:s + batch_size], padding="max_length", max_length=max_len, truncation=True,
                  return_tensors="pt").to(device)
        img = F.normalize(_features(model.get_image_features(pixel_values=px)), dim=-1)
        txt = F.normalize(_features(model.get_text_features(**ids)), dim=-1)
        scores.append((100 * (img * txt).sum(-1)).float().cpu())
    v = torch.cat(scores)
    se = float(v.std(unbiased=True) / math.sqrt(len(v))) if len(v) > 1 else math.nan
    return {"clip": float(v.mean()), "clip_se": se}


def _features(out) -> torch.Tensor:
    """transformers 4 returns a tensor, 5 may return a model output with pooler_output."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output
