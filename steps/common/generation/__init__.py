"""The generation engine and what it is told: sampling settings, chat templates, generator recipes, the engines
(transformers' fast path with its paged KV cache and Triton kernel, plain `generate`, vLLM), the reward models.
The training side never imports this package.

- sampling.py       `Sampling` (every setting, explicit), the loop rule, logits processors; light to import
- chat.py           chat templates: Magpie's pre-query template, turn boundaries, templates for base models
- recipes.py        generator recipes (env/generators/*.yaml): how Magpie samples each model family
- sanitize.py       Magpie's instruction sanitizing for Llama-3.x
- engines.py        the engines behind one call, `engine.sample(prompts, sampling, seed)`
- fastgen.py        the fast path: SlotGenerator.generate (admit -> run -> collect) and make_generator; its parts
                    (docs/engine.md):
  - scheduler.py    which request decodes in which slot: admission, preemption, compaction (no model)
  - pages.py        the KV cache's page table: which slot holds which pages, the free list, both layouts
  - slots.py        a request's state (Request) and the decoding rows' state on the device (SlotState)
  - runner.py       the model: cache sized from memory, packed prefill, the decoding step and its CUDA graphs, the check
  - cache.py        the KV cache object the model's forward writes (pages of keys and values, the block table)
  - attention.py    the attention the runner's forward calls, told whether it prefills or decodes
  - sampler.py      the next token: transformers' logits processors, greedy or nucleus sampling
  - patching.py     what the runner changes in a model while it lives (compiled norms/MLPs, fused q/k/v, its
                    attention), undone once (ModelPatches)
  - transfers.py    host <-> GPU copies that do not wait for the GPU's queued work
  - stats.py        what a run did (steps per slot bucket, prefills, preemptions), prefill timing for benches
- decode_kernel.py  the Triton decoding attention over the paged cache
- eval_engine.py    lm-eval's HFLM with its generative requests answered by the fast path, its log-likelihood ones
                    by loglik.py
- loglik.py         the packed log-likelihood scorer: a context once beside its continuations (tree mask)
- reward.py         reward models behind one call: a classifier (DeBERTa) or an embedding similarity
"""
