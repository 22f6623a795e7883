"""Shared settings of the Llama-shaped MTP configs (configs/llama_*.py): 4 transformer-layer heads,
parameter matched, untied embeddings, vocab 32000 (Llama-2), bf16 compute over fp32 parameters,
remat 'full' with scanned layers, the memory-flat 'scan' loss in 1024-token chunks, and a global
batch of 1024 x 4096 tokens (4M, Llama-2's) in 16 micro-batches. Not a runnable config itself.
"""

from mtp.config import base_config


def llama_config(name: str, *, d_model: int, n_layers: int, n_heads: int, n_kv_heads: int, d_ff: int):
    c = base_config()
    c.name = name
    c.model.vocab_size = c.data.vocab_size = 32000  # Llama-2 tokenizer size
    c.model.d_model = d_model
    c.model.n_layers = n_layers  # parameter-matched: n_layers - 3 trunk layers + 4 heads
    c.model.n_heads = n_heads
    c.model.n_kv_heads = n_kv_heads
    c.model.d_ff = d_ff
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
