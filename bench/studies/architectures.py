"""Measure the papers' real architectures with random weights (no download) and write one page per model.

    python -m bench.studies.architectures [--models sd-v1-4 ...] [--threads 2] [--warmup] [--pages-only]

Per model: parameter counts (UNet, autoencoder, conditioning encoder), the time of one sampling step (one eps_fn
call for one sample: a batch of 2 for classifier-free guidance) in FP and with W8A8 fake quantization
(eda.wrap.quantize_unet), and a reconstruction-cost estimate per unit. eda.recon is not used: one proxy iteration
(an FP forward of the unit, two fake-quant forwards, one backward; EDA-DM's FBR runs 3 forwards per iteration,
EDA-DM qdiff/block_recon.py) is timed at batch 1 on the unit's real input for a few units of each kind, and extrapolated to the
official budget as iters x batch x t_iter (linear in batch, an approximation). Step times run without autograd, as
sampling does. Timings are single runs (no warm-up unless --warmup) on a shared machine, reported as CPU and wall
seconds; treat them as orders of magnitude.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from bench.studies.perf_figures import cifar_unet  # the DDPM CIFAR-10 UNet as diffusers configures it

OUT = Path(__file__).resolve().parents[2] / "results" / "architectures"  # one page + .json per model, README.md


def build(name: str):
    """(unet, {part: module} of the FP parts around it, conditioning kwargs for one sample, cfg)."""
    from bench.models.compvis import PRESETS, build_autoencoder, build_unet
    from bench.models.zoo import apply_attention_heads

    if name == "cifar10-ddim":
        return cifar_unet(), {}, {}, False
    if name in PRESETS:
        p = PRESETS[name]
        unet = build_unet(p["unet"])
        if p["unet"].get("num_heads", -1) > 0 and not p["unet"].get("context_dim"):
            apply_attention_heads(unet, p["unet"]["num_heads"])
        parts = {"autoencoder": build_autoencoder(p["first_stage"], p["scale_factor"])}
        if "class_embedder" in p:
            ce = p["class_embedder"]
            parts["class embedder"] = torch.nn.Embedding(ce["n_classes"], ce["embed_dim"])
            return unet, parts, {"encoder_hidden_states": torch.randn(1, 1, ce["embed_dim"])}, True
        return unet, parts, {}, False
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768)  # SD v1
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77))
    return unet, {"autoencoder": vae, "text encoder (CLIP ViT-L/14)": text}, {
        "encoder_hidden_states": torch.randn(1, 77, 768)}, True


def nparams(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _step_inputs(unet, cond: dict):
    """One sample (batch 1); a classifier-free-guidance step is two such UNet calls ([uncond; cond])."""
    c = unet.config
    x = torch.randn(1, c.in_channels, c.sample_size, c.sample_size)
    t = torch.full((x.shape[0],), 500, dtype=torch.long)
    kw = {k: v.expand(x.shape[0], *v.shape[1:]).contiguous() for k, v in cond.items()}
    return x, t, kw


class Timer:
    """Wall and CPU (process, summed over threads) seconds: on a shared, oversubscribed machine the wall time
    mostly measures the other jobs, the CPU time what this computation costs."""

    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


@torch.no_grad()  # as sampling runs: without autograd the fake-quant fast path (eda.quantizer) applies
def time_forward(unet, x, t, kw, warmup: bool) -> dict[str, float]:
    if warmup:  # also fills eda.wrap's fake-quantized weight cache, as the first sampling step does
        unet(x, t, **kw)
    with Timer() as tm:
        unet(x, t, **kw)
    return {"wall": tm.wall, "cpu": tm.cpu}


def time_explicit_attention(unet, x, t, kw, warmup: bool) -> dict[str, float]:
    """The FP step with every attention computed as softmax(QK^T) then x V, as eda.wrap.QuantAttnProcessor must to
    quantize the softmax output, instead of diffusers' fused scaled-dot-product attention: separates the cost of
    materialising the attention maps from the cost of fake quantization."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    saved = {m: m.processor for m in unet.modules() if isinstance(m, Attention)}
    try:
        for m in saved:
            m.set_processor(AttnProcessor())
        return time_forward(unet, x, t, kw, warmup)
    finally:
        for m, proc in saved.items():
            m.set_processor(proc)


