"""MATH.md property 1 against TRL itself: with α = 0, tvkd_loss equals TRL's DPOTrainer
`loss_type="sigmoid"` loss on the same log-probabilities.

TRL computes its loss inside DPOTrainer._compute_loss from a policy and a reference model. We build
a real DPOTrainer on a tiny Llama with a copy of it as the reference, perturb the policy so that it
differs from the reference, let TRL compute the loss on one collated batch, and compute the same
batch's per-token log-probabilities from both models ourselves (plain float64 log-softmax) for tvkd_loss.
"""

from __future__ import annotations

import pytest
import torch


def _tiny_llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def test_alpha_zero_equals_trl_sigmoid_dpo(tmp_path, tiny_tokenizer):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from tvkd.logps import logits_logps
    from tvkd.losses import tvkd_loss

    tokenizer = tiny_tokenizer
    model = _tiny_llama(len(tokenizer))
    rows = [
        {"prompt": "Human: What is the capital of France? Assistant:", "chosen": " Paris.",
         "rejected": " I am sorry, I can't help with that."},
        {"prompt": "Human: How do I bake bread? Assistant:", "chosen": " Mix flour, water and yeast.",
         "rejected": " The lazy dog sleeps."},
        {"prompt": "The quick brown fox", "chosen": " jumps over the lazy dog.", "rejected": " sleeps."},
    ]  # fmt: skip
    args = DPOConfig(
        output_dir=str(tmp_path), beta=0.1, loss_type=["sigmoid"], per_device_train_batch_size=3,
        report_to=[], use_cpu=True, bf16=False, max_length=64, save_strategy="no",
    )  # fmt: skip
    import copy

    trainer = DPOTrainer(
        model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )  # fmt: skip
    with torch.no_grad():  # make the policy differ from TRL's frozen reference copy
        for p in trainer.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    with torch.no_grad():
        trl_loss = trainer._compute_loss(trainer.model, batch, return_outputs=False)
        if isinstance(trl_loss, tuple):
            trl_loss = trl_loss[0]

    # The same log-probabilities, computed independently from each model's logits in float64.
    ids, attn, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"].bool()

    def token_logps(m) -> torch.Tensor:
        with torch.no_grad():
            logits = m(input_ids=ids, attention_mask=attn).logits.double()
        return logits_logps(logits[:, :-1], ids[:, 1:])  # position i predicts token i+1

    labels_mask = completion[:, 1:]
    policy, ref = token_logps(trainer.model), token_logps(trainer.ref_model)

    def pack(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-align each row's response tokens into [B, T] with a contiguous mask."""
        lengths = mask.sum(-1)
        out = torch.zeros(x.shape[0], int(lengths.max()), dtype=x.dtype)
        for b in range(x.shape[0]):
            out[b, : lengths[b]] = x[b][mask[b]]
        return out, torch.arange(out.shape[1])[None] < lengths[:, None]

    n = ids.shape[0] // 2  # TRL's batch is [chosen rows; rejected rows]
    pc, mc = pack(policy[:n], labels_mask[:n])
    pr, mr = pack(policy[n:], labels_mask[n:])
    rc, _ = pack(ref[:n], labels_mask[:n])
    rr, _ = pack(ref[n:], labels_mask[n:])
    assert not torch.allclose(pc, rc), "policy and reference must differ for a meaningful check"
    zeros_c = torch.zeros(pc.shape[0], pc.shape[1] + 1, dtype=torch.float64)
    zeros_r = torch.zeros(pr.shape[0], pr.shape[1] + 1, dtype=torch.float64)
    ours, _ = tvkd_loss(pc, pr, rc, rr, zeros_c, zeros_r, mc, mr, alpha=0.0, beta=0.1)
    # TRL runs in float32 (its fused head); ours here in float64: float32 tolerance.
    assert ours.item() == pytest.approx(float(trl_loss), rel=1e-5, abs=1e-6)
    assert abs(ours.item() - torch.log(torch.tensor(2.0)).item()) > 1e-4  # not the trivial log 2
