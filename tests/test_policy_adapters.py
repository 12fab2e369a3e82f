"""LoRA (peft), MoE-LoRA and dual-branch LoRA: the gate and module formulas, gradients, what trains,
save/load, and loading the plain LoRA into diffusers' FluxPipeline."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file, save_file

from policies import (
    AttentionSwitches,
    DualBranchLoRAConfig,
    LoRAConfig,
    MoELoRAConfig,
    TinyFluxConfig,
    TokenLayout,
    load_balancing_loss,
    moe_gate_weights,
)
from policies.adapters import DualBranchLoRALinear, ForwardContext, MoELoRALinear, moe_lora_delta
from policies.components import build_tiny_components
from policies.ids import unpack_latents
from policy_helpers import PROMPTS, conditioning, latents, randomize_adapters, tiny_policy, transformer_inputs

SWITCHES_ON = AttentionSwitches(static_routing=True, temperature=True)


def test_gate_keeps_raw_softmax_at_top_k():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    p = torch.softmax(logits, dim=-1)[0]
    torch.testing.assert_close(moe_gate_weights(logits, 1), torch.tensor([[0.0, p[1], 0.0, 0.0]]))
    torch.testing.assert_close(moe_gate_weights(logits, 2), torch.tensor([[0.0, p[1], p[2], 0.0]]))


def test_load_balancing_loss_is_one_when_balanced_and_larger_when_not():
    balanced = torch.eye(4) * 5.0  # token i strongly prefers expert i
    torch.testing.assert_close(load_balancing_loss(balanced, 1), torch.tensor(1.0))
    collapsed = torch.zeros(4, 4)
    collapsed[:, 0] = 5.0
    p0 = torch.softmax(collapsed[0], dim=0)[0]
    torch.testing.assert_close(load_balancing_loss(collapsed, 1), 4 * p0)


def _load_balancing_loss_by_hand(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """N_e * sum_e f_e P_e with explicit loops: f_e = (top-k picks of e) / (tokens * top_k)."""
    tokens, num_experts = logits.shape
    counts = [0] * num_experts
    for t in range(tokens):
        for e in torch.topk(logits[t], top_k).indices.tolist():
            counts[e] += 1
    probabilities = torch.softmax(logits, dim=-1)
    total = 0.0
    for e in range(num_experts):
        f_e = counts[e] / (tokens * top_k)
        p_e = sum(float(probabilities[t, e]) for t in range(tokens)) / tokens
        total += f_e * p_e
    return torch.tensor(num_experts * total)


@pytest.mark.parametrize("top_k", [2, 3])
def test_load_balancing_loss_divides_the_assignment_fraction_by_top_k(top_k):
    """Guards f_e as the fraction of the tokens' top-k *assignments* (the / top_k): checked against a
    brute-force count on random logits, and uniform top-2 routing must give exactly 1."""
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 4)  # (B, S, N_e); the loss flattens the leading dims into tokens
    expected = _load_balancing_loss_by_hand(logits.reshape(-1, 4), top_k)
    torch.testing.assert_close(load_balancing_loss(logits, top_k), expected, rtol=1e-5, atol=1e-6)
    if top_k == 2:
        # 4 experts, every pair of experts chosen by one token with equal logits: f_e = P_e = 1/4
        pairs = [(0, 1), (2, 3), (0, 2), (1, 3), (0, 3), (1, 2)]
        uniform = torch.zeros(len(pairs), 4)
        for t, (i, j) in enumerate(pairs):
            uniform[t, [i, j]] = 1.0  # tie-free top-2 per token; softmax mean is uniform by symmetry
        torch.testing.assert_close(load_balancing_loss(uniform, 2), torch.tensor(1.0), rtol=0, atol=1e-6)


def test_moe_lora_layer_equals_the_paper_formula_with_one_expert_per_token():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    context = ForwardContext()
    layer = MoELoRALinear(base, MoELoRAConfig(enabled=True, num_experts=3, top_k=1, rank=2, alpha=4.0), context)
    with torch.no_grad():
        layer.lora_B.normal_()
    h = torch.randn(2, 7, 6)
    with context.bound(TokenLayout(0, 7, ())) as router:
        out = layer(h)
    logits = h @ layer.gate.weight.T
    p = torch.softmax(logits, dim=-1)
    expected = base(h).clone()
    for b in range(2):
        for s in range(7):
            e = int(logits[b, s].argmax())
            expected[b, s] += p[b, s, e] * (4.0 / 2) * layer.lora_B[e] @ layer.lora_A[e] @ h[b, s]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    (record,) = router
    assert record.experts.shape == (2, 7, 1)
    assert torch.equal(record.experts[..., 0], logits.argmax(dim=-1))
    layer(h)  # outside a policy call nothing is recorded (e.g. a checkpoint recompute in backward)
    assert len(router) == 1


def _moe_delta_by_hand(h: torch.Tensor, logits: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, top_k: int) -> torch.Tensor:
    """Brute force: for every token, sum over its top-k experts of p_e * scaling * B_e A_e h (raw softmax p)."""
    p = torch.softmax(logits, dim=-1)
    out = h.new_zeros(*h.shape[:-1], B.shape[1])
    for b in range(h.shape[0]):
        for s in range(h.shape[1]):
            for e in torch.topk(logits[b, s], top_k).indices.tolist():
                out[b, s] += p[b, s, e] * scaling * B[e] @ A[e] @ h[b, s]
    return out


def _moe_delta_dense(h: torch.Tensor, weights: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The previous dense formula: every expert evaluated, multiplied by the top-k-masked weights."""
    down = torch.einsum("bsi,eri->bser", h, A) * weights[..., None]
    return torch.einsum("bser,eor->bso", down, B) * scaling


