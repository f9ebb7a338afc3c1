"""``benchmarks.precision``: counting a compiled program's convolutions and dots by the element types they multiply in.

The count is read from HLO text, so it is checked on hand-written text (fused computations, mixed operands, a
tiled TPU layout, metadata that mentions the opcodes) and on programs XLA really compiled here.
"""

import jax
import jax.numpy as jnp
from jax import lax

from benchmarks import precision

_HLO = """\
HloModule jit_f, entry_computation_layout={(bf16[2,4,4,8]{3,2,1,0})->f32[2,10]{1,0}}

%fused_computation (param_0.1: bf16[2,4,4,8], param_1.2: bf16[3,3,8,8]) -> f32[2,4,4,8] {
  %param_0.1 = bf16[2,4,4,8]{3,2,1,0} parameter(0)
  %convert.2 = f32[2,4,4,8]{3,2,1,0} convert(%param_0.1), metadata={op_name="jit(f)/conv_general_dilated"}
  %param_1.2 = bf16[3,3,8,8]{3,2,1,0} parameter(1)
  %convert.3 = f32[3,3,8,8]{3,2,1,0} convert(%param_1.2)
  ROOT %convolution.4 = f32[2,4,4,8]{3,2,1,0} convolution(%convert.2, %convert.3), window={size=3x3}
}

ENTRY %main (x.1: bf16[2,4,4,8]) -> f32[2,10] {
  %x.1 = bf16[2,4,4,8]{3,2,1,0} parameter(0), metadata={op_name="x"}
  %w.2 = bf16[3,3,8,8]{3,2,1,0:T(8,128)(2,1)} constant({...})
  %conv.5 = bf16[2,4,4,8]{3,2,1,0:T(8,128)(2,1)} convolution(%x.1, %w.2), dim_labels=b01f_01io->b01f
  %fusion.6 = f32[2,4,4,8]{3,2,1,0} fusion(%x.1, %w.2), calls=%fused_computation, metadata={op_name="dot(x)"}
  %bitcast.7 = f32[2,128]{1,0} bitcast(%fusion.6)
  %w.8 = bf16[128,10]{1,0} constant({...})
  ROOT %dot.9 = f32[2,10]{1,0} dot(%bitcast.7, %w.8), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""


def test_counts_convolutions_and_dots_by_operand_type_in_hand_written_hlo():
  types = precision.compute_types(_HLO)
  # The fused convolution multiplies the float32 converts, the entry one bfloat16 (through a tiled layout), the dot
  # mixes the two; neither the fusion whose metadata mentions the opcodes nor the converts count.
  assert types == {"convolution": {"bf16": 1, "f32": 1}, "dot": {"bf16,f32": 1}}
  assert precision.describe(types) == "convolutions: 1 bf16, 1 f32; dots: 1 bf16,f32"
  assert precision.describe(precision.compute_types("HloModule empty")) == "no convolutions or dots"


_GPU_HLO = """\
ENTRY %main (p0: bf16[8,32,32,3], p1: bf16[3,3,3,16], p2: bf16[16,10]) -> bf16[8,10] {
  %p0 = bf16[8,32,32,3]{3,2,1,0} parameter(0)
  %p1 = bf16[3,3,3,16]{3,2,1,0} parameter(1)
  %cudnn-conv.1 = (bf16[8,32,32,16]{3,2,1,0}, u8[0]{0}) custom-call(%p0, %p1), window={size=3x3 pad=1_1x1_1}, \
dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convForward"
  %get-tuple-element.2 = bf16[8,32,32,16]{3,2,1,0} get-tuple-element(%cudnn-conv.1), index=0
  %bitcast.3 = bf16[8,16384]{1,0} bitcast(%get-tuple-element.2)
  %p2 = bf16[16,10]{1,0} parameter(2)
  %custom-call.4 = (f32[8,10]{1,0}, s8[4]{0}) custom-call(%bitcast.3, %p2), custom_call_target="__cublas$gemm"
  %sharding.5 = bf16[8,10]{1,0} custom-call(%p2), custom_call_target="Sharding"
  ROOT %convert.6 = bf16[8,10]{1,0} convert(%get-tuple-element.7)
}
"""


def test_counts_library_calls_that_are_convolutions_or_gemms():
  # cuDNN and cuBLAS calls return a tuple (result, scratch); other custom calls are neither.
  assert precision.compute_types(_GPU_HLO) == {"convolution": {"bf16": 1}, "dot": {"bf16": 1}}


def test_an_operand_defined_outside_the_text_counts_as_unknown():
  line = "  %dot.1 = f32[2,2]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}"
  assert precision.compute_types(line) == {"convolution": {}, "dot": {"?": 1}}


def _conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_counts_every_convolution_and_dot_of_a_compiled_program():
  def net(x, w1, w2, head):
    h = jax.nn.relu(_conv(x, w1))
    h = jax.nn.relu(_conv(h, w2)) + h
    return h.reshape(h.shape[0], -1) @ head

  shapes = [(2, 6, 6, 8), (3, 3, 8, 8), (3, 3, 8, 8), (6 * 6 * 8, 5)]
  for dtype in (jnp.float32, jnp.bfloat16):
    args = [jnp.ones(s, dtype) for s in shapes]
    types = precision.compute_types(jax.jit(net).lower(*args).compile().as_text())
    assert sum(types["convolution"].values()) == 2 and sum(types["dot"].values()) == 1, types
    if dtype == jnp.float32:
      assert types == {"convolution": {"f32": 2}, "dot": {"f32": 1}}
    else:  # XLA decides whether bfloat16 survives (CPU converts convolutions to float32), but nothing else appears
      assert set(types["convolution"]) | set(types["dot"]) <= {"bf16", "f32", "bf16,f32"}, types
