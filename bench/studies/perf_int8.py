"""bench.perf figure `int8`: integer inference (eda.integer) against FP32 and fake-quant, side by side in one run.

Three parts, each timed interleaved (bench.harness.timing.alternate) and reported as rows:
1. backends, one layer: a 3x3 conv and a linear layer in FP32 (torch) against each candidate integer route on CPU:
   oneDNN u8s8 kernels called directly (our x86 backend), the same lowered by torch.compile with torchao's x86 passes
   (x86-inductor), ONNX Runtime running the ONNX QDQ graph (QuantizeLinear/DequantizeLinear around an FP Conv, the
   format TensorRT takes) and an integer-op graph (ConvInteger/MatMulInteger), and torch's deprecated
   torch.ao.nn.quantized modules (these requantize the output to uint8, so they are a speed reference only);
2. one UNet call at batch 1, 8 and 64 on digits-ddpm and the DDIM CIFAR-10 UNet (random weights): FP32, W8A8
   fake-quant and W8A8 integer (target: integer >= 1.5x FP32 for CIFAR-10 at batch 8);
3. a whole sampling run (DDIM, fewer steps than the official 100 to fit the CPU; steps in the row) on both models.
"""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn.functional as F

from bench.harness.timing import alternate
from bench.studies.perf_figures import _calib, _quantized, cifar_unet, row

TARGET = 1.5  # README "Integer inference": integer W8A8 >= 1.5x FP32 per UNet call, CIFAR-10 UNet, batch 8


