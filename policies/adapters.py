"""Adapters on the FLUX transformer: plain LoRA (peft) on the attention projections, MoE-LoRA on the FFN
output layers (MultiCrafter Sec. 4.3) and MUSAR's dual-branch LoRA (token-type dependent branches).
The base weights stay frozen; only adapter parameters train."""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Literal, NamedTuple

import torch
import torch.nn.functional as F
from peft import LoraConfig

from policies.attention import TemperatureMLP, TokenLayout
from policies.config import DualBranchLoRAConfig, LoRAConfig, MoELoRAConfig

PEFT_ADAPTER_NAME = "default"

# FFN output layers that carry MoE-LoRA, relative to a block (never the model's final proj_out).
DOUBLE_BLOCK_FFN_OUTPUTS = ("ff.net.2", "ff_context.net.2")
SINGLE_BLOCK_FFN_OUTPUTS = ("proj_out",)
# Dual-branch LoRA sits on the image-stream attention projections of double blocks (the prompt stream's
# add_* projections get no LoRA) and on the joint-stream projections of single blocks.
DOUBLE_BLOCK_DUAL_BRANCH = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
SINGLE_BLOCK_DUAL_BRANCH = ("attn.to_q", "attn.to_k", "attn.to_v")


# ---- pure math ----------------------------------------------------------------------------------------


