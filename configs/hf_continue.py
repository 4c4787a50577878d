"""Continue a published model: SmolLM2-135M (a Llama) learns a legal domain, replaying general text.

    huggingface-cli download HuggingFaceTB/SmolLM2-135M --local-dir models/SmolLM2-135M
    clt prepare demo --tokenizer models/SmolLM2-135M --out data/smol          # general text: the replay source
    clt prepare text --domain legal --tokenizer models/SmolLM2-135M --out data/smol/legal docs/*.txt
    clt train configs/hf_continue.py --workdir runs/smol-legal
    clt hf export runs/smol-legal exports/smol-legal --dtype bfloat16

The model's shape comes from its config.json (init_from); the data must be prepared with its tokenizer.
1. legal: re-warm to 3e-4 (about a tenth of a typical pre-training peak for a model this size) and re-decay
   on the new domain, replaying 25% general text so the old abilities are not forgotten.
2. anneal: a short linear decay that upsamples the legal text in its last half.
Step 0's eval is the baseline of the stability gap on both domains.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0

    # Model: the Hugging Face folder's weights and architecture (config.json); nothing else to set
    c.model = dict(init_from="hf:models/SmolLM2-135M", remat="dots")

    # Data: prepared with the model's own tokenizer (`--tokenizer models/SmolLM2-135M`)
    c.data = dict(domains={"prose": "data/smol/prose", "code": "data/smol/code", "legal": "data/smol/legal"},
                  seq_len=512, block_rows=256, eval_sequences=32, eval_batch=8)
    c.batch_size = 16

    # Phases
    old = {"prose": 0.7, "code": 0.3}
    c.phases = (
        dict(name="legal", steps=300, mixture={"legal": 1.0}, replay=dict(share=0.25, weights=old),
             schedule=dict(preset="rewarm_cosine", warmup=30, peak=3e-4, end=3e-5)),
        dict(name="anneal", steps=60, mixture={"legal": 1.0}, replay=dict(share=0.25, weights=old),
             schedule=dict(kind="linear", peak=3e-5, end=0.0),
             upsample=dict(last=0.5, mixture={"legal": 0.8, "prose": 0.2})),
    )

    # Optimizer
    c.optim = dict(weight_decay=0.1, clip=1.0, b2=0.95)

    # Monitoring and checkpointing
    c.monitor = dict(every=50, dense_every=10, dense_window=50)
    c.checkpoint = dict(every=100, keep=2)
    c.log = dict(every=10)
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    return c
