"""Save / load a quantized UNet: integer weights (two int4 per byte, or int8) with per-channel scales and zero
points in safetensors, plus a JSON config (class, diffusers config, bit policy, quant state, method metadata).
No pickle. Loading rebuilds the same diffusers class from its config, wraps it with the saved policy and sets the
weights to the dequantized integers, so the loaded model reproduces the saved one's quantized outputs exactly.
`packed_size_mb` gives the model size EDA-DM's compression figure reports (FP32 vs W8 vs W4).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import torch

from eda.errors import BenchError
from eda.policy import BitPolicy
from eda.wrap import act_quantizers, get_quant_state, quant_layers, quantize_unet, set_quant_state

FORMAT = "eda-bench-quantized"
VERSION = 1
CONFIG_FILE, WEIGHTS_FILE = "quant_config.json", "quantized.safetensors"


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    flat = codes.flatten().to(torch.int32)
    if bits <= 4:  # two codes per byte, low nibble first
        if flat.numel() % 2:
            flat = torch.cat([flat, flat.new_zeros(1)])
        return (flat[0::2] | (flat[1::2] << 4)).to(torch.uint8)
    if bits <= 8:
        return flat.to(torch.uint8)
    return (flat - 32768).to(torch.int16)


def _unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    if bits <= 4:
        p = packed.to(torch.int32)
        return torch.stack([p & 0xF, p >> 4], dim=1).flatten()[:numel]
    if bits <= 8:
        return packed.to(torch.int32)[:numel]
    return packed.to(torch.int32)[:numel] + 32768


def _is_quantizer_key(key: str) -> bool:
    return "_quantizer" in key or ".processor." in key


def _weight_keys(qmodel) -> set[str]:
    return {f"{n}.module.weight" for n in quant_layers(qmodel)}


def save_quantized(qmodel: torch.nn.Module, out_dir: str | Path, meta: dict | None = None) -> Path:
    """Write quant_config.json + quantized.safetensors into out_dir (created)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    policy: BitPolicy = qmodel.quant_policy
    tensors: dict[str, torch.Tensor] = {}
    layers = {}
    for name, layer in quant_layers(qmodel).items():
        w = layer.module.weight.detach().cpu()
        parts = []
        for i, (qname, sl) in enumerate(layer.weight_parts()):
            q = getattr(layer, qname).cpu()
            codes = q.quantize_int(w[:, sl]) if q.initialized else None
            if codes is None:
                raise BenchError(f"layer {name} has no weight range yet; call eda.wrap.init_ranges before saving")
            tensors[f"w.{name}.{i}.codes"] = _pack(codes, q.n_bits)
            tensors[f"w.{name}.{i}.delta"] = q.delta.detach().float().reshape(-1).contiguous()
            tensors[f"w.{name}.{i}.zero_point"] = q.zero_point.detach().float().reshape(-1).contiguous()
            parts.append({"bits": q.n_bits, "shape": list(w[:, sl].shape),
                          "slice": [sl.start or 0, w.shape[1] if sl.stop is None else sl.stop]})
        layers[name] = {"split": layer.split, "act_allowed": layer.act_allowed, "parts": parts}
    acts = {}
    for name, q in act_quantizers(qmodel).items():
        acts[name] = {"bits": q.n_bits, "initialized": q.initialized, "enabled": q.enabled}
        tensors[f"a.{name}.delta"] = q.delta.detach().float().reshape(-1).contiguous().cpu()
        tensors[f"a.{name}.zero_point"] = q.zero_point.detach().float().reshape(-1).contiguous().cpu()
    skip = _weight_keys(qmodel)
    for key, v in qmodel.state_dict().items():
        if key not in skip and not _is_quantizer_key(key):
            tensors[f"fp.{key}"] = v.detach().cpu().contiguous()
    config = {
        "format": FORMAT, "version": VERSION, "class": type(qmodel).__name__,
        "diffusers_config": json.loads(qmodel.to_json_string()), "policy": asdict(policy),
        "quant_state": list(get_quant_state(qmodel)), "layers": layers, "act_quantizers": acts, "meta": meta or {},
    }
    save_file(tensors, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1, default=str))
    return out


def _unet_class(name: str):
    from diffusers import UNet2DConditionModel, UNet2DModel

    cls = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}.get(name)
    if cls is None:
        raise BenchError(f"quantized checkpoint holds a {name}; expected UNet2DModel or UNet2DConditionModel")
    return cls


