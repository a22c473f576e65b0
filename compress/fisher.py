"""Empirical Fisher of Linear weights: squared gradients of the language-model loss, block by block.

FWSVD weighs a layer's reconstruction error by how much the loss cares about each weight:
F_ij = Σ_samples (∂L/∂W_ij)². The gradients here are the exact full-model ones, yet only one
decoder block is on the device at a time:

1. forward the calibration sequences through the dense blocks (no autograd), keeping every
   block's input on the offload device (a chunk of sequences at a time, to bound memory);
2. the tail (final norm, LM head, loss) runs through the model's own forward with every block's
   forward replaced (`blocks_replaced`): the last one returns the stored final hidden state, so
   it works for any architecture; its gradient w.r.t. that state starts the backward pass;
3. walking the blocks backwards, each one recomputes its forward from its stored input (and its
   own keyword arguments: masks and RoPE differ per layer type) with autograd on, back-propagates the incoming gradient, and hands the gradient of its input to
   the block before it. Squared weight gradients are summed per sequence (batch of one: the
   empirical Fisher is a sum over samples, not the square of a batch mean).

`collect_fisher` keeps only the row and column sums of F (out + in numbers per layer, not
out × in) and the layer's Fisher energy Σ_ij F_ij·W_ij² (the second-order loss increase, times
two, if every weight moved by its own size: how much the loss cares about this layer, which the
knapsack's `fisher` cost uses); M-FAC takes the per-sequence gradients themselves through
`backward_walk`.

With `embeddings=True` it also prices the token embeddings and the output head, which the
knapsack may quantize (recipe `embeddings: {bits: [8, 4]}`), keeping the two roles of the table
apart even when they share one matrix (a tied head). For each role it sums the row and column
sums of F (a rank-1 model of the Fisher, F_vj ≈ r_v·c_j / Σr, within 10% of the full diagonal's
price on SmolLM2's head), which prices a rounding error ΔW as Σ F·ΔW² without the vocabulary ×
hidden matrix. The lookup's gradient comes from block 0's input gradient, run back through the
model's own embedding code (scaling, positions: any architecture). The head's Fisher is summed
per token, not per sequence: its tokens' gradients share directions (the softmax pushes the
same frequent tokens' logits at every position), so squaring their sum overstated the head's
loss increase under W4 (per token: 0.14 nats against 0.085 measured; per sequence about 3x more).
Per token, (∂L/∂z_tv)²·h_tj² sums to what the sequence-level Fisher would be if tokens were
independent: the units of the Linears' energies.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .blocks import (
    StopForward,
    block_forward,
    blocks_replaced,
    capture_block_inputs,
    forward_through_blocks,
    move_outside_blocks,
    split_hidden,
    tail_only,
    to_device,
)

logger = logging.getLogger("compress")


GradientCallback = Callable[[str, torch.Tensor], None]  # (layer name, one sequence's weight gradient)
BlockCallback = Callable[[int], None]  # called after a block's backward, with its index

# the key of the embeddings' sums in `collect_fisher`'s result (no Linear is named so)
EMBEDDING_STATS = "<embeddings>"


@dataclass
class EmbeddingHooks:
    """What `backward_walk` reports about the embeddings, per sequence."""

    # the embedding table's gradient through the lookup alone
    on_lookup_gradient: Callable[[torch.Tensor], None]
    # the head's input (tokens × hidden) and the loss gradient at its output (tokens × vocabulary)
    on_head: Callable[[torch.Tensor, torch.Tensor], None]


def backward_walk(
    model: nn.Module,
    blocks: nn.ModuleList,
    linears: dict[str, nn.Linear],
    input_ids: torch.Tensor,
    device: torch.device,
    offload_device: torch.device,
    on_gradient: GradientCallback,
    on_block_done: BlockCallback | None = None,
    chunk_size: int = 8,
    progress: bool = True,
    desc: str = "Backward passes",
    embeddings: EmbeddingHooks | None = None,
) -> None:
    """Exact per-sequence weight gradients of the LM loss for `linears`, one block on the device.

    `on_gradient(name, grad)` receives every sequence's gradient of every target weight;
    `on_block_done(index)` runs when a block's backward is finished for the current chunk (with
    one chunk holding every sequence, the block's gradients are then complete); `embeddings`:
    also the embedding table's gradient per role and the head's inputs. The model is left as it
    was (requires_grad flags, train/eval mode).
    """
    by_weight = {id(lin.weight): name for name, lin in linears.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(input_ids), desc=desc, disable=not progress, unit="seq")
    try:
        for chunk in input_ids.split(chunk_size):
            _walk_chunk(model, blocks, chunk, by_weight, on_gradient, on_block_done, device, offload_device, embeddings)
            bar.update(len(chunk))
    finally:
        bar.close()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)


def collect_fisher(
    model: nn.Module,
    blocks: nn.ModuleList,
    linears: dict[str, nn.Linear],
    input_ids: torch.Tensor,
    device: torch.device,
    offload_device: torch.device,
    chunk_size: int = 8,
    progress: bool = True,
    embeddings: bool = False,
) -> dict[str, dict[str, torch.Tensor]]:
    """{layer name: {"fisher_row": (out,), "fisher_col": (in,), "fisher_energy": ()}} summed over
    calibration sequences; with `embeddings`, also `EMBEDDING_STATS`: {"lookup_row": (vocab,),
    "lookup_col": (hidden,), "head_row": (vocab,), "head_col": (hidden,)}."""
    sums = {
        name: {
            "fisher_row": torch.zeros(lin.out_features, dtype=torch.float64),
            "fisher_col": torch.zeros(lin.in_features, dtype=torch.float64),
            "fisher_energy": torch.zeros((), dtype=torch.float64),
        }
        for name, lin in linears.items()
    }

    def accumulate(name: str, grad: torch.Tensor) -> None:
        g2 = grad.double().square()
        sums[name]["fisher_row"] += g2.sum(1).cpu()
        sums[name]["fisher_col"] += g2.sum(0).cpu()
        sums[name]["fisher_energy"] += (g2 * linears[name].weight.detach().double().square()).sum().cpu()

    hooks = None
    if embeddings:
        hooks = _embedding_sums(model, sums)
    backward_walk(
        model, blocks, linears, input_ids, device, offload_device, accumulate,
        chunk_size=chunk_size, progress=progress, desc="Fisher (backward passes)", embeddings=hooks,
    )  # fmt: skip
    return sums


def _embedding_sums(model: nn.Module, sums: dict[str, dict[str, torch.Tensor]]) -> EmbeddingHooks:
    """Adds `EMBEDDING_STATS` to `sums` and returns the hooks that fill it: {"lookup_row",
    "lookup_col", "head_row", "head_col"}, the row (vocabulary) and column (hidden) sums of each
    role's Fisher: the lookup's from per-sequence gradients, the head's per token."""
    vocab, hidden = model.get_input_embeddings().weight.shape
    entry = sums[EMBEDDING_STATS] = {
        f"{role}_{axis}": torch.zeros(vocab if axis == "row" else hidden, dtype=torch.float64)
        for role in ("lookup", "head") for axis in ("row", "col")
    }  # fmt: skip

    def on_lookup_gradient(grad: torch.Tensor) -> None:
        """Only the rows the sequence looked up are nonzero: square those (a vocabulary × hidden
        float64 copy would take 4 GB at Llama-3-8B's size)."""
        rows = torch.nonzero(grad.abs().amax(1) > 0).flatten()
        g2 = grad[rows].double().square()
        entry["lookup_row"][rows.cpu()] += g2.sum(1).cpu()
        entry["lookup_col"] += g2.sum(0).cpu()

    def on_head(x: torch.Tensor, logit_grad: torch.Tensor, tokens: int = 256) -> None:
        """F_vj = Σ_t (∂L/∂z_tv)²·h_tj²: row sums Σ_t (∂L/∂z_tv)²·‖h_t‖², column sums Σ_t ‖∂L/∂z_t‖²·h_tj²
        (a slice of tokens at a time: tokens × vocabulary squares are large)."""
        x = x.reshape(-1, x.shape[-1])
        logit_grad = logit_grad.reshape(x.shape[0], -1)
        for start in range(0, x.shape[0], tokens):
            x2 = x[start : start + tokens].double().square()
            g2 = logit_grad[start : start + tokens].float().square()
            entry["head_row"] += (g2.T @ x2.sum(1).float()).double().cpu()
            entry["head_col"] += (g2.sum(1, dtype=torch.float64) @ x2).cpu()

    return EmbeddingHooks(on_lookup_gradient, on_head)


