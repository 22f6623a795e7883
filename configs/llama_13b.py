"""Llama-2-13B shape (d=5120, 40 layers, 40 query heads, 40 kv heads = full multi-head attention,
d_ff 13824) with 4 MTP transformer-layer heads, parameter-matched (37 trunk layers + 4 heads).
Untied embeddings, vocab 32000 (Llama-2), bf16 compute / fp32 params, remat 'full', scanned layers,
memory-flat 'scan' loss with 1024-token chunks; global batch 1024 x 4096 tokens (4M, Llama-2's),
16 micro-batches of 64 sequences. Too big to train on a CPU: plan it (docs/scaling.md).

Run:     mtp plan --config configs/llama_13b.py --mesh data=1,fsdp=64,tensor=2 --devices 128 --hbm-gib 95
Expect:  13.33B parameters; per device (TPU v5p-128): params 0.39 GiB, opt_state 0.78, grads 0.39,
         activations 8.65 (analytic), total 10.21; AOT-compiled step 10.69 GiB; fits in 95 GiB.
"""

from mtp.configs.llama_base import llama_config


def get_config():
    return llama_config("llama_13b", d_model=5120, n_layers=40, n_heads=40,
                        n_kv_heads=40, d_ff=13824)
