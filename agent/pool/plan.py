"""Which nodes hold a pooled model, and how many of its layers each one holds.

Members are picked by the memory they offer (biggest offers first, so a pool has as few members, and as
few network hops per token, as it can). The layers are then shared out by *measured speed within
memory*: generating a token reads every weight once, so a member's time per token is about its layers'
bytes over its memory bandwidth; giving each member layers in proportion to its bandwidth evens those
times out (the memory-bound term of prima.cpp's Halda scheduler, which also weighs compute, disk and the
devices' other work). No member gets more layers than its offer holds; what a capped member cannot take
goes to the others, again by bandwidth ("water-filling"). The output layer (for small models often the
biggest tensor: the vocabulary) goes to the last device: the head's own when it can hold it, since the
logits come back from that device every token, else the one with the most memory.

The counts become llama.cpp's ``--tensor-split`` over the members' RPC devices: with every layer offloaded,
llama.cpp gives device *j* exactly the layers whose index falls below the running sum of the counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import HearthError
from .capacity import Offer

MIB = 1 << 20
OVERHEAD_BASE = 48 * MIB
"""Compute buffers and backend state on each member device, beside its layers and their KV cache."""
OVERHEAD_PER_TOKEN = 4 * 1024
"""Each device's compute buffer grows with the context (attention scratch against every cached token)."""


class PoolTooSmall(HearthError):
    """The household does not offer enough memory to hold the model."""


@dataclass(frozen=True)
class ModelLayout:
    """A model's memory, layer by layer, as the pool splits it."""

    layer_bytes: tuple[int, ...]
    """Weights of each repeating layer (blk.N.*)."""
    output_bytes: int
    """The output layer: output.weight (or the token embedding it is tied to, which llama.cpp copies onto
    the output's device) and the final norm."""
    kv_per_layer: int
    """KV cache of one layer for the whole context (every slot)."""
    context: int
    """Tokens of context over every slot."""

    @property
    def n_layers(self) -> int:
        """Repeating layers."""
        return len(self.layer_bytes)

    @property
    def per_layer(self) -> int:
        """What one layer costs on a member, conservatively: the biggest layer's weights plus its KV cache."""
        return (max(self.layer_bytes) if self.layer_bytes else 0) + self.kv_per_layer

    @property
    def overhead(self) -> int:
        """A member device's compute buffers."""
        return OVERHEAD_BASE + self.context * OVERHEAD_PER_TOKEN

    @property
    def total(self) -> int:
        """Everything the members hold together, on one device (more devices add an overhead each)."""
        return sum(self.layer_bytes) + self.output_bytes + self.kv_per_layer * self.n_layers + self.overhead