def _moe_layer(num_experts: int, top_k: int, d_in: int = 6, d_out: int = 5, rank: int = 3, seed: int = 0) -> tuple[MoELoRALinear, ForwardContext]:
    torch.manual_seed(seed)
    context = ForwardContext()
    cfg = MoELoRAConfig(enabled=True, num_experts=num_experts, top_k=top_k, rank=rank, alpha=2.0 * rank)
    layer = MoELoRALinear(torch.nn.Linear(d_in, d_out), cfg, context)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.gate.weight.normal_()
    return layer, context


@pytest.mark.parametrize("num_experts,top_k", [(3, 1), (5, 1), (4, 2), (5, 2)])
def test_moe_lora_delta_equals_a_per_token_loop(num_experts, top_k):
    torch.manual_seed(1)
    h = torch.randn(2, 9, 6)  # two samples
    logits = torch.randn(2, 9, num_experts)
    A, B = torch.randn(num_experts, 3, 6), torch.randn(num_experts, 5, 3)
    weights, experts = moe_gate_weights(logits, top_k), logits.topk(top_k, dim=-1).indices
    delta = moe_lora_delta(h, weights, experts, A, B, 0.5)
    assert delta.shape == (2, 9, 5)
    torch.testing.assert_close(delta, _moe_delta_by_hand(h, logits, A, B, 0.5, top_k), rtol=1e-5, atol=1e-5)


