"""What the generation engine changes in a model while it lives, and the one undo (ModelPatches).

- the attention implementation: switched to the engine's (fastgen's slot attention), put back on undo;
- compile_pointwise: the norms, MLPs and rotary embedding compiled (a GPU with triton);
- fuse_projections: each attention layer's query, key and value projections run as one GEMM in decoding steps (a GPU).

    with ModelPatches(model) as patches:   # an exception inside undoes what was applied
        patches.apply(switch_attention, compile=True, fuse=True)
    ...
    patches.undo()                          # the model as it was (SlotGenerator.close)

Library internals (transformers 5.17 on the device and 5.24 in the CPU tests, torch 2.11 and 2.13):
`config._attn_implementation`, `module._compiled_call_impl` (undoing `Module.compile`), the q/k/v
projections' `forward` set on each `nn.Linear`, each modeling module's `apply_rotary_pos_emb` (module-wide: while
one engine lives, every model of that family in the process runs the compiled form, the same arithmetic).
"""

import functools
import sys

import torch

POINTWISE_MODULES = ("RMSNorm", "MLP")  # class-name endings: Llama, Qwen2, Mistral, SmolLM2 (Llama) all have them
ROPE_FUNCTION = "apply_rotary_pos_emb"  # the rotary embedding, a function of each of those models' modeling module


def compile_pointwise(model):
    """Compile the model's norms, MLPs and rotary embedding (rope_home), with dynamic shapes: each compiles once and
    serves every layer, every slot bucket and every prefill. A decoding step is ~45 small kernels a layer when eager
    (RMSNorm alone is seven, the rotary embedding ten), which the CUDA graph replays but still runs one by one;
    compiled, a norm, the SiLU gate or the rotary embedding is one or two fused kernels: the 8B model's step is 568
    kernels instead of 1,072, 22.3 ms instead of 23.7 at 512 rows (bench/results/step-profile-h200-fused.json). Attention,
    with the cache's Python-side bookkeeping, stays eager. True where anything was compiled (nothing without
    `torch.compile` support, e.g. no triton)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:  # inductor's GPU backend
        return False
    compiled = 0
    for module in model.modules():
        if type(module).__name__.endswith(POINTWISE_MODULES) and not hasattr(module, "sit_compiled"):
            module.compile(dynamic=True)
            module.sit_compiled = True
            compiled += 1
        home = rope_home(module)
        rope = getattr(home, ROPE_FUNCTION, None)
        if home is not None and not hasattr(rope, "sit_original"):
            fast = torch.compile(rope, dynamic=True)
            fast.sit_original = rope
            setattr(home, ROPE_FUNCTION, fast)
            compiled += 1
    return compiled > 0


PROJECTIONS = ("q_proj", "k_proj", "v_proj")  # an attention module's input projections, called in this order


def fuse_projections(model):
    """Run each attention layer's query, key and value projections as one GEMM: their weights (and biases) become
    slices of one tensor (no extra memory) and q_proj computes all three, which k_proj and v_proj then hand back. At
    512 rows of the 8B model the key and value GEMMs (1,024 outputs each) leave most of an H200 idle: the three
    take 1.50 ms a step over 32 layers, one takes 1.18; the decoding step at 8-256 rows takes 0.33-0.40 ms less
    (bench/results/prefill-profile-h200.json); at 512 rows it is a wash. Decoding only (one token a row): a
    prefill's GEMMs gain nothing from it and its rotary embedding ran slower on the slices (9.4 against 7.1 ms a
    prefill of 3,536 tokens, bench/results/prefill-explore-h200.json). Only plain `nn.Linear` projections of one
    dtype (not 4-bit or LoRA layers). How many attention layers were fused."""
    fused = 0
    for module in model.modules():
        layers = [getattr(module, name, None) for name in PROJECTIONS]
        if (hasattr(module, "sit_fused") or not all(type(layer) is torch.nn.Linear for layer in layers)
                or any("forward" in vars(layer) for layer in layers)  # hooked already (accelerate): left alone
                or len({layer.weight.dtype for layer in layers}) > 1
                or len({layer.bias is None for layer in layers}) > 1):
            continue
        sizes = [layer.out_features for layer in layers]
        weight = torch.cat([layer.weight.data for layer in layers])
        bias = None if layers[0].bias is None else torch.cat([layer.bias.data for layer in layers])
        for layer, w, b in zip(layers, weight.split(sizes), bias.split(sizes) if bias is not None else [None] * 3):
            layer.weight.data = w  # the separate tensors are freed: each layer's weights are now a slice of one
            if b is not None:
                layer.bias.data = b
        held = {}  # what q_proj computed for the others, and from which input

        def project(x, weight=weight, bias=bias, sizes=sizes, held=held, own=layers[0]):
            if x.dim() != 3 or x.shape[1] != 1:  # not a decoding step: k_proj and v_proj run their own GEMMs
                return torch.nn.functional.linear(x, own.weight, own.bias)
            query, held[1], held[2] = torch.nn.functional.linear(x, weight, bias).split(sizes, dim=-1)
            held["input"] = x
            return query

        def reuse(x, k, layer, held=held):
            # a model that calls them in another order or on other inputs gets each layer's own GEMM
            out = held.get(k) if held.get("input") is x else None
            if k == 2:  # the last of the three: nothing outlives the layer's call
                held.clear()
            return out if out is not None else torch.nn.functional.linear(x, layer.weight, layer.bias)

        layers[0].forward = project
        layers[1].forward = functools.partial(reuse, k=1, layer=layers[1])
        layers[2].forward = functools.partial(reuse, k=2, layer=layers[2])
        module.sit_fused = True
        fused += 1
    return fused


def unfuse_projections(model):
    """Undo fuse_projections: separate weights again (a copy each, so that nothing shares memory, e.g. for
    save_pretrained) and the projections' own forward."""
    for module in model.modules():
        if not hasattr(module, "sit_fused"):
            continue
        for name in PROJECTIONS:
            layer = getattr(module, name)
            del layer.forward
            layer.weight.data = layer.weight.data.clone()
            if layer.bias is not None:
                layer.bias.data = layer.bias.data.clone()
        del module.sit_fused


