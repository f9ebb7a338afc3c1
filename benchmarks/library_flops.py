"""FLOPs of the oneDNN convolutions in a compiled program, which XLA's cost analysis cannot see.

A folded ResNet on CPU runs its convolutions as ``__onednn$convolution`` custom calls (``models.onednn_conv``).
XLA's cost analysis knows nothing of a custom call and counts each as -1 flop, so the benchmark's achieved FLOP/s
would drop the network's convolutions. This module counts them from the optimised HLO text the way XLA counts its
own convolution: two flops per multiply-add that touches the image (not the zero padding), plus one per output
element for each fused bias add, residual add and ReLU.

Promises:
  * ``onednn_convolution_flops(hlo_text)`` is that count summed over the text's oneDNN convolution calls, plus one
    per call to cancel the -1 of XLA's cost analysis: XLA's ``flops`` plus this is the program's FLOPs.
  * A call whose shapes or configuration cannot be read raises ``ValueError`` naming the instruction, rather than
    counting a wrong number.
"""

from __future__ import annotations

import json
import math
import re

_CALL = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*\w+\[([\d,]*)\]\S*\s+custom-call\(.*"
                   r'custom_call_target="__onednn\$convolution"')
_LAYOUTS = re.compile(r"operand_layout_constraints=\{(.*?)\}\s*,\s*\w+=")
_SHAPE = re.compile(r"\w+\[([\d,]*)\]")
_CONFIG = re.compile(r"backend_config=(\{.*\})\s*$")


def _dims(text: str) -> list[int]:
  return [int(d) for d in text.split(",") if d]


def _taps(size: int, kernel: int, stride: int, pad: int, outputs: int) -> int:
  """Kernel taps that land inside the image, summed over the outputs of one spatial dimension."""
  return sum(sum(1 for t in range(kernel) if 0 <= o * stride - pad + t < size) for o in range(outputs))


def _call_flops(name: str, line: str, out_dims: list[int]) -> int:
  layouts, config = _LAYOUTS.search(line), _CONFIG.search(line)
  if layouts is None or config is None:
    raise ValueError(f"oneDNN convolution %{name}: no operand shapes or backend_config in its HLO line.")
  shapes = [_dims(s) for s in _SHAPE.findall(layouts.group(1))]
  conv = json.loads(config.group(1))["onednn_conv_config"]
  data, kernel_layout, out_layout = conv["input"]["data"], conv["kernel"]["filter"], conv["output"]["data"]
  x, kernel, window = shapes[0], shapes[1], conv["window"]
  groups = int(conv.get("feature_groups", 1))
  if groups != 1:
    raise ValueError(f"oneDNN convolution %{name}: grouped convolutions ({groups} groups) are not counted.")
  taps = 1
  for d, (x_dim, k_dim, o_dim) in enumerate(zip(data["spatial_dims"], kernel_layout["spatial_dims"],
                                                out_layout["spatial_dims"])):
    taps *= _taps(x[x_dim], kernel[k_dim], window["strides"][d], window["pad_left"][d], out_dims[o_dim])
  multiply_adds = (x[data["batch_dim"]] * kernel[kernel_layout["input_feature_dim"]]
                   * kernel[kernel_layout["output_feature_dim"]] * taps)
  return 2 * multiply_adds + len(conv.get("fusions", {}).get("ops", [])) * math.prod(out_dims) + 1


def onednn_convolution_flops(hlo_text: str) -> float:
  """The FLOPs of ``hlo_text``'s oneDNN convolution calls, as XLA would count them (see the module docstring)."""
  total = 0
  for line in hlo_text.splitlines():
    call = _CALL.match(line)
    if call is not None:
      try:
        total += _call_flops(call.group(1), line, _dims(call.group(2)))
      except (KeyError, IndexError, json.JSONDecodeError) as error:
        raise ValueError(f"oneDNN convolution %{call.group(1)}: cannot read its shapes or configuration "
                         f"({type(error).__name__}: {error}).") from None
  return float(total)