def moe_gate_weights(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch-style gate (MultiCrafter Sec. 4.3 with the raw probability): p = softmax(W_g h) over all
    N_e experts, kept at the top-k experts and zeroed elsewhere, not renormalized (renormalized top-1
    weights are always 1 and would give the gate no gradient from the main loss).
    logits (..., N_e) -> weights (..., N_e)."""
    probabilities = logits.softmax(dim=-1)
    chosen = logits.topk(top_k, dim=-1).indices
    keep = torch.zeros_like(probabilities).scatter_(-1, chosen, 1.0)
    return probabilities * keep


def moe_lora_delta(
    hidden: torch.Tensor,
    gate_weights: torch.Tensor,
    experts: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """MoE-LoRA update with sparse top-k dispatch: delta(h) = scaling * sum_{e in experts(h)} w_e B_e A_e h,
    computing only the chosen experts' LoRA for each token.

    ``gate_weights`` are moe_gate_weights' output (zero outside the top-k), so this equals the dense
    scaling * sum_e w_e B_e A_e h over all N_e experts, at k / N_e of its matmul work. The T * k
    (token, slot) assignments are grouped by expert (stable sort: token order kept inside a group); each
    expert runs two matmuls on its gathered rows x_e, down = x_e A_e^T and up = (w_e * down) B_e^T, and
    up is added back to its tokens with index_add_. The gate weight multiplies inside the graph, so the
    gate gets the same gradient through p as in the dense form. The group sizes are read on the host.

    hidden (..., d_in), gate_weights (..., N_e), experts (..., k) int64, lora_A (N_e, r, d_in),
    lora_B (N_e, d_out, r), all of one floating dtype -> (..., d_out)."""
    num_experts, _, d_in = lora_A.shape
    d_out, top_k = lora_B.shape[1], experts.shape[-1]
    x = hidden.reshape(-1, d_in)  # (T, d_in)
    chosen = experts.reshape(-1, top_k)  # (T, k)
    weight = gate_weights.reshape(-1, num_experts).gather(1, chosen) * scaling  # (T, k)
    chosen, weight = chosen.reshape(-1), weight.reshape(-1)  # (T k,) token-major assignments
    order = torch.argsort(chosen, stable=True)  # (T k,) assignments grouped by expert, token order kept
    tokens = order // top_k  # (T k,) token of each grouped assignment
    counts = torch.bincount(chosen, minlength=num_experts).tolist()  # host sync: group sizes
    delta = x.new_zeros(x.shape[0], d_out)  # (T, d_out)
    # unbind (not indexing) so backward stacks the per-expert grads once instead of N_e full-size scatters;
    # an expert without tokens runs on 0 rows (no work) and so gets an exact zero grad, as in the dense form
    groups = zip(tokens.split(counts), weight[order].split(counts), lora_A.unbind(0), lora_B.unbind(0))
    for token_e, weight_e, a_e, b_e in groups:
        down = F.linear(x.index_select(0, token_e), a_e)  # (n_e, r)
        delta.index_add_(0, token_e, F.linear(down * weight_e[:, None], b_e))  # (n_e, d_out) added to tokens
    return delta.reshape(*hidden.shape[:-1], d_out)


def load_balancing_loss(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch Transformer auxiliary loss: N_e * sum_e f_e P_e, where f_e is the fraction of top-k
    assignments that go to expert e and P_e the mean router probability of e over tokens.
    Equals 1 for perfectly uniform routing. logits (..., N_e) -> scalar."""
    num_experts = logits.shape[-1]
    flat = logits.reshape(-1, num_experts)
    chosen = flat.topk(top_k, dim=-1).indices
    fraction = F.one_hot(chosen, num_experts).float().sum(dim=1).mean(dim=0) / top_k
    mean_probability = flat.softmax(dim=-1).mean(dim=0)
    return num_experts * (fraction * mean_probability).sum()


# ---- modules ------------------------------------------------------------------------------------------


class RouterRecord(NamedTuple):
    """One MoE-LoRA layer's routing in the last forward: observable and usable for the aux loss."""

    logits: torch.Tensor  # (B, S, N_e), with graph
    experts: torch.Tensor  # (B, S, top_k) chosen expert indices


class MoELoRALinear(torch.nn.Module):
    """h_out = W h + sum_e p_e (alpha / r) B_e A_e h with p from moe_gate_weights (MultiCrafter Sec. 4.3).

    A_e start Kaiming-uniform and B_e at zero (as peft's LoRA), so the layer starts equal to its base.
    Only each token's top-k experts are computed (moe_lora_delta's sparse dispatch)."""

    def __init__(self, base: torch.nn.Linear, cfg: MoELoRAConfig, context: ForwardContext):
        super().__init__()
        if not 1 <= cfg.top_k <= cfg.num_experts:
            raise ValueError(f"moe_lora.top_k must be in [1, num_experts={cfg.num_experts}], got {cfg.top_k}")
        self.base = base
        self.top_k = cfg.top_k
        self.scaling = cfg.alpha / cfg.rank
        self.gate = torch.nn.Linear(base.in_features, cfg.num_experts, bias=False)
        self.lora_A = torch.nn.Parameter(torch.empty(cfg.num_experts, cfg.rank, base.in_features))
        self.lora_B = torch.nn.Parameter(torch.zeros(cfg.num_experts, base.out_features, cfg.rank))
        for a in self.lora_A:
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.gate.requires_grad_(not cfg.freeze_gate)
        self.context = context
        self.adapter_enabled = True

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden (B, S, d_in) -> (B, S, d_out)
        if not self.adapter_enabled:
            return self.base(hidden)
        adapter_input = hidden.to(self.lora_A.dtype)  # adapters may stay fp32 on a bf16 model
        logits = self.gate(adapter_input)  # (B, S, N_e)
        weights = moe_gate_weights(logits, self.top_k)  # (B, S, N_e), zero outside the top-k
        experts = logits.topk(self.top_k, dim=-1).indices  # (B, S, top_k)
        delta = moe_lora_delta(adapter_input, weights, experts, self.lora_A, self.lora_B, self.scaling)
        self.context.record(RouterRecord(logits, experts))
        output = self.base(hidden)
        return output + delta.to(output.dtype)

    def adapter_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {"gate.weight": self.gate.weight, "lora_A": self.lora_A, "lora_B": self.lora_B}


class ForwardContext:
    """What adapter layers need to know about the model call in progress (they see only their input
    tensor): the token layout (dual-branch LoRA) and where to record routing (MoE-LoRA). The policy binds
    it around each call. A checkpointed block recomputed during backward runs outside the call: its
    recompute gets the layout bound when the block first ran (``checkpoint_contexts``) and records no
    routing, so the call's records are those of its forward alone."""

    def __init__(self) -> None:
        self._layout: TokenLayout | None = None
        self._router: list[RouterRecord] | None = None

    @contextlib.contextmanager
    def bound(self, layout: TokenLayout) -> Iterator[list[RouterRecord]]:
        """Bind ``layout`` for one call; yields the list the MoE-LoRA layers append their routing to."""
        previous = self._layout, self._router
        self._layout, self._router = layout, []
        try:
            yield self._router
        finally:
            self._layout, self._router = previous

    @contextlib.contextmanager
    def _recomputing(self, layout: TokenLayout | None) -> Iterator[None]:
        previous = self._layout, self._router
        self._layout, self._router = layout, None
        try:
            yield
        finally:
            self._layout, self._router = previous

    def checkpoint_contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """torch.utils.checkpoint's ``context_fn``, called when a checkpointed block runs forward: nothing
        changes in the forward; the recompute binds this call's layout and records no routing."""
        return contextlib.nullcontext(), self._recomputing(self._layout)

    @property
    def layout(self) -> TokenLayout:
        if self._layout is None:
            raise RuntimeError("dual-branch LoRA called outside a policy forward: no token layout is bound")
        return self._layout

    def record(self, routing: RouterRecord) -> None:
        if self._router is not None:
            self._router.append(routing)


class DualBranchLoRALinear(torch.nn.Module):
    """MUSAR dual-branch LoRA: W x for prompt tokens; W x + (a_n / r_n) B_n A_n x for noisy-image tokens;
    W x + (a_c / r_c) B_c A_c x for condition (reference) tokens.

    ``stream`` says what the layer sees: "image" = [noisy, references] (double-block image stream) or
    "joint" = [text, noisy, references] (single blocks)."""

    def __init__(self, base: torch.nn.Linear, cfg: DualBranchLoRAConfig, stream: Literal["image", "joint"], context: ForwardContext):
        super().__init__()
        self.base = base
        self.stream = stream
        self.context = context
        self.noisy_A, self.noisy_B = self._branch(base, cfg.noisy_rank)
        self.condition_A, self.condition_B = self._branch(base, cfg.condition_rank)
        self.noisy_scaling = cfg.alpha_ratio  # alpha / r with alpha = alpha_ratio * r
        self.condition_scaling = cfg.alpha_ratio
        self.adapter_enabled = True

    @staticmethod
    def _branch(base: torch.nn.Linear, rank: int) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
        down = torch.nn.Parameter(torch.empty(rank, base.in_features))
        torch.nn.init.kaiming_uniform_(down, a=math.sqrt(5))
        return down, torch.nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden (B, S, d_in) -> (B, S, d_out)
        if not self.adapter_enabled:
            return self.base(hidden)
        layout = self.context.layout
        start = layout.text if self.stream == "joint" else 0
        expected = start + layout.noisy + sum(layout.references)
        if hidden.shape[1] != expected:
            raise ValueError(f"dual-branch LoRA ({self.stream} stream) got {hidden.shape[1]} tokens, layout says {expected}")
        split = start + layout.noisy
        adapter_input = hidden.to(self.noisy_A.dtype)  # adapters may stay fp32 on a bf16 model
        noisy, condition = adapter_input[:, start:split], adapter_input[:, split:]
        deltas = [
            F.linear(F.linear(noisy, self.noisy_A), self.noisy_B) * self.noisy_scaling,
            F.linear(F.linear(condition, self.condition_A), self.condition_B) * self.condition_scaling,
        ]
        if start:
            deltas.insert(0, adapter_input.new_zeros(hidden.shape[0], start, self.base.out_features))
        output = self.base(hidden)
        return output + torch.cat(deltas, dim=1).to(output.dtype)

    def adapter_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {"noisy_A": self.noisy_A, "noisy_B": self.noisy_B, "condition_A": self.condition_A, "condition_B": self.condition_B}


# ---- installing ---------------------------------------------------------------------------------------


def peft_lora_config(cfg: LoRAConfig) -> LoraConfig:
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules), init_lora_weights=True)


