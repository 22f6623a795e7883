"""Llama-2-13B shape (d=5120, 40 layers, 40 query heads, 40 kv heads = full multi-head attention,
d_ff 13824) with 4 MTP transformer-layer heads, parameter-matched (37 trunk layers + 4 heads).
Untied embeddings, vocab 32000 (Llama-2), bf16 compute / fp32 params, remat 'full', scanned layers,
memory-flat 'scan' loss with 1024-token chunks; global batch 1024 x 4096 tokens (4M, Llama-2's),
16 micro-batches of 64 sequences. Too big to train on a CPU: plan it (docs/scaling.md).

Run:     mtp plan --config configs/llama_13b.py --mesh data=1,fsdp=64,tensor=2 --devices 128 --hbm-gib 95
Expect:  13.33B parameters; per device (TPU v5p-128): params 0.39 GiB, opt_state 0.78, grads 0.39,
         activations 8.65 (analytic), total 10.21; AOT-compiled step 10.69 GiB; fits in 95 GiB.
"""

from mtp.config import base_config


def get_config():
    c = base_config()
    c.name = "llama_13b"
    c.model.vocab_size = c.data.vocab_size = 32000  # Llama-2 tokenizer size
    c.model.d_model = 5120
    c.model.n_layers = 40  # parameter-matched: 37 trunk layers + 4 transformer-layer heads
    c.model.n_heads = 40
    c.model.n_kv_heads = 40
    c.model.d_ff = 13824
    c.model.n_future = 4
    c.model.head_type = "transformer"
    c.model.parameter_matched = True
    c.model.tie_embeddings = False  # Llama keeps separate input and output embeddings
    c.model.max_seq_len = 4096
    c.model.rope_theta = 10_000.0
    c.model.init_std = 0.02
    c.model.remat = "full"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.loss.impl = "scan"
    c.loss.chunk_size = 1024
    c.train.batch_size = 1024  # sequences: 1024 x 4096 = 4M tokens per step (Llama-2's batch)
    c.train.grad_accum = 16  # micro-batch of 64 sequences
    c.train.seq_len = 4096
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 2000
    c.optim.min_lr_ratio = 0.1
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    return c
