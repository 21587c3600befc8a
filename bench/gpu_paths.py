"""The paths bench/gpu.py times: the Qwen2-shaped model, random pair batches (padded or packed),
TVKD's precompute and training step and the naive full-logits ones, and the checks that a
packed layout and a compiled decoder give the plain log-probs.
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass

import torch
from gpu_checks import Check, _compare, _matmul_precision

from tvkd.logps import linear_logps
from tvkd.losses import tvkd_loss
from tvkd.values import teacher_signals

H100_BF16_PEAK_TFLOPS = 989.0

QWEN2_05B = dict(
    hidden_size=896,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4864,
    vocab_size=151936,
)
SMOKE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=512,
)


# --------------------------------------------------------------------------------------------
# (b) throughput


@dataclass
class Batch:
    """Random pair batch in either padded [rows, L] or packed [1, Σ len] layout.

    Rows 0..P−1 are the chosen sides, P..2P−1 the rejected ones; a pair's two rows share the prompt.
    `resp_index` are the flat positions whose next-token logits predict response tokens and
    `labels` those tokens; (`row`, `col`) place each into a padded [rows, T_max] grid.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor
    resp_index: torch.Tensor
    labels: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    resp_lens: torch.Tensor
    n_tokens: int

    @property
    def rows(self) -> int:
        return int(self.resp_lens.shape[0])

    @property
    def t_max(self) -> int:
        return int(self.resp_lens.max())


