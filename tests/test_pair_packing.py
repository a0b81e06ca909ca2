"""DPO's packed pairs (steps/common/training/pair_packing.py): one unpadded row a micro-batch, each prompt computed
once for both answers, trains the same loss as TRL's padded rows. The embedded model in float32 on the CPU, where the
attention is "varlen_sdpa" (each virtual sequence through SDPA)."""

import json

import pytest
import torch
from conftest import REPO

from common.training.pair_packing import answer_log_probs, pack_pairs

TOLERANCE = 1e-4  # float32: the same sums in another order


def test_a_pair_is_a_trunk_and_two_branches():
    batch = pack_pairs([{"prompt_ids": [11, 12, 13], "chosen_ids": [21, 22], "rejected_ids": [31]},
                        {"prompt_ids": [14], "chosen_ids": [23], "rejected_ids": [32, 33]}])
    assert batch["input_ids"][0].tolist() == [11, 12, 13, 21, 22, 13, 31, 14, 23, 14, 32, 33]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 2, 3, 0, 1, 0, 1, 2]
    assert batch["labels"][0].tolist() == [-100, -100, -100, 21, 22, -100, 31, -100, 23, -100, 32, 33]
    assert batch["answer_of"].tolist() == [-1, -1, -1, 0, 0, -1, 2, -1, 1, -1, 3, 3]  # chosen 0, 1; rejected 2, 3
    # Virtual sequences: trunk + chosen, trunk + rejected, for each pair; the rejected one's trunk is not written back.
    assert batch["tree_index"].tolist() == [0, 1, 2, 3, 4, 0, 1, 5, 6, 7, 8, 9, 10, 11]
    assert batch["tree_keep"].tolist() == [0, 1, 2, 3, 4, 7, 8, 9, 10, 11, 12, 13]  # not 5, 6: the trunk again
    assert batch["tree_cu_seq_lens"].tolist() == [0, 5, 9, 11, 14] and batch["tree_max_length"] == 5
    assert batch["pair_tokens"] == (2 * 3 + 2 + 1) + (2 * 1 + 1 + 2)  # TRL's two rows a pair, unpadded


def pairs():
    """Pairs of unequal lengths (TRL pads them), one with a two-turn prompt."""
    words = "apples pears plums cherries peaches grapes figs dates".split()
    out = []
    for i in range(6):
        prompt = [{"role": "user", "content": f"Name {i + 1} fruits, then say why you like them."}]
        if i == 2:
            prompt = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi! How can I help?"},
                      *prompt]
        out.append({"id": f"p{i}", "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": " ".join(words[: i + 2]) + "."}],
                    "rejected": [{"role": "assistant", "content": "No." if i % 2 else "I " + "really " * i + "can't."}]})
    return out


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory, smol):
    from peft import LoraConfig, get_peft_model

    from common.generation.chat import prepare_tokenizer
    from common.models import load_causal_lm, load_tokenizer

    out = tmp_path_factory.mktemp("adapter") / "sft"
    model = get_peft_model(load_causal_lm("embedded:smollm2", dtype="float32"),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                      task_type="CAUSAL_LM"))
    model.save_pretrained(out)
    prepare_tokenizer(load_tokenizer("embedded:smollm2")).save_pretrained(out)
    return out


def build(tmp_path, sft_adapter, packed):
    import dpo

    extra = (["--pack_pairs", "true", "--attn_implementation", "varlen"] if packed
             else ["--pack_pairs", "false", "--attn_implementation", "sdpa"])  # the cpu tier packs: TRL's rows
    args = dpo.parse_args([
        "--config", str(REPO / "env/cpu/dpo.yaml"), "--model_name_or_path", "embedded:smollm2", "--sft_adapter",
        str(sft_adapter), "--train_file", "unused", "--output_dir", str(tmp_path / f"dpo-{packed}"),
        "--test_fraction", "0", "--dtype", "float32", "--torch_compile", "false", *extra])
    trainer = dpo.build_trainer(*args, pairs())
    # The same trained policy in both: LoRA B weights away from the reference's, so the loss is not log 2.
    generator = torch.Generator().manual_seed(0)
    for name, param in sorted(trainer.model.named_parameters()):
        if ".default." in name and "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.02
    return trainer


