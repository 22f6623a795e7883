"""Code-Llama-34B shape (d=8192, 48 layers, 64 query heads, 8 kv heads (GQA), d_ff 22016) with 4 MTP
transformer-layer heads, parameter-matched (45 trunk layers + 4 heads).
Untied embeddings, vocab 32000 (Llama-2), bf16 compute / fp32 params, remat 'full', scanned layers,
memory-flat 'scan' loss with 1024-token chunks; global batch 1024 x 4096 tokens (4M, Llama-2's),
16 micro-batches of 64 sequences. Too big to train on a CPU: plan it (docs/scaling.md).

Run:     mtp plan --config configs/llama_34b.py --mesh data=1,fsdp=64,tensor=2 --devices 128 --hbm-gib 95
Expect:  34.44B parameters; per device (TPU v5p-128): params 1.01 GiB, opt_state 2.01, grads 1.01,
         activations 14.76 (analytic), total 18.78; AOT-compiled step 21.20 GiB; fits in 95 GiB.
"""

from mtp.configs.llama_base import llama_config


def get_config():
    return llama_config("llama_34b", d_model=8192, n_layers=48, n_heads=64,
                        n_kv_heads=8, d_ff=22016)
