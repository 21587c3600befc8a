"""Training under `torchrun`: the model wrapped in DDP or FSDP2, each optimizer step's
micro-batches split across ranks, and the step's metrics summed over ranks.

The global batch of an optimizer step is the one-process batch: `batch_size × grad_accum` pairs
in the order `tvkd.batch.step_order` gives, cut into the same `grad_accum` micro-batches. Rank r
of N runs micro-batches r, r+N, r+2N, ... (each exactly as one process would collate it) and
scales its loss by N/(the step's pairs or tokens), so the gradient after DDP's or FSDP's
averaging all-reduce is the one-process gradient up to float32 summation order. When
`grad_accum` is not a multiple of N some ranks get one micro-batch less; they run a copy of one
with weight 0 so that every rank makes the same collective calls (pick grad_accum = k·N).

Wrapping (PyTorch's own engines, nothing home-made):
  "ddp"  `torch.nn.parallel.DistributedDataParallel` of the step module (no buffer broadcast:
         the models' buffers are constants); gradient accumulation under `no_sync()`.
  "fsdp" FSDP2: `torch.distributed.fsdp.fully_shard` on every decoder layer (the model's
         `_no_split_modules` classes), then on the step module (embeddings, final norm, head);
         optional `CPUOffloadPolicy` (for an accelerator; nothing to do on the CPU); bf16 is the
         one-process autocast over float32 parameters, so a bf16 run equals one process too
         (FSDP's MixedPrecisionPolicy(param_dtype=bf16) would halve the all-gathers but computes
         otherwise: measured 1.1e-2 max |Δw| after 4 steps of the tests' tiny job); accumulation
         with `set_requires_gradient_sync(False)`.
The step module (`StepModule`) is the whole model with a forward that runs a given function of
it (the trainer's fused `policy_logps`), so that the wrapped forward covers the decoder and the
head even though the library never calls the model's own `forward`.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from tvkd import distributed
from tvkd.callbacks import Callbacks
from tvkd.modeling import unwrap

T = TypeVar("T")
MODES = ("auto", "ddp", "fsdp")


class StepModule(nn.Module):
    """`model` (registered as a child, so parameter names gain a "model." prefix here only)
    whose forward is `fn(model, *args)`: what DDP/FSDP wrap."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(self.model, *args, **kwargs)


class QuietCallbacks(Callbacks):
    """A rank other than 0: no logging, events, progress or files; only the stop check."""

    def __init__(self, inner: Callbacks) -> None:
        self.inner = inner

    def should_stop(self) -> bool:
        return self.inner.should_stop()


def rank_callbacks(callbacks: Callbacks) -> Callbacks:
    """`callbacks` on rank 0; elsewhere the same stop check and nothing else (INTERFACE11 point 3)."""
    return callbacks if distributed.context().is_main else QuietCallbacks(callbacks)