def _replace(root: torch.nn.Module, path: str, make) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    base = getattr(parent, leaf) if not leaf.isdigit() else parent[int(leaf)]
    if not isinstance(base, torch.nn.Linear):
        raise TypeError(
            f"{path} is a {type(base).__module__}.{type(base).__name__}, not the plain nn.Linear an adapter "
            "expects (is it already adapted? lora.target_modules must not name the MoE-LoRA layers)"
        )
    wrapped = make(base)
    if leaf.isdigit():
        parent[int(leaf)] = wrapped
    else:
        setattr(parent, leaf, wrapped)


def install_moe_lora(transformer: torch.nn.Module, cfg: MoELoRAConfig, context: ForwardContext) -> None:
    for prefix, blocks, names in (
        ("transformer_blocks", transformer.transformer_blocks, DOUBLE_BLOCK_FFN_OUTPUTS),
        ("single_transformer_blocks", transformer.single_transformer_blocks, SINGLE_BLOCK_FFN_OUTPUTS),
    ):
        for index in range(len(blocks)):
            for name in names:
                _replace(transformer, f"{prefix}.{index}.{name}", lambda base: MoELoRALinear(base, cfg, context))


def install_dual_branch_lora(transformer: torch.nn.Module, cfg: DualBranchLoRAConfig, context: ForwardContext) -> None:
    for prefix, blocks, names, stream in (
        ("transformer_blocks", transformer.transformer_blocks, DOUBLE_BLOCK_DUAL_BRANCH, "image"),
        ("single_transformer_blocks", transformer.single_transformer_blocks, SINGLE_BLOCK_DUAL_BRANCH, "joint"),
    ):
        for index in range(len(blocks)):
            for name in names:
                _replace(transformer, f"{prefix}.{index}.{name}", lambda base, s=stream: DualBranchLoRALinear(base, cfg, s, context))


def custom_adapter_state(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters of the adapters that are not peft's: MoE-LoRA, dual-branch LoRA and the attention
    temperature MLPs, keyed by their module path."""
    state = {}
    for path, module in transformer.named_modules():
        if isinstance(module, (MoELoRALinear, DualBranchLoRALinear)):
            for name, tensor in module.adapter_parameters().items():
                state[f"{path}.{name}"] = tensor
        elif isinstance(module, TemperatureMLP):
            for name, tensor in module.state_dict().items():
                state[f"{path}.{name}"] = tensor
    return state
