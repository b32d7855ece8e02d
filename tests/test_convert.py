"""bench.convert: tiny checkpoints in the original CompVis key layout convert to diffusers models that compute the
same function. The reference modules below are written from the CompVis `openaimodel.py` / taming `model.py`
architecture (key names and forward order), independently of the conversion code."""

import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.models.compvis import convert, map_unet, read_checkpoint
from bench.errors import BenchError

torch.set_num_threads(2)


# ---- CompVis openaimodel reference ---------------------------------------------------------------------------------
def timestep_embedding(t, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, ch, emb, out, scale_shift=False, up=False, down=False):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(ch, out, 3, padding=1))
        self.up, self.down, self.scale_shift = up, down, scale_shift
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, 2 * out if scale_shift else out))
        self.out_layers = nn.Sequential(nn.GroupNorm(32, out), nn.SiLU(), nn.Dropout(0), nn.Conv2d(out, out, 3,
                                                                                                   padding=1))
        self.skip_connection = nn.Identity() if out == ch else nn.Conv2d(ch, out, 1)

    def forward(self, x, emb, context=None):
        if self.up or self.down:
            rs = (lambda a: F.interpolate(a, scale_factor=2, mode="nearest")) if self.up else (
                lambda a: F.avg_pool2d(a, 2, 2))
            h = rs(self.in_layers[:-1](x))
            x = rs(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        e = self.emb_layers(emb)[..., None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):  # QKVAttentionLegacy
    def __init__(self, ch, heads):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(32, ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv1d(ch, ch, 1)

    def forward(self, x, emb=None, context=None):
        b, c, hh, ww = x.shape
        x2 = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x2))
        ch = c // self.heads
        q, k, v = qkv.reshape(b * self.heads, 3 * ch, -1).split(ch, dim=1)
        s = 1 / math.sqrt(math.sqrt(ch))
        w = torch.einsum("bct,bcs->bts", q * s, k * s).softmax(-1)
        a = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, -1)
        return (x2 + self.proj_out(a)).reshape(b, c, hh, ww)


class CrossAttention(nn.Module):
    def __init__(self, qd, cd, heads, dh):
        super().__init__()
        inner, self.heads, self.scale = heads * dh, heads, dh**-0.5
        self.to_q, self.to_k, self.to_v = nn.Linear(qd, inner, False), nn.Linear(cd, inner, False), nn.Linear(
            cd, inner, False)
        self.to_out = nn.Sequential(nn.Linear(inner, qd), nn.Dropout(0))

    def forward(self, x, context=None):
        context = x if context is None else context
        h = self.heads

        def split(t):
            return t.reshape(t.shape[0], t.shape[1], h, -1).permute(0, 2, 1, 3).reshape(t.shape[0] * h, t.shape[1],
                                                                                         -1)

        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        a = torch.einsum("bij,bkj->bik", q, k).mul(self.scale).softmax(-1) @ v
        a = a.reshape(x.shape[0], h, x.shape[1], -1).permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], -1)
        return self.to_out(a)


class GEGLU(nn.Module):
    def __init__(self, d, inner):
        super().__init__()
        self.proj = nn.Linear(d, inner * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class BasicTransformerBlock(nn.Module):
    def __init__(self, d, heads, dh, cd):
        super().__init__()
        self.attn1 = CrossAttention(d, d, heads, dh)
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(GEGLU(d, 4 * d), nn.Dropout(0), nn.Linear(4 * d, d))
        self.attn2 = CrossAttention(d, cd, heads, dh)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff.net(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, ch, heads, dh, cd):
        super().__init__()
        self.norm = nn.GroupNorm(32, ch, eps=1e-6)
        self.proj_in = nn.Conv2d(ch, heads * dh, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(heads * dh, heads, dh, cd)])
        self.proj_out = nn.Conv2d(heads * dh, ch, 1)

    def forward(self, x, emb=None, context=None):
        b, _, hh, ww = x.shape
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        for blk in self.transformer_blocks:
            h = blk(h, context)
        return x + self.proj_out(h.transpose(1, 2).reshape(b, -1, hh, ww))


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x, emb=None, context=None):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, emb=None, context=None):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TES(nn.Sequential):
    def forward(self, x, emb, context=None):
        for m in self:
            x = m(x) if isinstance(m, nn.Conv2d) else m(x, emb, context)
        return x