def resolve_mode(parallel: str, world_size: int) -> str:
    """ "single" at world size 1 (whatever `parallel` says), else "ddp" for auto/ddp or "fsdp".
    Raises ValueError naming the setting for another value."""
    if parallel not in MODES:
        raise ValueError(f"parallel={parallel!r}: expected one of {', '.join(MODES)}")
    if world_size <= 1:
        return "single"
    return "fsdp" if parallel == "fsdp" else "ddp"


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers: modules whose class is one of its `_no_split_modules` (the
    classes transformers keeps whole, e.g. LlamaDecoderLayer). Raises ValueError when none."""
    names = set(getattr(unwrap(model), "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"{type(unwrap(model)).__name__} declares no decoder layer classes (_no_split_modules): "
            "FSDP cannot wrap it per layer; use parallel='ddp'"
        )
    return layers


class Parallel:
    """The run's process layout and wrapped model. At world size 1 every method is the plain
    one-process behaviour (the model unwrapped, every micro-batch here, sums unchanged).

    `parallel`: "auto" | "ddp" | "fsdp" (TrainConfig.parallel); `cpu_offload` and `bf16` apply
    to FSDP. Joins the process group (`tvkd.distributed.init`) when torchrun started the process.
    """

    def __init__(self, parallel: str = "auto", *, cpu_offload: bool = False, bf16: bool = False) -> None:
        self.ctx = distributed.init()
        self.mode = resolve_mode(parallel, self.ctx.world_size)
        self.cpu_offload, self.bf16 = cpu_offload, bf16
        self.model: nn.Module | None = None
        self.runner: nn.Module | None = None

    @property
    def world(self) -> int:
        return self.ctx.world_size

    def wrap(self, model: nn.Module, device: torch.device) -> None:
        """Wrap `model` (its parameters stay the trainable ones the optimizer is then built on;
        under FSDP they become sharded DTensors, so build the optimizer after this)."""
        self.model = model
        if self.mode == "single":
            return
        step = StepModule(model)
        if self.mode == "ddp":
            ids = [device.index] if device.type == "cuda" else None
            self.runner = nn.parallel.DistributedDataParallel(step, device_ids=ids, **_no_buffer_sync())
            return
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

        kw: dict[str, Any] = {}
        if self.cpu_offload and device.type != "cpu":  # on the CPU they are there already
            kw["offload_policy"] = CPUOffloadPolicy()
        for layer in decoder_layers(model):
            fully_shard(layer, **kw)
        fully_shard(step, **kw)
        self.runner = step

    def forward(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(model, *args)` through the wrapped module (its hooks: FSDP's all-gathers, DDP's
        reducer), or directly at world size 1."""
        if self.runner is None:
            assert self.model is not None, "wrap() first"
            return fn(self.model, *args, **kwargs)
        return self.runner(fn, *args, **kwargs)

    def shard(self, micro_batches: Sequence[T]) -> list[tuple[T, float]]:
        """This rank's micro-batches of a step with their loss factor: (micro-batch, N) for its
        own (r, r+N, ...), then (a copy, 0.0) up to ceil(M/N) so every rank runs as many; at
        world size 1 every micro-batch with factor 1."""
        n = self.world
        mine = [(mb, float(n)) for mb in micro_batches[self.ctx.rank :: n]]
        rounds = math.ceil(len(micro_batches) / n)
        return mine + [(micro_batches[0], 0.0)] * (rounds - len(mine))

    @contextlib.contextmanager
    def sync(self, last: bool) -> Iterator[None]:
        """Around one micro-batch's forward+backward: gradients are reduced across ranks only
        in the step's `last` one (DDP `no_sync`, FSDP `set_requires_gradient_sync`)."""
        if self.mode == "ddp" and not last:
            assert isinstance(self.runner, nn.parallel.DistributedDataParallel)
            with self.runner.no_sync():
                yield
            return
        if self.mode == "fsdp":
            self.runner.set_requires_gradient_sync(last)  # type: ignore[union-attr,operator]
        yield

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """Each key's sum over ranks (float64 all-reduce; a key some rank lacks counts 0 there);
        `values` at world size 1."""
        if not self.ctx.enabled:
            return dict(values)
        keys: list[list[str] | None] = [None] * self.world
        dist.all_gather_object(keys, list(values))
        names = list(dict.fromkeys(k for ks in keys for k in ks or ()))  # rank 0's order first
        t = torch.tensor([float(values.get(k, 0.0)) for k in names], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return dict(zip(names, t.tolist(), strict=True))

    def clip_grad_norm(self, params: Sequence[torch.Tensor], max_norm: float) -> float:
        """The global gradient norm (clipped to `max_norm`), the same on every rank; FSDP's
        sharded gradients are reduced through DTensor."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        full = getattr(norm, "full_tensor", None)
        return float(full() if full is not None else norm)

    def should_stop(self, callbacks: Callbacks) -> bool:
        """A stop request on any rank (rank 0's in practice) stops every rank at this step."""
        return distributed.any_flag(callbacks.should_stop())

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The full (unsharded) state dict of the model on CPU, on rank 0 (empty elsewhere):
        `get_model_state_dict(full_state_dict=True, cpu_offload=True)`. A collective: every rank
        calls it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        assert self.model is not None
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.model, options=options)


def _no_buffer_sync() -> dict[str, bool]:
    """DDP's switch for "do not broadcast buffers before each forward" (the student's buffers,
    e.g. rotary frequencies, are the same on every rank). torch 2.13 renamed it
    `forward_sync_buffers` and warns on the old `broadcast_buffers`; older torch (the GPU image's
    2.11) knows only the old name."""
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    name = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return {name: False}