# ---- 1. backends on one layer -----------------------------------------------------------------------------------
def _ort_session(model):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = torch.get_num_threads()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _onnx_graphs(kind: str, x, t8, sw, b, sx: float, zx: int, pad: int):
    """(QDQ graph, integer-op graph) computing the same layer as oneDNN's u8s8 kernel."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    n_out = t8.shape[0]
    X = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))
    Y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    f32 = np.float32
    common = [numpy_helper.from_array(np.array(sx, f32), "sx"), numpy_helper.from_array(np.array(zx, np.uint8), "zx")]
    wq = t8.numpy() if kind == "conv" else t8.t().contiguous().numpy()
    qdq_w = [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(sw.numpy().astype(f32), "sw"),
             numpy_helper.from_array(np.zeros(n_out, np.int8), "zw"), numpy_helper.from_array(b.numpy(), "b")]
    scale_shape = (1, n_out, 1, 1) if kind == "conv" else (n_out,)
    int_w = [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(np.int8(0), "zw0"),
             numpy_helper.from_array((sw * sx).numpy().astype(f32).reshape(scale_shape), "sxw"),
             numpy_helper.from_array(b.numpy().reshape(scale_shape), "b2")]
    if kind == "conv":
        op = helper.make_node("Conv", ["xd", "wd", "b"], ["y"], pads=[pad] * 4)
        iop = helper.make_node("ConvInteger", ["xq", "wq", "zx", "zw0"], ["yi"], pads=[pad] * 4)
        w_axis = 0
    else:
        op = helper.make_node("Gemm", ["xd", "wd", "b"], ["y"])
        iop = helper.make_node("MatMulInteger", ["xq", "wq", "zx", "zw0"], ["yi"])
        w_axis = 1
    qdq = helper.make_graph([helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
                             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
                             helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], axis=w_axis), op],
                            "qdq", [X], [Y], common + qdq_w)
    integer = helper.make_graph([helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]), iop,
                                 helper.make_node("Cast", ["yi"], ["yf"], to=TensorProto.FLOAT),
                                 helper.make_node("Mul", ["yf", "sxw"], ["ym"]),
                                 helper.make_node("Add", ["ym", "b2"], ["y"])], "int", [X], [Y], common + int_w)
    opset = [helper.make_opsetid("", 21)]
    return helper.make_model(qdq, opset_imports=opset), helper.make_model(integer, opset_imports=opset)


def _layer_case(kind: str, shape: tuple, reps: int) -> list[dict]:
    """FP32 vs every integer route for one layer; rows name the route, its max error against the exact result."""
    import eda.integer as ei

    g = torch.Generator().manual_seed(0)
    if kind == "conv":
        n, c, h = shape
        x, w = torch.randn(n, c, h, h, generator=g), torch.randn(c, c, 3, 3, generator=g) * 0.05
        case = f"layer: 3x3 conv {c}ch {h}x{h}, batch {n}"
    else:
        m, k, o = shape
        x, w = torch.randn(m, k, generator=g), torch.randn(o, k, generator=g) * 0.05
        case = f"layer: linear {m}x{k}x{o}"
    b = torch.randn(w.shape[0], generator=g)
    sx, zx = float(x.abs().max() * 2 / 255), 128
    sw = w.flatten(1).abs().amax(1) * 2 / 255
    t8 = torch.clamp(torch.round(w / sw.view(-1, *[1] * (w.dim() - 1))), -128, 127).to(torch.int8)
    spec = {"kind": kind, "out": w.shape[0], "bias": True,
            "parts": [{"slice": [0, w.shape[1]], "w_shape": list(t8.shape), "act": {"scale": sx, "zero_point": zx,
                                                                                  "qmax": 255}, "bits": 8,
                       "asym": False}]}
    if kind == "conv":
        spec.update(stride=[1, 1], padding=[1, 1], dilation=[1, 1], kernel=[3, 3])
    layer = ei.IntLayer(spec)
    with torch.no_grad():
        layer.w0.copy_(t8)
        layer.s0.copy_(sw)
        layer.z0.fill_(128)
        layer.bias.copy_(b)
    layer.finalize().set_mode("onednn")
    fp = (lambda: F.conv2d(x, w, b, padding=1)) if kind == "conv" else (lambda: F.linear(x, w, b))
    routes = {"x86: oneDNN u8s8 (ours)": lambda: layer(x)}
    errors = {}
    with torch.no_grad():
        exact = layer.set_mode("reference")(x)
        layer.set_mode("onednn")
        try:
            import torchao  # noqa: F401

            t0 = time.perf_counter()
            ref_layer = ei.IntLayer(spec)
            ref_layer.load_state_dict(layer.state_dict())
            compiled = ei.compile_for(ref_layer.finalize(), "x86-inductor")
            compiled(x)
            routes[f"x86-inductor (compiled in {time.perf_counter() - t0:.0f} s)"] = lambda: compiled(x)
        except ImportError:
            pass
        try:
            qdq, integer = _onnx_graphs(kind, x, t8, sw, b, sx, zx, 1)
            xn = x.numpy()
            for label, m in (("onnxruntime: QDQ (TensorRT's format)", qdq),
                             ("onnxruntime: ConvInteger/MatMulInteger", integer)):
                sess = _ort_session(m)
                routes[label] = lambda s=sess: torch.from_numpy(s.run(None, {"x": xn})[0])
        except ImportError:
            pass
        if kind == "conv":  # torch's deprecated quantized module (output requantized: speed reference only)
            qc = torch.ao.nn.quantized.Conv2d(w.shape[1], w.shape[0], 3, padding=1)
            qc.set_weight_bias(torch._make_per_channel_quantized_tensor(t8, sw.double(), torch.zeros(
                w.shape[0], dtype=torch.long), 0), b)
            qc.scale, qc.zero_point = float(exact.abs().max() * 2 / 255), 128
            routes["torch.ao.nn.quantized.Conv2d (deprecated; uint8 output)"] = lambda: torch.dequantize(
                qc(torch.quantize_per_tensor(x, sx, zx, torch.quint8)))
        fns = {"fp": fp, **routes}
        for k, f in fns.items():
            if k != "fp":
                errors[k] = float((f() - exact).abs().max() / exact.abs().max())
        t = alternate(fns, reps)
    rows = []
    for k in routes:
        rows.append(row("int8", case, "FP32 (torch)", t["fp"], k, t[k], "speedup", None, part="backend",
                        max_rel_error_vs_exact=errors[k], threads=torch.get_num_threads()))
        print(f"  int8 {case}: {k} x{t['fp'] / t[k]:.2f} (max rel. error {errors[k]:.1e})", flush=True)
    return rows


# ---- 2./3. UNet call and sampling run ---------------------------------------------------------------------------
def _models():
    from bench.models.registry import load_model

    digits = load_model("digits-ddpm")
    yield "digits-ddpm", digits.unet.eval(), digits
    yield "cifar10-ddim (random weights)", cifar_unet(), None


def fig_int8(args) -> list[dict]:
    from eda.integer import IntLayer, compile_for, integer_unet, n_kernels
    from eda.wrap import quant_layers

    reps = 3 if args.quick else 5
    rows = []
    shapes = [("conv", (8, 128, 32)), ("conv", (8, 256, 16)), ("conv", (8, 256, 8)), ("linear", (2048, 512, 512))]
    for kind, shape in shapes[:2] if args.quick else shapes:
        rows += _layer_case(kind, shape, reps)
    batches = (1, 8) if args.quick else (1, 8, 64)
    for name, unet, model in _models():
        q = _quantized(unet, "W8A8", _calib(unet, 8))
        iu = compile_for(integer_unet(q), "x86")
        info = n_kernels(iu)
        info["asym_layers"] = sum(any(p["asym"] for p in m.spec["parts"]) for m in iu.modules()
                                  if isinstance(m, IntLayer))
        info["layers"] = len(quant_layers(q))
        c, s = unet.config.in_channels, unet.config.sample_size
        for b in batches:
            g = torch.Generator().manual_seed(b)
            x, t = torch.randn(b, c, s, s, generator=g), torch.randint(0, 1000, (b,), generator=g)
            with torch.no_grad():
                tm = alternate({"fp": lambda: unet(x, t), "fq": lambda: q(x, t), "int": lambda: iu(x, t)},
                               reps if b < 64 else max(2, reps - 2))
            target = TARGET if name.startswith("cifar") and b == 8 else None
            extra = dict(part="unet call", batch=b, bits="W8A8", backend="x86", threads=torch.get_num_threads(),
                         ranges="minmax", **info)
            rows.append(row("int8", f"{name}, one UNet call, batch {b}", "FP32", tm["fp"], "W8A8 fake-quant",
                            tm["fq"], "speedup", None, **extra))
            rows.append(row("int8", f"{name}, one UNet call, batch {b}", "FP32", tm["fp"], "W8A8 integer (x86)",
                            tm["int"], "speedup", target, **extra))
            print(f"  int8 {name} batch {b}: FP32 {tm['fp'] * 1e3:.1f} ms, fake-quant x{tm['fp'] / tm['fq']:.2f}, "
                  f"integer x{tm['fp'] / tm['int']:.2f}", flush=True)
        # a whole sampling run
        steps = (5 if args.quick else 10) if model is None else (10 if args.quick else 20)
        n = 8 if model is None else 64
        if model is None:
            from bench.models.model import DiffusionModel
            from bench.models.sampling import SamplerConfig
            from bench.models.schedule import alphas_cumprod_for

            model = DiffusionModel(name=name, unet=unet, alphas_cumprod=alphas_cumprod_for(),
                                   sampler=SamplerConfig(steps=steps), sample_shape=(c, s, s), dataset="cifar10")
        model = dataclasses.replace(model, sampler=dataclasses.replace(model.sampler, steps=steps))
        tm = alternate({k: (lambda u=u: model.generate(n, seed=0, unet=u, batch_size=n))
                        for k, u in (("fp", unet), ("fq", q), ("int", iu))}, max(2, reps - 2))
        extra = dict(part="sampling run", batch=n, samples=n, steps=steps, sampler=model.sampler.describe(),
                     bits="W8A8", backend="x86", threads=torch.get_num_threads())
        case = f"{name}, sampling run: {n} samples, {steps} steps"
        rows.append(row("int8", case, "FP32", tm["fp"], "W8A8 fake-quant", tm["fq"], "speedup", None, **extra))
        rows.append(row("int8", case, "FP32", tm["fp"], "W8A8 integer (x86)", tm["int"], "speedup", None, **extra))
        print(f"  int8 {case}: FP32 {tm['fp']:.1f} s, fake-quant x{tm['fp'] / tm['fq']:.2f}, integer "
              f"x{tm['fp'] / tm['int']:.2f}", flush=True)
    return rows
