"""Attention over rows packed into a prefix tree (ppo.pack_rows) that computes only the blocks
the tree lets a token see, instead of the dense (N, N) masked product.

A packed minibatch holds every distinct prefix once; a token sees its ancestors and itself. Rows
are inserted one after another, so each row adds one contiguous run of new tokens (its part
after what it shares with earlier rows), and every token of that run sees the same ancestors
(the row's shared part) plus the run's earlier tokens. One attention per run over exactly
those keys equals the dense masked attention (the masked entries weigh exactly zero there), at
a fraction of its cost: 8 rows of ~190 tokens sharing a 66-token system prompt pack into ~900
tokens, 810k query-key pairs dense against ~130k in the runs.

The model selects it as its attention implementation (`enable_tree_attention`); a forward
without `tree_segments` (generate(), padded batches) goes to SDPA unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

TREE_ATTENTION = "outcomeloop_tree"


@dataclass(frozen=True)
class TreeSegment:
    """One row's run of new tokens, packed[start:end], and the packed indices they may see."""

    start: int
    end: int
    keys: Tensor  # (m + run,) long: the row's m shared ancestors, then the run itself
    mask: Tensor  # (run, m + run) bool: True where the query sees the key


def tree_segments(paths: Sequence[Sequence[int]], device: Any = "cpu") -> list[TreeSegment]:
    """The runs of rows inserted in order into a prefix tree, from each row's path of packed
    indices (ancestors first); rows that add no token (a prefix of an earlier row) add none."""
    segments = []
    created = 0  # tokens created by earlier rows: indices below it are shared
    for path in paths:
        shared = 0
        while shared < len(path) and path[shared] < created:
            shared += 1
        run = list(path[shared:])
        if not run:
            continue
        if run != list(range(created, created + len(run))):
            raise ValueError("a row's new tokens must follow each other in the packing")
        causal = torch.ones((len(run), len(run)), dtype=torch.bool).tril()
        mask = torch.cat([torch.ones((len(run), shared), dtype=torch.bool), causal], dim=1)
        keys = torch.tensor([*path[:shared], *run], dtype=torch.long)
        segments.append(TreeSegment(created, created + len(run), keys.to(device), mask.to(device)))
        created += len(run)
    return segments


def tree_attention(
    module: Any,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    tree_segments: Sequence[TreeSegment] | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' attention interface: query (B, H, N, D), key and value (B, H_kv, N, D);
    returns (B, N, H, D). With `tree_segments` (B = 1), attention run by run."""
    if tree_segments is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if query.shape[0] != 1:
        raise ValueError("tree attention takes one packed sequence")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # query head h reads key head h // groups, as transformers' repeat_kv
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    outputs = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, segment.start : segment.end],
            key.index_select(2, segment.keys),
            value.index_select(2, segment.keys),
            attn_mask=segment.mask,
            dropout_p=dropout,
            scale=scaling,
        )
        for segment in tree_segments
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def enable_tree_attention(model: Any) -> None:
    """Make tree attention the model's attention implementation (SDPA where no tree is given)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(TREE_ATTENTION, tree_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(TREE_ATTENTION, sdpa_mask)
    model.set_attn_implementation(TREE_ATTENTION)


def uses_tree_attention(model: Any) -> bool:
    return getattr(model.config, "_attn_implementation", None) == TREE_ATTENTION