def _out(o):
    o = o.sample if hasattr(o, "sample") else o
    return o[0] if isinstance(o, tuple) else o


def proxy_iteration(q_unit, fp_unit, args, kwargs) -> float:
    """CPU seconds of one reconstruction-like iteration at batch 1: FP forward (target), two fake-quant forwards,
    one backward."""
    for p in q_unit.parameters():
        p.requires_grad_(True)
    with Timer() as tm:
        with torch.no_grad():
            target = _out(fp_unit(*args, **kwargs))
        out = _out(q_unit(*args, **kwargs))
        out2 = _out(q_unit(*args, **kwargs))
        loss = torch.nn.functional.mse_loss(out, target) + 0.8 * torch.nn.functional.mse_loss(out2, target)
        loss.backward()
    for p in q_unit.parameters():
        p.grad = None
    return tm.cpu


def measure(name: str, warmup: bool) -> dict:
    from eda.policy import BitPolicy
    from eda.units import reconstruction_units
    from eda.wrap import quantize_unet, set_quant_state

    from bench.models.zoo import ZOO

    entry = ZOO[name]
    t0 = time.perf_counter()
    unet, parts, cond, cfg = build(name)
    unet.eval()
    res = {"name": name, "unet_class": type(unet).__name__, "params": {"unet": nparams(unet)},
           "build_seconds": 0.0, "warmup": warmup}
    res["params"].update({k: nparams(v) for k, v in parts.items()})
    del parts
    res["build_seconds"] = time.perf_counter() - t0
    x, t, kw = _step_inputs(unet, cond)
    res["unet_batch_per_step"] = 2 if cfg else 1
    # Fake-quant W8A8 with min-max ranges: the timing does not depend on the range values.
    policy = BitPolicy.from_bits("W8A8", w_init="minmax", a_init="minmax")
    q = quantize_unet(unet, policy)
    captured: dict[str, tuple] = {}
    units = reconstruction_units(q, example=(x, t, kw))
    by_kind: dict[str, list] = {}
    for u in units:
        by_kind.setdefault(u.kind, []).append(u)
    picks = {k: [v[0], v[-1]] if len(v) > 1 else v for k, v in by_kind.items()}  # first and last in forward order
    pick_names = {u.name for us in picks.values() for u in us}
    fp_mods = dict(unet.named_modules())
    handles = []
    for n in pick_names:  # capture the units' real inputs during the timed FP call (same module names)
        def hook(mod, args, kwargs, n=n):
            captured.setdefault(n, (tuple(a.detach() if torch.is_tensor(a) else a for a in args),
                                    {k: (v.detach() if torch.is_tensor(v) else v) for k, v in kwargs.items()}))
        handles.append(fp_mods[n].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        res["fp_step_s"] = time_forward(unet, x, t, kw, warmup)
    finally:
        for h in handles:
            h.remove()
    res["fp_explicit_attn_step_s"] = time_explicit_attention(unet, x, t, kw, warmup)
    from eda.trajectories import CalibSet
    from eda.wrap import init_ranges

    # Activation ranges need one calibration pass before fake-quant activations run: a min-max pass on x.
    init_ranges(q, CalibSet(x, t, kw or None), batch_size=1)
    set_quant_state(q, True, True)
    res["wq_aq_step_s"] = time_forward(q, x, t, kw, warmup)
    res["units"] = {k: len(v) for k, v in by_kind.items()}
    res["unit_iter_s"] = {}
    for kind, us in picks.items():
        times = []
        for u in us:
            if u.name not in captured:
                continue
            args, kwargs = captured[u.name]
            times.append(proxy_iteration(u.module, fp_mods[u.name], args, kwargs))
        res["unit_iter_s"][kind] = sum(times) / len(times) if times else float("nan")
    d = entry.defaults["eda-dm"]
    res["official"] = {"iters": d["iters"], "batch_size": d["batch_size"], "steps": entry.sampler.steps,
                       "sampler": entry.sampler.describe(), "n_eval": entry.n_eval}
    per_iter_total = sum(res["units"][k] * res["unit_iter_s"].get(k, 0.0) for k in res["units"])
    # CFG models reconstruct on [uncond; cond] pairs: twice the batch (EDA-DM qdiff_control/data_utils.py).
    res["recon_estimate_s"] = per_iter_total * d["iters"] * d["batch_size"] * res["unet_batch_per_step"]
    res["total_seconds"] = time.perf_counter() - t0
    res["loadavg"], res["cpus"] = os.getloadavg()[0], os.cpu_count()
    del q, unet
    return res


def _fmt_s(s: float) -> str:
    if s != s:  # NaN
        return "n/a"
    for unit, div in (("h", 3600), ("min", 60)):
        if s >= div:
            return f"{s / div:.1f} {unit}"
    return f"{s:.3g} s"


def _load_note(r: dict) -> str:
    if "loadavg" not in r:  # pages measured before the load was recorded
        return "The wall column was taken with other jobs competing for the cores."
    return (f"The 1-minute load average when this model was measured was {r['loadavg']:.2f} on {r['cpus']} cores "
            "(above the core count, other jobs were competing for them).")


def page(r: dict, env: str) -> str:
    from bench.models.zoo import ZOO

    e = ZOO[r["name"]]
    src = e.hub_id or f"CompVis checkpoint {e.ckpt_url} converted with `python -m bench.convert`"
    o = r["official"]
    lines = [
        f"# {r['name']}", "",
        f"Random weights, full-size configuration ({r['unet_class']}); weights for real runs: {src}.",
        f"Sampler: {o['sampler']}, guidance scale {e.guidance_scale:g}; {o['n_eval']} images per evaluation.", "",
        "## Parameters", "", "| part | parameters | fp32 MB |", "|---|---|---|",
        *[f"| {k} | {v / 1e6:.1f}M | {v * 4 / 2**20:.1f} |" for k, v in r["params"].items()], "",
        "Only the UNet is quantized; the other parts stay FP.", "",
        "## Time per sampling step (CPU)", "",
        "Measured: one UNet call on one sample (batch 1)."
        + (" A classifier-free-guidance step is two such calls ([uncond; cond]); the last column counts both."
           if r["unet_batch_per_step"] == 2 else ""), "",
        "| model | CPU s / UNet call | wall s / UNet call | x FP (CPU) | CPU time of the whole sampler (1 sample) |",
        "|---|---|---|---|---|",
        *[f"| {lbl} | {r[k]['cpu']:.3f} | {r[k]['wall']:.3f} | {r[k]['cpu'] / r['fp_step_s']['cpu']:.2f} | "
          f"{_fmt_s(r[k]['cpu'] * o['steps'] * r['unet_batch_per_step'])} |"
          for lbl, k in (("FP32", "fp_step_s"), ("FP32, explicit attention", "fp_explicit_attn_step_s"),
                         ("W8A8 fake-quant", "wq_aq_step_s")) if k in r], "",
        "*FP32, explicit attention* computes softmax(QK^T) x V as separate operations, as the quantized attention "
        "must in order to quantize the softmax output, instead of the fused scaled-dot-product kernel FP uses: the "
        "gap between it and FP32 is the cost of materialising the attention maps, not of fake quantization.", "",
        "CPU s = process time summed over the torch threads; an idle machine would take roughly CPU s / threads "
        "to CPU s of wall time. " + _load_note(r), "",
        "Fake quantization simulates integers in float32, so it is slower than FP on any device; the papers' "
        "speed-ups need integer kernels.", "",
        "## Reconstruction cost per unit (CPU, proxy)", "",
        "| unit kind | units | CPU s / iteration at batch 1 (mean of the first and last unit) |", "|---|---|---|",
        *[f"| {k} | {n} | {r['unit_iter_s'].get(k, float('nan')):.4f} |" for k, n in r["units"].items()], "",
        f"Extrapolated to the official budget ({o['iters']} iterations x batch {o['batch_size']} per unit"
        f"{' x 2 for the [uncond; cond] pairs' if r['unet_batch_per_step'] == 2 else ''}, linear in batch): about {_fmt_s(r['recon_estimate_s'])} of CPU time for one reconstruction pass over all "
        f"{sum(r['units'].values())} units.", "",
        "## How this was measured", "",
        f"`python -m bench.studies.architectures` on {env}; no GPU was available in this "
        "session, so there are no GPU numbers. A proxy iteration = an FP forward of the unit (the target), two "
        "W8A8 fake-quant forwards and one backward, on the unit's real input captured from a UNet call at t=500. "
        "The step times run without autograd, as sampling does (so the fake-quant fast path applies)"
        + (", after one untimed warm-up call; " if r.get("warmup") else "; ")
        + "the proxy iterations are single runs without warm-up. "
        f"Measured on a shared machine (this model: "
        f"{r['total_seconds']:.0f} s wall in all): orders of magnitude, not benchmarks.", "",
    ]
    return "\n".join(lines)


def index() -> str:
    """README.md: one summary row per measured model."""
    rows = []
    for f in sorted(OUT.glob("*.json")):
        r = json.loads(f.read_text())
        p = r["params"]
        fp = r["fp_step_s"]["cpu"]
        explicit = r.get("fp_explicit_attn_step_s", {}).get("cpu", float("nan"))
        rows.append(f"| [{r['name']}]({r['name']}.md) | {p['unet'] / 1e6:.1f}M | "
                    f"{sum(v for k, v in p.items() if k != 'unet') / 1e6:.1f}M | {fp:.2f} | "
                    f"{r['wq_aq_step_s']['cpu']:.2f} ({r['wq_aq_step_s']['cpu'] / fp:.2f}x) | {explicit / fp:.2f}x | "
                    f"{sum(r['units'].values())} | {_fmt_s(r['recon_estimate_s'])} |")
    return "\n".join([
        "# The papers' architectures on CPU (random weights)", "",
        "Produced by `python -m bench.studies.architectures` (see bench/studies/architectures.py); no GPU was "
        "available, so CPU only.",
        "Times are CPU seconds (process time over 2 torch threads) for one UNet call on one sample, measured on a "
        "shared 2-core machine (the load average at measurement time is on each page): orders of magnitude.", "",
        "| model | UNet params | FP parts | FP s / call | W8A8 fake-quant s / call (x FP) | FP with explicit attention "
        "(x FP) | units | reconstruction estimate (official budget) |", "|---|---|---|---|---|---|---|---|", *rows, "",
        "*FP with explicit attention*: the FP UNet with softmax(QK^T) x V computed as separate operations, as the "
        "quantized attention must to quantize the softmax output; the rest of the fake-quant overhead is the "
        "quantizers themselves.", ""])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.studies.architectures", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=["cifar10-ddim", "lsun-bedroom-ldm4", "lsun-church-ldm8",
                                                     "imagenet-ldm4", "sd-v1-4"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", action="store_true", help="run each step once before timing it")
    ap.add_argument("--pages-only", action="store_true", help="re-render the .md pages from the saved .json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    env = f"{platform.processor() or platform.machine()} CPU, {args.threads} torch threads, torch {torch.__version__}"
    for name in args.models:
        if args.pages_only:
            if (OUT / f"{name}.json").is_file():
                (OUT / f"{name}.md").write_text(page(json.loads((OUT / f"{name}.json").read_text()), env))
            continue
        r = measure(name, warmup=args.warmup)
        (OUT / f"{name}.json").write_text(json.dumps(r, indent=1))
        (OUT / f"{name}.md").write_text(page(r, env))
        print(f"{name}: {r['params']['unet'] / 1e6:.1f}M params, FP {r['fp_step_s']['cpu']:.2f} CPU s/step, "
              f"W8A8 {r['wq_aq_step_s']['cpu']:.2f} CPU s/step, total {r['total_seconds']:.0f}s wall", flush=True)
    (OUT / "README.md").write_text(index())


if __name__ == "__main__":
    main()
