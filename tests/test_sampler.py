"""The sampler: hand-checkable cases, and token-identity with the reference algorithm.

`reference_sample` below is the published Dream `_sample` loop (generation_utils.py), kept as
close to its text as possible: full forward every step, shift, the global RNG. It is the oracle.
"""

import math

import pytest
import torch
import torch.distributions as dists
import torch.nn.functional as F

from diffucode.daemon.errors import Cancelled, InputError
from diffucode.daemon.engine.sampler import FINISH, SamplerConfig, denoise, generate, sample_tokens


# ---- the reference, transcribed --------------------------------------------------------------

def ref_top_p_logits(logits, top_p=None):
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    cumulative_probs = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    sorted_indices_to_remove = cumulative_probs > top_p
    sorted_indices_to_remove[..., 1:] = sorted_indices_to_remove[..., :-1].clone()
    sorted_indices_to_remove[..., 0] = 0
    mask = torch.zeros_like(logits, dtype=torch.bool, device=logits.device)
    mask = mask.scatter_(-1, sorted_indices, sorted_indices_to_remove)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def ref_top_k_logits(logits, top_k=None):
    top_k = min(top_k, logits.size(-1))
    indices_to_remove = logits < torch.topk(logits, top_k)[0][..., -1, None]
    return logits.masked_fill(indices_to_remove, torch.finfo(logits.dtype).min)


