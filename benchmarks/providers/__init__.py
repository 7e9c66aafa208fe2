"""Benchmark providers, one module each, all built from the same random parameters (`params`):

    base            the frozen projection alone: the floor (cuBLAS on GPU)
    naive_medcare   the original implementation's computation (fp32 experts on every token, stack/gather/
                    einsum; the orthogonality loss as a per-pair loop over name-matched parameters)
    naive_peft      what a careful user writes with PEFT (PEFT LoRA; routed experts in a loop with per-expert
                    token gather and index_add; two active PEFT adapters plus an O-LoRA-style penalty loop)
    medcare         medcare_kernels / medcare on each backend that is built and runs on the device
"""
