"""The policy's attention processor against independent references: diffusers' stock FluxAttnProcessor,
a naive full-softmax attention, masks written out from the papers' definitions."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from policies import AttentionSwitches, TokenLayout, dice_loss, mask_tokens, routing_loss
from policies.attention import (
    AttentionControl,
    TemperatureMLP,
    condition_affinity,
    dynamic_routing_mask,
    normalize_maps,
    prompt_routing_maps,
    reference_attention_map,
    static_routing_mask,
)
from policy_helpers import HEIGHT, PHRASES, PROMPTS, WIDTH, conditioning, latents, randomize_adapters, references, tiny_policy

LAYOUT = TokenLayout(text=3, noisy=4, references=(2, 3))


def _segment_of(index: int, layout: TokenLayout) -> str:
    if index < layout.text:
        return "text"
    if index < layout.text + layout.noisy:
        return "noisy"
    start = layout.text + layout.noisy
    for i, n in enumerate(layout.references):
        if index < start + n:
            return f"ref{i}"
        start += n
    raise IndexError(index)


def test_static_routing_mask_follows_musar_definition():
    mask = static_routing_mask(LAYOUT)
    for q in range(LAYOUT.total):
        for k in range(LAYOUT.total):
            sq, sk = _segment_of(q, LAYOUT), _segment_of(k, LAYOUT)
            prompt_condition = {sq, sk} & {"text"} and (sq.startswith("ref") or sk.startswith("ref"))
            cross_condition = sq.startswith("ref") and sk.startswith("ref") and sq != sk
            assert bool(mask[q, k]) == (not prompt_condition and not cross_condition), (sq, sk)


def test_condition_affinity_and_dynamic_mask_follow_musar_eq_2_to_4():
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2, 4, 8, generator=generator), torch.randn(2, 2, 3, 8, generator=generator)
    spans = ((0, 1), (1, 3))
    affinity = condition_affinity(q, k, spans)
    for b in range(2):
        for x in range(4):
            s = torch.stack([torch.softmax(q[b, h, x] @ k[b, h].T / 8**0.5, dim=0) for h in range(2)]).mean(0)
            torch.testing.assert_close(affinity[b, x], torch.stack([s[0:1].mean(), s[1:3].mean()]))
    assignment = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]])
    mask = dynamic_routing_mask(assignment, LAYOUT)
    for b in range(2):
        for q_index in range(LAYOUT.total):
            for k_index in range(LAYOUT.total):
                sq, sk = _segment_of(q_index, LAYOUT), _segment_of(k_index, LAYOUT)
                blocked = sq == "noisy" and sk.startswith("ref") and sk != f"ref{assignment[b, q_index - LAYOUT.text]}"
                assert bool(mask[b, q_index, k_index]) == (not blocked)


def test_chunked_reference_map_equals_naive_softmax_rows():
    generator = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 3, 7, 8, generator=generator), torch.randn(2, 3, 5, 8, generator=generator)
    naive = torch.zeros(2, 5)
    for b in range(2):
        for h in range(3):
            for r in range(7):
                naive[b] += torch.softmax(q[b, h, r] @ k[b, h].T / 8**0.5, dim=0)
    naive /= 3 * 7
    for chunk in (1, 3, 7, 100):
        torch.testing.assert_close(reference_attention_map(q, k, chunk), naive, rtol=1e-6, atol=1e-6)


def test_normalize_maps_spans_zero_to_one():
    maps = torch.tensor([[[0.2, 0.4, 0.6]]])
    torch.testing.assert_close(normalize_maps(maps), torch.tensor([[[0.0, 0.5, 1.0]]]))


def _double_block_inputs(policy, batch=2, seed=0):
    """Random inputs for the first double block's attention, with the rotary embedding of a real
    conditioning's ids."""
    cond = conditioning(policy)
    layout = cond.layout
    generator = torch.Generator().manual_seed(seed)
    dim = policy.transformer.inner_dim
    image = torch.randn(batch, layout.noisy + sum(layout.references), dim, generator=generator)
    text = torch.randn(batch, layout.text, dim, generator=generator)
    rotary = policy.transformer.pos_embed(torch.cat([cond.txt_ids, cond.img_ids]))
    return cond, image, text, rotary


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    policy = tiny_policy()
    randomize_adapters(policy)
    return policy


