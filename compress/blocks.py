"""Decoder-block plumbing: find the blocks, catch what each one receives, run and move them.

Finding the blocks does not assume `model.model.layers`. First choice: the ModuleList whose
children are the classes in the model's own `_no_split_modules` (what accelerate uses to place
whole blocks on one device). Then a list of known attribute paths; last, the longest ModuleList
of identical modules that contain Linears.

What a block receives is caught from the model's own forward (`capture_block_inputs`): every
block's forward is swapped for a recorder that keeps its keyword arguments and passes the hidden
states through. The model itself therefore builds each layer's attention mask (sliding window or
full, chunked) and rotary embedding (per-layer-type RoPE bases, as in Gemma-2/3, Mistral, gpt-oss,
Cohere-2, Llama-4) exactly as in a plain forward, and nothing here is model-specific.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .errors import LlmpressError

KNOWN_BLOCK_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma2/3 text, Phi-3
    "model.language_model.layers",  # Gemma3 / multimodal wrappers
    "model.decoder.layers",  # OPT
    "gpt_neox.layers",  # GPT-NeoX / Pythia
    "transformer.h",  # GPT-2, Falcon, Bloom
    "transformer.blocks",  # MPT
)


def _get(model: nn.Module, path: str) -> nn.Module | None:
    module = model
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _has_linear(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) for m in module.modules())


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return (attribute path, ModuleList) of the repeated decoder blocks."""
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0
    ]
    by_class = [
        (name, module)
        for name, module in candidates
        if no_split and all(type(child).__name__ in no_split for child in module)
    ]
    if by_class:
        return max(by_class, key=lambda item: len(item[1]))
    for path in KNOWN_BLOCK_PATHS:
        module = _get(model, path)
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return path, module
    homogeneous = [
        (name, module)
        for name, module in candidates
        if len({type(child) for child in module}) == 1 and _has_linear(module[0])
    ]
    if homogeneous:
        return max(homogeneous, key=lambda item: len(item[1]))
    raise LlmpressError(
        f"could not find the decoder blocks of {type(model).__name__}: no ModuleList of "
        f"{sorted(no_split) or 'repeated blocks'} and none of {list(KNOWN_BLOCK_PATHS)}. "
        "Please report the architecture"
    )


def weight_stacks(blocks: nn.ModuleList) -> dict[str, int]:
    """Parameters of 3 or more dimensions inside the blocks (fused expert stacks of MoE models,
    e.g. `mlp.experts.gate_up_proj` of shape (experts, 2·inter, hidden)), by name: weights that
    are not nn.Linear modules and that no llmpress method compresses yet."""
    return {
        f"{index}.{name}": param.numel()
        for index, block in enumerate(blocks)
        for name, param in block.named_parameters()
        if param.dim() >= 3
    }


