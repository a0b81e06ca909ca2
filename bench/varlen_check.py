"""Exactness of padding-free training attention (steps/common/training/varlen.py) on a CUDA GPU, forward and backward.

A randomly initialised model (bench/configs/llama-3.2-3b.json by default, bf16) sees 16 sequences of chain-like
lengths twice: packed into one row whose position ids restart per sequence, through torch's varlen Flash kernel,
and each sequence alone through SDPA (the reference). Compared: logits (max and mean absolute difference, against
the logits' own scale), the loss (token-mean cross-entropy, float32, over the same targets) and the gradients of
two weights that every layer's attention backward reaches (layer 0's q_proj, the last layer's o_proj). Beside it,
the same packed row through SDPA with transformers' block-diagonal mask (today's path: the size of bf16 noise
here), and a control: the packed row through the varlen kernel without boundaries (one long sequence), which must
be far off.

    python bench/varlen_check.py [--config bench/configs/llama-3.2-3b.json] [--out varlen-check.json]
"""

import argparse
import json
from pathlib import Path

import torch
from provenance import provenance

REPO = Path(__file__).resolve().parents[1]


def chain_like_lengths(n, seed=0):
    """Template + instruction 16-128 + response 32-512 tokens (the tiers' limits), as bench/training_speed.py's sft_var."""
    g = torch.Generator().manual_seed(seed)
    return [int(30 + torch.randint(16, 129, (1,), generator=g) + torch.randint(32, 513, (1,), generator=g))
            for _ in range(n)]


def check(config, dtype=torch.bfloat16, lengths=None, seed=0):
    from transformers import AutoModelForCausalLM

    from common.training import varlen

    lengths = lengths or chain_like_lengths(16, seed)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.train()  # the training path (the configs' attention dropout is 0)
    for p in model.parameters():
        p.requires_grad_(False)
    layers = model.model.layers
    watched = {"layer0.q_proj": layers[0].self_attn.q_proj.weight, "last.o_proj": layers[-1].self_attn.o_proj.weight}
    for w in watched.values():
        w.requires_grad_(True)
    vocab = min(config.vocab_size, 32000)
    seqs = [torch.randint(0, vocab, (n,), device="cuda") for n in lengths]
    ids = torch.cat(seqs)[None]
    positions = torch.cat([torch.arange(n, device="cuda") for n in lengths])[None]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    # targets: next token within each sequence (a sequence's last token predicts nothing)
    targets = torch.cat([torch.cat([s[1:], torch.tensor([-100], device="cuda")]) for s in seqs])

    def run(forward):
        for w in watched.values():
            w.grad = None
        logits = forward().float()
        loss = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100)
        loss.backward()
        return logits.detach(), loss.item(), {k: w.grad.float().clone() for k, w in watched.items()}

    def alone():
        return torch.cat([model(s[None], use_cache=False).logits[0] for s in seqs])

    def packed(**kw):
        return lambda: model(ids, use_cache=False, **kw).logits[0]

    ref_logits, ref_loss, ref_grads = run(alone)
    out = {"tokens": sum(lengths), "lengths": lengths, "dtype": str(dtype).removeprefix("torch."),
           "reference": "each sequence alone through SDPA", "reference_loss": ref_loss,
           "reference_logit_abs_max": ref_logits.abs().max().item()}

    def compare(name, forward):
        logits, loss, grads = run(forward)
        diff = (logits - ref_logits).abs()
        out[name] = {"max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item(),
                     "loss": loss, "loss_diff": abs(loss - ref_loss),
                     "grad_rel_diff": {k: ((g - ref_grads[k]).norm() / ref_grads[k].norm()).item()
                                       for k, g in grads.items()}}
        print(name, json.dumps(out[name]), flush=True)

    compare("sdpa_block_diagonal", packed(position_ids=positions))  # today's path
    varlen.register()
    model.set_attn_implementation(varlen.NAME)
    compare("varlen", packed(position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                             max_length_q=max(lengths), max_length_k=max(lengths)))
    compare("varlen_from_position_ids", packed(position_ids=positions))
    compare("control_varlen_without_boundaries", packed())
    v, c, s = out["varlen"], out["control_varlen_without_boundaries"], out["sdpa_block_diagonal"]
    # bf16 tolerance: no worse than twice today's packed path (SDPA, block-diagonal mask; it was checked and taken),
    # with floors for tiny models; the control (no boundaries) at least 10x further off than the varlen path
    tol = {"max_abs_logit_diff": max(2 * s["max_abs_logit_diff"], 0.05), "loss_diff": max(2 * s["loss_diff"], 1e-3),
           "grad_rel_diff": {k: max(2 * g, 0.02) for k, g in s["grad_rel_diff"].items()}}
    out["tolerance"] = tol
    out["passed"] = bool(
        v["max_abs_logit_diff"] <= tol["max_abs_logit_diff"] and v["loss_diff"] <= tol["loss_diff"]
        and all(g <= tol["grad_rel_diff"][k] for k, g in v["grad_rel_diff"].items())
        and c["max_abs_logit_diff"] > 10 * v["max_abs_logit_diff"] and c["loss_diff"] > 10 * v["loss_diff"]
        and all(c["grad_rel_diff"][k] > 10 * g for k, g in v["grad_rel_diff"].items()))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(REPO / "bench" / "configs" / "llama-3.2-3b.json"))
    p.add_argument("--out")
    a = p.parse_args()
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(a.config)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "config": Path(a.config).name,
              **provenance(), **check(config)}
    import transformers

    from common.training import varlen

    result["transformers"] = transformers.__version__
    result["kernel_parameters"] = sorted(varlen.kernel_parameters())
    text = json.dumps(result, indent=1)
    if a.out:
        Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