def layout_from_gguf(path: Path, context: int) -> ModelLayout:
    """The layout of the GGUF at *path* with *context* tokens of KV cache (hearth.models.gguf)."""
    from ..models.gguf import model_facts, tensor_sizes

    facts = model_facts(path)
    sizes = tensor_sizes(path)
    n_layers = int(facts.n_layers or 0) or 1 + max((int(n.split(".")[1]) for n in sizes if n.startswith("blk.")),
                                                      default=0)
    layers = [0] * n_layers
    output = 0
    for name, size in sizes.items():
        parts = name.split(".")
        if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit() and int(parts[1]) < n_layers:
            layers[int(parts[1])] += size
        elif parts[0] in ("output", "output_norm"):
            output += size
    if "output.weight" not in sizes:
        output += sizes.get("token_embd.weight", 0)
    kv_total = facts.kv_cache_bytes(context) or 0
    return ModelLayout(tuple(layers), output, kv_total // max(1, n_layers), context)


@dataclass(frozen=True)
class Share:
    """One member device's part of a pooled model."""

    node: str
    name: str
    device: str
    layers: int
    """Repeating layers it holds."""
    output: bool
    """It also holds the output layer (the last device)."""
    bytes: int
    """What it will hold (estimate): weights, KV cache, compute buffers."""
    offered: int
    bandwidth_gbs: float

    @property
    def split(self) -> int:
        """Its entry in llama.cpp's --tensor-split (the output layer counts as one)."""
        return self.layers + (1 if self.output else 0)


@dataclass(frozen=True)
class Plan:
    """A pool: the member devices in llama.cpp's device order, and their shares."""

    shares: tuple[Share, ...]

    @property
    def members(self) -> tuple[str, ...]:
        """The member nodes, each once, in device order."""
        return tuple(dict.fromkeys(s.node for s in self.shares))

    @property
    def tensor_split(self) -> tuple[int, ...]:
        """llama.cpp's --tensor-split values."""
        return tuple(s.split for s in self.shares)

    def devices_of(self, node: str) -> tuple[str, ...]:
        """The devices *node* contributes, in order (what its rpc-server exposes, in that order)."""
        return tuple(s.device for s in self.shares if s.node == node)

    def describe(self) -> str:
        """'hearth-a 10 layers (CPU), hearth-b 8 layers + output (CPU)'."""
        return ", ".join(f"{s.name} {s.layers} layers{' + output' if s.output else ''} ({s.device})" for s in self.shares)


@dataclass(frozen=True)
class _Slice:
    offer: Offer
    device: str
    bytes: int
    bandwidth: float


def split_layers(n_layers: int, caps: Sequence[int], weights: Sequence[float]) -> list[int]:
    """*n_layers* shared out in proportion to *weights*, none above its cap (water-filling), in whole layers.

    Raises PoolTooSmall when the caps together hold fewer than *n_layers*."""
    if sum(caps) < n_layers:
        raise PoolTooSmall(f"the members hold {sum(caps)} of {n_layers} layers")
    weights = [w if w > 0 else 1.0 for w in weights]
    exact = [0.0] * len(caps)
    free = set(range(len(caps)))
    left = float(n_layers)
    while left > 1e-9 and free:
        total = sum(weights[i] for i in free)
        capped = {i for i in free if exact[i] + left * weights[i] / total >= caps[i]}
        if not capped:
            for i in free:
                exact[i] += left * weights[i] / total
            left = 0.0
            break
        for i in capped:
            left -= caps[i] - exact[i]
            exact[i] = float(caps[i])
        free -= capped
    counts = [min(caps[i], math.floor(exact[i] + 1e-9)) for i in range(len(caps))]
    # Largest remainders first, never above a cap: the whole layers that rounding left over.
    order = sorted(range(len(caps)), key=lambda i: (exact[i] - counts[i], weights[i]), reverse=True)
    while sum(counts) < n_layers:
        for i in order:
            if sum(counts) < n_layers and counts[i] < caps[i]:
                counts[i] += 1
    return counts


def plan(layout: ModelLayout, offers: Sequence[Offer], prefer: str = "") -> Plan:
    """Pick member devices from *offers* (biggest offers first; *prefer*'s node wins ties: no hop) and split
    *layout*'s layers among them by bandwidth within memory. Raises PoolTooSmall when they cannot hold it."""
    slices = [_Slice(o, d.name, d.bytes, d.bandwidth_gbs) for o in offers if o.rpc_ready
              for d in o.devices if d.bytes > layout.overhead]
    slices.sort(key=lambda s: (s.bytes, s.offer.node == prefer, s.bandwidth), reverse=True)
    offered = sum(s.bytes for s in slices)
    per = max(1, layout.per_layer)
    for n in range(1, len(slices) + 1):
        chosen = slices[:n]
        # The last device holds the output layer, and the logits (vocabulary x 4 bytes per token: 1 MiB for
        # Gemma 3) come back from it every token: the head's own device when it can hold the output keeps
        # them off the network; otherwise the one with the most memory.
        fits = [i for i in range(n) if chosen[i].bytes >= layout.overhead + layout.output_bytes]
        own = [i for i in fits if chosen[i].offer.node == prefer]
        last = own[0] if own else max(range(n), key=lambda i: chosen[i].bytes)
        order = [s for i, s in enumerate(chosen) if i != last] + [chosen[last]]
        caps = [max(0, (s.bytes - layout.overhead - (layout.output_bytes if i == n - 1 else 0)) // per)
                for i, s in enumerate(order)]
        if order[-1].bytes < layout.overhead + layout.output_bytes or sum(caps) < layout.n_layers:
            continue
        counts = split_layers(layout.n_layers, caps, [s.bandwidth for s in order])
        shares = []
        for i, (s, k) in enumerate(zip(order, counts, strict=True)):
            if k == 0 and i != n - 1:
                continue  # a device with nothing to hold is no member
            out = i == n - 1
            held = k * per + layout.overhead + (layout.output_bytes if out else 0)
            shares.append(Share(s.offer.node, s.offer.name, s.device, k, out, held, s.bytes, s.bandwidth))
        return Plan(tuple(shares))
    from ..hardware.report import gib

    raise PoolTooSmall(f"the household offers {gib(offered)} to the pool but the model needs about "
                       f"{gib(layout.total)} across its members",
                       hint="add a node, free memory, or raise pool.max_ram_mib on the members")
