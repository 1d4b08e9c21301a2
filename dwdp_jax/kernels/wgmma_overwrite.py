"""wgmma accumulators that their first wgmma overwrites, for Mosaic GPU kernels whose accumulators are fresh partials.

Mosaic GPU allocates every wgmma accumulator zero-filled and issues every wgmma with PTX's scale-d predicate on
(`use_out = 1` in `jax.experimental.mosaic.gpu.wgmma.wgmma_m64`, jax 0.10.2 to 0.11.2), so a kernel that takes a
fresh fp32 partial per 128-wide K block (the block-scaled FP8 GEMMs' promotion) pays a compute thread one register
move per accumulator register and K block, beside the promotion's one FFMA. DeepGEMM issues the first wgmma of a K
block with scale-d off: the tensor cores overwrite the accumulator, and nothing fills it.

In a kernel named by `kernel_name(..., True)`, an accumulator whose zero fill feeds exactly one wgmma (a `plgpu.ACC`
taking one `plgpu.wgmma` before it is read: the same product either way) is allocated undefined instead, and the
first wgmma instruction into each of its 64-row blocks (Mosaic GPU issues a 128-wide K block of e4m3 as four k32
instructions per 64 rows) is issued with scale-d off and no accumulator inputs. This happens in Mosaic GPU's dialect
lowering (warpgroup semantics), through two hooks installed when this module is imported: the optimization barrier's
rule (Pallas fences a fresh accumulator's fill with one) and `wgmma_m64`. Every other kernel lowers unchanged: the
barrier rule acts only inside a named kernel, and `wgmma_m64` only on accumulators that rule left undefined.
"""
import sys

from jax._src.lib import mosaic_gpu_dialect as mgpu_dialect
from jax.experimental.mosaic.gpu import dialect_lowering, fragmented_array as fa, inference_utils
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import llvm

_WGMMA = sys.modules["jax.experimental.mosaic.gpu.wgmma"]
MARK = "overwrite_partials"
WGMMA_PTX = "wgmma.mma_async"
_VIEWS = ("vector.extract_strided_slice", "vector.extract", "vector.bitcast", "vector.shape_cast",
          "builtin.unrealized_conversion_cast")


def kernel_name(base: str, overwrite: bool) -> str:
    """The pallas_call name that turns the overwrite on for a kernel (or leaves `base` as it is)."""
    return f"{base}_{MARK}" if overwrite else base


def _in_marked_kernel(op) -> bool:
    while op is not None and op.name != "func.func":
        op = op.parent
    return op is not None and ir.StringAttr(op.attributes["sym_name"]).value.endswith(f"{MARK}_mosaic_gpu")


def _defining_op(value):
    """The op whose result `value` is, or None for a block argument (a loop-carried accumulator)."""
    return None if isinstance(value.owner, ir.Block) else value.owner


def _constant_zero(value) -> bool:
    while (owner := _defining_op(value)) is not None and owner.name in (
            "vector.broadcast", "vector.splat", "builtin.unrealized_conversion_cast"):
        value = owner.operands[0]
    if owner is None or owner.name not in ("arith.constant", "llvm.mlir.constant"):
        return False
    attr = owner.attributes["value"]
    if isinstance(attr, ir.DenseElementsAttr):
        return attr.is_splat and _constant_zero_attr(attr.get_splat_value())
    return _constant_zero_attr(attr)


def _constant_zero_attr(attr) -> bool:
    if isinstance(attr, ir.FloatAttr):
        return ir.FloatAttr(attr).value == 0.0
    return isinstance(attr, ir.IntegerAttr) and ir.IntegerAttr(attr).value == 0


def _undefined(value) -> bool:
    while (owner := _defining_op(value)) is not None and owner.name in _VIEWS:
        value = owner.operands[0]
    return owner is not None and owner.name == "llvm.mlir.undef"


def _fills_one_fresh_accumulator(op) -> bool:
    """A barrier over one zero-filled array whose only use is as one wgmma's accumulator."""
    if len(op.operands) != 1 or len(op.results) != 1 or not isinstance(op.operands[0].type, ir.VectorType):
        return False
    uses = list(op.results[0].uses)
    return (len(uses) == 1 and uses[0].owner.name == mgpu_dialect.WGMMAOp.OPERATION_NAME
            and uses[0].operand_number == 0)


_BARRIER = mgpu_dialect.OptimizationBarrierOp.OPERATION_NAME
_barrier_rule = dialect_lowering._lowerings[_BARRIER]


def _barrier_or_undefined(ctx, op):
    if not (_in_marked_kernel(op) and _fills_one_fresh_accumulator(op)):
        return _barrier_rule(ctx, op)
    zeros = dialect_lowering._fragmented_array_from_ir(op.operands[0], inference_utils.in_layouts(op)[0])
    if not all(_constant_zero(r) for r in zeros.registers.flat):
        return _barrier_rule(ctx, op)
    registers = zeros.registers.copy()
    for i, r in enumerate(zeros.registers.flat):
        registers.flat[i] = llvm.mlir_undef(r.type)
    undef = fa.FragmentedArray(_registers=registers, _layout=zeros.layout, _is_signed=zeros.is_signed)
    return [dialect_lowering.fragmented_array_to_ir(undef, op.results[0].type)]


class _FirstWgmmaOverwrites:
    """The llvm dialect as `wgmma_m64` sees it while it issues into an undefined accumulator: its first wgmma
    instruction goes out with scale-d off and undefined accumulator inputs; everything else passes through."""

    def __init__(self):
        self.pending = True

    def __getattr__(self, name):
        return getattr(llvm, name)

    def inline_asm(self, result_type, operands, asm_string, constraints, **kwargs):
        if self.pending and WGMMA_PTX in asm_string:
            self.pending = False
            cs = constraints.split(",")
            outputs = sum(c.startswith("=") for c in cs)
            operands = list(operands)
            i32 = ir.IntegerType.get_signless(32)
            # the first literal operand is scale-d's predicate source (`setp.ne.b32 p, $use_out, 0`)
            operands[cs.index("n") - outputs] = llvm.ConstantOp(i32, ir.IntegerAttr.get(i32, 0)).result
            for i, c in enumerate(cs[outputs:]):
                if c.isdigit():  # an accumulator input, tied to its output
                    operands[i] = llvm.mlir_undef(operands[i].type)
        return llvm.inline_asm(result_type, operands, asm_string, constraints, **kwargs)


_wgmma_m64 = _WGMMA.wgmma_m64


def _wgmma_m64_overwriting_undefined(acc, *args, **kwargs):
    undefined = [_undefined(r) for r in acc.flat]
    if not any(undefined):
        return _wgmma_m64(acc, *args, **kwargs)
    if not all(undefined):
        raise NotImplementedError("wgmma_overwrite: a wgmma into a partly undefined 64-row accumulator block")
    _WGMMA.llvm = _FirstWgmmaOverwrites()
    try:
        return _wgmma_m64(acc, *args, **kwargs)
    finally:
        _WGMMA.llvm = llvm


dialect_lowering._lowerings[_BARRIER] = _barrier_or_undefined
_WGMMA.wgmma_m64 = _wgmma_m64_overwriting_undefined