class UNetModel(nn.Module):
    def __init__(self, in_channels, out_channels, model_channels, attention_resolutions, num_res_blocks,
                 channel_mult, num_heads=-1, num_head_channels=-1, use_scale_shift_norm=False,
                 resblock_updown=False, context_dim=None, **_):
        super().__init__()
        mc, ted, ss = model_channels, 4 * model_channels, use_scale_shift_norm
        self.mc = mc

        def attn(ch):
            heads = ch // num_head_channels if num_head_channels > 0 else num_heads
            if context_dim:
                return SpatialTransformer(ch, heads, ch // heads, context_dim)
            return AttentionBlock(ch, heads)

        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
        self.input_blocks = nn.ModuleList([TES(nn.Conv2d(in_channels, mc, 3, padding=1))])
        ch, chans, ds = mc, [mc], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, ted, mult * mc, ss)]
                ch = mult * mc
                if ds in attention_resolutions:
                    layers.append(attn(ch))
                self.input_blocks.append(TES(*layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TES(ResBlock(ch, ted, ch, ss, down=True) if resblock_updown else
                                             Downsample(ch)))
                chans.append(ch)
                ds *= 2
        self.middle_block = TES(ResBlock(ch, ted, ch, ss), attn(ch), ResBlock(ch, ted, ch, ss))
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), ted, mc * mult, ss)]
                ch = mc * mult
                if ds in attention_resolutions:
                    layers.append(attn(ch))
                if level and i == num_res_blocks:
                    layers.append(ResBlock(ch, ted, ch, ss, up=True) if resblock_updown else Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TES(*layers))
        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(mc, out_channels, 3, padding=1))

    def forward(self, x, t, context=None):
        emb = self.time_embed(timestep_embedding(t, self.mc))
        hs, h = [], x
        for m in self.input_blocks:
            h = m(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for m in self.output_blocks:
            h = m(torch.cat([h, hs.pop()], 1), emb, context)
        return self.out(h)


# ---- taming autoencoder reference ---------------------------------------------------------------------------------
def _norm(c):
    return nn.GroupNorm(32, c, eps=1e-6)


class VRes(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class VAttn(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q, k, v = (m(h).reshape(b, c, -1) for m in (self.q, self.k, self.v))
        w = torch.bmm(q.permute(0, 2, 1), k).mul(c**-0.5).softmax(2)
        return x + self.proj_out(torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww))


def _mid(c):
    m = nn.Module()
    m.block_1, m.attn_1, m.block_2 = VRes(c, c), VAttn(c), VRes(c, c)
    return m


class Encoder(nn.Module):
    def __init__(self, ch, ch_mult, nrb, z, double_z):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down, cin = nn.ModuleList(), ch
        for i, m in enumerate(ch_mult):
            d = nn.Module()
            d.block = nn.ModuleList([VRes(cin if j == 0 else ch * m, ch * m) for j in range(nrb)])
            cin = ch * m
            if i != len(ch_mult) - 1:
                d.downsample = nn.Module()
                d.downsample.conv = nn.Conv2d(cin, cin, 3, stride=2)
            self.down.append(d)
        self.mid, self.norm_out = _mid(cin), _norm(cin)
        self.conv_out = nn.Conv2d(cin, 2 * z if double_z else z, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for d in self.down:
            for b in d.block:
                h = b(h)
            if hasattr(d, "downsample"):
                h = d.downsample.conv(F.pad(h, (0, 1, 0, 1)))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch, ch_mult, nrb, z):
        super().__init__()
        cin = ch * ch_mult[-1]
        self.conv_in, self.mid = nn.Conv2d(z, cin, 3, padding=1), _mid(cin)
        self.up = nn.ModuleList()
        for i in reversed(range(len(ch_mult))):
            u = nn.Module()
            u.block = nn.ModuleList([VRes(cin if j == 0 else ch * ch_mult[i], ch * ch_mult[i]) for j in range(nrb + 1)])
            cin = ch * ch_mult[i]
            if i != 0:
                u.upsample = nn.Module()
                u.upsample.conv = nn.Conv2d(cin, cin, 3, padding=1)
            self.up.insert(0, u)
        self.norm_out, self.conv_out = _norm(cin), nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i in reversed(range(len(self.up))):
            for b in self.up[i].block:
                h = b(h)
            if i != 0:
                h = self.up[i].upsample.conv(F.interpolate(h, scale_factor=2, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))


class FirstStage(nn.Module):
    def __init__(self, kind, embed_dim, z_channels, ch, ch_mult, num_res_blocks, n_embed=None, **_):
        super().__init__()
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, z_channels, kind == "kl")
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, z_channels)
        zq = 2 * z_channels if kind == "kl" else z_channels
        self.quant_conv = nn.Conv2d(zq, 2 * embed_dim if kind == "kl" else embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        if kind == "vq":
            self.quantize = nn.Module()
            self.quantize.embedding = nn.Embedding(n_embed, embed_dim)


# ---- tiny presets in the three layouts -----------------------------------------------------------------------------
UNETS = {
    "bedroom": dict(image_size=8, in_channels=3, out_channels=3, model_channels=32, attention_resolutions=(2,),
                    num_res_blocks=1, channel_mult=(1, 2), num_head_channels=16),
    "church": dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=(1, 2),
                   num_res_blocks=1, channel_mult=(1, 2, 2), num_heads=2, use_scale_shift_norm=True,
                   resblock_updown=True),
    "imagenet": dict(image_size=8, in_channels=3, out_channels=3, model_channels=32, attention_resolutions=(2,),
                     num_res_blocks=1, channel_mult=(1, 2), num_heads=1, context_dim=16),
}
VQ = dict(kind="vq", embed_dim=3, n_embed=16, z_channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=16)
KL = dict(kind="kl", embed_dim=4, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=16)


def _randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():  # zero-initialised layers would hide mapping mistakes
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


