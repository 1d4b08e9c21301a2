"""`wgmma_overwrite` in the FP8 kernel's lowered Mosaic GPU module (lowered for CUDA on CPU, the serialized module
read back): with `Fp8Blocks.overwrite_partials`, the first wgmma instruction into each 64-row block of a fresh
partial has scale-d off and undefined accumulator inputs, the rest accumulate, and no barrier holds a zero fill;
without it (lowered after, in the same process) every instruction accumulates onto the zero fill as before. The
compiled products are checked on GPU (`test_split_gemm_fp8_mgpu`'s compiled test runs these options)."""
import dataclasses

import jax
import jax.numpy as jnp
import pytest
from jax._src.interpreters import mlir as jax_mlir
from jax.experimental.mosaic.gpu import dialect as mgpu_dialect
from jaxlib.mlir import ir

from dwdp_jax.kernels import fp8
from dwdp_jax.kernels.split_gemm_fp8_mgpu import (DEFAULT_FP8_BLOCKS, ONE_PARTIAL_FP8_BLOCKS, WG_COLS_FP8_BLOCKS,
                                                  split_ragged_dot_fp8_mgpu)
from dwdp_jax.kernels.wgmma_overwrite import WGMMA_PTX


def _ops(op):
    for region in op.regions:
        for block in region.blocks:
            for o in block.operations:
                yield o
                yield from _ops(o)


def _root(value):
    """The op a register value is a view or a broadcast of."""
    while any(value.owner.name.endswith(v) for v in ("extract", "extractelement", "extract_strided_slice", "bitcast",
                                                      "broadcast", "splat", "unrealized_conversion_cast")):
        value = value.owner.operands[0]
    return value.owner


def _kernel_asm(blocks, fused: bool) -> tuple[list, int]:
    """The kernel's wgmma instructions as (scale-d's literal, the defining op of its first accumulator input), and
    its optimization barriers (empty inline asm) over constant registers."""
    x_q, x_scale = fp8.quantize_rows(jnp.ones((256, 256), jnp.float32))
    w = fp8.quantize_weights_kn(jnp.ones((2, 256, 256), jnp.float32))
    f = jax.jit(lambda x, s, gs, w: split_ragged_dot_fp8_mgpu(x, gs, (w,), x_scale_SM=s, blocks=blocks,
                                                               fused=fused))
    lowered = f.trace(x_q, x_scale, jnp.asarray([128, 128], jnp.int32), (w, w) if fused else w).lower(
        lowering_platforms=("cuda",)).compiler_ir()
    [call] = [o for o in _ops(lowered.operation) if o.name == "stablehlo.custom_call"
              and "mosaic_gpu" in ir.StringAttr(o.attributes["call_target_name"]).value]
    serialized = ir.StringAttr(call.attributes["mhlo.backend_config"]["module"]).value_bytes
    ctx = jax_mlir.make_ir_context()
    mgpu_dialect.register_dialect(ctx)
    ctx.allow_unregistered_dialects = True  # the serialized module's dialects carry a stable prefix
    with ctx:
        module = ir.Module.parse(bytes(serialized))
        wgmmas, zero_barriers = [], 0
        for o in _ops(module.operation):
            if not o.name.endswith("llvm.inline_asm"):
                continue
            asm = ir.StringAttr(o.attributes["asm_string"]).value
            cs = ir.StringAttr(o.attributes["constraints"]).value.split(",")
            outputs = sum(c.startswith("=") for c in cs)
            operands = list(o.operands)
            if WGMMA_PTX in asm:
                literal = operands[cs.index("n") - outputs].owner
                wgmmas.append((ir.IntegerAttr(literal.attributes["value"]).value, operands[0].owner.name))
            elif asm == "" and operands and all(_root(v).name.endswith("constant") for v in operands):
                zero_barriers += 1
        return wgmmas, zero_barriers


@pytest.mark.parametrize("blocks, fused", [
    (DEFAULT_FP8_BLOCKS, False), (WG_COLS_FP8_BLOCKS, False), (ONE_PARTIAL_FP8_BLOCKS, True),
    (dataclasses.replace(ONE_PARTIAL_FP8_BLOCKS, x_in_registers=True), True)])
def test_each_partials_first_wgmma_overwrites_it_and_nothing_fills_it(blocks, fused):
    blocks = dataclasses.replace(blocks, max_concurrent_steps=2)  # K = 256: two K blocks
    on, on_barriers = _kernel_asm(dataclasses.replace(blocks, overwrite_partials=True), fused)
    off, off_barriers = _kernel_asm(blocks, fused)
    assert len(on) == len(off) and len(on) % 4 == 0 and on
    # Mosaic GPU issues a 128-wide e4m3 K block as four k32 instructions per 64-row block
    for i, (use_out, acc_from) in enumerate(on):
        if i % 4 == 0:
            assert use_out == 0 and acc_from.endswith("llvm.mlir.undef"), (i, use_out, acc_from)
        else:
            assert use_out == 1 and acc_from.endswith("llvm.extractvalue"), (i, use_out, acc_from)
    assert all(use_out == 1 for use_out, _ in off)
    assert off_barriers >= len(off) // 4 and on_barriers == 0