def make_batch(
    *,
    pairs: int,
    seq_len: int,
    prompt_len: int,
    vocab: int,
    lengths: str,
    packing: bool,
    device: torch.device,
    seed: int,
) -> Batch:
    g = torch.Generator().manual_seed(seed)
    seqs, p_lens, r_lens = [], [], []
    prompts = []
    for _ in range(pairs):
        p = (
            prompt_len
            if lengths == "fixed"
            else int(torch.randint(8, max(9, seq_len // 2), (1,), generator=g))
        )
        prompts.append(torch.randint(0, vocab, (p,), generator=g))
    for _side in ("chosen", "rejected"):  # all chosen rows first, then all rejected rows
        for i in range(pairs):
            p = len(prompts[i])
            r = (
                seq_len - p
                if lengths == "fixed"
                else int(torch.randint(8, seq_len - p + 1, (1,), generator=g))
            )
            seqs.append(torch.cat([prompts[i], torch.randint(0, vocab, (r,), generator=g)]))
            p_lens.append(p)
            r_lens.append(r)
    rows = len(seqs)
    resp_index, labels, row_i, col_i = [], [], [], []
    if packing:
        flat = torch.cat(seqs)
        input_ids = flat[None]
        position_ids = torch.cat([torch.arange(len(s)) for s in seqs])[None]
        attention_mask = None
        offset = 0
        for r, s in enumerate(seqs):
            pos = offset + p_lens[r] - 1 + torch.arange(r_lens[r])
            resp_index.append(pos)
            labels.append(s[p_lens[r] :])
            row_i.append(torch.full((r_lens[r],), r))
            col_i.append(torch.arange(r_lens[r]))
            offset += len(s)
    else:
        width = max(len(s) for s in seqs)
        input_ids = torch.zeros(rows, width, dtype=torch.long)
        attention_mask = torch.zeros(rows, width, dtype=torch.long)
        for r, s in enumerate(seqs):
            input_ids[r, : len(s)] = s
            attention_mask[r, : len(s)] = 1
            pos = r * width + p_lens[r] - 1 + torch.arange(r_lens[r])
            resp_index.append(pos)
            labels.append(s[p_lens[r] :])
            row_i.append(torch.full((r_lens[r],), r))
            col_i.append(torch.arange(r_lens[r]))
        position_ids = torch.arange(width)[None].expand(rows, width).contiguous()
        if lengths == "fixed":
            attention_mask = None  # all rows full: let the attention kernel take its unmasked path
    return Batch(
        input_ids=input_ids.to(device),
        attention_mask=None if attention_mask is None else attention_mask.to(device),
        position_ids=position_ids.to(device),
        resp_index=torch.cat(resp_index).to(device),
        labels=torch.cat(labels).to(device),
        row=torch.cat(row_i).to(device),
        col=torch.cat(col_i).to(device),
        resp_lens=torch.tensor(r_lens, device=device),
        n_tokens=sum(len(s) for s in seqs),
    )


def build_model(args: argparse.Namespace, device: torch.device):
    from transformers import AutoModelForCausalLM, Qwen2Config

    shape = SMOKE if args.cpu_smoke else QWEN2_05B
    config = Qwen2Config(
        **shape,
        tie_word_embeddings=True,
        max_position_embeddings=max(4096, args.seq_len),  # packed rows restart their positions
        use_cache=False,
    )
    torch.manual_seed(args.seed)
    with torch.device(device):  # initialise on the device: CPU init of 0.5B params takes a while
        model = AutoModelForCausalLM.from_config(config, attn_implementation=args.attn)
    model.to(device=device, dtype=torch.float32)  # fp32 master weights; compute under autocast
    return model


def check_packing(model, args: argparse.Namespace, vocab: int, device: torch.device, *, name: str) -> Check:
    """Packed rows (position_ids restarting per sequence, no mask) must give the padded layout's
    log-probs: catches an attention implementation that lets packed sequences see each other."""
    kw = dict(
        pairs=args.pairs, seq_len=args.seq_len, prompt_len=args.prompt_len, vocab=vocab,
        lengths="random", device=device, seed=args.seed,
    )  # fmt: skip
    padded, packed = make_batch(packing=False, **kw), make_batch(packing=True, **kw)
    head = model.get_output_embeddings().weight
    was_training = model.training
    model.eval()
    with torch.no_grad(), _matmul_precision("highest"):
        with _attn(model, args.attn):
            a = linear_logps(_decoder_hidden(model, padded)[padded.resp_index], head, padded.labels)
        b = linear_logps(_decoder_hidden(model, packed)[packed.resp_index], head, packed.labels)
    model.train(was_training)
    # fp32 on both sides; a flash/flex kernel computes in bf16 (fp32 inputs are cast), hence the
    # looser tolerance when the packed side is not sdpa/eager.
    exact = model.config._attn_implementation in ("sdpa", "eager")
    return _compare(name + ", fp32", b, a, atol=1e-3 if exact else 5e-2, rtol=1e-4 if exact else 0.0)


def check_compiled(model, batch: Batch, decoder, *, name: str) -> Check:
    """The compiled decoder's log-probs against the eager decoder's (fp32, exact matmuls)."""
    head = model.get_output_embeddings().weight
    was_training = model.training
    model.eval()
    with torch.no_grad(), _matmul_precision("highest"):
        a = linear_logps(_decoder_hidden(model, batch)[batch.resp_index], head, batch.labels)
        b = linear_logps(_decoder_hidden(model, batch, decoder)[batch.resp_index], head, batch.labels)
    model.train(was_training)
    return _compare(name, b, a, atol=1e-3, rtol=1e-4)


def flop_params(model) -> int:
    """N for model FLOPs: non-embedding parameters + the LM head's vocab × hidden."""
    n = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    head = model.get_output_embeddings().weight
    if head is model.get_input_embeddings().weight:  # tied: named_parameters() listed it only once
        n += head.numel()
    return n


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _padded(values: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Scatter flat per-response-token values into [rows, T_max] (differentiable in values)."""
    out = values.new_zeros(batch.rows, batch.t_max)
    return out.index_put((batch.row, batch.col), values)


def _decoder_hidden(model, batch: Batch, decoder=None) -> torch.Tensor:
    """Last hidden states [rows · L, H]; `decoder` replaces the model's (a compiled wrapper)."""
    out = (model.get_decoder() if decoder is None else decoder)(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    )
    h = out.last_hidden_state
    return h.reshape(-1, h.shape[-1])


def _full_logits(model, batch: Batch) -> torch.Tensor:
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    )
    return out.logits


def make_precompute_ours(model, batch: Batch, args, dtype, decoder=None):
    head = model.get_output_embeddings().weight
    device = batch.input_ids.device

    @torch.no_grad()
    def step():
        with _autocast(device, dtype):
            hidden = _decoder_hidden(model, batch, decoder)
        sig = teacher_signals(
            hidden[batch.resp_index], head, labels=batch.labels, chunk_size=args.values_chunk
        )
        return sig.values, sig.token_logps

    return step


def make_precompute_naive(model, batch: Batch, dtype):
    device = batch.input_ids.device

    @torch.no_grad()
    def step():
        with _autocast(device, dtype):
            logits = _full_logits(model, batch)
        z = logits.float()  # the usual "upcast the logits" before any softmax
        z = z.reshape(-1, z.shape[-1])
        lse = torch.logsumexp(z, -1)
        values = lse[batch.resp_index]
        token_logps = z[batch.resp_index].gather(-1, batch.labels[:, None]).squeeze(-1) - values
        return values, token_logps

    return step


def _loss_inputs(batch: Batch, seed: int):
    """Constant per-token inputs of the loss (reference log-probs, teacher values, masks)."""
    g = torch.Generator().manual_seed(seed)
    rows, t = batch.rows, batch.t_max
    dev = batch.input_ids.device
    ref = (-torch.rand(rows, t, generator=g) * 4).to(dev)
    values = (10 + torch.randn(rows, t + 1, generator=g)).to(dev)
    mask = torch.arange(t, device=dev)[None] < batch.resp_lens[:, None]
    return ref, values, mask


def _dpo_loss(
    policy: torch.Tensor, ref: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, alpha: float
):
    p = policy.shape[0] // 2
    loss, _ = tvkd_loss(
        policy[:p], policy[p:], ref[:p], ref[p:], values[:p], values[p:], mask[:p], mask[p:],
        alpha=alpha, beta=0.1,
    )  # fmt: skip
    return loss


def make_train_ours(model, batch: Batch, args, dtype, optimizer, decoder=None):
    head = model.get_output_embeddings()
    ref, values, mask = _loss_inputs(batch, args.seed)
    device = batch.input_ids.device

    def step():
        with _autocast(device, dtype):
            hidden = _decoder_hidden(model, batch, decoder)
            logps = linear_logps(
                hidden[batch.resp_index], head.weight, batch.labels, chunk_size=args.logps_chunk
            )
        loss = _dpo_loss(_padded(logps, batch), ref, values, mask, alpha=0.7)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_train_naive(model, batch: Batch, args, dtype, optimizer, ref_model=None):
    ref_pre, values, mask = _loss_inputs(batch, args.seed)
    device = batch.input_ids.device

    def token_logps(m) -> torch.Tensor:
        with _autocast(device, dtype):
            logits = _full_logits(m, batch)
        logp = logits.float().log_softmax(-1)  # labels-style float32 upcast of the whole tensor
        logp = logp.reshape(-1, logp.shape[-1])[batch.resp_index]
        return logp.gather(-1, batch.labels[:, None]).squeeze(-1)

    def step():
        policy = _padded(token_logps(model), batch)
        if ref_model is not None:
            with torch.no_grad():
                ref = _padded(token_logps(ref_model), batch)
        else:
            ref = ref_pre
        loss = _dpo_loss(policy, ref, values, mask, alpha=0.7)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


@contextlib.contextmanager
def _checkpointing(model):
    from tvkd.modeling import set_activation_checkpointing

    set_activation_checkpointing(model, True)
    try:
        yield
    finally:
        set_activation_checkpointing(model, False)


@contextlib.contextmanager
def _attn(model, implementation: str):
    """The model's attention implementation switched for a block."""
    before = model.config._attn_implementation
    model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        model.set_attn_implementation(before)
