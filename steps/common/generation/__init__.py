"""The generation engine and what it is told: sampling settings, chat templates, generator recipes, the engines
(transformers' fast path with its paged KV cache and Triton kernel, plain `generate`, vLLM), the reward models.
The training side never imports this package.

- sampling.py       `Sampling` (every setting, explicit), the loop rule, logits processors; light to import
- chat.py           chat templates: Magpie's pre-query template, turn boundaries, templates for base models
- recipes.py        generator recipes (env/generators/*.yaml): how Magpie samples each model family
- sanitize.py       Magpie's instruction sanitizing for Llama-3.x
- engines.py        the engines behind one call, `engine.sample(prompts, sampling, seed)`
- fastgen.py        the fast path: continuous batching over a paged KV cache, CUDA graphs, 4-bit models too
- pages.py          the KV cache's page table: which slot holds which pages, the free list, both layouts
- transfers.py      host <-> GPU copies that do not wait for the GPU's queued work
- patching.py       what the fast path changes in a model while it lives (compiled norms/MLPs, fused q/k/v,
                    its attention), undone once (ModelPatches)
- decode_kernel.py  the Triton decoding attention over the paged cache
- eval_engine.py    lm-eval's HFLM with its generative requests answered by the fast path, its log-likelihood ones
                    by loglik.py
- loglik.py         the packed log-likelihood scorer: a context once beside its continuations (tree mask)
- reward.py         reward models behind one call: a classifier (DeBERTa) or an embedding similarity
"""
