"""Code-Llama-34B shape (d=8192, 48 layers, 64 query heads, 8 kv heads (GQA), d_ff 22016) with 4 MTP
transformer-layer heads, parameter-matched (45 trunk layers + 4 heads).
Untied embeddings, vocab 32000 (Llama-2), bf16 compute / fp32 params, remat 'full', scanned layers,
memory-flat 'scan' loss with 1024-token chunks; global batch 1024 x 4096 tokens (4M, Llama-2's),
16 micro-batches of 64 sequences. Too big to train on a CPU: plan it (docs/scaling.md).

Run:     mtp plan --config configs/llama_34b.py --mesh data=1,fsdp=64,tensor=2 --devices 128 --hbm-gib 95
Expect:  34.44B parameters; per device (TPU v5p-128): params 1.01 GiB, opt_state 2.01, grads 1.01,
         activations 14.76 (analytic), total 18.78; AOT-compiled step 21.20 GiB; fits in 95 GiB.
"""

from mtp.config import base_config


def get_config():
    c = base_config()
    c.name = "llama_34b"
    c.model.vocab_size = c.data.vocab_size = 32000  # Llama-2 tokenizer size
    c.model.d_model = 8192
    c.model.n_layers = 48  # parameter-matched: 45 trunk layers + 4 transformer-layer heads
    c.model.n_heads = 64
    c.model.n_kv_heads = 8
    c.model.d_ff = 22016
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
