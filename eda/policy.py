"""Bit policy as plain data: which bits go where (weights, activations, softmax, first/last layer).

The defaults follow EDA-DM's released setup (`scripts/sample_diffusion_ddim.py`, `qdiff/quant_model.py`): symmetric
weights (per output channel) and activations (per tensor), L_p (p = 2.4) range search, softmax output at 8 bit, the
first and last weight layers at 8 bit (`set_first_last_layer_to_8bit`), and the input of the network's output conv
left unquantized (`disable_network_output_quantization`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from eda.errors import UsageError

MIN_BITS, MAX_BITS = 2, 16
_INITS = ("lp", "minmax", "qdiff-max")  # eda.quantizer docstring
FIRST_LAST_CHOICES = ("official", "conv_io", "none")


def check_bits(bits: int, what: str = "bits") -> int:
    """Bits must be an int in 2..16 (uniform fake-quant below 2 bits is meaningless, above 16 is FP in disguise)."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise UsageError(f"{what} must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    return bits


def parse_bits(spec: str) -> tuple[int, int]:
    """'W4A8' -> (4, 8), case and spaces ignored; each width in 2..16. The one parser of bit settings (grids, CLIs,
    methods); torch-free, so planning a grid needs no torch. 'W8A32'-style weight-only specs are not accepted: use
    set_quant_state(acts=False)."""
    m = re.fullmatch(r"\s*[Ww](\d+)\s*[Aa](\d+)\s*", str(spec))
    if m is None:
        raise UsageError(f"bad bit setting {spec!r}; expected W<bits>A<bits> (WxAy) with bits in "
                         f"{MIN_BITS}..{MAX_BITS}, such as W4A8 or W8A8")
    w, a = int(m.group(1)), int(m.group(2))
    check_bits(w, f"bad bit setting {spec!r}: weight bits")
    check_bits(a, f"bad bit setting {spec!r}: activation bits")
    return w, a


@dataclass(frozen=True)
class BitPolicy:
    """Where each bit width goes. Plain data: methods override fields, the wrapper reads them once."""

    w_bits: int
    a_bits: int
    softmax_bits: int = 8  # Q-Diffusion `sm_abit` default; SD W*A8 uses 16 (`--sm_abit`; EDA-DM's for_coco.sh keeps 8)
    # Which weight layers stay at 8 bit (QDrop's `set_first_last_layer_to_8bit`, used by EDA-DM and PTQ4DM):
    # "official": the first and last weight quantizers in the official models' registration order, i.e. the
    #   time-embedding MLP's first Linear (registered before conv_in there) and conv_out;
    # "conv_io": conv_in and conv_out (the first and last layers of diffusers' registration order);
    # "none": every layer at w_bits (Q-Diffusion).
    first_last_8bit: str = "official"
    quantize_output_input: bool = False  # official: disable_network_output_quantization (input of conv_out is FP)
    split_shortcut: bool = True  # Q-Diffusion --split: separate quantizers for [h | skip] on the decoder shortcut
    split_conv1: bool = False  # also split conv1's input (it sees the concat too; not done by the official code)
    w_symmetric: bool = True  # EDA-DM: symmetric per-channel weights (Q-Diffusion uses asymmetric)
    a_symmetric: bool = True  # EDA-DM: symmetric per-tensor activations; one-sided tensors use [0, thres]
    w_init: str = "lp"
    a_init: str = "lp"
    quantize_attention: bool = True  # both attention matmuls (q, k, softmax, v quantizers)

    def __post_init__(self):
        if isinstance(self.first_last_8bit, bool):  # saved before the choice had names: True meant conv_in/conv_out
            object.__setattr__(self, "first_last_8bit", "conv_io" if self.first_last_8bit else "none")
        if self.first_last_8bit not in FIRST_LAST_CHOICES:
            raise UsageError(f"first_last_8bit must be one of {', '.join(FIRST_LAST_CHOICES)}, got "
                             f"{self.first_last_8bit!r}")
        check_bits(self.w_bits, "w_bits")
        check_bits(self.a_bits, "a_bits")
        check_bits(self.softmax_bits, "softmax_bits")
        for name in ("w_init", "a_init"):
            if getattr(self, name) not in _INITS:
                raise UsageError(f"{name} must be one of {', '.join(_INITS)}, got {getattr(self, name)!r}")

    @classmethod
    def from_bits(cls, spec: str, **overrides) -> BitPolicy:
        w, a = parse_bits(spec)
        return cls(w_bits=w, a_bits=a, **overrides)

    def with_(self, **changes) -> BitPolicy:
        return replace(self, **changes)

    def describe(self) -> str:
        return f"W{self.w_bits}A{self.a_bits}"