def ref_sample_tokens(logits, temperature=0.0, top_p=None, top_k=None, margin_confidence=False, neg_entropy=False):
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = ref_top_p_logits(logits, top_p)
    if top_k is not None:
        logits = ref_top_k_logits(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        try:
            x0 = dists.Categorical(probs=probs).sample()
            confidence = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
        except Exception:
            confidence, x0 = probs.max(dim=-1)
    else:
        confidence, x0 = probs.max(dim=-1)
    if margin_confidence:
        sorted_probs, _ = torch.sort(probs, dim=-1, descending=True)
        confidence = sorted_probs[:, 0] - sorted_probs[:, 1]
    if neg_entropy:
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, x0


@torch.inference_mode()
def reference_sample(model, input_ids, max_length, mask_token_id, steps, eps=1e-3, alg="origin",
                     alg_temp=None, temperature=0.0, top_p=None, top_k=None):
    histories = []
    x = F.pad(input_ids, (0, max_length - input_ids.shape[1]), value=mask_token_id)
    timesteps = torch.linspace(1, eps, steps + 1, device=x.device)
    for i in range(steps):
        mask_index = (x == mask_token_id)
        logits = model(x).logits  # our network with every position predicted: shifted already
        mask_logits = logits[mask_index]
        t = timesteps[i]
        s = timesteps[i + 1]
        if alg == 'origin':
            p_transfer = 1 - s / t if i < steps - 1 else 1
            x0 = torch.zeros_like(x[mask_index], device=x.device, dtype=torch.long) + mask_token_id
            transfer_index_t_s = torch.rand(*x0.shape, device=x.device) < p_transfer
            _, x0[transfer_index_t_s] = ref_sample_tokens(mask_logits[transfer_index_t_s], temperature=temperature, top_p=top_p, top_k=top_k)
            x[mask_index] = x0.clone()
        else:
            if alg == 'maskgit_plus':
                confidence, x0 = ref_sample_tokens(mask_logits, temperature=temperature, top_p=top_p, top_k=top_k)
            elif alg == 'topk_margin':
                confidence, x0 = ref_sample_tokens(mask_logits, temperature=temperature, top_p=top_p, top_k=top_k, margin_confidence=True)
            elif alg == 'entropy':
                confidence, x0 = ref_sample_tokens(mask_logits, temperature, top_p=top_p, top_k=top_k, neg_entropy=True)
            num_mask_token = mask_index.sum() / mask_index.shape[0]
            number_transfer_tokens = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
            full_confidence = torch.full_like(x, -torch.inf, device=x.device, dtype=logits.dtype)
            full_confidence[mask_index] = confidence
            if number_transfer_tokens > 0:
                if alg_temp is None or alg_temp == 0:
                    _, transfer_index = torch.topk(full_confidence, number_transfer_tokens)
                else:
                    full_confidence = full_confidence / alg_temp
                    full_confidence = F.softmax(full_confidence, dim=-1)
                    transfer_index = torch.multinomial(full_confidence, num_samples=number_transfer_tokens)
                x_ = torch.zeros_like(x, device=x.device, dtype=torch.long) + mask_token_id
                x_[mask_index] = x0.clone()
                row_indices = torch.arange(x.size(0), device=x.device).unsqueeze(1).expand_as(transfer_index)
                x[row_indices, transfer_index] = x_[row_indices, transfer_index]
        histories.append(x.clone())
    return x, histories


# The reference's effective settings: diffusion_generate's generation config, built from the model
# config under transformers 4.51.3, carries the legacy default top_k = 50 for a call that sets none
# (shared/reference/dream.md). Every oracle call below that sets no top_k runs with it.
EFFECTIVE_TOP_K = 50


def reference_generate(model, input_ids, max_length, mask_token_id, steps, top_k=None, **kw):
    """reference_sample with the generation config's effective defaults filled in."""
    return reference_sample(model, input_ids, max_length, mask_token_id, steps,
                            top_k=EFFECTIVE_TOP_K if top_k is None else top_k, **kw)


# ---- identity with the reference ---------------------------------------------------------------

PROMPT = torch.tensor([[5, 17, 99, 42, 7, 250, 31]])


@pytest.mark.parametrize("alg", ["origin", "maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("n,steps", [(16, 16), (24, 6), (5, 9)])
def test_greedy_is_token_identical_to_the_reference(tiny_ckpt, alg, n, steps):
    net, mask = tiny_ckpt.network, tiny_ckpt.mask_id
    torch.manual_seed(123)  # origin draws which positions to reveal from the global RNG
    ref_x, ref_hist = reference_generate(net, PROMPT, PROMPT.shape[1] + n, mask, steps, alg=alg)
    ours = generate(net, PROMPT, n, mask, SamplerConfig(steps=steps, alg=alg),
                    generator=torch.Generator().manual_seed(123), keep_history=True)
    assert ours.x.tolist() == ref_x.tolist()
    assert len(ours.history) == len(ref_hist) == steps
    for a, b in zip(ours.history, ref_hist):
        assert a.tolist() == b.tolist()
    assert not (ours.x == mask).any()


@pytest.mark.parametrize("alg,alg_temp", [("origin", None), ("maskgit_plus", 0.5), ("entropy", None),
                                          ("topk_margin", 0.1)])
def test_seeded_sampling_follows_the_reference_rng(tiny_ckpt, alg, alg_temp):
    """A seed draws what the reference draws after torch.manual_seed(seed)."""
    net, mask = tiny_ckpt.network, tiny_ckpt.mask_id
    kw = dict(temperature=0.7, top_p=0.9, top_k=50, alg_temp=alg_temp)
    torch.manual_seed(7)
    ref_x, _ = reference_sample(net, PROMPT, PROMPT.shape[1] + 12, mask, 6, alg=alg, **kw)
    ours = generate(net, PROMPT, 12, mask, SamplerConfig(steps=6, alg=alg, **kw),
                    generator=torch.Generator().manual_seed(7))
    assert ours.x.tolist() == ref_x.tolist()


def test_batches_of_equal_prompts_match_the_reference(tiny_ckpt):
    net, mask = tiny_ckpt.network, tiny_ckpt.mask_id
    prompts = torch.tensor([[5, 17, 99, 42], [8, 9, 10, 11]])
    ref_x, _ = reference_generate(net, prompts, 14, mask, 10, alg="entropy")
    ours = generate(net, prompts, 10, mask, SamplerConfig(steps=10, alg="entropy"))
    assert ours.x.tolist() == ref_x.tolist()


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
def test_top_k_zero_is_no_top_k_and_the_default_changes_the_order(tiny_ckpt, alg):
    """top_k=0 is the reference without top-k; the default (50) renormalises the confidences, so
    greedy decoding reveals in another order than without it: the difference the default fixes."""
    net, mask = tiny_ckpt.network, tiny_ckpt.mask_id
    ref_x, ref_hist = reference_sample(net, PROMPT, PROMPT.shape[1] + 16, mask, 16, alg=alg, top_k=None)
    off = generate(net, PROMPT, 16, mask, SamplerConfig(steps=16, alg=alg, top_k=0), keep_history=True)
    assert [h.tolist() for h in off.history] == [h.tolist() for h in ref_hist]
    default = generate(net, PROMPT, 16, mask, SamplerConfig(steps=16, alg=alg), keep_history=True)
    assert SamplerConfig(steps=1).top_k == EFFECTIVE_TOP_K
    if alg == "entropy":  # (a probability or margin rescaled per row may keep its rank on this tiny model)
        assert [h.tolist() for h in default.history] != [h.tolist() for h in off.history]


# ---- hand-checkable cases ------------------------------------------------------------------------

def test_reveal_schedule_by_hand(tiny_ckpt):
    """8 masks in 4 steps: ts = linspace(1, 1e-3, 5) = 1, .75025, .5005, .25075, .001.
    step 0: int(8 * (1 - .75025)) = int(1.998) = 1; step 1: int(7 * (1 - .5005/.75025)) = 2;
    step 2: int(5 * (1 - .25075/.5005)) = 2; step 3 (last): the 3 left."""
    counts = []
    generate(tiny_ckpt.network, PROMPT, 8, tiny_ckpt.mask_id, SamplerConfig(steps=4, alg="maskgit_plus"),
             callback=lambda st: counts.append(int(st.revealed.sum())))
    assert counts == [1, 2, 2, 3]


def test_one_token_per_step_schedule(tiny_ckpt):
    """steps == max_new_tokens: the first step reveals nothing, the last what is left."""
    counts = []
    generate(tiny_ckpt.network, PROMPT, 10, tiny_ckpt.mask_id, SamplerConfig(steps=10, alg="entropy"),
             callback=lambda st: counts.append(int(st.revealed.sum())))
    assert counts[0] == 0 and sum(counts) == 10 and len(counts) == 10
    assert all(c <= 2 for c in counts)


def test_confidences_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    logits = probs.log()
    cfg = SamplerConfig(steps=1)
    conf, tok = sample_tokens(logits, cfg, confidence="prob")
    assert tok.item() == 0 and conf.item() == pytest.approx(0.5)
    conf, _ = sample_tokens(logits, cfg, confidence="margin")
    assert conf.item() == pytest.approx(0.2)
    conf, _ = sample_tokens(logits, cfg, confidence="neg_entropy")
    assert conf.item() == pytest.approx(sum(p * math.log(p) for p in (0.5, 0.3, 0.2)), abs=1e-6)


def test_top_p_and_top_k_filtering_by_hand():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    # cumulative 0.5, 0.8, 0.95, 1.0: top_p 0.7 keeps the first two (the token passing p is kept)
    _, tok = sample_tokens(logits, SamplerConfig(steps=1, temperature=1.0, top_p=0.7),
                           torch.Generator().manual_seed(0))
    seen = {sample_tokens(logits, SamplerConfig(steps=1, temperature=1.0, top_p=0.7),
                          torch.Generator().manual_seed(s))[1].item() for s in range(200)}
    assert seen == {0, 1}
    seen = {sample_tokens(logits, SamplerConfig(steps=1, temperature=1.0, top_k=3),
                          torch.Generator().manual_seed(s))[1].item() for s in range(300)}
    assert seen == {0, 1, 2}
    # a tiny top_p still keeps the most probable token
    seen = {sample_tokens(logits, SamplerConfig(steps=1, temperature=1.0, top_p=0.01),
                          torch.Generator().manual_seed(s))[1].item() for s in range(50)}
    assert seen == {0}


# ---- properties ---------------------------------------------------------------------------------

def test_greedy_is_deterministic_and_seeds_reproduce(tiny_ckpt):
    net, mask = tiny_ckpt.network, tiny_ckpt.mask_id
    a = generate(net, PROMPT, 12, mask, SamplerConfig(steps=12)).x
    b = generate(net, PROMPT, 12, mask, SamplerConfig(steps=12)).x
    assert a.tolist() == b.tolist()
    cfg = SamplerConfig(steps=6, temperature=1.0, alg="entropy")
    runs = [generate(net, PROMPT, 12, mask, cfg, generator=torch.Generator().manual_seed(s)).x.tolist()
            for s in (1, 1, 2, 3)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2] or runs[0] != runs[3]


def test_history_and_revealed_tokens_stay(tiny_ckpt):
    res = generate(tiny_ckpt.network, PROMPT, 9, tiny_ckpt.mask_id, SamplerConfig(steps=5),
                   keep_history=True)
    assert len(res.history) == 5
    mask = tiny_ckpt.mask_id
    for earlier, later in zip(res.history, res.history[1:]):
        kept = earlier != mask
        assert (later[kept] == earlier[kept]).all()
    assert (res.history[0][:, :PROMPT.shape[1]] == PROMPT).all()


def test_masks_in_the_middle_leave_the_rest_alone(tiny_ckpt):
    mask = tiny_ckpt.mask_id
    x = torch.tensor([[11, 12, 13, mask, mask, mask, 14, 15, mask, 16]])
    res = denoise(tiny_ckpt.network, x, mask, SamplerConfig(steps=4))
    fixed = x != mask
    assert (res.x[fixed] == x[fixed]).all() and not (res.x == mask).any()
    assert torch.isnan(res.logprob[fixed]).all() and not torch.isnan(res.logprob[~fixed]).any()


def test_callback_cancels_between_steps(tiny_ckpt):
    seen = []

    def cancel_at_two(step):
        seen.append(step.index)
        if step.index == 2:
            raise Cancelled("cancelled by the test")

    with pytest.raises(Cancelled):
        generate(tiny_ckpt.network, PROMPT, 16, tiny_ckpt.mask_id, SamplerConfig(steps=16),
                 callback=cancel_at_two)
    assert seen == [0, 1, 2]


def test_callback_finish_fills_the_rest_in_one_step(tiny_ckpt):
    """A deadline: after step 1 the callback asks to finish; step 2 reveals every mask."""
    masks_left = []

    def deadline(step):
        masks_left.append(step.masks_left)
        return FINISH if step.index == 1 else None

    res = generate(tiny_ckpt.network, PROMPT, 16, tiny_ckpt.mask_id, SamplerConfig(steps=16),
                   callback=deadline)
    assert res.steps_run == 3 and masks_left[-1] == 0 and masks_left[1] > 0
    assert not (res.x == tiny_ckpt.mask_id).any()


@pytest.mark.parametrize("bad,word", [(dict(steps=0), "steps"), (dict(steps=2, alg="nope"), "alg"),
                                      (dict(steps=2, top_p=1.5), "top_p"), (dict(steps=2, top_k=-1), "top_k"),
                                      (dict(steps=2, temperature=-1), "temperature"),
                                      (dict(steps=2, eps=0), "eps")])
def test_bad_sampler_options_are_named(tiny_ckpt, bad, word):
    with pytest.raises(InputError, match=word):
        generate(tiny_ckpt.network, PROMPT, 4, tiny_ckpt.mask_id, SamplerConfig(**bad))
