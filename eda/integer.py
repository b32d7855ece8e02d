"""Integer inference: a fake-quantized UNet (eda.wrap) rebuilt from the method's own integer weight codes and scales,
run on oneDNN's int8 (u8s8) convolution and linear kernels on x86 CPUs.

Notation (eda.quantizer): codes c = clamp(round(x / delta) + z, 0, 2^b - 1), x_hat = (c - z) delta.
- Activations (per tensor, b <= 8): uint8 codes computed with the fake-quantizer's own formula (x / delta, rounded
  half to even), so the integer model sees bit-identical input codes. (quantized_decomposed.quantize_per_tensor and
  ONNX runtimes round x * (1 / delta) instead, which moves about 1e-5 of the elements by one step.)
- Weights (per output channel, b <= 8): int8 t = c - 2^(b-1), zero point z' = z - 2^(b-1) (0 for symmetric weights,
  so 4-bit codes run exactly on int8 kernels). oneDNN takes zero-point-free int8 weights only, so a layer with some
  z' != 0 (Q-Diffusion's asymmetric weights, or a channel whose weights are all >= 0) is decomposed exactly:
  conv(x_hat, (t - z') s) = conv(x_hat, t s) - (z' s)[c] * conv(x_hat, ones) (a one-channel box sum, in FP).
- Shortcut-split layers: conv(cat[a, b], W) = conv(a, W[:, :k]) + conv(b, W[:, k:]), each group with its own
  activation and weight quantizers (Q-Diffusion --split), bias added once.
- CPUs whose oneDNN u8s8 kernels saturate (x86 without VNNI or AMX: AVX2, and AVX-512 before Cascade Lake) form
  each pair sum c1 t1 + c2 t2 in int16 (vpmaddubsw), which 255 * 127 * 2 = 64770 overflows; oneDNN documents this
  ("Nuances of int8 Computations", developer guide). `kernels_saturate` probes it once per process; on such a CPU a
  layer whose codes could overflow runs on t = hi + lo with hi = floor(t / 2), lo = t - hi, both in [-64, 64]
  (255 * 64 * 2 = 32640 fits), stacked as 2C output channels and summed: exact, for twice the kernel's work.
- The network-output conv's input stays FP (act_allowed False): an FP conv of the dequantized weights.
- Attention: q, k, v and the softmax output are quantized exactly as QuantAttnProcessor does (its own __call__); the
  two bmm's multiply the quantized values in FP32, because no x86 CPU kernel for an int8 bmm of two dynamic operands
  was faster (results/perf.md, figure int8).
The weight codes are the method's own (`quantize_int`, as eda.checkpoint saves them, AdaRound's hardened rounding
included), never re-quantized from FP weights.

Kernel modes of an IntLayer (`set_mode`): "onednn" calls torch.ops.onednn.qconv_pointwise / qlinear_pointwise with
weights prepacked once (backend x86: no compilation); "reference" runs the same arithmetic as dequantize -> FP op in
the quantized_decomposed representation that PT2E produces, which `compile_for(..., "x86-inductor")` lowers to the
same oneDNN kernels through torch.compile and torchao's x86 passes (minutes of compilation per input shape).
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import torch.ao.quantization.fx._decomposed  # noqa: F401  registers torch.ops.quantized_decomposed
from eda.errors import BenchError
from eda.wrap import QuantAttnProcessor, QuantLayer, attn_processors, get_quant_state, quant_layers

QD = torch.ops.quantized_decomposed
FORMAT, VERSION = "eda-bench-integer", 1
CONFIG_FILE, WEIGHTS_FILE = "integer_config.json", "integer.safetensors"
# `python -m bench.perf --only int8` measures these and the alternatives (README "Integer inference")
BACKENDS = {"x86": "oneDNN u8s8 conv/linear kernels called directly, weights prepacked once (no compilation)",
            "x86-inductor": "torch.compile (inductor, freezing) with torchao's x86 passes: the PT2E lowering of the "
                            "same arithmetic to the same oneDNN kernels, plus fused elementwise code"}
MODES = ("reference", "onednn")
MAX_BITS = 8
INT16_MAX = 32767  # the saturation bound of vpmaddubsw's pair sums on CPUs without VNNI
FALLBACK = "sample the fake-quant model instead (python -m bench.sample --model CHECKPOINT)"


@functools.cache
def kernels_saturate() -> bool:
    """Whether this process's oneDNN u8s8 kernels saturate pair sums at int16 (CPUs without VNNI or AMX, or
    ONEDNN_MAX_CPU_ISA set below them): one linear on the worst case, codes 255 times weights 127 over 64 inputs."""
    w = torch.full((1, 64), 127, dtype=torch.int8)
    c = torch.full((1, 64), 255, dtype=torch.uint8)
    y = torch.ops.onednn.qlinear_pointwise(c, 1.0, 0, torch.ops.onednn.qlinear_prepack(w, None), torch.ones(1),
                                           torch.zeros(1, dtype=torch.int64), None, 1.0, 0, torch.float32, "none",
                                           [], "")
    return float(y.reshape(())) != 255 * 127 * 64


class UnsupportedError(BenchError):
    """Something in the quantized model that integer kernels cannot run; the message names it and the alternative."""


def _act_spec(q, where: str) -> dict:
    if not (q.enabled and q.initialized):
        raise UnsupportedError(f"{where}: activation quantizer is {'off' if not q.enabled else 'not calibrated'}; "
                               f"integer kernels need every activation quantized; {FALLBACK}")
    if q.n_bits > MAX_BITS:
        raise UnsupportedError(f"{where}: {q.n_bits}-bit activations; integer kernels take at most {MAX_BITS}-bit "
                               f"(uint8) activations; quantize with A<=8 (softmax_bits<=8) or {FALLBACK}")
    z = float(q.zero_point.detach().reshape(()))
    qmax = 2**q.n_bits - 1
    if z != round(z) or not 0 <= z <= qmax:
        raise UnsupportedError(f"{where}: zero point {z} is not an integer in [0, {qmax}]; {FALLBACK}")
    return {"scale": float(q.delta.detach().clamp_min(1e-8).reshape(())), "zero_point": int(z), "qmax": qmax}


class ActQDQ(nn.Module):
    """Per-tensor uint8 activation codes (the fake-quantizer's formula) and their dequantization."""

    def __init__(self, scale: float, zero_point: int, qmax: int):
        super().__init__()
        self.scale, self.zero_point, self.qmax = float(scale), int(zero_point), int(qmax)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """clamp(round(x / delta) + z, 0, qmax) as uint8: bit-identical to UniformQuantizer.quantize_int."""
        y = torch.div(x, self.scale)
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return torch.clamp(torch.round(y) + self.zero_point, 0, self.qmax).to(torch.uint8)
        return y.round_().add_(self.zero_point).clamp_(0, self.qmax).to(torch.uint8)  # in place: 2 buffers, not 5

    def dequant(self, c: torch.Tensor) -> torch.Tensor:
        return QD.dequantize_per_tensor.default(c, self.scale, self.zero_point, 0, self.qmax, torch.uint8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.codes(x))

    def spec(self) -> dict:
        return {"scale": self.scale, "zero_point": self.zero_point, "qmax": self.qmax}

    def extra_repr(self) -> str:
        return f"scale={self.scale:.4g}, zero_point={self.zero_point}, qmax={self.qmax}"


def _weight_part(q, w: torch.Tensor, where: str) -> dict[str, torch.Tensor]:
    if getattr(q, "soft_targets", False):
        raise UnsupportedError(f"{where}: AdaRound rounding is still soft (reconstruction not finished); harden it "
                               "(eda.recon does at the end of each unit) before exporting")
    if not getattr(q, "initialized", False):
        raise UnsupportedError(f"{where}: weight quantizer has no range; call eda.wrap.init_ranges first")
    if q.n_bits > MAX_BITS:
        raise UnsupportedError(f"{where}: {q.n_bits}-bit weights; integer kernels take at most {MAX_BITS}-bit "
                               f"(int8) weights; quantize with W<=8 or {FALLBACK}")
    codes = q.quantize_int(w.detach())  # the method's own codes, exactly as eda.checkpoint stores them
    z = q.zero_point.detach().reshape(-1).round()
    view = (-1,) + (1,) * (codes.dim() - 1)
    rel = (codes - z.view(view)).flatten(1)
    # t = c - z when every code of the channel fits int8 (always for b <= 7); else t = c - 2^(b-1), z' = z - 2^(b-1)
    fits = (rel.amin(1) >= -128) & (rel.amax(1) <= 127)
    off = torch.where(fits, z, torch.full_like(z, 2 ** (q.n_bits - 1)))
    return {"w": (codes - off.view(view)).to(torch.int8).contiguous(),
            "scale": q.delta.detach().clamp_min(1e-8).reshape(-1).float().contiguous(),
            "zp": (z - off).to(torch.int64).contiguous(), "z": z.float().contiguous()}


class IntLayer(nn.Module):
    """A Conv2d/Linear on int8 weight codes with uint8 input codes (or an FP input for the network-output conv).

    Buffers per input-channel group i: w{i} int8 t, s{i} scales, z{i} the quantizer's zero points z, zp{i} the
    residual z' (0 where folded). A group with some z' != 0 runs with one extra all-ones output channel, whose output
    is the box sum of x_hat: y = out[:C] - (z' s) * out[C] (exact; see the module docstring)."""

    def __init__(self, spec: dict):
        super().__init__()
        self.spec = spec
        self.kind = spec["kind"]
        self.parts = nn.ModuleList()
        n_out = spec["out"]
        for i, p in enumerate(spec["parts"]):
            self.register_buffer(f"w{i}", torch.zeros(p["w_shape"], dtype=torch.int8))
            self.register_buffer(f"s{i}", torch.ones(n_out))
            self.register_buffer(f"z{i}", torch.zeros(n_out))
            self.register_buffer(f"zp{i}", torch.zeros(n_out, dtype=torch.int64))
            self.parts.append(ActQDQ(**p["act"]) if p["act"] else nn.Identity())
        self.register_buffer("bias", torch.zeros(n_out) if spec["bias"] else None)
        # split_weights: the reference representation runs on the split operands too (set by compile_for for the
        # inductor lowering, which reaches the same oneDNN kernels); the eager kernels decide for themselves
        self.mode, self._packed, self.split_weights = "reference", {}, False
        self.finalize()

    def finalize(self) -> IntLayer:
        """Derived kernel operands (not saved): weights with the all-ones channel for groups with z' != 0, zero
        weight zero points, and the z' s coefficients. Call after loading buffers."""
        for i, p in enumerate(self.spec["parts"]):
            w, s = getattr(self, f"w{i}"), getattr(self, f"s{i}")
            if p["asym"]:
                w = torch.cat([w, w.new_ones(1, *w.shape[1:])])
                s = torch.cat([s, s.new_ones(1)])
                self.register_buffer(f"coef{i}", getattr(self, f"zp{i}").float() * getattr(self, f"s{i}"),
                                     persistent=False)
            self.register_buffer(f"kw{i}", w.contiguous(), persistent=False)
            self.register_buffer(f"ks{i}", s.contiguous(), persistent=False)
            self.register_buffer(f"kzero{i}", torch.zeros(len(s), dtype=torch.int64), persistent=False)
            bias = self.bias if i == 0 else None
            if bias is not None and p["asym"]:
                bias = torch.cat([bias, bias.new_zeros(1)])
            self.register_buffer(f"kb{i}", bias, persistent=False)
        self._packed = {}
        return self

    @classmethod
    def from_quant(cls, ql: QuantLayer, name: str) -> IntLayer:
        mod = ql.module
        conv = isinstance(mod, nn.Conv2d)
        if conv and mod.groups != 1:
            raise UnsupportedError(f"layer {name}: grouped conv (groups={mod.groups}) is not exported; {FALLBACK}")
        if conv and mod.padding_mode != "zeros":
            raise UnsupportedError(f"layer {name}: padding_mode {mod.padding_mode!r}; {FALLBACK}")
        if conv and isinstance(mod.padding, str):
            raise UnsupportedError(f"layer {name}: padding={mod.padding!r}; {FALLBACK}")
        acts = ql.act_quantizers()
        parts, tensors = [], []
        for i, (qname, sl) in enumerate(ql.weight_parts()):
            wp = _weight_part(getattr(ql, qname), mod.weight[:, sl], f"layer {name} ({qname})")
            act = _act_spec(acts[i], f"layer {name} input") if ql.use_act_quant and ql.act_allowed else None
            lo, hi = sl.start or 0, sl.stop if sl.stop is not None else mod.weight.shape[1]
            parts.append({"slice": [lo, hi], "w_shape": list(wp["w"].shape), "act": act,
                          "bits": getattr(ql, qname).n_bits, "asym": bool((wp["zp"] != 0).any())})
            tensors.append(wp)
        spec = {"kind": "conv" if conv else "linear", "out": mod.weight.shape[0], "bias": mod.bias is not None,
                "parts": parts}
        if conv:
            spec.update(stride=list(mod.stride), padding=list(mod.padding), dilation=list(mod.dilation),
                        kernel=list(mod.kernel_size))
        layer = cls(spec)
        with torch.no_grad():
            for i, wp in enumerate(tensors):
                for key, buf in (("w", "w"), ("scale", "s"), ("z", "z"), ("zp", "zp")):
                    getattr(layer, f"{buf}{i}").copy_(wp[key])
            if mod.bias is not None:
                layer.bias.copy_(mod.bias.detach())
        return layer.finalize()

    def codes(self) -> list[torch.Tensor]:
        """The weight codes c = t + z - z' per group (what the checkpoint stores)."""
        return [(getattr(self, f"w{i}").float() + getattr(self, f"z{i}").view(-1, *[1] * (len(p["w_shape"]) - 1))
                 - getattr(self, f"zp{i}").float().view(-1, *[1] * (len(p["w_shape"]) - 1)))
                for i, p in enumerate(self.spec["parts"])]

    # -- kernels ------------------------------------------------------------------------------------------------------
    def set_mode(self, mode: str, split_weights: bool = False) -> IntLayer:
        if mode not in MODES:
            raise ValueError(f"unknown IntLayer mode {mode!r}; expected one of {MODES}")
        self.mode, self.split_weights = mode, split_weights
        self._packed = {}
        return self

    def _must_split(self, i: int, act) -> bool:
        """Group i's codes could overflow an int16 pair sum (2 qmax max|t| > 32767) on a CPU whose kernels saturate."""
        if not isinstance(act, ActQDQ):
            return False
        t_max = int(getattr(self, f"kw{i}").to(torch.int16).abs().max())  # in int16: int8 abs(-128) wraps to -128
        return 2 * act.qmax * t_max > INT16_MAX and kernels_saturate()

    def _operands(self, i: int, split: bool) -> tuple:
        """(int8 weights, scales, weight zero points, bias, rows): with split, t = hi + lo stacked as [hi; lo] with
        the scales repeated and the bias on the hi half only; rows is then the row count of each half, else 0."""
        w, s, zero, bias = (getattr(self, f"{k}{i}") for k in ("kw", "ks", "kzero", "kb"))
        if not split:
            return w, s, zero, bias, 0
        hi = torch.div(w, 2, rounding_mode="floor")  # [-64, 63]; lo = t - hi in [-64, 64]
        return (torch.cat([hi, w - hi]).contiguous(), torch.cat([s, s]), torch.cat([zero, zero]),
                None if bias is None else torch.cat([bias, torch.zeros_like(bias)]), w.shape[0])

    def _conv_args(self) -> tuple:
        sp = self.spec
        return sp["stride"], sp["padding"], sp["dilation"], 1

    def _kernel(self, i: int, act: ActQDQ, c: torch.Tensor) -> tuple[torch.Tensor, int]:
        """oneDNN u8s8 conv/linear with an FP32 output: s_x s_w[o] sum (c - z_x) t + bias; and the split rows."""
        if i not in self._packed:
            w, s, zero, bias, rows = self._operands(i, self._must_split(i, act))
            packed = (torch.ops.onednn.qconv_prepack(w, s, act.scale, act.zero_point, *self._conv_args(), None)
                      if self.kind == "conv" else torch.ops.onednn.qlinear_prepack(w, None))
            self._packed[i] = (packed, s, zero, bias, rows)
        packed, s, zero, bias, rows = self._packed[i]
        if self.kind == "conv":
            return torch.ops.onednn.qconv_pointwise(c, act.scale, act.zero_point, packed, s, zero, bias,
                                                    *self._conv_args(), 1.0, 0, torch.float32, "none", [], ""), rows
        lead = c.shape[:-1]
        y = torch.ops.onednn.qlinear_pointwise(c.reshape(-1, c.shape[-1]), act.scale, act.zero_point, packed, s,
                                               zero, bias, 1.0, 0, torch.float32, "none", [], "")
        return y.reshape(*lead, y.shape[-1]), rows

    def _reference(self, i: int, act, x_hat: torch.Tensor) -> tuple[torch.Tensor, int]:
        # zero-point-free int8 weights: the pattern the x86 inductor passes turn into oneDNN u8s8 kernels
        w, s, zero, bias, rows = self._operands(i, self.split_weights and self._must_split(i, act))
        w = QD.dequantize_per_channel.default(w, s, zero, 0, -128, 127, torch.int8)
        if self.kind == "linear":
            return F.linear(x_hat, w, bias), rows
        return F.conv2d(x_hat, w, bias, *self._conv_args()), rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        dim = 1 if self.kind == "conv" else -1
        kernels = self.mode == "onednn" and not torch.is_grad_enabled()
        for i, (p, act) in enumerate(zip(self.spec["parts"], self.parts)):
            xi = x if len(self.parts) == 1 else x.narrow(dim, p["slice"][0], p["slice"][1] - p["slice"][0])
            if kernels and isinstance(act, ActQDQ):
                y, rows = self._kernel(i, act, act.codes(xi))
            else:
                y, rows = self._reference(i, act, act(xi))
            if rows:  # t = hi + lo: add the two halves
                y = y[:, :rows] + y[:, rows:] if self.kind == "conv" else y[..., :rows] + y[..., rows:]
            if p["asym"]:  # drop the all-ones channel, subtract (z' s) times its box sum
                n = self.spec["out"]
                coef = getattr(self, f"coef{i}")
                y = (y[:, :n] - y[:, n:] * coef.view(1, -1, 1, 1) if self.kind == "conv"
                     else y[..., :n] - y[..., n:] * coef)
            out = y if out is None else out + y
        return out

    def extra_repr(self) -> str:
        p = self.spec["parts"]
        return (f"{self.kind}, parts={len(p)}, w_bits={[q['bits'] for q in p]}, act={[bool(q['act']) for q in p]}, "
                f"asym={[q['asym'] for q in p]}")


class IntAttnProcessor(QuantAttnProcessor):
    """QuantAttnProcessor's own __call__ with its four quantizers replaced by uint8 quantize/dequantize ops."""

    def __init__(self, fp_processor, specs: dict[str, dict]):
        nn.Module.__init__(self)
        object.__setattr__(self, "fp_processor", fp_processor)
        for key in ("q", "k", "v", "softmax"):
            setattr(self, f"{key}_quantizer", ActQDQ(**specs[key]))
        self.use_act_quant = True

    def specs(self) -> dict[str, dict]:
        return {k: getattr(self, f"{k}_quantizer").spec() for k in ("q", "k", "v", "softmax")}


def _attn_specs(proc: QuantAttnProcessor, name: str) -> dict[str, dict]:
    return {k: _act_spec(getattr(proc, f"{k}_quantizer"), f"attention {name} ({k})")
            for k in ("q", "k", "v", "softmax")}


def _set_module(root: nn.Module, name: str, new: nn.Module):
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


def _attention_cls():
    from diffusers.models.attention_processor import Attention

    return Attention


def integer_unet(qmodel: nn.Module) -> nn.Module:
    """A copy of a fake-quantized UNet (weights + activations on) with every QuantLayer replaced by an IntLayer and
    every QuantAttnProcessor by an IntAttnProcessor; raises UnsupportedError naming what cannot run."""
    layers = quant_layers(qmodel)
    if not layers:
        raise UnsupportedError("the model has no quantized layers (eda.wrap.quantize_unet); nothing to export")
    w_on, a_on = get_quant_state(qmodel)
    if not (w_on and a_on):
        raise UnsupportedError(f"the model is in the {'FP' if not w_on else 'weight-only'} state; integer kernels run "
                               "weights and activations quantized (eda.wrap.set_quant_state(model, True, True))")
    specs = {n: IntLayer.from_quant(ql, n) for n, ql in layers.items()}  # validate everything before copying
    attn = {n: _attn_specs(p, n) for n, p in attn_processors(qmodel).items() if p.use_act_quant}
    out = copy.deepcopy(qmodel)
    for name, layer in specs.items():
        _set_module(out, name, layer)
    for m_name, m in out.named_modules():
        if isinstance(m, _attention_cls()) and isinstance(m.processor, QuantAttnProcessor):
            key = f"{m_name}.processor"
            if key in attn:
                m.set_processor(IntAttnProcessor(m.processor.fp_processor, attn[key]))
            else:
                m.set_processor(m.processor.fp_processor)
    out.integer_export = True
    return out.eval()


# ---- save / load ----------------------------------------------------------------------------------------------------
def save_integer(int_unet: nn.Module, out_dir: str | Path, backend: str, meta: dict | None = None) -> Path:
    """integer_config.json (class, diffusers config, per-layer specs, attention specs, backend, meta) +
    integer.safetensors (int8 weights, scales, zero points, and the FP tensors: biases, norms, embeddings)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = {n: m.spec for n, m in int_unet.named_modules() if isinstance(m, IntLayer)}
    attn = {n: m.specs() for n, m in int_unet.named_modules() if isinstance(m, IntAttnProcessor)}
    state = {k: v.detach().cpu().contiguous() for k, v in int_unet.state_dict().items() if ".processor." not in k}
    cfg = {"format": FORMAT, "version": VERSION, "backend": backend, "class": type(int_unet).__name__,
           "diffusers_config": json.loads(int_unet.to_json_string()), "layers": layers, "attention": attn,
           "meta": meta or {}}
    save_file(state, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=1, default=str))
    return out


def is_integer_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG_FILE).is_file()


def load_integer(directory: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the integer UNet saved by `save_integer` (eager; `compile_for(model, cfg['backend'])` lowers it)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from eda.checkpoint import _unet_class

    d = Path(directory)
    cfg_file, w_file = d / CONFIG_FILE, d / WEIGHTS_FILE
    if not cfg_file.is_file() or not w_file.is_file():
        raise BenchError(f"{d} is not an integer export (needs {CONFIG_FILE} and {WEIGHTS_FILE}); write one with "
                         "python -m bench.export CHECKPOINT --out DIR")
    try:
        cfg = json.loads(cfg_file.read_text())
        tensors = load_file(str(w_file))
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise BenchError(f"corrupt integer export in {d} ({type(e).__name__}); export it again") from None
    if cfg.get("format") != FORMAT:
        raise BenchError(f"{cfg_file} is not an {FORMAT} config (format={cfg.get('format')!r}); export it again")
    cls = _unet_class(cfg["class"])
    unet = cls.from_config({k: v for k, v in cfg["diffusers_config"].items() if not k.startswith("_")}).eval()
    for name, spec in cfg["layers"].items():
        _set_module(unet, name, IntLayer(spec))
    procs = {n.removesuffix(".processor"): s for n, s in cfg["attention"].items()}
    for m_name, m in unet.named_modules():
        if isinstance(m, _attention_cls()) and m_name in procs:
            m.set_processor(IntAttnProcessor(_fp_processor(), procs[m_name]))
    try:
        unet.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise BenchError(f"{w_file.name} does not match {cfg_file.name} in {d} "
                         f"({str(e).splitlines()[-1].strip()[:150]}); export it again") from None
    for m in unet.modules():
        if isinstance(m, IntLayer):
            m.finalize()
    unet.integer_export = True
    return unet, cfg


def _fp_processor():
    from diffusers.models.attention_processor import AttnProcessor2_0

    return AttnProcessor2_0()


# ---- backends -------------------------------------------------------------------------------------------------------
def require_backend(backend: str, device: str | torch.device = "cpu") -> None:
    """One line naming the problem and the alternative when `backend` cannot run here."""
    if backend not in BACKENDS:
        raise BenchError(f"unknown integer backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if torch.device(device).type != "cpu":
        raise BenchError(f"the {backend} integer backend runs on x86 CPUs (oneDNN); got device {device}: sample "
                         "the fake-quant model on the GPU instead (GPU integer kernels are not implemented)")
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.onednn, "qconv_pointwise"):
        raise BenchError(f"this torch build has no oneDNN int8 kernels, which the {backend} backend needs; "
                         "use an x86 build of torch==2.14.1")
    if backend == "x86-inductor":
        try:
            import torchao  # noqa: F401
        except ImportError:
            raise BenchError("the x86-inductor backend needs torchao (its x86 inductor passes lower the int8 "
                             "conv/linear to oneDNN): pip install -e '.[int8]', or use --backend x86") from None


def set_mode(int_unet: nn.Module, mode: str, split_weights: bool = False) -> nn.Module:
    for m in int_unet.modules():
        if isinstance(m, IntLayer):
            m.set_mode(mode, split_weights)
    return int_unet


def compile_for(int_unet: nn.Module, backend: str = "x86"):
    """The integer UNet ready to run on `backend`: "x86" calls the oneDNN kernels eagerly; "x86-inductor" compiles
    the reference representation (lazily, at the first call of each input shape; minutes on a small CPU)."""
    require_backend(backend)
    if backend == "x86":
        return set_mode(int_unet, "onednn")
    # the lowering reaches the same oneDNN kernels, so on a CPU whose kernels saturate it needs the split weights too
    set_mode(int_unet, "reference", split_weights=kernels_saturate())
    # importing the quantizer module registers the x86 int8 fusion passes with inductor (torchao 0.18)
    import torch._inductor.config as inductor_config
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401

    # Freezing folds the int8 weights into constants so the x86 passes can prepack them for oneDNN. It is read when a
    # graph is compiled, lazily at each new input shape, so it is set for the process (it only changes graphs compiled
    # for inference, under no_grad).
    inductor_config.freezing = True
    return torch.compile(int_unet, dynamic=False)


def layer_codes(int_unet: nn.Module) -> dict[str, list[torch.Tensor]]:
    """{layer: [weight codes per input-channel group]}: what eda.checkpoint stores, for checks."""
    return {n: m.codes() for n, m in int_unet.named_modules() if isinstance(m, IntLayer)}


def n_kernels(int_unet: nn.Module) -> dict[str, int]:
    """How many conv/linear run on int8 inputs, how many on an FP input (network output), attention processors."""
    n_int = sum(1 for m in int_unet.modules() if isinstance(m, IntLayer) for a in m.parts if isinstance(a, ActQDQ))
    n_fp = sum(1 for m in int_unet.modules() if isinstance(m, IntLayer) for a in m.parts if not isinstance(a, ActQDQ))
    n_attn = sum(1 for m in int_unet.modules() if isinstance(m, IntAttnProcessor))
    return {"int8_ops": n_int, "fp_input_ops": n_fp, "attention": n_attn, "ops": n_int + n_fp}


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, backend: str = "x86") -> dict:
    """A saved quantized model (eda.checkpoint) -> an integer export in out_dir; returns a summary."""
    from eda.checkpoint import load_quantized

    require_backend(backend)
    qmodel, meta = load_quantized(checkpoint_dir)
    int_unet = integer_unet(qmodel)
    save_integer(int_unet, out_dir, backend, {**meta, "source_checkpoint": str(Path(checkpoint_dir).resolve())})
    sizes = {p.name: p.stat().st_size for p in Path(out_dir).iterdir() if p.is_file()}
    return {"backend": backend, "out": str(out_dir), "model": meta.get("model"), "method": meta.get("method"),
            "bits": meta.get("bits"), **n_kernels(int_unet), "bytes": sum(sizes.values())}


def load_for_backend(directory: str | Path, backend: str | None = None,
                     device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """An integer export ready to run: (callable UNet, config); `backend` overrides the one it was exported for."""
    unet, cfg = load_integer(directory)
    backend = backend or cfg["backend"]
    require_backend(backend, device)
    return compile_for(unet, backend), {**cfg, "backend": backend}
