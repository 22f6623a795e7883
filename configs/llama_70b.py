"""Llama-2-70B shape (d=8192, 80 layers, 64 query heads, 8 kv heads (GQA), d_ff 28672) with 4 MTP
transformer-layer heads, parameter-matched (77 trunk layers + 4 heads).
Untied embeddings, vocab 32000 (Llama-2), bf16 compute / fp32 params, remat 'full', scanned layers,
memory-flat 'scan' loss with 1024-token chunks; global batch 1024 x 4096 tokens (4M, Llama-2's),
16 micro-batches of 64 sequences. Too big to train on a CPU: plan it (docs/scaling.md).

Run:     mtp plan --config configs/llama_70b.py --mesh data=1,fsdp=64,tensor=2 --devices 128 --hbm-gib 95
Expect:  69.83B parameters; per device (TPU v5p-128): params 2.04 GiB, opt_state 4.07, grads 2.04,
         activations 17.60 (analytic), total 25.75; AOT-compiled step 30.97 GiB; fits in 95 GiB.
         One 8xH100 node does not fit (159.6 GiB analytic, 191.8 GiB AOT per GPU); 32 H100s
         (--mesh data=1,fsdp=32,tensor=1 --config.train.grad_accum=32) need 69.65 GiB: fits in 80.
"""

from mtp.configs.llama_base import llama_config


def get_config():
    return llama_config("llama_70b", d_model=8192, n_layers=80, n_heads=64,
                        n_kv_heads=8, d_ff=28672)
