"""TVM TensorIR lowering for CPUs: one TVMScript generator per algorithm, compiled by LLVM for the host.

- :mod:`.codegen`   line writer, the shared GEMM micro-kernel emitter
- :mod:`.intrinsics` a vectorisable ``exp2`` for the generated code
- :mod:`.window`    block-sparse softmax over the window plan (+ fused hybrid epilogues)
- :mod:`.linear`    chunked (gated) linear attention, state in / out
- :mod:`.shared_lag` combine="shared" on 1D windows: the out-of-window terms as lagged (and reversed) scans
- :mod:`.features`  hedgehog feature maps
- :mod:`.decode`    one decoding step (``TVMDecoder``)
- :mod:`.build`     compile + in-memory memo + on-disk module cache
- :mod:`.kernel`    ``TVMKernel``: configs (tuning db), plans, launches
"""
