"""Llama-style 1.1B (TinyLlama shape: d=2048, 22 layers, 32 query heads, 4 kv heads (GQA), d_ff 5632)
with 4 MTP transformer-layer heads, parameter-matched (19 trunk layers + 4 heads).
Untied embeddings, vocab 32000 (Llama-2), bf16 compute / fp32 params, remat 'full', scanned layers,
memory-flat 'scan' loss with 1024-token chunks; global batch 1024 x 4096 tokens (4M, Llama-2's),
16 micro-batches of 64 sequences. Too big to train on a CPU: plan it (docs/scaling.md).

Run:     mtp plan --config configs/llama_1b.py --mesh data=1,fsdp=8,tensor=1 --hbm-gib 80 \\
             --config.train.grad_accum=128
Expect:  1.14B parameters; per device (8xH100 node): params 0.53 GiB, opt_state 1.07, grads 0.53,
         activations 8.80 (analytic); AOT-compiled step 12.00 GiB total (temp 10.40); fits in 80 GiB.
"""

from mtp.configs.llama_base import llama_config


def get_config():
    return llama_config("llama_1b", d_model=2048, n_layers=22, n_heads=32,
                        n_kv_heads=4, d_ff=5632)
