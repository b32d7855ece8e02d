"""CompVis latent-diffusion checkpoints -> diffusers-layout model folders the zoo loads (`python -m bench.convert`).

No diffusers release of the LDM-4 bedroom, LDM-8 church or cin256-v2 checkpoints exists, so we
map the keys ourselves: CompVis `openaimodel.UNetModel` -> `UNet2DModel` (AttentionBlock) or `UNet2DConditionModel`
(SpatialTransformer), taming VQ-f4 / KL-f8 autoencoders -> `VQModel` / `AutoencoderKL`, `ClassEmbedder` ->
`class_embedder/embedding.safetensors`. Architectures come from the models' official `config.yaml` (PRESETS).
The checkpoint is read with `torch.load(weights_only=True)`: tensors only, never arbitrary pickled objects.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from bench.errors import BenchError, UsageError

# Architectures of the official configs (latent-diffusion models/ldm/*/config.yaml).
_VQ_F4 = dict(kind="vq", embed_dim=3, n_embed=8192, z_channels=3, ch=128, ch_mult=(1, 2, 4), num_res_blocks=2,
              resolution=256)
PRESETS: dict[str, dict[str, Any]] = {
    "lsun-bedroom-ldm4": dict(
        unet=dict(image_size=64, in_channels=3, out_channels=3, model_channels=224, attention_resolutions=(8, 4, 2),
                  num_res_blocks=2, channel_mult=(1, 2, 3, 4), num_head_channels=32),
        first_stage=_VQ_F4, schedule=("scaled_linear", 0.0015, 0.0195), scale_factor=1.0),
    "lsun-church-ldm8": dict(
        unet=dict(image_size=32, in_channels=4, out_channels=4, model_channels=192,
                  attention_resolutions=(1, 2, 4, 8), num_res_blocks=2, channel_mult=(1, 2, 2, 4, 4), num_heads=8,
                  use_scale_shift_norm=True, resblock_updown=True),
        first_stage=dict(kind="kl", embed_dim=4, z_channels=4, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2,
                         resolution=256),
        schedule=("scaled_linear", 0.0015, 0.0155), scale_factor=0.22994),
    "imagenet-ldm4": dict(
        unet=dict(image_size=64, in_channels=3, out_channels=3, model_channels=192, attention_resolutions=(8, 4, 2),
                  num_res_blocks=2, channel_mult=(1, 2, 3, 5), num_heads=1, context_dim=512, transformer_depth=1),
        first_stage=_VQ_F4, class_embedder=dict(n_classes=1001, embed_dim=512),
        schedule=("scaled_linear", 0.0015, 0.0195), scale_factor=1.0),
}


# ---- architectures -----------------------------------------------------------------------------------------------
def _levels(u: dict) -> tuple[list[int], list[bool]]:
    chans = [u["model_channels"] * m for m in u["channel_mult"]]
    return chans, [2**i in tuple(u["attention_resolutions"]) for i in range(len(chans))]


def build_unet(u: dict) -> torch.nn.Module:
    """The diffusers UNet with the structure of a CompVis `UNetModel` config (random weights)."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    chans, attn = _levels(u)
    nhc, nh = u.get("num_head_channels", -1), u.get("num_heads", -1)
    common = dict(sample_size=u["image_size"], in_channels=u["in_channels"], out_channels=u["out_channels"],
                  block_out_channels=tuple(chans), layers_per_block=u["num_res_blocks"], norm_num_groups=32)
    if u.get("context_dim"):
        if u.get("transformer_depth", 1) != 1 or u.get("use_scale_shift_norm") or u.get("resblock_updown"):
            raise BenchError("only transformer_depth=1 UNets without scale-shift norm / resblock up-down convert")
        heads = [c // nhc for c in chans] if nhc and nhc > 0 else [nh] * len(chans)
        return UNet2DConditionModel(
            **common, cross_attention_dim=u["context_dim"], attention_head_dim=heads,  # = heads (diffusers naming)
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)))
    updown = bool(u.get("resblock_updown"))
    plain_down, plain_up = ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if updown else ("DownBlock2D",
                                                                                                "UpBlock2D")
    # UNet2DModel takes a head *dim*; a fixed head count is re-applied after loading (zoo.apply_attention_heads).
    head_dim = nhc if nhc and nhc > 0 else chans[0] // nh
    return UNet2DModel(
        **common, attention_head_dim=head_dim, attn_norm_num_groups=32,
        resnet_time_scale_shift="scale_shift" if u.get("use_scale_shift_norm") else "default",
        downsample_type="resnet" if updown else "conv", upsample_type="resnet" if updown else "conv",
        down_block_types=tuple("AttnDownBlock2D" if a else plain_down for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else plain_up for a in reversed(attn)))


