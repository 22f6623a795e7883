"""Llama-2-7B shape (d=4096, 32 layers, 32 query heads, 32 kv heads = full multi-head attention,
d_ff 11008) with 4 MTP transformer-layer heads, parameter-matched (29 trunk layers + 4 heads).
Untied embeddings, vocab 32000 (Llama-2), bf16 compute / fp32 params, remat 'full', scanned layers,
memory-flat 'scan' loss with 1024-token chunks; global batch 1024 x 4096 tokens (4M, Llama-2's),
16 micro-batches of 64 sequences. Too big to train on a CPU: plan it (docs/scaling.md).

Run:     mtp plan --config configs/llama_7b.py --mesh data=1,fsdp=64,tensor=2 --devices 128 --hbm-gib 95
Expect:  6,940,798,976 parameters; per device (TPU v5p-128): params 0.20 GiB, opt_state 0.41, grads 0.20,
         activations 6.50 (analytic), total 7.32; AOT-compiled step 7.43 GiB (temp 6.82); fits in
         95 GiB. On one 8xH100 node: --mesh data=1,fsdp=8,tensor=1 --config.train.grad_accum=128
         -> 24.56 GiB analytic / 27.54 GiB AOT, fits in 80 GiB.
"""

from mtp.configs.llama_base import llama_config


def get_config():
    return llama_config("llama_7b", d_model=4096, n_layers=32, n_heads=32,
                        n_kv_heads=32, d_ff=11008)
