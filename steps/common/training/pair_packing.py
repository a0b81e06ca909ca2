"""DPO pairs packed padding-free, each prompt computed once for both of its answers (`--pack_pairs`).

TRL's DPO collator makes two padded rows of a pair, prompt+chosen and prompt+rejected: the prompt goes through every
projection and MLP twice (four times counting the reference forward), and each row is padded to the longest of the
micro-batch. Here a micro-batch of pairs is one row with no padding, each pair laid out as

    tokens     prompt[:-1]  | prompt[-1] chosen       | prompt[-1] rejected
    positions  0 .. P-2     | P-1 .. P+C-1            | P-1 .. P+R-1

a trunk and two branches that both continue it. The last prompt token heads each branch, so every answer token's
log-prob is read from the token just before it in the row (the causal shift TRL's fused LM head computes), and no
answer token follows the other answer. Attention runs over two virtual sequences a pair, trunk+chosen and
trunk+rejected, gathered by index (common/training/varlen.py, `tree_*` arguments): every token sees exactly what it
sees in TRL's rows, so the log-probs are the same up to floating-point order (tests/test_pair_packing.py).

The loss is TRL's default, `loss_type: sigmoid` (the only one supported here): -log sigmoid(beta * ((chosen -
ref_chosen) - (rejected - ref_rejected))), averaged over the micro-batch's pairs, with the reference log-probs from
the same packed row under the frozen "ref" adapter (no gradient). It logs TRL's reward and log-prob metrics.

Library internals (TRL 1.16): `DPOTrainer._compute_loss` (overridden), its `_metrics` and `_total_train_tokens`,
`trl.trainer.utils.use_adapter` and `trl.models.utils.disable_gradient_checkpointing`.
"""

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from common import OptionError
from common.training.varlen import TREE_KEYS


def pack_pairs(examples):
    """One packed row of TRL-tokenised pairs ({prompt_ids, chosen_ids, rejected_ids} each): a dict of tensors. The
    DPO trainer's data collator with --pack_pairs (precomputed reference log-probs are not carried).

    input_ids, position_ids, labels (1, T): the row, its positions, and each answer token's own id (-100 elsewhere);
    answer_of (T,): which of the 2B answers a token belongs to (chosen i: i, rejected i: B + i, TRL's order; -1 none);
    tree_*: the virtual sequences for attention; pair_tokens: the tokens of TRL's two rows of each pair (2P + C + R),
    the work this row stands for."""
    count = len(examples)
    ids, positions, answer_of, index, keep, lengths = [], [], [], [], [], []
    pair_tokens = 0
    for i, example in enumerate(examples):
        prompt, chosen, rejected = example["prompt_ids"], example["chosen_ids"], example["rejected_ids"]
        if not prompt:
            raise ValueError("a preference pair with an empty prompt can't be packed")
        start, trunk = len(ids), len(prompt) - 1
        ids += prompt[:-1]
        positions += range(trunk)
        answer_of += [-1] * trunk
        for answer, number in ((chosen, i), (rejected, count + i)):
            head = len(ids)
            ids += [prompt[-1], *answer]
            positions += range(trunk, trunk + 1 + len(answer))
            answer_of += [-1] + [number] * len(answer)
            # The virtual sequence: the trunk (attended to, its outputs already written by the first) and the branch.
            branch = range(head, len(ids))
            index += [*range(start, start + trunk), *branch]
            keep += [number < count] * trunk + [True] * len(branch)
            lengths.append(trunk + len(branch))
        pair_tokens += 2 * len(prompt) + len(chosen) + len(rejected)
    answer_of = torch.tensor(answer_of)
    input_ids = torch.tensor(ids)
    return {
        "input_ids": input_ids[None],
        "position_ids": torch.tensor(positions)[None],
        "labels": input_ids.masked_fill(answer_of < 0, -100)[None],
        "answer_of": answer_of,
        "tree_index": torch.tensor(index),
        "tree_cu_seq_lens": torch.tensor([0, *lengths]).cumsum(0).to(torch.int32),
        "tree_max_length": max(lengths),
        "tree_keep": torch.tensor(keep).nonzero().squeeze(-1),  # as indices: no data-dependent shape under compile
        "pair_tokens": pair_tokens,
    }


def answer_log_probs(log_probs, answer_of, answers):
    """(answers,) summed log-probs from the fused LM head's per-token ones: log_probs[0, t] is token t + 1's."""
    target = answer_of[1:]
    taken = target >= 0
    return log_probs.new_zeros(answers).index_add(0, target[taken], log_probs[0][taken])


def check_supported(args):
    """Refuse the DPOConfig options this loss does not implement, naming them."""
    unsupported = [f"{name}={getattr(args, name)!r}" for name, default in (
        ("loss_type", ["sigmoid"]), ("ld_alpha", None), ("use_weighting", False),
        ("f_divergence_type", "reverse_kl"), ("precompute_ref_log_probs", False), ("label_smoothing", 0.0))
        if hasattr(args, name) and _normal(getattr(args, name)) != _normal(default)]
    if unsupported:
        raise OptionError(f"--pack_pairs trains the sigmoid DPO loss alone; it does not take {', '.join(unsupported)} "
                          "(pass --pack_pairs false for TRL's own loss)")


def _normal(value):
    value = getattr(value, "value", value)  # enums
    return list(value) if isinstance(value, (list, tuple)) else value


def dpo_loss(trainer, model, inputs, return_outputs=False):
    """The sigmoid DPO loss of one packed micro-batch, logging TRL's metrics under its names."""
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import use_adapter

    mode = "train" if trainer.model.training else "eval"
    answers = int(inputs["tree_cu_seq_lens"].numel() - 1)
    pairs = answers // 2
    model_kwargs = {"input_ids": inputs["input_ids"], "position_ids": inputs["position_ids"],
                    **{k: inputs[k] for k in TREE_KEYS}, "use_cache": False}
    outputs = model(**model_kwargs, labels=inputs["labels"], fused_lm_head=True)
    logps = answer_log_probs(outputs.log_probs, inputs["answer_of"], answers)
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    with torch.no_grad(), disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs), \
            use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
        reference = model(**model_kwargs, labels=inputs["labels"], fused_lm_head=True)
    ref_logps = answer_log_probs(reference.log_probs, inputs["answer_of"], answers)
    chosen, rejected = logps[:pairs], logps[pairs:]
    chosen_ratio, rejected_ratio = chosen - ref_logps[:pairs], rejected - ref_logps[pairs:]
    loss = -F.logsigmoid(trainer.beta * (chosen_ratio - rejected_ratio)).mean()

    gather = trainer.accelerator.gather
    metrics = trainer._metrics[mode]
    if mode == "train":
        tokens = torch.tensor(inputs["pair_tokens"], device=loss.device)
        trainer._total_train_tokens += trainer.accelerator.gather_for_metrics(tokens).sum().item()
    metrics["num_tokens"] = [trainer._total_train_tokens]
    chosen_rewards = trainer.beta * chosen_ratio.detach()
    rejected_rewards = trainer.beta * rejected_ratio.detach()
    metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
    metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
    metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
    metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
    metrics["logps/chosen"].append(gather(chosen.detach()).mean().item())
    metrics["logps/rejected"].append(gather(rejected.detach()).mean().item())
    # Evaluation asks for outputs to collect logits; there are none (the fused head builds no logits).
    return (loss, SimpleNamespace(logits=None)) if return_outputs else loss