def to_device(obj: Any, device: torch.device | str) -> Any:
    """Move tensors inside nested tuples/lists/dicts (block kwargs) to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def move_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device | str) -> None:
    """Move every parameter/buffer that is not inside the decoder blocks (embeddings, rotary, norm)."""
    inside = {id(m) for m in blocks.modules()}
    for module in model.modules():
        if id(module) in inside:
            continue
        for param in module.parameters(recurse=False):
            param.data = param.data.to(device)
        for key, buf in module._buffers.items():
            if buf is not None:
                module._buffers[key] = buf.to(device)


# (block index, positional args, keyword args) -> what the block returns to the model
BlockStandIn = Callable[[int, tuple, dict], Any]


@contextmanager
def blocks_replaced(blocks: nn.ModuleList, stand_in: BlockStandIn) -> Iterator[None]:
    """Within the context, calling block i runs `stand_in(i, args, kwargs)` instead of its forward.

    The blocks stay in place (the model may read their attributes, e.g. a layer's attention type)
    and only their `forward` is shadowed by an instance attribute; an instance `forward` already
    there (accelerate's offload hooks put one) is restored afterwards.
    """
    saved = [block.__dict__.get("forward") for block in blocks]
    try:
        for index, block in enumerate(blocks):
            block.forward = lambda *args, _i=index, **kwargs: stand_in(_i, args, kwargs)
        yield
    finally:
        for block, forward in zip(blocks, saved):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


class StopForward(Exception):
    """Raised by a block stand-in when nothing after it is needed (the rest of the forward is skipped)."""


def split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict]:
    """(hidden states, the other keyword arguments) of a block call."""
    kwargs = dict(kwargs)
    if args:
        if len(args) > 1:
            raise LlmpressError(
                f"a decoder block was called with {len(args)} positional arguments; llmpress expects the hidden "
                "states alone positionally and the rest as keywords (every transformers v5 model does). Please report the model"
            )
        return args[0], kwargs
    return kwargs.pop("hidden_states"), kwargs


@dataclass
class BlockInputs:
    """Calibration batches entering the current block, and what every block receives besides.

    `hiddens[b]` is batch b's hidden state at the current block's input (advanced by
    `run_block`); `kwargs[i][b]` is block i's own keyword arguments for batch b (attention mask,
    position embeddings, ...). Tensors shared between blocks (layers of one attention type get the
    same mask and RoPE) are stored once.
    """

    hiddens: list[torch.Tensor]
    kwargs: list[list[dict]]


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    input_ids: torch.Tensor,
    batch_size: int,
    device: torch.device | str,
    offload_device: torch.device | str,
) -> BlockInputs:
    """Block 0's hidden states and every block's keyword arguments, for each calibration batch.

    One forward of the model per batch with every block replaced by a recorder (no block is
    computed, none is moved to the device): the model computes each layer's mask and RoPE itself.
    """
    hiddens: list[torch.Tensor] = []
    kwargs: list[list[dict]] = [[] for _ in blocks]
    stored: dict[int, torch.Tensor] = {}  # id of a tensor of this batch -> its offloaded copy

    def keep(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            if id(obj) not in stored:
                stored[id(obj)] = obj.detach().to(offload_device)
            return stored[id(obj)]
        if isinstance(obj, (tuple, list)):
            return type(obj)(keep(o) for o in obj)
        if isinstance(obj, dict):
            return {k: keep(v) for k, v in obj.items()}
        return obj

    def record(index: int, args: tuple, call_kwargs: dict) -> Any:
        hidden, rest = split_hidden(args, call_kwargs)
        if index == 0:
            hiddens.append(hidden.detach().to(offload_device))
        kwargs[index].append(keep(rest))
        if index == len(blocks) - 1:
            raise StopForward
        return hidden

    move_outside_blocks(model, blocks, device)
    try:
        with blocks_replaced(blocks, record):
            for batch in input_ids.split(batch_size):
                stored.clear()
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except StopForward:
                    pass
    finally:
        stored.clear()
        move_outside_blocks(model, blocks, offload_device)
    if any(len(k) != len(hiddens) for k in kwargs):
        called = [len(k) for k in kwargs]
        raise LlmpressError(f"the model's forward did not call every decoder block once per batch (calls per block: {called})")
    return BlockInputs(hiddens, kwargs)


def block_forward(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, bool]:
    """(the block's output hidden state, whether the block returns it inside a tuple)."""
    out = block(hidden, **kwargs)
    return block_output(out), isinstance(out, (tuple, list))


@torch.no_grad()
def forward_through_blocks(
    blocks: nn.ModuleList,
    inputs: BlockInputs,
    device: torch.device | str,
    offload_device: torch.device | str,
    keep_inputs: list[list[torch.Tensor]] | None = None,
) -> tuple[list[torch.Tensor], bool]:
    """(the final hidden state of every batch, whether the blocks return tuples): the dense blocks
    one at a time on `device`, outputs offloaded; `keep_inputs` receives each block's inputs."""
    hiddens, as_tuple = inputs.hiddens, False
    for index, block in enumerate(blocks):
        block.to(device)
        if keep_inputs is not None:
            keep_inputs.append(hiddens)
        outputs = []
        for hidden, kwargs in zip(hiddens, inputs.kwargs[index]):
            out, as_tuple = block_forward(block, hidden.to(device), to_device(kwargs, device))
            outputs.append(out.to(offload_device))
        hiddens = outputs
        block.to(offload_device)
    return hiddens, as_tuple


@contextmanager
def tail_only(
    model: nn.Module, blocks: nn.ModuleList, as_tuple: bool, device: torch.device | str, offload_device: torch.device | str
) -> Iterator[Callable[[torch.Tensor], None]]:
    """Within the context the model's forward computes only what follows the decoder blocks (final
    norm, head, loss) from a final hidden state handed in with `hand_over(hidden)` before each
    call: every block passes its input on and the last returns that state. The parts outside the
    blocks are on `device` meanwhile."""
    last = len(blocks) - 1
    state: dict[str, torch.Tensor] = {}

    def stand_in(index: int, args: tuple, kwargs: dict):
        hidden = state["last"] if index == last else split_hidden(args, kwargs)[0]
        return (hidden,) if as_tuple else hidden

    move_outside_blocks(model, blocks, device)
    try:
        with blocks_replaced(blocks, stand_in):
            yield lambda hidden: state.__setitem__("last", hidden)
    finally:
        state.clear()
        move_outside_blocks(model, blocks, offload_device)


def block_output(out: Any) -> torch.Tensor:
    """The hidden state in a block's return value (a tensor, or a tuple whose first item it is)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def run_block(
    block: nn.Module,
    hiddens: list[torch.Tensor],
    kwargs: list[dict],
    device: torch.device | str,
    offload_device: torch.device | str,
    keep: bool,
) -> list[torch.Tensor] | None:
    """Run every batch through `block` with its own kwargs; return the outputs (offloaded) if `keep`."""
    outputs = [] if keep else None
    for hidden, block_kwargs in zip(hiddens, kwargs):
        out = block_output(block(hidden.to(device), **to_device(block_kwargs, device)))
        if keep:
            outputs.append(out.detach().to(offload_device))
    return outputs