def test_moe_lora_layer_with_top_2_equals_the_per_token_loop_and_records_both_experts():
    layer, context = _moe_layer(num_experts=4, top_k=2)
    h = torch.randn(2, 7, 6)
    with context.bound(TokenLayout(0, 7, ())) as router:
        out = layer(h)
    logits = h @ layer.gate.weight.T
    with torch.no_grad():
        expected = layer.base(h) + _moe_delta_by_hand(h, logits, layer.lora_A, layer.lora_B, layer.scaling, 2)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    (record,) = router
    assert record.experts.shape == (2, 7, 2)
    assert torch.equal(record.experts, logits.topk(2, dim=-1).indices)


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_lora_gradients_equal_the_dense_formula(top_k):
    """Sparse dispatch vs the dense einsum, both through autograd: the gate must get the same gradient
    through the raw probabilities, and A, B and the input theirs."""
    layer, _ = _moe_layer(num_experts=4, top_k=top_k, d_in=8, d_out=6, rank=4, seed=2)
    h = torch.randn(2, 11, 8, requires_grad=True)
    cotangent = torch.randn(2, 11, 6)
    wrt = [h, layer.lora_A, layer.lora_B, layer.gate.weight]

    sparse = layer(h)
    logits = layer.gate(h)
    dense = layer.base(h) + _moe_delta_dense(h, moe_gate_weights(logits, top_k), layer.lora_A, layer.lora_B, layer.scaling)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    sparse_grads = torch.autograd.grad((sparse * cotangent).sum(), wrt)
    dense_grads = torch.autograd.grad((dense * cotangent).sum(), wrt)
    for name, got, want in zip(["input", "lora_A", "lora_B", "gate"], sparse_grads, dense_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert sparse_grads[3].abs().sum() > 0


@pytest.mark.parametrize("num_experts,top_k,allowed", [(4, 1, [1, 3]), (4, 1, [2]), (5, 2, [0, 2, 3])])
def test_moe_lora_delta_handles_experts_without_tokens(num_experts, top_k, allowed):
    """Routing that leaves experts empty: same value as the loop, and those experts get exact zero
    gradients (tensors, not None), as in the dense form."""
    torch.manual_seed(3)
    h = torch.randn(2, 6, 6)
    logits = torch.randn(2, 6, num_experts)
    blocked = [e for e in range(num_experts) if e not in allowed]
    logits[..., blocked] -= 100.0  # never in the top-k; their probability is ~0 anyway
    A = torch.randn(num_experts, 3, 6, requires_grad=True)
    B = torch.randn(num_experts, 5, 3, requires_grad=True)
    weights, experts = moe_gate_weights(logits, top_k), logits.topk(top_k, dim=-1).indices
    assert set(experts.unique().tolist()) <= set(allowed)
    delta = moe_lora_delta(h, weights, experts, A, B, 0.5)
    with torch.no_grad():
        torch.testing.assert_close(delta, _moe_delta_by_hand(h, logits, A, B, 0.5, top_k), rtol=1e-5, atol=1e-5)
    grad_A, grad_B = torch.autograd.grad(delta.pow(2).sum(), [A, B])
    assert torch.equal(grad_A[blocked], torch.zeros_like(grad_A[blocked]))
    assert torch.equal(grad_B[blocked], torch.zeros_like(grad_B[blocked]))
    assert grad_A[allowed].abs().sum() > 0 and grad_B[allowed].abs().sum() > 0

    no_tokens = moe_lora_delta(h[:, :0], weights[:, :0], experts[:, :0], A, B, 0.5)
    assert no_tokens.shape == (2, 0, 5)
    grad_A, grad_B = torch.autograd.grad(no_tokens.sum(), [A, B])
    assert torch.equal(grad_A, torch.zeros_like(A)) and torch.equal(grad_B, torch.zeros_like(B))


def test_moe_lora_layer_on_a_bf16_base_keeps_fp32_adapters():
    layer, context = _moe_layer(num_experts=4, top_k=1, d_in=8, d_out=6, rank=4, seed=4)
    layer.base.to(torch.bfloat16)
    h = torch.randn(2, 5, 8).to(torch.bfloat16).requires_grad_()
    out = layer(h)
    assert out.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    with torch.no_grad():
        hf = h.float()
        delta = _moe_delta_by_hand(hf, layer.gate(hf), layer.lora_A, layer.lora_B, layer.scaling, 1)
        torch.testing.assert_close(out, layer.base(h) + delta.to(torch.bfloat16))
    out.float().pow(2).sum().backward()
    assert h.grad.dtype == torch.bfloat16 and torch.isfinite(h.grad).all()
    for param in layer.adapter_parameters().values():
        assert param.grad.dtype == torch.float32 and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0


def test_moe_lora_layer_is_batch_size_invariant():
    """A sample's output must not depend on the rest of its batch (the RL ratio recomputes log-probs in
    other batch splits): alone, together and reordered agree to fp32 rounding."""
    layer, _ = _moe_layer(num_experts=4, top_k=2, d_in=32, d_out=24, rank=8, seed=5)
    h = torch.randn(3, 16, 32)
    with torch.no_grad():
        together = layer(h)
        alone = torch.cat([layer(h[i : i + 1]) for i in range(3)])
        reordered = layer(h.flip(0)).flip(0)
    torch.testing.assert_close(alone, together, rtol=0, atol=1e-5)
    torch.testing.assert_close(reordered, together, rtol=0, atol=1e-5)


def test_dual_branch_layer_leaves_prompt_tokens_alone():
    torch.manual_seed(0)
    base, context = torch.nn.Linear(6, 5), ForwardContext()
    layout = TokenLayout(text=2, noisy=3, references=(2, 1))
    layer = DualBranchLoRALinear(base, DualBranchLoRAConfig(enabled=True, noisy_rank=1, condition_rank=3, alpha_ratio=2.0), "joint", context)
    with torch.no_grad():
        layer.noisy_B.normal_()
        layer.condition_B.normal_()
    h = torch.randn(2, 8, 6)
    with context.bound(layout):
        out = layer(h)
    expected = base(h).clone()
    expected[:, 2:5] += 2.0 * h[:, 2:5] @ layer.noisy_A.T @ layer.noisy_B.T
    expected[:, 5:] += 2.0 * h[:, 5:] @ layer.condition_A.T @ layer.condition_B.T
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[:, :2], base(h)[:, :2], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="no token layout"):
        layer(h)


