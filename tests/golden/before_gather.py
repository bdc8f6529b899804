# ruff: noqa
# Golden TensorIR, case 'before_gather': schedule 'before', kernel 'gather'
# shapes: KernelShapes(d_in=64, d_out=32, tables=8, bits=4, block_size=32, repeats=1, table_dtype='float32')
# target: llvm -mtriple=x86_64-linux-gnu -mcpu=znver3 -num-cores=2 (numerics only)
# Written by tests/test_schedule_golden.py; do not edit. Regenerate only for an
# intended change, then review the diff: LOOKUPC_REGEN_GOLDEN=1 python -m pytest tests/test_schedule_golden.py
# from tvm.script import ir as I
# from tvm.script import tirx as T
# from tvm.tirx.layout import Axis

@I.ir_module
class Module:
    @T.prim_func(s_tir=True)
    def main(codes: T.Buffer(("n", 8), "int32"), scores: T.Buffer((n, 8), "float32"), tables: T.Buffer((8, 16, 32), "float32"), bias: T.Buffer((32,), "float32"), y: T.Buffer((n, 32), "float32")):
        n = T.int32()
        T.func_attr({"global_symbol": "gather", "tirx.noalias": True})
        # with T.sblock("root"):
        for i, c, k in T.grid(n, 32, 8):
            with T.sblock("gather"):
                vi, vc, vk = T.axis.remap("SSR", [i, c, k])
                T.reads(bias[vc], scores[vi, vk], tables[vk, 0:16, vc], codes[vi, vk])
                T.writes(y[vi, vc])
                with T.init():
                    y[vi, vc] = bias[vc]
                y[vi, vc] = y[vi, vc] + scores[vi, vk] * tables[vk, codes[vi, vk] & 15, vc]