def _walk_chunk(model, blocks, chunk, by_weight, on_gradient, on_block_done, device, offload_device, embeddings=None) -> None:
    captured = capture_block_inputs(model, blocks, chunk, 1, device, offload_device)
    # 1. dense forward, keeping each block's inputs
    inputs: list[list[torch.Tensor]] = []
    hiddens, as_tuple = forward_through_blocks(blocks, captured, device, offload_device, keep_inputs=inputs)
    # 2. the tail: loss from the last hidden state, through the model's own forward
    grads = _tail_gradients(model, blocks, chunk, hiddens, as_tuple, device, offload_device, embeddings)
    # 3. backward through the blocks, last to first
    for index in reversed(range(len(blocks))):
        block = blocks[index]
        block.to(device)
        weights = [m.weight for m in block.modules() if id(getattr(m, "weight", None)) in by_weight]
        for w in weights:
            w.requires_grad_(True)
        new_grads = []
        for hidden, kwargs, grad in zip(inputs[index], captured.kwargs[index], grads):
            x = hidden.to(device).requires_grad_(True)
            with torch.enable_grad():
                out, _ = block_forward(block, x, to_device(kwargs, device))
                out.backward(grad.to(device))
            for w in weights:
                on_gradient(by_weight[id(w)], w.grad.detach())
                w.grad = None
            new_grads.append(x.grad.detach().to(offload_device))
        for w in weights:
            w.requires_grad_(False)
        if on_block_done is not None:
            on_block_done(index)
        block.to(offload_device)
        grads = new_grads
    if embeddings is not None:  # 4. the lookup: from block 0's input gradient back to the table
        _lookup_gradients(model, blocks, chunk, grads, device, offload_device, embeddings.on_lookup_gradient)