def load_quantized(directory: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the wrapped UNet saved by `save_quantized`; returns (qmodel, meta)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(directory)
    cfg_file, w_file = d / CONFIG_FILE, d / WEIGHTS_FILE
    if not cfg_file.is_file() or not w_file.is_file():
        raise BenchError(f"{d} is not a quantized checkpoint (needs {CONFIG_FILE} and {WEIGHTS_FILE}); "
                         "write one with eda.checkpoint.save_quantized")
    try:
        cfg = json.loads(cfg_file.read_text())
        tensors = load_file(str(w_file))
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise BenchError(f"corrupt quantized checkpoint in {d} ({type(e).__name__}); re-save it") from None
    if cfg.get("format") != FORMAT:
        raise BenchError(f"{cfg_file} is not an {FORMAT} config (format={cfg.get('format')!r}); re-save it")

    def mismatch(what: str):
        return BenchError(f"{cfg_file.name} does not match {w_file.name} in {d}: {what}; re-save both with "
                          "save_quantized")

    cls = _unet_class(cfg["class"])
    dcfg = {k: v for k, v in cfg["diffusers_config"].items() if not k.startswith("_")}
    try:
        unet = cls.from_config(dcfg)
    except Exception as e:  # noqa: BLE001 - diffusers raises many kinds for a bad config
        raise BenchError(f"cannot build {cfg['class']} from {cfg_file}: {type(e).__name__}: {e}"[:300]) from None
    qmodel = quantize_unet(unet.eval(), BitPolicy(**cfg["policy"]), inplace=True)
    layers = quant_layers(qmodel)
    if set(layers) != set(cfg["layers"]):
        extra = sorted(set(layers) ^ set(cfg["layers"]))[:3]
        raise mismatch(f"the quantized layers differ from the model built from the config (e.g. {extra})")
    fp_state = {k[3:]: v for k, v in tensors.items() if k.startswith("fp.")}
    expected = {k for k in qmodel.state_dict() if k not in _weight_keys(qmodel) and not _is_quantizer_key(k)}
    if set(fp_state) != expected:
        raise mismatch(f"full-precision tensors differ (e.g. {sorted(set(fp_state) ^ expected)[:3]})")
    try:
        qmodel.load_state_dict(fp_state, strict=False)
    except RuntimeError as e:
        raise mismatch(f"tensor shapes differ ({str(e).splitlines()[-1].strip()[:150]})") from None
    with torch.no_grad():
        for name, info in cfg["layers"].items():
            layer = layers[name]
            if layer.split != info["split"]:
                raise mismatch(f"layer {name} split {layer.split} vs {info['split']} (split_shortcut flags differ)")
            w = layer.module.weight
            for i, ((qname, _), part) in enumerate(zip(layer.weight_parts(), info["parts"])):
                lo, hi = part["slice"]
                shape = part["shape"]
                if list(w[:, lo:hi].shape) != shape:
                    raise mismatch(f"layer {name} weight shape {list(w[:, lo:hi].shape)} vs saved {shape}")
                try:
                    packed = tensors[f"w.{name}.{i}.codes"]
                    delta, zp = tensors[f"w.{name}.{i}.delta"], tensors[f"w.{name}.{i}.zero_point"]
                except KeyError as e:
                    raise mismatch(f"missing tensor {e.args[0]}") from None
                numel = math.prod(shape)
                # the codes' length and dtype follow from the bit width (_pack); a config edited to other bits
                # would otherwise unpack silently into wrong weights
                want = (math.ceil(numel / 2), torch.uint8) if part["bits"] <= 4 else \
                    (numel, torch.uint8 if part["bits"] <= 8 else torch.int16)
                if (packed.numel(), packed.dtype) != want:
                    raise mismatch(f"layer {name} is {part['bits']}-bit in the config but its stored codes are "
                                   f"{packed.numel()} x {packed.dtype}")
                codes = _unpack(packed, part["bits"], numel).float().reshape(shape)
                q = getattr(layer, qname)
                q.set_bits(part["bits"])
                view = (-1,) + (1,) * (len(shape) - 1)
                q.delta.data = delta.reshape(view).clone()
                q.zero_point = zp.reshape(view).clone()
                q.initialized = True
                w[:, lo:hi] = (codes - q.zero_point) * q.delta
            layer.act_allowed = info["act_allowed"]
        aqs = act_quantizers(qmodel)
        if set(aqs) != set(cfg["act_quantizers"]):
            raise mismatch("the activation quantizers differ (quantize_attention or split flags differ)")
        for name, info in cfg["act_quantizers"].items():
            q = aqs[name]
            q.set_bits(info["bits"])
            try:
                q.delta.data = tensors[f"a.{name}.delta"].reshape(()).clone()
                q.zero_point = tensors[f"a.{name}.zero_point"].reshape(()).clone()
            except KeyError as e:
                raise mismatch(f"missing tensor {e.args[0]}") from None
            q.initialized, q.enabled = info["initialized"], info["enabled"]
    set_quant_state(qmodel, *cfg["quant_state"])
    return qmodel.to(device), cfg["meta"]


def packed_size_mb(qmodel: torch.nn.Module) -> dict[str, float]:
    """Model size in MB: fp32 (every model tensor at 4 bytes) vs packed (quantized weights at their bit width,
    int4 packed two per byte, plus FP32 scales/zero points and the FP tensors that stay FP: biases, norms)."""
    skip = _weight_keys(qmodel)
    fp_other = sum(v.numel() for k, v in qmodel.state_dict().items() if k not in skip and not _is_quantizer_key(k))
    fp32 = packed = nominal = 4.0 * fp_other
    for layer in quant_layers(qmodel).values():
        w = layer.module.weight
        fp32 += 4.0 * w.numel()
        for qname, sl in layer.weight_parts():
            q = getattr(layer, qname)
            n = w[:, sl].numel()
            stored_bits = 4 if q.n_bits <= 4 else (8 if q.n_bits <= 8 else 16)
            packed += math.ceil(n * stored_bits / 8) + 8.0 * w.shape[0]  # codes + delta + zero point per channel
            nominal += n * q.n_bits / 8
    mb = 1024.0**2
    return {"fp32": fp32 / mb, "packed": packed / mb, "nominal": nominal / mb}
