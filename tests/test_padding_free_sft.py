"""SFT on padding-free rows (`padding_free: true` with `attn_implementation: varlen`, the t4 and a100 tiers) trains
the same loss, with the same gradients, as the padded recipe on the same batch: one- and two-turn conversations, the
embedded model in float32 on the CPU (where the attention is "varlen_sdpa")."""

import json

import torch
from conftest import REPO

TOLERANCE = 1e-5


def records():
    out = []
    for i in range(6):
        answer = " ".join(["Apples and pears grow well here."] * (i + 1))
        conversation = None
        if i % 3 == 1:  # two turns: both answers are trained
            conversation = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi there."},
                            {"role": "user", "content": f"Tell me about fruit {i}."},
                            {"role": "assistant", "content": answer}]
        record = {"id": f"r{i}", "instruction": f"Tell me about fruit {i}.", "response": answer,
                  "instruction_finished": True, "response_finished": True}
        out.append({**record, "conversation": conversation} if conversation else record)
    return out


def build(tmp_path, padding_free):
    import sft

    data = tmp_path / "filtered.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records()))
    extra = ["--padding_free", "true", "--attn_implementation", "varlen"] if padding_free else []
    trainer = sft.build_trainer(*sft.parse([
        "--config", str(REPO / "env/cpu/sft.yaml"), "--model_name_or_path", "embedded:smollm2", "--train_file",
        str(data), "--output_dir", str(tmp_path / f"sft-{padding_free}"), "--test_fraction", "0", "--dtype",
        "float32", "--max_length", "200", *extra]))
    trainer.model.eval()  # no LoRA dropout: the two paths see the same weights and inputs
    return trainer


def test_padding_free_rows_train_the_same_loss_as_padded_rows(tmp_path):
    padded, free = build(tmp_path, False), build(tmp_path, True)
    assert free.model.config._attn_implementation == "varlen_sdpa"
    assert free.run_facts["max_length"] == 200 and free.args.max_length is None  # dropped by the step, not TRL
    generator = torch.Generator().manual_seed(0)
    trained = {}
    for name, param in sorted(padded.model.named_parameters()):
        if param.requires_grad:
            if "lora_B" in name:  # away from zero, so that the LoRA A weights get gradients too
                param.data = torch.randn(param.shape, generator=generator) * 0.02
            trained[name] = param.data
    for name, param in free.model.named_parameters():
        if param.requires_grad:
            param.data = trained[name].clone()
    examples = [padded.train_dataset[i] for i in range(len(padded.train_dataset))]
    assert len({len(e["input_ids"]) for e in examples}) > 3  # lengths differ: the padded rows carry padding
    rows, row = padded.data_collator(examples), free.data_collator(examples)
    assert (rows["attention_mask"] == 0).any() and row["input_ids"].shape[0] == 1
    assert row["input_ids"].shape[1] == rows["attention_mask"].sum()  # every token once, no padding
    loss_padded = padded.compute_loss(padded.model, rows)
    loss_free = free.compute_loss(free.model, row)
    assert abs(loss_free.item() - loss_padded.item()) < TOLERANCE, (loss_free.item(), loss_padded.item())
    loss_padded.backward()
    loss_free.backward()
    compared = 0
    for (name, a), (_, b) in zip(padded.model.named_parameters(), free.model.named_parameters()):
        if a.requires_grad:
            assert (a.grad - b.grad).abs().max() <= 1e-4 * a.grad.abs().max() + 1e-8, name
            compared += 1
    assert compared >= 2 * 30  # LoRA A and B in every layer

    # Control: the padding-free row with its boundaries dropped is one long sequence, and trains another loss.
    control = dict(row)
    control.pop("position_ids")
    for key in [k for k in control if k.startswith(("cu_seq_lens", "max_length"))]:
        control.pop(key)
    with torch.no_grad():
        assert abs(free.compute_loss(free.model, control).item() - loss_padded.item()) > 1e-2