def _tail_gradients(model, blocks, chunk, last_hiddens, as_tuple, device, offload_device, embeddings=None) -> list[torch.Tensor]:
    """∂loss/∂(last hidden state) for each sequence of the chunk, using the model's own norm, head
    and loss. No block is computed: each passes its input on and the last returns the stored state.
    `embeddings`: also report the head's input and the loss gradient at its output (the stored
    state cuts the path from the embedding lookup: only the head's role)."""
    head = model.get_output_embeddings() if embeddings is not None else None
    at_head: dict[str, torch.Tensor] = {}

    def keep_head(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        output.retain_grad()
        at_head.update(x=args[0].detach(), z=output)

    hook = head.register_forward_hook(keep_head) if head is not None else None
    grads = []
    try:
        with tail_only(model, blocks, as_tuple, device, offload_device) as hand_over:
            for seq, hidden in zip(chunk, last_hiddens):
                h = hidden.to(device).requires_grad_(True)
                hand_over(h)
                with torch.enable_grad():
                    ids = seq[None].to(device)
                    loss: Any = model(input_ids=ids, labels=ids, use_cache=False).loss
                    loss.backward()
                grads.append(h.grad.detach().to(offload_device))
                if hook is not None:
                    embeddings.on_head(at_head["x"], at_head.pop("z").grad.detach())
    finally:
        at_head.clear()
        if hook is not None:
            hook.remove()
    return grads


def _lookup_gradients(model, blocks, chunk, first_grads, device, offload_device, on_gradient: Callable[[torch.Tensor], None]) -> None:
    """Per sequence: the model's forward up to block 0 (its own embedding code: scaling, positions),
    then block 0's input gradient run back to the embedding table ("lookup" role)."""
    table = model.get_input_embeddings().weight
    state: dict[str, torch.Tensor] = {}

    def stop_at_first(index: int, args: tuple, kwargs: dict):
        state["first"] = split_hidden(args, kwargs)[0]
        raise StopForward

    table.requires_grad_(True)
    move_outside_blocks(model, blocks, device)
    try:
        with blocks_replaced(blocks, stop_at_first):
            for seq, grad in zip(chunk, first_grads):
                with torch.enable_grad():
                    try:
                        model(input_ids=seq[None].to(device), use_cache=False)
                    except StopForward:
                        pass
                    state.pop("first").backward(grad.to(device))
                on_gradient(table.grad.detach())
                table.grad = None
    finally:
        state.clear()
        table.requires_grad_(False)
        move_outside_blocks(model, blocks, offload_device)