def padded_log_probs(trainer, batch):
    """TRL's per-answer log-probs of its padded rows (chosen rows first)."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    out = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                        fused_lm_head=True, use_cache=False)
    return out.log_probs.sum(1)


def packed_log_probs(trainer, batch, **override):
    kwargs = {k: batch[k] for k in ("input_ids", "position_ids", "tree_index", "tree_cu_seq_lens",
                                    "tree_max_length", "tree_keep")}
    out = trainer.model(**{**kwargs, **override}, labels=batch["labels"], fused_lm_head=True, use_cache=False)
    return answer_log_probs(out.log_probs, batch["answer_of"], len(batch["tree_cu_seq_lens"]) - 1)


def test_packed_pairs_train_the_same_loss_as_padded_rows(tmp_path, sft_adapter):
    padded, packed = build(tmp_path, sft_adapter, False), build(tmp_path, sft_adapter, True)
    assert packed.model.config._attn_implementation == "varlen_sdpa"
    assert packed.run_facts["pack_pairs"] and not padded.run_facts["pack_pairs"]
    examples = [padded.train_dataset[i] for i in range(len(padded.train_dataset))]
    assert examples == [packed.train_dataset[i] for i in range(len(packed.train_dataset))]
    rows, row = padded.data_collator(examples), packed.data_collator(examples)
    assert (rows["attention_mask"] == 0).any()  # TRL's rows are padded; the packed row is not, and is shorter
    assert row["input_ids"].shape[1] < rows["attention_mask"].sum() < rows["input_ids"].numel()
    assert row["pair_tokens"] == rows["attention_mask"].sum()

    with torch.no_grad():
        want, got = padded_log_probs(padded, rows), packed_log_probs(packed, row)
        assert (got - want).abs().max() < TOLERANCE, (got, want)
        assert want.abs().min() > 1  # real sums over several tokens
        # Control: the same row with boundaries from the position ids alone: each rejected answer sees its chosen one.
        control = packed_log_probs(packed, row, tree_index=None)
        half = len(examples)
        assert (control[:half] - want[:half]).abs().max() < TOLERANCE  # the chosen answers come first: unaffected
        assert (control[half:] - want[half:]).abs().max() > 1e-2

    loss_padded = padded.compute_loss(padded.model, rows)
    loss_packed = packed.compute_loss(packed.model, row)
    assert abs(loss_padded.item() - 0.6931) > 1e-3  # the policy is not the reference
    assert abs(loss_packed.item() - loss_padded.item()) < TOLERANCE
    for key in ("rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert padded._metrics["train"][key][-1] == pytest.approx(packed._metrics["train"][key][-1], abs=TOLERANCE)
    loss_padded.backward()
    loss_packed.backward()
    grads = {}
    for trainer in (padded, packed):
        for name, param in trainer.model.named_parameters():
            if param.requires_grad and param.grad is not None:
                grads.setdefault(name, []).append(param.grad)
    assert len(grads) >= 2 * 3 * 30  # LoRA A and B of three modules in every layer
    for name, (a, b) in grads.items():
        assert (a - b).abs().max() <= 1e-4 * a.abs().max() + 1e-7, name


def test_packing_refuses_losses_it_does_not_implement(tmp_path, sft_adapter):
    import dpo

    from common import OptionError

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs()))
    common = ["--config", str(REPO / "env/cpu/dpo.yaml"), "--model_name_or_path", "embedded:smollm2",
              "--sft_adapter", str(sft_adapter), "--train_file", str(data), "--output_dir", str(tmp_path / "out"),
              "--pack_pairs", "true"]
    with pytest.raises(OptionError, match="--pack_pairs needs --attn_implementation varlen"):
        dpo.main(common + ["--attn_implementation", "sdpa"])
    with pytest.raises(OptionError, match=r"does not take loss_type=\['ipo'\]"):
        dpo.main(common + ["--attn_implementation", "varlen", "--loss_type", "ipo"])
    assert not (tmp_path / "out").exists()