def _write_ckpt(path, unet, fs, class_emb=None, ema=None, extra=None):
    sd = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    sd.update({f"first_stage_model.{k}": v for k, v in fs.state_dict().items()})
    if class_emb is not None:
        sd["cond_stage_model.embedding.weight"] = class_emb
    if ema is not None:
        sd.update({"model_ema." + f"diffusion_model.{k}".replace(".", ""): v for k, v in ema.state_dict().items()})
    torch.save({"state_dict": sd, "global_step": 1, **(extra or {})}, path)


@pytest.mark.parametrize("kind", ["bedroom", "church", "imagenet"])
def test_converted_unet_and_autoencoder_match_the_compvis_layout(tmp_path, kind):
    u = UNETS[kind]
    fcfg = KL if kind == "church" else VQ
    ref, fs = _randomize(UNetModel(**u).eval(), 0), _randomize(FirstStage(**fcfg).eval(), 1)
    emb = torch.randn(11, 16) if kind == "imagenet" else None
    ckpt = tmp_path / "model.ckpt"
    _write_ckpt(ckpt, ref, fs, emb)
    preset = dict(unet=u, first_stage=fcfg, schedule=("scaled_linear", 0.0015, 0.0195), scale_factor=0.5)
    if emb is not None:
        preset["class_embedder"] = dict(n_classes=11, embed_dim=16)
    out = convert(ckpt, tmp_path / "conv", preset, name=f"tiny-{kind}")

    from bench.models.zoo import ZOO, _base, _read_unet, apply_attention_heads, _meta  # noqa: F401

    unet = _read_unet(out / "unet")
    apply_attention_heads(unet, _meta(out).get("attention_heads"))
    x, t = torch.randn(2, u["in_channels"], 8, 8), torch.tensor([3, 700])
    ctx = torch.randn(2, 1, 16) if kind == "imagenet" else None
    with torch.no_grad():
        want = ref(x, t, ctx)
        got = unet(x, t, ctx).sample if ctx is not None else unet(x, t).sample
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()

    import diffusers

    vae = getattr(diffusers, "VQModel" if fcfg["kind"] == "vq" else "AutoencoderKL").from_pretrained(
        out / ("vqvae" if fcfg["kind"] == "vq" else "vae"))
    img, z = torch.randn(1, 3, 16, 16), torch.randn(1, fcfg["z_channels"], 8, 8)
    with torch.no_grad():
        want_dec = fs.decoder(fs.post_quant_conv(z))
        want_enc = fs.quant_conv(fs.encoder(img))
        if fcfg["kind"] == "vq":
            got_dec = vae.decode(z, force_not_quantize=True).sample
            got_enc = vae.encode(img).latents
        else:
            got_dec = vae.decode(z).sample
            got_enc = vae.encode(img).latent_dist.mean
            want_enc = want_enc[:, : fcfg["z_channels"]]
    assert torch.allclose(got_dec, want_dec, atol=1e-4, rtol=1e-4)
    assert torch.allclose(got_enc, want_enc, atol=1e-4, rtol=1e-4)
    if emb is not None:
        from safetensors.torch import load_file

        assert torch.equal(load_file(str(out / "class_embedder" / "embedding.safetensors"))["weight"], emb)


def test_ema_weights_are_used_when_present(tmp_path):
    u = UNETS["bedroom"]
    raw, ema, fs = _randomize(UNetModel(**u), 0), _randomize(UNetModel(**u), 5), _randomize(FirstStage(**VQ), 1)
    ckpt = tmp_path / "model.ckpt"
    _write_ckpt(ckpt, raw, fs, ema=ema)
    sd = read_checkpoint(ckpt)
    mapped = map_unet(dict(sd), u)  # raw
    from bench.models.compvis import _ema_state_dict

    mapped_ema = map_unet(_ema_state_dict(sd), u)
    assert torch.equal(mapped["conv_in.weight"], raw.input_blocks[0][0].weight)
    assert torch.equal(mapped_ema["conv_in.weight"], ema.input_blocks[0][0].weight)


def test_checkpoint_with_pickled_objects_is_refused(tmp_path):
    u = UNETS["bedroom"]
    ckpt = tmp_path / "model.ckpt"
    _write_ckpt(ckpt, UNetModel(**u), FirstStage(**VQ), extra={"hparams": argparse.Namespace(lr=1)})
    with pytest.raises(BenchError, match="weights_only"):
        read_checkpoint(ckpt)


def test_wrong_architecture_is_one_line_error(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    _write_ckpt(ckpt, UNetModel(**UNETS["bedroom"]), FirstStage(**VQ))
    preset = dict(unet=UNETS["church"], first_stage=VQ, schedule=("scaled_linear", 0.0015, 0.0155))
    with pytest.raises(BenchError):
        convert(ckpt, tmp_path / "out", preset)


def test_cli_rejects_missing_file(tmp_path, capsys):
    from bench.convert import main

    with pytest.raises(SystemExit) as e:
        main(["lsun-bedroom-ldm4", str(tmp_path / "nope.ckpt"), str(tmp_path / "out")])
    assert e.value.code == 2
    assert "not found" in capsys.readouterr().err