def rope_home(module):
    """The modeling module whose `apply_rotary_pos_emb` an attention module calls (by its global name), or None. The
    swap is module-wide: while one generator lives, every model of that family in the process runs the compiled
    form (the same arithmetic)."""
    if not type(module).__name__.endswith("Attention"):
        return None
    home = sys.modules.get(type(module).__module__)
    return home if callable(getattr(home, ROPE_FUNCTION, None)) else None


def uncompile_pointwise(model):
    """Undo compile_pointwise: the modules and the rotary embedding run eagerly again."""
    for module in model.modules():
        if hasattr(module, "sit_compiled"):
            module._compiled_call_impl = None
            del module.sit_compiled
        home = rope_home(module)
        rope = getattr(home, ROPE_FUNCTION, None)
        if hasattr(rope, "sit_original"):
            setattr(home, ROPE_FUNCTION, rope.sit_original)


class ModelPatches:
    """The engine's changes to one model: `apply` them, `undo` them all (also when an exception leaves the `with`
    block). `compiled` and `fused` say what applied; `uncompile`/`recompile` toggle the compiled modules alone (the
    engine's check runs again without them where it fails with them)."""

    def __init__(self, model):
        self.model = model
        self.attention_before = model.config._attn_implementation
        self.compiled = self.fused = False

    def apply(self, switch_attention, compile=False, fuse=False):
        switch_attention(self.model)
        self.compiled = compile and compile_pointwise(self.model)
        self.fused = fuse and fuse_projections(self.model) > 0
        return self

    def uncompile(self):
        uncompile_pointwise(self.model)
        self.compiled = False

    def recompile(self):
        self.compiled = compile_pointwise(self.model)

    def undo(self):
        if self.model.config._attn_implementation != self.attention_before:
            self.model.set_attn_implementation(self.attention_before)
        self.uncompile()
        unfuse_projections(self.model)
        self.fused = False

    def __enter__(self):
        return self

    def __exit__(self, kind, *rest):
        if kind is not None:
            self.undo()
        return False
