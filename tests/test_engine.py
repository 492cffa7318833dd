"""The public engine API: `from diffucode import Engine`, as a script or another tool uses it."""

import subprocess
import sys

import pytest
import torch

from diffucode import Engine
from diffucode.daemon.engine.options import Options, SamplerConfig
from diffucode.daemon.engine.sampler import generate
from diffucode.daemon.errors import InputError


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return Engine.load(tiny_dir, device="cpu", decoding="exact")


def test_importing_diffucode_loads_no_torch_until_engine_is_used():
    code = ("import sys, diffucode; before = 'torch' in sys.modules; diffucode.Engine; "
            "print(before, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


def test_infill_takes_sampling_as_keywords_and_says_what_it_saw(engine, tasks):
    before, after = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"
    ans = engine.infill(before, after, max_new_tokens=8)
    same = tasks.infill(before, after, Options(max_new_tokens=8))  # the engine is the tasks, nothing added
    assert (ans.text, ans.tokens, ans.confidence) == (same.text, same.tokens, same.confidence)
    assert len(ans.ids) == len(ans.tokens) and ans.steps_run >= 1 and ans.forward_passes >= 1
    assert ans.context.before_chars_cut == 0 and ans.context.after_chars_cut == 0
    assert ans.context.before_tokens == len(engine.tasks.tok.encode(before))
    assert ans.context.after_tokens == len(engine.tasks.tok.encode(after))


def test_context_cut_is_reported_in_tokens_kept_and_characters_cut(engine):
    before = "".join(f"x{i} = {i}\n" for i in range(300))
    ans = engine.infill(before, "y = 1\n" * 50, max_new_tokens=4, budget=(20, 10))
    ctx = ans.context
    assert ctx.before_tokens <= 20 and ctx.after_tokens <= 10
    assert ctx.before_chars_cut > len(before) // 2 and ctx.after_chars_cut > 200
    kept = engine.tasks.tok.decode(engine.tasks.tok.encode(before[ctx.before_chars_cut:]))
    assert before.endswith(kept)


def test_unknown_or_bad_sampling_is_an_error_naming_it(engine):
    with pytest.raises(InputError, match="unknown sampling option 'temprature'.*temperature"):
        engine.infill("a", "b", temprature=0.5)
    with pytest.raises(InputError, match="steps must be in \\[1, max_new_tokens = 4\\]"):
        engine.complete("x = ", max_new_tokens=4, steps=9)


def test_complete_and_refine(engine):
    done = engine.complete("import os\n", max_new_tokens=6, decoding="fast")
    assert done.forward_passes <= 6 and len(done.ids) <= 6
    span = "    return a + b\n"
    new = engine.refine("def add(a, b):\n", span, "\n", fraction=0.5)
    assert new.context.before_tokens > 0 and len(new.tokens) == len(new.confidence)


def test_generate_is_the_reference_sampler(engine, tiny_ckpt):
    prompt = [5, 17, 99, 3]
    (ans,) = engine.generate(prompt, max_new_tokens=8, steps=4, alg="entropy", keep_history=True)
    ref = generate(tiny_ckpt.network, torch.tensor([prompt]), 8, tiny_ckpt.mask_id, SamplerConfig(steps=4))
    assert ans.ids == ref.x[0, len(prompt):].tolist()
    assert len(ans.history) == 4 and ans.history[-1] == prompt + ans.ids
    # rows of different lengths: left-padded as the reference pads them, each row as it is alone
    a, b = engine.generate([prompt, prompt[1:]], max_new_tokens=8, steps=4)
    (alone,) = engine.generate(prompt[1:], max_new_tokens=8, steps=4)
    assert a.ids == ans.ids and b.ids == alone.ids
    with pytest.raises(InputError, match=f"each in 0..{tiny_ckpt.config.vocab_size - 1}; got \\[9999\\]"):
        engine.generate([5, 9999], max_new_tokens=4)


def test_answers_record_the_order_of_decoding(engine):
    ans = engine.infill("def add(a, b):\n    return ", "\n", max_new_tokens=8, decoding="exact")
    # the reference schedule reveals int(masks * (1 - s/t)) a step (0 at some steps, the rest at the last)
    assert len(ans.order) == len(ans.tokens) and all(0 <= s < ans.steps_run for s in ans.order)
    assert ans.steps_run == 8 and len(set(ans.order)) >= len(ans.order) // 2
    assert set(ans.ar_ness) == {"local", "global"} and all(0 <= v <= 1 for v in ans.ar_ness.values())
    fast = engine.infill("def add(a, b):\n    return ", "\n", max_new_tokens=8, decoding="fast", threshold=0.01)
    assert max(fast.order, default=0) < fast.forward_passes  # several tokens a step: fewer steps than tokens
    span = "    return a + b\n"
    new = engine.refine("def add(a, b):\n", span, "\n", fraction=0.5)
    assert -1 in new.order and len(new.order) == len(new.tokens)  # the kept half was never re-decoded


@pytest.mark.parametrize("order, local, global_", [
    ([0, 1, 2, 3], 1.0, 1.0),  # left to right
    ([3, 2, 1, 0], 0.25, 0.25),  # right to left: only the last token touches known code, at the left end
    ([0, 0, 1, 1], 1.0, 1.0),  # two at a time, left to right
    ([1, 0, 2, 3], 0.75, 0.75),  # the second token first
    ([-1, 0, -1, 1], 1.0, 1.0),  # a refinement: kept tokens count as known
    ([-1, -1], 1.0, 1.0),  # nothing revealed
])
def test_ar_ness_as_the_paper_defines_it(order, local, global_):
    from diffucode.daemon.engine.order import ar_ness

    assert ar_ness(order) == {"local": local, "global": global_}


def test_alternatives_are_distinct_and_ranked_by_the_coupled_likelihood(engine):
    from diffucode.daemon.engine.ranking import coupled_logliks

    before, after = "def mean(values):\n    total = ", "\n    return total / len(values)\n"
    alts = engine.alternatives(before, after, 6, max_new_tokens=10, temperature=1.0)
    texts = [a.answer.text for a in alts]
    assert len(set(texts)) == len(texts) >= 2 and [a.temperature for a in alts].count(0.0) == 1
    assert [a.score for a in alts] == sorted((a.score for a in alts), reverse=True)
    tasks = engine.tasks
    b, a = tasks._context(before, after, reserve=10 + tasks.template_tokens)
    middles = [alt.answer.ids for alt in alts]
    # one left-padded batch scores each middle as it is scored alone
    together = coupled_logliks(tasks, b, middles, a)
    alone = [coupled_logliks(tasks, b, [m], a)[0] for m in middles]
    assert together == pytest.approx(alone, abs=1e-4) and together == pytest.approx([x.score for x in alts], abs=1e-3)
    assert coupled_logliks(tasks, b, [[]], a) == [float("-inf")]
    with pytest.raises(InputError, match="alternatives must be in \\[1, 16\\], got 17"):
        engine.alternatives(before, after, 17)


def test_length_auto_chooses_the_canvas_from_one_pass(engine):
    from diffucode.daemon.engine.length import chosen_length

    assert chosen_length([1.0] * 16) == 2  # sure the middle is empty: a canvas of 2
    assert chosen_length([0.0] * 16) == 16  # sure it runs on: the whole upper bound
    assert chosen_length([0.0] * 4 + [1.0] * 28) == 6  # 4 expected, with slack
    fixed = engine.infill("x = ", "\n", max_new_tokens=16, decoding="exact")
    auto = engine.infill("x = ", "\n", max_new_tokens=16, decoding="exact", length="auto")
    # exact decoding runs one step per canvas token: the passes say which canvas was used, plus the one that chose it
    assert fixed.forward_passes == 16 and 2 <= auto.forward_passes <= 17 and auto.steps_run == auto.forward_passes - 1
    with pytest.raises(InputError, match="length 'longest' is unknown"):
        engine.infill("x = ", "\n", length="longest")
    tried = engine.infill("x = ", "\n", lengths=[4, 8], decoding="exact")
    assert tried.forward_passes == 4 + 8  # each size tried costs its passes, whichever is kept


def test_refine_keeps_the_lines_whose_rewrite_the_model_does_not_prefer(engine):
    span = "    if x < lo:\n        return lo\n    if x > hi:\n        return hi\n    return x\n"
    for seed in range(3):
        guarded = engine.refine("def clamp(x, lo, hi):\n", span, "\n", fraction=0.5, seed=seed)
        free = engine.refine("def clamp(x, lo, hi):\n", span, "\n", fraction=0.5, seed=seed, guard=False)
        r = guarded.refined
        assert r["lines"] == 5 and r["changed"] + r["kept"] <= 5 and free.refined["kept"] == 0
        assert r["changed"] + r["kept"] == free.refined["changed"]  # the same rewrite, judged line by line
        if r["changed"] == 0:  # every rewrite refused: the span comes back as it was
            assert guarded.text == span and set(guarded.order) == {-1}
