"""The element types a compiled program really multiplies in: XLA may run a bfloat16 convolution in float32.

A network asked to compute in bfloat16 is only as fast as the kernels XLA gives it. On CPU, jaxlib 0.10 converts
the operands of every bfloat16 convolution to float32 before handing it to YNNPACK (it keeps bfloat16 only for
matrix products), so a bfloat16 ResNet runs at the float32 rate there. The benchmark reads this off the compiled
program, so that a bfloat16 row says why it is or is not faster.

Promises:
  * ``compute_types(hlo_text)`` counts the convolutions and matrix products of an optimised HLO module's text
    (``compiled.as_text()``): ``convolution`` and ``dot`` instructions, fused computations included, and library
    calls to convolutions and GEMMs (cuDNN, cuBLAS, oneDNN ``custom-call``s), by the element types of their first
    two operands: ``{"convolution": {"f32": 111}, "dot": {"bf16": 1}}``; mixed operands count as e.g.
    ``"bf16,f32"``. An operand whose definition is not in the text counts as ``"?"``.
  * ``describe(types)`` is that count in words, e.g. ``"convolutions: 111 f32; dots: 1 bf16"``.
"""

from __future__ import annotations

import collections
import re

_OPCODES = ("convolution", "dot")
# "%name = f32[64,8,8,64]{3,2,1,0} opcode(...)", optionally after "ROOT". A tuple result, "(f32[...]{...}, u8[0]{0})",
# is typed by its first element: GPU library calls return their result beside a scratch buffer.
_DEFINITION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*\(?(\w+)\[")
# After the "=": the result (an array with its layout, or a tuple of them), then the opcode. Layouts hold no
# nested braces, even tiled TPU ones ("{3,2,1,0:T(8,128)(2,1)}").
_ARRAY = r"\w+\[[^\]]*\](?:\{[^}]*\})?"
_OPERATION = re.compile(rf"^\s*(?:{_ARRAY}|\((?:{_ARRAY}(?:,\s*)?)*\))\s+(convolution|dot|custom-call)\(")
# Which library calls are convolutions or matrix products: cuDNN's "__cudnn$convForward", cuBLAS's
# "__cublas$gemm", oneDNN's "__onednn$convolution" and "__onednn$matmul".
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_NAME = re.compile(r"%([\w.\-]+)")


def _kind(opcode: str, rhs: str) -> str | None:
  """"convolution", "dot" or None (a custom call that is neither)."""
  if opcode != "custom-call":
    return opcode
  target = _TARGET.search(rhs)
  target = target.group(1).lower() if target else ""
  if "conv" in target:
    return "convolution"
  if "gemm" in target or "matmul" in target:
    return "dot"
  return None


def compute_types(hlo_text: str) -> dict[str, dict[str, int]]:
  """Counts of the convolutions and dots in ``hlo_text`` by their operands' element types (see the module doc)."""
  defined, operations = {}, []
  for line in hlo_text.splitlines():
    definition = _DEFINITION.match(line)
    if definition is None:
      continue
    defined[definition.group(1)] = definition.group(2)
    rhs = line[definition.end(1):].split("=", 1)[1]
    operation = _OPERATION.match(rhs)
    kind = operation and _kind(operation.group(1), rhs)
    if kind:
      # Convolutions and dots have two operands (a library call's bias comes later), the first two names after the
      # opening parenthesis; the attributes after them (window, dim_labels, metadata) name no instruction.
      operations.append((kind, _NAME.findall(rhs[operation.end():])[:2]))
  counts = {opcode: collections.Counter() for opcode in _OPCODES}
  for kind, names in operations:  # operands may be defined further down (fused computations come first)
    counts[kind][",".join(sorted({defined.get(name, "?") for name in names}))] += 1
  return {opcode: dict(sorted(found.items())) for opcode, found in counts.items()}


def describe(types: dict[str, dict[str, int]]) -> str:
  """``compute_types``'s count in words, e.g. "convolutions: 111 f32; dots: 1 bf16" (empty kinds left out)."""
  parts = []
  for opcode, found in types.items():
    if found:
      parts.append(f"{opcode}s: " + ", ".join(f"{count} {dtype}" for dtype, count in found.items()))
  return "; ".join(parts) if parts else "no convolutions or dots"