def test_dual_branch_layer_matches_peft_lora_at_ranks_above_one():
    """Guards the branch scale alpha / r = alpha_ratio (alpha = alpha_ratio * r), not alpha_ratio / r:
    at noisy rank 4 and condition rank 16 each token type must equal peft's LoRA with the same A, B
    and lora_alpha = alpha_ratio * r, and prompt tokens must equal the base layer exactly."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    base, context = torch.nn.Linear(8, 6), ForwardContext()
    layout = TokenLayout(text=2, noisy=3, references=(2, 2))
    cfg = DualBranchLoRAConfig(enabled=True, noisy_rank=4, condition_rank=16, alpha_ratio=2.0)
    layer = DualBranchLoRALinear(base, cfg, "joint", context)
    with torch.no_grad():
        for weight in layer.adapter_parameters().values():
            weight.normal_()
    h = torch.randn(2, 9, 8)
    with context.bound(layout):
        out = layer(h)

    def peft_reference(A: torch.nn.Parameter, B: torch.nn.Parameter, rank: int) -> torch.nn.Module:
        model = torch.nn.Sequential()
        model.add_module("proj", torch.nn.Linear(8, 6))
        model.proj.load_state_dict(base.state_dict())
        lora = LoraConfig(r=rank, lora_alpha=cfg.alpha_ratio * rank, target_modules=["proj"], lora_dropout=0.0)
        model = inject_adapter_in_model(lora, model)
        with torch.no_grad():
            model.proj.lora_A["default"].weight.copy_(A)
            model.proj.lora_B["default"].weight.copy_(B)
        return model

    noisy_ref = peft_reference(layer.noisy_A, layer.noisy_B, 4)
    condition_ref = peft_reference(layer.condition_A, layer.condition_B, 16)
    with torch.no_grad():
        torch.testing.assert_close(out[:, 2:5], noisy_ref(h[:, 2:5]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[:, 5:], condition_ref(h[:, 5:]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[:, :2], base(h)[:, :2], rtol=0, atol=0)
        assert not torch.allclose(out[:, 2:], base(h)[:, 2:])  # the branches are really on


@pytest.mark.slow
def test_moe_gate_gets_gradient_and_only_adapters_change_after_a_step():
    policy = tiny_policy()
    randomize_adapters(policy)
    cond, x, sigma = conditioning(policy), latents(policy, 2), torch.tensor([0.4, 0.9])
    out = policy(x, sigma, cond, SWITCHES_ON)
    assert len(out.router) == 2 * 2 + 2  # ff.net.2 and ff_context.net.2 per double block, proj_out per single
    assert all(r.experts.shape[-1] == 1 for r in out.router)
    (out.velocity.pow(2).mean() + 0.01 * sum(load_balancing_loss(r.logits, 1) for r in out.router)).backward()
    gates = [m.gate.weight for m in policy.modules() if isinstance(m, MoELoRALinear)]
    assert len(gates) == 6 and all(g.grad is not None and g.grad.abs().sum() > 0 for g in gates)

    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    adapter_words = ("lora_", "gate.weight", "processor.temperature")
    assert trainable and all(any(w in n for w in adapter_words) for n in trainable)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2).step()
    changed = {n for n, p in policy.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any("lora_A" in n for n in changed) and any("gate.weight" in n for n in changed)


def test_frozen_gate_is_not_trainable():
    policy = tiny_policy(moe_lora=MoELoRAConfig(enabled=True, freeze_gate=True))
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert not any("gate" in n for n in trainable) and any("lora_B" in n for n in trainable)


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [{}, {"lora": LoRAConfig(enabled=False), "dual_branch": DualBranchLoRAConfig(enabled=True, noisy_rank=2, condition_rank=6)}],
    ids=["lora+moe+temperature", "dual_branch+moe+temperature"],
)
def test_save_then_load_gives_identical_outputs(tmp_path, overrides):
    trained = tiny_policy(**overrides)
    randomize_adapters(trained, seed=1)
    cond, x, sigma = conditioning(trained), latents(trained, 2), torch.tensor([0.2, 0.6])
    with torch.no_grad():
        expected = trained(x, sigma, cond, SWITCHES_ON).velocity
    trained.save_adapters(tmp_path)
    # One format: the files hold exactly adapter_state(), the weights rollout workers and checkpoints get,
    # and it carries every adapter tensor.
    state, files = trained.adapter_state(), {}
    for name in ("pytorch_lora_weights.safetensors", "policy_adapters.safetensors"):
        if (tmp_path / name).is_file():
            files.update(load_file(str(tmp_path / name)))
    assert files.keys() == state.keys() and all(torch.equal(files[k], state[k]) for k in state)
    copy = tiny_policy(adapter_seed=7, **overrides)
    copy.load_adapter_state(state)
    for (name, value), (_, copied) in zip(trained.named_parameters(), copy.named_parameters()):
        assert torch.equal(value, copied), name  # every adapter tensor, trainable or frozen, travels

    fresh = tiny_policy(adapter_seed=7, **overrides)
    with torch.no_grad():
        assert not torch.allclose(fresh(x, sigma, cond, SWITCHES_ON).velocity, expected)
        fresh.load_adapters(tmp_path)
        torch.testing.assert_close(fresh(x, sigma, cond, SWITCHES_ON).velocity, expected, rtol=0, atol=0)

    mismatched = tiny_policy(moe_lora=MoELoRAConfig(enabled=True, num_experts=2), **{k: v for k, v in overrides.items() if k != "moe_lora"})
    with pytest.raises(ValueError, match="'moe_lora'"):
        mismatched.load_adapters(tmp_path)


@pytest.mark.slow
def test_dual_branch_trains_both_branches_and_no_prompt_projection():
    policy = tiny_policy(lora=LoRAConfig(enabled=False), moe_lora=MoELoRAConfig(enabled=False), dual_branch=DualBranchLoRAConfig(enabled=True))
    randomize_adapters(policy)
    cond, x = conditioning(policy), latents(policy, 2)
    policy(x, torch.tensor([0.5, 0.5]), cond).velocity.pow(2).mean().backward()
    layers = {n: m for n, m in policy.transformer.named_modules() if isinstance(m, DualBranchLoRALinear)}
    assert len(layers) == 2 * 4 + 2 * 3
    assert all(m.noisy_B.grad.abs().sum() > 0 for m in layers.values())
    # the last block's condition queries only shape condition outputs, which are dropped: no gradient there
    last_query = "single_transformer_blocks.1.attn.to_q"
    assert layers[last_query].condition_B.grad.abs().sum() == 0
    assert all(m.condition_B.grad.abs().sum() > 0 for n, m in layers.items() if n != last_query)
    prompt_projections = [n for n, _ in policy.transformer.named_modules() if n.endswith(("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"))]
    assert prompt_projections and all(isinstance(policy.transformer.get_submodule(n), torch.nn.Linear) for n in prompt_projections)


@pytest.mark.slow
def test_plain_lora_loads_into_diffusers_flux_pipeline(tmp_path):
    policy = tiny_policy(moe_lora=MoELoRAConfig(enabled=False), lora=LoRAConfig(rank=4, alpha=2.0))
    randomize_adapters(policy, seed=2)
    policy.save_adapters(tmp_path)

    parts = build_tiny_components(TinyFluxConfig())  # same seed: the same base weights
    pipe = FluxPipeline(
        scheduler=None, vae=None, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
        text_encoder_2=parts.text_encoder_2, tokenizer_2=parts.tokenizer_2, transformer=parts.transformer,
    )
    cond, x, sigma = conditioning(policy, prompts=PROMPTS[:1]), latents(policy, 1), torch.tensor([0.5])
    inputs = transformer_inputs(cond, x, sigma)
    with torch.no_grad():
        base = pipe.transformer(**inputs).sample
        pipe.load_lora_weights(tmp_path)
        loaded = pipe.transformer(**inputs).sample
        ours = policy.transformer(**inputs).sample
    assert not torch.allclose(base, ours, atol=1e-4)
    torch.testing.assert_close(loaded, ours, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [{}, {"lora": LoRAConfig(enabled=False), "dual_branch": DualBranchLoRAConfig(enabled=True)}],
    ids=["lora+moe", "dual_branch+moe"],
)
def test_adapters_disabled_gives_the_base_model(overrides):
    policy = tiny_policy(**overrides)
    randomize_adapters(policy)
    base = build_tiny_components(TinyFluxConfig()).transformer  # same seed, no adapters, stock attention
    cond, x, sigma = conditioning(policy, prompts=PROMPTS[:1]), latents(policy, 1), torch.tensor([0.5])
    inputs = transformer_inputs(cond, x, sigma)
    with torch.no_grad():
        expected = unpack_latents(base(**inputs).sample[:, : cond.layout.noisy], cond.noisy_grid)
        adapted = policy(x, sigma, cond).velocity
        with policy.adapters_disabled():
            disabled = policy(x, sigma, cond).velocity
        again = policy(x, sigma, cond).velocity
    torch.testing.assert_close(disabled, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(adapted, expected, atol=1e-4)
    torch.testing.assert_close(again, adapted, rtol=0, atol=0)


def test_loading_a_lora_file_with_missing_tensors_is_an_error(tmp_path):
    policy = tiny_policy()
    policy.save_adapters(tmp_path)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    state = load_file(str(path))
    state.pop("transformer.transformer_blocks.0.attn.to_q.lora_A.weight")
    save_file(state, str(path))
    with pytest.raises(ValueError, match="missing .*transformer_blocks.0.attn.to_q.lora_A"):
        tiny_policy().load_adapters(tmp_path)


def test_attention_temperature_mlps_train_next_to_plain_lora():
    """One-for-All's Dynamic Attention Modulation trains with the LoRA: peft's add_adapter freezes every
    non-LoRA parameter, which used to include the temperature MLPs (0 of them trainable)."""
    from policies import AttentionConfig, FluxPolicy, PolicyConfig
    from policies.attention import TemperatureMLP

    policy = FluxPolicy.from_config(PolicyConfig(attention=AttentionConfig(temperature=True)))
    temperature = [p for m in policy.transformer.modules() if isinstance(m, TemperatureMLP) for p in m.parameters()]
    trainable = {id(p) for p in policy.trainable_parameters()}
    assert temperature and all(id(p) in trainable for p in temperature)
    block = policy.transformer.transformer_blocks[0]
    assert not block.attn.to_q.base_layer.weight.requires_grad and not block.ff.net[2].base.weight.requires_grad  # the base stays frozen
