"""The causal-LM loss without the full logits tensor: the head and the cross-entropy in tiles of tokens.

One 32k-token row with a 152k vocabulary has 32,768 x 152,064 fp32 logits = 20 GB, and the plain loss keeps them, their
fp32 copy and their gradient alive at once. Here the model's output head is patched (its ``forward``, so the weights
and their state-dict names stay the head's own) to compute, for the rows' target positions only, tile by tile:
logits (in the head's dtype, upcast to fp32 like transformers' loss), the summed cross-entropy, and right away the
gradients for the hidden states and the head's weight, so a tile's logits are freed before the next one. Peak extra
memory is one tile of ``tile_tokens x vocab`` fp32 logits (~256 MiB) instead of ``tokens x vocab``; the rule for
``auto`` and the tile size live in ``ds_configs.memory`` (the memory model counts the same bytes). The value and the
gradients equal the plain loss (tests/unit/finetune/test_tiled_loss.py, 152k vocabulary).

Why not DeepSpeed's ``TiledFusedLogitsLoss``: it needs the caller to hold the head's weight outside the head's forward,
which ZeRO-3 has released by then; computing inside the head's own forward keeps ZeRO-3's gather hooks in charge.

    head = install(model, mode="auto", tokens_per_micro_batch=4 * 8192)   # None: not installed (says why in the log)
    loss_sum = summed_loss(engine, kwargs, head)   # = engine(**kwargs, num_items_in_batch=1).loss, without logits
"""

from __future__ import annotations

import contextlib
import logging
import types

import torch

from ds_configs.memory import tile_tokens, tiles_loss  # the auto rule and the tile size live with the memory model

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Config attributes of models that transform the logits after the head (softcapping, scaling): the loss would be wrong.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class _TiledLinearCrossEntropy(torch.autograd.Function):
    """sum over rows of CE(hidden @ weight.T + bias, targets), tile by tile, gradients computed in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, tile: int, grads: tuple[bool, bool, bool]):
        n = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        gh = torch.empty_like(hidden) if grads[0] else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grads[1] else None
        gb = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if grads[2] else None
        for a in range(0, n, tile):
            h, y = hidden[a : a + tile], targets[a : a + tile]
            logits = torch.nn.functional.linear(h, weight, bias).float()  # what transformers' loss computes on
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if gh is None and gw is None and gb is None:
                continue
            probs = logits.sub_(lse[:, None]).exp_()  # d(sum CE)/d(logits) = softmax - onehot, in place
            probs[torch.arange(len(y), device=y.device), y] -= 1.0
            g = probs.to(hidden.dtype)  # the plain loss hands the head's backward a gradient in the head's dtype
            if gh is not None:
                gh[a : a + tile] = g @ weight
            if gw is not None:
                gw += (g.t() @ h).float()
            if gb is not None:
                gb += probs.sum(0)
        ctx.save_for_backward(*(t for t in (gh, gw, gb) if t is not None))
        ctx.have = tuple(t is not None for t in (gh, gw, gb))
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        saved = iter(ctx.saved_tensors)
        out = [next(saved) if have else None for have in ctx.have]
        out = [None if g is None else (g * grad_total).to(dt) for g, dt in zip(out, ctx.dtypes, strict=True)]
        return out[0], out[1], out[2], None, None, None


def tiled_cross_entropy_sum(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, tile: int
) -> torch.Tensor:
    """The causal-LM loss summed over target tokens (transformers' ``ForCausalLMLoss`` with ``num_items_in_batch=1``):
    position ``t`` of ``hidden`` (B, T, H) predicts ``labels[:, t + 1]``; -100 is no target."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    h = hidden[:, :-1][keep]  # only target positions reach the head: prompt tokens cost nothing
    y = targets[keep].to(h.device)
    grads = (
        torch.is_grad_enabled() and hidden.requires_grad,
        torch.is_grad_enabled() and weight.requires_grad,
        torch.is_grad_enabled() and bias is not None and bias.requires_grad,
    )
    return _TiledLinearCrossEntropy.apply(h, weight, bias, y, tile, grads)


class TiledHead:
    """A model's output head, patched so that inside :meth:`targets` its forward returns the summed loss."""

    def __init__(self, head: torch.nn.Linear, vocab: int):
        self.head, self.labels = head, None
        self.tile = tile_tokens(vocab)
        plain = head.forward

        def forward(module, hidden):
            if self.labels is None:
                return plain(hidden)
            return tiled_cross_entropy_sum(hidden, module.weight, module.bias, self.labels, self.tile)

        head.forward = types.MethodType(forward, head)

    @contextlib.contextmanager
    def targets(self, labels: torch.Tensor):
        self.labels = labels
        try:
            yield
        finally:
            self.labels = None


def _why_not(model) -> str | None:
    config = getattr(model, "config", None)
    if any(getattr(config, key, None) not in (None, 1, 1.0) for key in _LOGIT_TRANSFORMS):
        return "the model transforms its logits after the head (softcapping or scaling)"
    if not type(model).__module__.startswith("transformers."):
        return "custom modelling code (trust_remote_code) may do anything after the head"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear:
        return f"the output head is a {type(head).__name__}, not a plain Linear (e.g. an adapter on lm_head)"
    return None


def install(model, *, mode: str, tokens_per_micro_batch: int) -> TiledHead | None:
    """Patch ``model``'s head (the transformers model, under any PEFT wrapper) for tiled losses.

    Args:
        model: the model the engine trains (a ``PeftModel`` is unwrapped to its base).
        mode: ``always``, ``never`` or ``auto`` (tile when the micro batch's fp32 logits would exceed 1 GiB).
        tokens_per_micro_batch: micro batch x seq_len.

    Returns:
        The :class:`TiledHead`, or None when not installed (``never``, ``auto`` below the threshold, or a model the
        tiled loss would get wrong: logged, and the plain loss is used).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    vocab = int(getattr(base.config, "vocab_size", 0) or 0)
    if not tiles_loss(mode, tokens_per_micro_batch=tokens_per_micro_batch, vocab_size=vocab):
        return None
    reason = _why_not(base)
    if reason is not None:
        logger.warning("train.tiled_loss=%s: not tiling the loss, %s", mode, reason)
        return None
    return TiledHead(base.get_output_embeddings(), vocab)


def summed_loss(engine, kwargs: dict, head: TiledHead | None) -> torch.Tensor:
    """The micro batch's summed target-token loss: the model's own (``num_items_in_batch=1``) or the tiled one."""
    if head is None:
        return engine(**kwargs, num_items_in_batch=torch.ones((), device=engine.device)).loss
    kwargs = dict(kwargs)
    labels = kwargs.pop("labels")
    with head.targets(labels):
        return engine(**kwargs).logits