def build_autoencoder(f: dict, scale_factor: float = 1.0) -> torch.nn.Module:
    """The diffusers VQModel / AutoencoderKL with the structure of a taming / CompVis first-stage config."""
    from diffusers import AutoencoderKL, VQModel

    n = len(f["ch_mult"])
    common = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                  up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(f["ch"] * m for m in f["ch_mult"]),
                  layers_per_block=f["num_res_blocks"], latent_channels=f["z_channels"], norm_num_groups=32,
                  sample_size=f["resolution"], scaling_factor=scale_factor)
    if f["kind"] == "vq":
        return VQModel(**common, num_vq_embeddings=f["n_embed"], vq_embed_dim=f["embed_dim"])
    if f["embed_dim"] != f["z_channels"]:
        raise BenchError("AutoencoderKL needs embed_dim == z_channels")
    return AutoencoderKL(**common)


# ---- key mapping -------------------------------------------------------------------------------------------------
class _Mapper:
    """Collects target <- source tensor copies; remembers which source keys were consumed."""

    def __init__(self, sd: dict[str, torch.Tensor]):
        self.sd, self.out, self.used = sd, {}, set()

    def get(self, key: str) -> torch.Tensor:
        if key not in self.sd:
            raise BenchError(f"checkpoint has no {key!r}; wrong model name/preset for this checkpoint?")
        self.used.add(key)
        return self.sd[key]

    def has(self, key: str) -> bool:
        return key in self.sd

    def copy(self, dst: str, src: str, squeeze: bool = False) -> None:
        for w in ("weight", "bias"):
            if self.has(f"{src}.{w}"):
                t = self.get(f"{src}.{w}")
                self.out[f"{dst}.{w}"] = t.reshape(t.shape[0], -1) if squeeze and w == "weight" else t

    def resnet(self, dst: str, src: str) -> None:  # openaimodel ResBlock
        for a, b in [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                     ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]:
            self.copy(f"{dst}.{a}", f"{src}.{b}")

    def attention(self, dst: str, src: str, heads: int) -> None:  # openaimodel AttentionBlock, legacy qkv order
        self.copy(f"{dst}.group_norm", f"{src}.norm")
        w, b = self.get(f"{src}.qkv.weight"), self.get(f"{src}.qkv.bias")
        c = w.shape[1]
        # QKVAttentionLegacy reshapes qkv to (heads, 3 * ch): channels are ordered [head][q|k|v][ch].
        w = w.reshape(heads, 3, c // heads, c)
        b = b.reshape(heads, 3, c // heads)
        for i, n in enumerate(("to_q", "to_k", "to_v")):
            self.out[f"{dst}.{n}.weight"] = w[:, i].reshape(c, c)
            self.out[f"{dst}.{n}.bias"] = b[:, i].reshape(c)
        self.copy(f"{dst}.to_out.0", f"{src}.proj_out", squeeze=True)

    def same(self, dst: str, src: str) -> None:  # SpatialTransformer: diffusers Transformer2DModel uses its names
        for k in [k for k in self.sd if k.startswith(src + ".")]:
            self.out[dst + k[len(src):]] = self.get(k)

    def vres(self, dst: str, src: str) -> None:  # taming ResnetBlock
        for a, b in [("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
                     ("conv_shortcut", "nin_shortcut")]:
            self.copy(f"{dst}.{a}", f"{src}.{b}")

    def vattn(self, dst: str, src: str) -> None:  # taming AttnBlock (1x1 convs -> linears)
        for a, b in [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]:
            self.copy(f"{dst}.{a}", f"{src}.{b}", squeeze=a != "group_norm")


def map_unet(sd: dict[str, torch.Tensor], u: dict, prefix: str = "model.diffusion_model.") -> dict[str, torch.Tensor]:
    """CompVis UNetModel state dict -> diffusers UNet2DModel / UNet2DConditionModel state dict."""
    m = _Mapper({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
    chans, attn = _levels(u)
    nrb, L = u["num_res_blocks"], len(chans)
    updown, cond = bool(u.get("resblock_updown")), bool(u.get("context_dim"))
    nhc, nh = u.get("num_head_channels", -1), u.get("num_heads", -1)

    def attention(dst: str, src: str, c: int) -> None:
        if cond:
            m.same(dst, src)
        else:
            m.attention(dst, src, c // nhc if nhc and nhc > 0 else nh)

    m.copy("time_embedding.linear_1", "time_embed.0")
    m.copy("time_embedding.linear_2", "time_embed.2")
    m.copy("conv_in", "input_blocks.0.0")
    k = 1
    for i in range(L):
        for j in range(nrb):
            m.resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{k}.0")
            if attn[i]:
                attention(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{k}.1", chans[i])
            k += 1
        if i != L - 1:
            if updown:
                m.resnet(f"down_blocks.{i}.downsamplers.0", f"input_blocks.{k}.0")
            else:
                m.copy(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{k}.0.op")
            k += 1
    m.resnet("mid_block.resnets.0", "middle_block.0")
    attention("mid_block.attentions.0", "middle_block.1", chans[-1])
    m.resnet("mid_block.resnets.1", "middle_block.2")
    k = 0
    for i in range(L):
        lvl = L - 1 - i
        for j in range(nrb + 1):
            m.resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{k}.0")
            sub = 1
            if attn[lvl]:
                attention(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{k}.1", chans[lvl])
                sub = 2
            if j == nrb and i != L - 1:
                if updown:
                    m.resnet(f"up_blocks.{i}.upsamplers.0", f"output_blocks.{k}.{sub}")
                else:
                    m.copy(f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{k}.{sub}.conv")
            k += 1
    m.copy("conv_norm_out", "out.0")
    m.copy("conv_out", "out.2")
    _check_consumed(m, "UNet (model.diffusion_model.*)")
    return m.out


def map_autoencoder(sd: dict[str, torch.Tensor], f: dict, prefix: str = "first_stage_model.") -> dict:
    """taming Encoder/Decoder (+ VQ codebook or KL moments convs) -> diffusers VQModel / AutoencoderKL."""
    m = _Mapper({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and ".loss." not in k
                 and not k.startswith(prefix + "loss.")})
    n, nrb = len(f["ch_mult"]), f["num_res_blocks"]
    for part in ("encoder", "decoder"):
        m.copy(f"{part}.conv_in", f"{part}.conv_in")
        m.vres(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1")
        m.vattn(f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1")
        m.vres(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2")
        m.copy(f"{part}.conv_norm_out", f"{part}.norm_out")
        m.copy(f"{part}.conv_out", f"{part}.conv_out")
    for i in range(n):
        for j in range(nrb):
            m.vres(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}")
        if i != n - 1:
            m.copy(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv")
        lvl = n - 1 - i  # taming builds decoder.up in reverse: up[n-1] runs first
        for j in range(nrb + 1):
            m.vres(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{lvl}.block.{j}")
        if i != n - 1:
            m.copy(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{lvl}.upsample.conv")
    m.copy("quant_conv", "quant_conv")
    m.copy("post_quant_conv", "post_quant_conv")
    if f["kind"] == "vq":
        m.out["quantize.embedding.weight"] = m.get("quantize.embedding.weight")
    _check_consumed(m, "autoencoder (first_stage_model.*)")
    return m.out


def _check_consumed(m: _Mapper, what: str) -> None:
    left = sorted(set(m.sd) - m.used)
    if left:
        raise BenchError(f"{what}: {len(left)} checkpoint tensors were not mapped (e.g. {left[0]!r}); "
                         "the checkpoint does not match the preset architecture")


def _ema_state_dict(sd: dict[str, torch.Tensor], prefix: str = "model.diffusion_model.") -> dict[str, torch.Tensor]:
    """Swap in the EMA UNet weights (LitEma stores `model_ema.<param name without dots>`), as CompVis' sampling
    under `ema_scope` does; unchanged if the checkpoint has no EMA copy."""
    out, swapped = dict(sd), 0
    for k in sd:
        if k.startswith(prefix):
            ema = "model_ema." + k[len("model."):].replace(".", "")
            if ema in sd:
                out[k], swapped = sd[ema], swapped + 1
    return out if swapped else sd


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a CompVis / Lightning checkpoint, loaded with weights_only=True."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"checkpoint {p} not found; download it first (see `python -m bench.run --list-models`)")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BenchError(f"{p} cannot be read with torch.load(weights_only=True) ({type(e).__name__}); it holds "
                         "pickled objects besides tensors: re-save only its state_dict from a trusted environment "
                         "(torch.save({'state_dict': ckpt['state_dict']}, 'model.ckpt'))") from None
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise BenchError(f"{p} is not a state dict of tensors (expected a CompVis .ckpt with 'state_dict')")
    return sd


def _load_strict(module: torch.nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise BenchError(f"{what}: converted weights do not fit the preset architecture "
                         f"({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e})") from None


def convert(ckpt: str | Path, out_dir: str | Path, preset: str | dict, use_ema: bool = True,
            name: str | None = None) -> Path:
    """Convert `ckpt` with the architecture `preset` (a PRESETS name or dict) into `out_dir`; returns out_dir."""
    from safetensors.torch import save_file

    if isinstance(preset, str):
        if preset not in PRESETS:
            raise UsageError(f"no conversion preset {preset!r}; expected one of {', '.join(PRESETS)}")
        name, preset = name or preset, PRESETS[preset]
    sd = read_checkpoint(ckpt)
    if use_ema:
        sd = _ema_state_dict(sd)
    out = Path(out_dir)
    unet = build_unet(preset["unet"])
    _load_strict(unet, map_unet(sd, preset["unet"]), "UNet")
    vae = build_autoencoder(preset["first_stage"], preset.get("scale_factor", 1.0))
    _load_strict(vae, map_autoencoder(sd, preset["first_stage"]), "autoencoder")
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out / "unet")
    vae.save_pretrained(out / ("vqvae" if preset["first_stage"]["kind"] == "vq" else "vae"))
    u = preset["unet"]
    meta: dict[str, Any] = {"name": name or out.name, "schedule": list(preset["schedule"]),
                            "scale_factor": preset.get("scale_factor", 1.0), "source": str(ckpt), "ema": use_ema}
    if not u.get("context_dim") and not (u.get("num_head_channels", -1) or -1) > 0:
        meta["attention_heads"] = u["num_heads"]
    if "class_embedder" in preset:
        emb = sd.get("cond_stage_model.embedding.weight")
        if emb is None:
            raise BenchError("checkpoint has no cond_stage_model.embedding.weight (the ClassEmbedder)")
        (out / "class_embedder").mkdir(exist_ok=True)
        save_file({"weight": emb.contiguous()}, str(out / "class_embedder" / "embedding.safetensors"))
        (out / "class_embedder" / "config.json").write_text(json.dumps(
            {"num_classes": emb.shape[0], "embed_dim": emb.shape[1], "unconditional_class": emb.shape[0] - 1}))
    (out / "bench.json").write_text(json.dumps(meta, indent=2))
    return out
