"""Code in the form inductor writes it for a GPU (a graph's wrapper: ``async_compile.triton``
kernels and the ``call`` that launches them), for the tests of what reads it
(``benchmarks/head_kernels.py``, ``benchmarks/gpu_check.py``)."""

#: two kernels in the form inductor writes them (``async_compile.triton`` in a graph's wrapper
#: code): a reduction over rows of 100 bf16 logits in two loops, and an element-wise kernel
TRITON_GRAPH = """
triton_red_fused_0 = async_compile.triton('triton_red_fused_0', '''
@triton_heuristics.reduction(
    triton_meta={'signature': {'in_ptr0': '*bf16', 'in_ptr1': '*i64', 'out_ptr0': '*fp32', 'out_ptr1': '*fp32', 'xnumel': 'i32', 'r0_numel': 'i32', 'XBLOCK': 'constexpr', 'R0_BLOCK': 'constexpr'}, 'device': DeviceProperties(type='cpu')},
)
@triton.jit
def triton_red_fused_0(in_ptr0, in_ptr1, out_ptr0, out_ptr1, xnumel, r0_numel, XBLOCK : tl.constexpr, R0_BLOCK : tl.constexpr):
    xnumel = 4
    r0_numel = 100
    xindex = xoffset + tl.arange(0, XBLOCK)[:, None]
    x0 = xindex
    tmp0 = tl.load(in_ptr1 + (x0), xmask, eviction_policy='evict_last')
    for r0_offset in tl.range(0, r0_numel, R0_BLOCK):
        r0_index = r0_offset + r0_base
        r0_1 = r0_index
        tmp1 = tl.load(in_ptr0 + (r0_1 + 100*x0), r0_mask & xmask, other=0.0).to(tl.float32)
    tmp2 = tl.sum(_tmp2, 1)[:, None]
    for r0_offset in tl.range(0, r0_numel, R0_BLOCK):
        r0_index = r0_offset + r0_base
        r0_1 = r0_index
        tmp3 = tl.load(in_ptr0 + (r0_1 + 100*x0), r0_mask & xmask, other=0.0).to(tl.float32)
        tmp4 = tl.load(in_ptr0 + (tmp0 + 100*x0), r0_mask & xmask).to(tl.float32)
        tl.store(out_ptr0 + (r0_1 + 100*x0), tmp5, r0_mask & xmask)
    tl.store(out_ptr1 + (x0), tmp2, xmask)
''', device_str='cpu')

triton_poi_fused_1 = async_compile.triton('triton_poi_fused_1', '''
@triton_heuristics.pointwise(
    triton_meta={'signature': {'in_ptr0': '*fp32', 'in_ptr1': '*fp32', 'out_ptr0': '*bf16', 'xnumel': 'i32', 'XBLOCK': 'constexpr'}, 'device': DeviceProperties(type='cpu')},
)
@triton.jit
def triton_poi_fused_1(in_ptr0, in_ptr1, out_ptr0, xnumel, XBLOCK : tl.constexpr):
    xnumel = 400
    xindex = xoffset + tl.arange(0, XBLOCK)[:]
    x2 = xindex
    x1 = xindex // 100
    x0 = (xindex % 100)
    tmp0 = tl.load(in_ptr0 + (x2), xmask)
    tmp1 = tl.load(in_ptr1 + (x1), xmask, eviction_policy='evict_last')
    tmp2 = tl.load(in_ptr1 + (x0), xmask, eviction_policy='evict_last')
    tl.store(out_ptr0 + (x2), tmp3, xmask)
''', device_str='cpu')

class Runner:
    def call(self, args):
        triton_red_fused_0.run(arg0_1, arg1_1, buf0, buf1, 4, 100, stream=raw_stream0)
        buf2 = torch.ops.aten.topk.default(buf1, 2, -1, True, True)
        triton_poi_fused_1.run(buf0, buf1, buf3, 400, stream=raw_stream0)
        aten.scatter_reduce_.two(buf3, -1, buf4, buf5, reduce='sum', include_self=True)
"""


#: ``TRITON_GRAPH`` as inductor writes it for a dynamic row count (the fused head's chunk
#: function once it runs chunks of two lengths): no row count written in the kernels, the
#: launches pass it (``s10``, ``100*s10``), and a split sum over the rows whose part length
#: (``ks0``) and loop length the ``call`` computes from it
TRITON_GRAPH_DYNAMIC = (
    TRITON_GRAPH
    .replace("    xnumel = 4\n", "").replace("    xnumel = 400\n", "")
    .replace("buf0, buf1, 4, 100,", "buf0, buf1, s10, 100,")
    .replace("buf3, 400,", "buf3, 100*s10,")
    .replace("class Runner:\n    def call(self, args):\n", '''triton_red_fused_sum_2 = async_compile.triton('triton_red_fused_sum_2', \'\'\'
@triton_heuristics.reduction(
    triton_meta={'signature': {'in_ptr0': '*fp32', 'out_ptr0': '*fp32', 'ks0': 'i64', 'xnumel': 'i32', 'r0_numel': 'i32', 'XBLOCK': 'constexpr', 'R0_BLOCK': 'constexpr'}, 'device': DeviceProperties(type='cpu')},
)
@triton.jit
def triton_red_fused_sum_2(in_ptr0, out_ptr0, ks0, xnumel, r0_numel, XBLOCK : tl.constexpr, R0_BLOCK : tl.constexpr):
    xnumel = 2
    xindex = xoffset + tl.arange(0, XBLOCK)[:, None]
    x0 = xindex
    for r0_offset in tl.range(0, r0_numel, R0_BLOCK):
        r0_index = r0_offset + r0_base
        r0_1 = r0_index
        tmp0 = tl.load(in_ptr0 + (r0_1 + x0*((1 + ks0) // 2)), r0_mask & xmask, other=0.0)
    tl.store(out_ptr0 + (x0), tmp1, xmask)
\'\'\', device_str='cpu')

class Runner:
    def call(self, args):
        arg0_1, arg1_1, arg2_1 = args
        s10 = arg2_1
        s13 = s10
        buf5 = empty_strided_cuda((s10, 1), (1, s10), torch.float32)
        triton_red_fused_sum_2_r0_numel = (1 + s13) // 2
''')
    + "        triton_red_fused_sum_2.run(buf1, buf6, s13, 2, triton_red_fused_sum_2_r0_numel, "
      "stream=raw_stream0)\n"
)