def test_static_routing_equals_stock_attention_with_a_naive_mask(policy):
    cond, image, text, rotary = _double_block_inputs(policy)
    layout = cond.layout
    naive_mask = torch.tensor(
        [[not ({_segment_of(q, layout), _segment_of(k, layout)} & {"text"} and "ref" in _segment_of(q, layout) + _segment_of(k, layout))
          and not ("ref" in _segment_of(q, layout) and "ref" in _segment_of(k, layout) and _segment_of(q, layout) != _segment_of(k, layout))
          for k in range(layout.total)] for q in range(layout.total)]
    )
    for attn, args in (
        (policy.transformer.transformer_blocks[0].attn, (image, text)),
        (policy.transformer.single_transformer_blocks[0].attn, (torch.cat([text, image], dim=1), None)),
    ):
        ours = attn.processor(attn, *args, image_rotary_emb=rotary, attention_control=AttentionControl(layout, static_routing=True))
        stock = FluxAttnProcessor()(attn, *args, attention_mask=naive_mask[None, None], image_rotary_emb=rotary)
        for a, b in zip(ours if isinstance(ours, tuple) else (ours,), stock if isinstance(stock, tuple) else (stock,)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        unmasked = FluxAttnProcessor()(attn, *args, image_rotary_emb=rotary)
        assert not torch.allclose(ours[0] if isinstance(ours, tuple) else ours, unmasked[0] if isinstance(unmasked, tuple) else unmasked)


def test_dynamic_routing_lets_each_noisy_token_see_one_condition(policy):
    cond, image, text, rotary = _double_block_inputs(policy, batch=1)
    layout = cond.layout
    attn = policy.transformer.transformer_blocks[0].attn
    control = AttentionControl(layout, dynamic_routing=True, prompt_spans=cond.item_spans)
    routed, _ = attn.processor(attn, image, text, image_rotary_emb=rotary, attention_control=control)
    assignment = control.routing_assignments[0][0]  # (N,)
    assert set(assignment.tolist()) == {0, 1}, "the test needs noisy tokens routed to both conditions"
    # perturbing condition 1's tokens changes only the noisy tokens routed to condition 1
    perturbed = image.clone()
    perturbed[:, layout.noisy + layout.references[0] :] += torch.randn_like(perturbed[:, layout.noisy + layout.references[0] :])
    control_2 = AttentionControl(layout, dynamic_routing=True, prompt_spans=cond.item_spans)
    routed_2, _ = attn.processor(attn, perturbed, text, image_rotary_emb=rotary, attention_control=control_2)
    assert torch.equal(control_2.routing_assignments[0][0], assignment)  # routing reads text keys only
    change = (routed_2 - routed)[0, : layout.noisy].abs().amax(dim=-1)
    assert torch.all(change[assignment == 0] < 1e-6)
    assert torch.all(change[assignment == 1] > 1e-4)
    # and the output equals the stock attention under the Eq. 4 mask of the recorded assignment
    stock, _ = FluxAttnProcessor()(attn, image, text, attention_mask=dynamic_routing_mask(control.routing_assignments[0], layout)[:, None], image_rotary_emb=rotary)
    torch.testing.assert_close(routed, stock, rtol=1e-5, atol=1e-6)


def test_temperature_starts_at_one_and_equals_naive_eq5(policy):
    fresh = TemperatureMLP(32, 16, 0.01)
    torch.testing.assert_close(fresh(torch.randn(2, 5, 2, 16)), torch.ones(2, 5, 1, 1), rtol=0, atol=1e-6)
    attn = policy.transformer.single_transformer_blocks[0].attn
    cond, image, text, rotary = _double_block_inputs(policy)
    hidden = torch.cat([text, image], dim=1)
    with torch.no_grad():  # a non-trivial temperature
        for parameter in attn.processor.temperature.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(3)))
    ours = attn.processor(attn, hidden, image_rotary_emb=rotary, attention_control=AttentionControl(cond.layout, temperature=True))
    # naive Eq. 5: softmax(q k^T / (sqrt(d) f_temp)) v with f_temp = softplus(MLP(q)) + t_min
    q = attn.norm_q(attn.to_q(hidden).unflatten(-1, (2, 16)))
    k = attn.norm_k(attn.to_k(hidden).unflatten(-1, (2, 16)))
    v = attn.to_v(hidden).unflatten(-1, (2, 16))
    mlp = attn.processor.temperature
    f_temp = torch.nn.functional.softplus(mlp.out(torch.nn.functional.gelu(mlp.hidden(q.flatten(2))))) + 0.01  # (B, L, 1)
    assert f_temp.std() > 0.01
    q, k = apply_rotary_emb(q, rotary, sequence_dim=1), apply_rotary_emb(k, rotary, sequence_dim=1)
    scores = torch.einsum("blhd,bmhd->bhlm", q, k) / (16**0.5 * f_temp.permute(0, 2, 1)[..., None])
    naive = torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v).flatten(2)
    torch.testing.assert_close(ours, naive, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_all_features_off_equals_stock_processor():
    policy = tiny_policy()
    randomize_adapters(policy)
    cond, x, sigma = conditioning(policy), latents(policy, 2), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        ours = policy(x, sigma, cond, AttentionSwitches()).velocity
        for block in [*policy.transformer.transformer_blocks, *policy.transformer.single_transformer_blocks]:
            block.attn.set_processor(FluxAttnProcessor())
        stock = policy(x, sigma, cond, AttentionSwitches()).velocity
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_captured_maps_equal_full_softmax_and_train_double_block_lora():
    policy = tiny_policy()
    randomize_adapters(policy)
    cond, x, sigma = conditioning(policy), latents(policy, 2), torch.tensor([0.3, 0.8])
    target = (torch.rand(2, 2, cond.layout.noisy, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    grads, maps = {}, {}
    for method in ("chunked", "full"):
        policy.zero_grad(set_to_none=True)
        out = policy(x, sigma, cond, AttentionSwitches(capture=True, capture_method=method))
        maps[method] = out.attention_maps
        dice_loss(out.attention_maps, target).backward()
        grads[method] = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    assert maps["chunked"].shape == (2, 2, cond.layout.noisy)
    assert maps["chunked"].min() == 0 and maps["chunked"].max() == 1
    torch.testing.assert_close(maps["chunked"], maps["full"], rtol=1e-5, atol=1e-5)
    assert grads["chunked"].keys() == grads["full"].keys()
    for name in grads["full"]:
        torch.testing.assert_close(grads["chunked"][name], grads["full"][name], rtol=1e-4, atol=1e-6)
    double_lora = [n for n in grads["chunked"] if n.startswith("transformer.transformer_blocks.") and "attn.to_q.lora_B" in n]
    assert len(double_lora) == 2 and all(grads["chunked"][n].abs().sum() > 0 for n in double_lora)
    # single blocks run after every double block: the maps cannot depend on them
    assert not any(n.startswith("transformer.single_transformer_blocks.") for n in grads["chunked"])


def test_routing_needs_prompt_spans():
    with pytest.raises(ValueError, match="prompt_spans"):
        AttentionControl(LAYOUT, dynamic_routing=True)
    with pytest.raises(ValueError, match="prompt_spans"):
        AttentionControl(LAYOUT, capture_routing=True)


def test_prompt_routing_maps_are_the_phrase_share_of_prompt_attention():
    generator = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 3, 5, 8, generator=generator), torch.randn(2, 3, 6, 8, generator=generator)
    spans = (((0, 2), (3, 6)), ((1, 2), (2, 5)))  # each sample's own phrase tokens
    maps = prompt_routing_maps(q, k, spans)
    assert maps.shape == (2, 2, 5)
    for b in range(2):
        for x in range(5):
            s = torch.stack([torch.softmax(q[b, h, x] @ k[b, h].T / 8**0.5, dim=0) for h in range(3)]).mean(0)
            torch.testing.assert_close(maps[b, :, x], torch.stack([s[start:end].sum() for start, end in spans[b]]))
    assert float(maps.sum(dim=1).max()) <= 1 + 1e-6  # token 2 is the background route


def test_routing_loss_and_mask_tokens_follow_their_definitions():
    generator = torch.Generator().manual_seed(2)
    maps, target = torch.rand(2, 3, 2, 4, generator=generator), (torch.rand(2, 2, 4, generator=generator) > 0.5).float()
    expected = sum(((maps[b, k, i] - target[b, i]) ** 2).mean() for b in range(2) for k in range(3) for i in range(2)) / 12
    torch.testing.assert_close(routing_loss(maps, target), expected)
    with pytest.raises(ValueError):
        routing_loss(maps[:, 0], target)
    masks = torch.zeros(1, 1, 4, 6)
    masks[0, 0, :2, :3] = 1  # the whole top-left token of a 2x2 grid
    masks[0, 0, 2, 3] = 1  # one of the 6 pixels of the bottom-right token
    torch.testing.assert_close(mask_tokens(masks, (2, 2)), torch.tensor([[[1.0, 0.0, 0.0, 1 / 6]]]))


def test_policy_routing_maps_per_double_block_train_the_adapters():
    policy = tiny_policy()
    randomize_adapters(policy)
    cond, x, sigma = conditioning(policy), latents(policy, 2), torch.tensor([0.3, 0.8])
    out = policy(x, sigma, cond, AttentionSwitches(capture_routing=True))
    blocks = len(policy.transformer.transformer_blocks)
    assert out.routing_maps.shape == (2, blocks, 2, cond.layout.noisy)
    maps = out.routing_maps.detach()
    assert float(maps.min()) >= 0 and float(maps.sum(dim=2).max()) <= 1 + 1e-6
    assert policy(x, sigma, cond).routing_maps is None
    # per-sample spans: swapping the phrases of sample 1 swaps its maps, sample 0 keeps the shared ones
    swapped = cond._replace(sample_item_spans=(cond.item_spans, cond.item_spans[::-1]))
    with torch.no_grad():
        per_sample = policy(x, sigma, swapped, AttentionSwitches(capture_routing=True)).routing_maps
    torch.testing.assert_close(per_sample[0], out.routing_maps[0].detach())
    torch.testing.assert_close(per_sample[1], out.routing_maps[1].detach().flip(1))
    target = torch.zeros(2, 2, cond.layout.noisy)
    target[:, 0, : cond.layout.noisy // 2] = 1
    routing_loss(out.routing_maps, target).backward()
    grads = [n for n, p in policy.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert any(n.startswith("transformer.transformer_blocks.") and "lora" in n for n in grads)


def test_chunked_reference_map_gradient_equals_autograd_of_naive_softmax():
    generator = torch.Generator().manual_seed(2)
    q = torch.randn(2, 3, 7, 8, generator=generator, dtype=torch.float64).float().requires_grad_()
    k = torch.randn(2, 3, 5, 8, generator=generator, dtype=torch.float64).float().requires_grad_()
    upstream = torch.randn(2, 5, generator=generator)
    naive = torch.softmax(torch.einsum("bhrd,bhjd->bhrj", q, k) / 8**0.5, dim=-1).mean(dim=(1, 2))
    naive_q, naive_k = torch.autograd.grad((naive * upstream).sum(), (q, k))
    for chunk in (1, 3, 7):
        ours_q, ours_k = torch.autograd.grad((reference_attention_map(q, k, chunk) * upstream).sum(), (q, k))
        torch.testing.assert_close(ours_q, naive_q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours_k, naive_k, rtol=1e-5, atol=1e-6)
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: reference_attention_map(a, b, 3), (q64, k64))


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_maps_gradients_and_routing():
    policy = tiny_policy()
    randomize_adapters(policy)
    cond, x, sigma = conditioning(policy), latents(policy, 2), torch.tensor([0.3, 0.8])
    target = (torch.rand(2, 2, cond.layout.noisy, generator=torch.Generator().manual_seed(0)) > 0.5).float()

    def step():
        policy.zero_grad(set_to_none=True)
        out = policy(x, sigma, cond, AttentionSwitches(capture=True, temperature=True))
        (out.velocity.pow(2).mean() + dice_loss(out.attention_maps, target)).backward()
        return out, {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}

    calls = []
    policy.transformer.transformer_blocks[0].ff.net[2].register_forward_pre_hook(lambda module, args: calls.append(1))
    plain, plain_grads = step()
    policy.transformer.enable_gradient_checkpointing()
    checkpointed, checkpointed_grads = step()
    assert len(calls) == 1 + 2  # once without checkpointing; forward + recompute with it
    torch.testing.assert_close(checkpointed.attention_maps, plain.attention_maps, rtol=0, atol=0)
    assert len(checkpointed.router) == len(plain.router) == 6  # the recompute in backward records nothing
    assert checkpointed_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-6, atol=1e-7)


def test_velocity_fn_applies_the_temperature_the_policy_was_trained_with():
    from policies import AttentionConfig

    policy = tiny_policy(position_scheme="condition_id", attention=AttentionConfig(temperature=True))
    with torch.no_grad():  # move the temperature away from its initial 1
        for name, parameter in policy.named_parameters():
            if "temperature" in name:
                parameter.add_(0.5 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(3)))
    cond = conditioning(policy, condition_ids=[1, 2])
    x, sigma = latents(policy, 2), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        default = policy.velocity_fn(cond)(x, sigma)
        with_temperature = policy(x, sigma, cond, AttentionSwitches(temperature=True)).velocity
        without = policy(x, sigma, cond, AttentionSwitches()).velocity
    torch.testing.assert_close(default, with_temperature)
    assert (default - without).abs().max() > 1e-4


# ---- MUSAR per-condition prompts: [CI^1; CT^1; ...; CI^c; CT^c; T; X] -------------------------------------


def test_routing_masks_with_condition_captions_follow_musar_index_formulas():
    """Static routing (Sec. 3.2.2) and Eq. 4 written with the paper's indices over its own order
    [CI^1; CT^1; CI^2; CT^2; T; X] (l' = n' + m' tokens per condition), then permuted to ours
    [T, CT^1, CT^2, X, CI^1, CI^2]: a caption belongs to its condition, not to the prompt."""
    n_ref, n_cap, c, m, n = 3, 2, 2, 3, 4
    layout = TokenLayout(text=m + c * n_cap, noisy=n, references=(n_ref,) * c, captions=(n_cap,) * c)
    l_cond = n_ref + n_cap
    prompt_start = c * l_cond
    total = prompt_start + m + n
    # ours -> the paper's index of the same token
    order = list(range(prompt_start, prompt_start + m))
    order += [i * l_cond + n_ref + j for i in range(c) for j in range(n_cap)]
    order += list(range(prompt_start + m, total))
    order += [i * l_cond + j for i in range(c) for j in range(n_ref)]
    assert sorted(order) == list(range(total)) and len(order) == layout.total

    paper = torch.ones(total, total, dtype=torch.bool)
    paper[prompt_start : prompt_start + m, :prompt_start] = False  # prompt-condition decoupling
    paper[:prompt_start, prompt_start : prompt_start + m] = False
    for i in range(c):
        for j in range(c):
            if i != j:  # inter-condition isolation
                paper[i * l_cond : (i + 1) * l_cond, j * l_cond : (j + 1) * l_cond] = False
    index = torch.tensor(order)
    assert torch.equal(static_routing_mask(layout), paper[index][:, index])

    assignment = torch.tensor([[0, 1, 1, 0]])
    paper_dynamic = torch.ones(total, total, dtype=torch.bool)
    for row in range(prompt_start + m, total):  # Eq. 4: noisy rows, condition columns
        for column in range(prompt_start):
            paper_dynamic[row, column] = column // l_cond == int(assignment[0, row - prompt_start - m])
    assert torch.equal(dynamic_routing_mask(assignment, layout)[0], paper_dynamic[index][:, index])


def test_condition_captions_are_their_own_t5_tokens_and_routing_scores_only_the_prompt():
    """Per-condition prompts append each reference's own T5 caption tokens after the prompt; Eq. 2's
    similarity (dynamic routing, routing maps) still reads the target prompt's tokens only, so the first
    block's routing maps equal those of the same policy without captions."""
    from policies import ConditionPromptConfig

    plain = tiny_policy()
    captioned = tiny_policy(condition_prompts=ConditionPromptConfig(enabled=True, tokens=6))
    captions = [["a small cat", "a brown dog"]] * 2
    embeds = captioned.encode_prompts(PROMPTS, item_phrases=PHRASES, condition_captions=captions)
    base = plain.encode_prompts(PROMPTS, item_phrases=PHRASES)
    assert embeds.caption_tokens == (6, 6) and embeds.prompt_embeds.shape[1] == base.prompt_embeds.shape[1] + 12
    torch.testing.assert_close(embeds.prompt_embeds[:, : base.prompt_embeds.shape[1]], base.prompt_embeds)
    ids = captioned.tokenizer_2(["a brown dog"], padding="max_length", max_length=6, truncation=True, return_tensors="pt").input_ids
    own = captioned.text_encoder_2(ids).last_hidden_state.float()
    torch.testing.assert_close(embeds.prompt_embeds[:, -6:], own.expand(2, -1, -1))

    with_captions = captioned.condition(embeds, references(), HEIGHT, WIDTH)
    without = plain.condition(base, references(), HEIGHT, WIDTH)
    assert with_captions.layout.prompt == without.layout.text and with_captions.layout.captions == (6, 6)
    x, sigma = latents(plain, 2), torch.tensor([0.3, 0.8])
    switches = AttentionSwitches(capture_routing=True)
    with torch.no_grad():
        routed = captioned(x, sigma, with_captions, switches)
        reference = plain(x, sigma, without, switches)
    torch.testing.assert_close(routed.routing_maps[:, 0], reference.routing_maps[:, 0])
    assert not torch.allclose(routed.velocity, reference.velocity)  # the captions reach the image

    other = captioned.encode_prompts(PROMPTS, item_phrases=PHRASES, condition_captions=[["a small cat", "a grey mouse"]] * 2)
    with torch.no_grad():
        changed = captioned(x, sigma, captioned.condition(other, references(), HEIGHT, WIDTH), captioned.attention_mode)
    assert not torch.allclose(changed.velocity, routed.velocity)
    with pytest.raises(ValueError, match="condition_captions"):
        captioned.encode_prompts(PROMPTS)
    with pytest.raises(ValueError, match="2 references but the prompts carry 1 condition captions"):
        captioned.condition(captioned.encode_prompts(PROMPTS, condition_captions=[["a cat"]] * 2), references(), HEIGHT, WIDTH)
