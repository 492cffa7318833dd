"""Tasks in text: complete, infill, refine; prompt formats; limits; trimming."""

import pytest

from diffucode.daemon.engine.checkpoint import load_checkpoint
from diffucode.daemon.errors import InputError
from diffucode.daemon.engine.tasks import Limits, Options, Tasks, line_span, locate

BEFORE = "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        "
AFTER = "\n    return a\n"


def test_infill_returns_a_middle_and_the_text_around_it_stays(tasks):
    ans = tasks.infill(BEFORE, AFTER, Options(max_new_tokens=12))
    assert ans.text and ans.steps_run == 12
    assert len(ans.tokens) == len(ans.confidence) <= 12
    assert all(0 <= c <= 1 for c in ans.confidence)
    assert "".join(ans.tokens) == ans.text
    assert not any(t in ans.text for t in ("<|mask|>", "<|endoftext|>"))


def test_end_tokens_cut_the_output(tasks):
    ids = [tasks.tok.encode("x")[0]] * 3
    for end in ("<|endoftext|>", "<|im_end|>"):
        end_id = tasks.tok.token_id(end)
        assert tasks._cut(ids + [end_id] + ids) == 3
    assert tasks._cut(ids) == 3


def test_several_lengths_keep_the_most_confident(tasks):
    ans = tasks.infill(BEFORE, AFTER, Options(max_new_tokens=8), lengths=[4, 8, 16])
    assert [c.length for c in ans.candidates] == [4, 8, 16]
    best = max(ans.candidates, key=lambda c: c.score)
    assert ans.text == best.text


def test_complete_continues_the_code(tasks):
    ans = tasks.complete("class Stack:\n    def push(self, item):\n", Options(max_new_tokens=10, steps=5))
    assert ans.steps_run == 5 and len(ans.tokens) <= 10


def test_refine_changes_only_its_span(tasks):
    before, span, after = "def add(a, b):\n", "    return a + b", "\n\n\nprint(add(1, 2))\n"
    ans = tasks.refine(before, span, after, Options(), fraction=0.5)
    assert len(ans.tokens) == len(ans.confidence)
    assert all(0 <= c <= 1 for c in ans.confidence)
    scores = tasks.score(tasks.tok.encode(before), tasks.tok.encode(span), tasks.tok.encode(after))
    assert len(scores) == len(tasks.tok.encode(span)) and all(s <= 0 for s in scores)


def test_chatml_is_detected_for_instruct_checkpoints(tiny_instruct_dir, tiny_dir):
    inst = Tasks(load_checkpoint(tiny_instruct_dir, device="cpu"))
    assert inst.prompt_format == "chatml"
    assert inst.tok.token_id("<|dlm_pad|>") in inst.end_ids
    ids, start = inst._layout("infill", [7, 8], [inst.ckpt.mask_id] * 3, [9])
    text = inst.tok.decode(ids[:start])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_start|>assistant\n" + inst.tok.decode([7, 8]))
    assert ids[-1] == inst.tok.token_id("<|im_end|>")
    ans = inst.infill(BEFORE, AFTER, Options(max_new_tokens=6))
    assert "<|dlm_pad|>" not in ans.text
    base = Tasks(load_checkpoint(tiny_dir, device="cpu"))
    assert base.prompt_format == "raw"
    assert Tasks(load_checkpoint(tiny_dir, device="cpu"), "chatml").prompt_format == "chatml"


def test_limits_give_clear_errors(tiny_ckpt):
    t = Tasks(tiny_ckpt, limits=Limits(max_canvas_tokens=64))
    with pytest.raises(InputError, match="canvas of 100 tokens exceeds the limit of 64"):
        t.infill("a", "b", Options(max_new_tokens=100))
    with pytest.raises(InputError, match="canvas of 65 tokens exceeds the limit of 64"):
        t.infill("a", "b", lengths=[8, 65])
    with pytest.raises(InputError, match="prompt format 'fim'"):
        Tasks(tiny_ckpt, "fim")
    with pytest.raises(InputError, match="fraction"):
        t.refine("a", "b", "c", fraction=0)


def test_context_is_cut_to_the_budget_nearest_the_cursor(tiny_ckpt):
    t = Tasks(tiny_ckpt, limits=Limits(max_context_tokens=40, prefix_share=0.75))
    before, after = "x = 1\n" * 50, "y = 2\n" * 50
    b, a = t._context(before, after)
    assert (len(b), len(a)) == (30, 10)
    assert b == t.tok.encode(before)[-30:] and a == t.tok.encode(after)[:10]
    b, a = t._context(before, "z")  # the budget the suffix does not use goes to the prefix
    assert len(b) + len(a) == 40 and len(a) == len(t.tok.encode("z"))


def test_a_stride_keeps_the_start_of_the_context_put_while_typing(tiny_ckpt):
    t = Tasks(tiny_ckpt, limits=Limits(max_context_tokens=40, prefix_share=0.75))
    doc = "".join(f"x{i} = {i}\n" for i in range(80))
    whole = t.tok.encode(doc)
    starts = []
    for typed in range(1, 12):  # the user types at the end of `before`
        before = doc + "y" * typed
        b, _ = t._context(before, "z = 0\n" * 20, stride=8)
        assert 30 - 8 < len(b) <= 30
        starts.append(len(t.tok.encode(before)) - len(b))  # tokens dropped from the front
        assert b[:10] == whole[starts[-1]:starts[-1] + 10]
    assert all(s % 8 == 0 for s in starts) and len(set(starts)) <= 3  # moves in whole strides only
    b1, _ = t._context(doc, "", stride=1)
    assert len(b1) == 40 and b1 == whole[-40:]  # no stride: the exact budget


def test_cursor_and_line_positions():
    text = "ab\ncde\r\n\nf"
    assert locate(text, 1, 1) == 0 and locate(text, 1, 3) == 2 and locate(text, 2, 4) == 6
    assert locate(text, 4, 2) == len(text)
    with pytest.raises(InputError, match="line 5 is outside the file, which has 4 lines"):
        locate(text, 5, 1)
    with pytest.raises(InputError, match=r"column 5 is outside line 2, which has 3 characters \(columns 1..4\)"):
        locate(text, 2, 5)
    start, end = line_span(text, 2, 2)
    assert text[start:end] == "cde"
    with pytest.raises(InputError, match="lines 3-9"):
        line_span(text, 3, 9)


def test_per_request_budget_cuts_each_side(tiny_ckpt):
    t = Tasks(tiny_ckpt)
    before, after = "x = 1\n" * 50, "y = 2\n" * 50
    b, a = t._context(before, after, (12, 5))
    assert b == t.tok.encode(before)[-12:] and a == t.tok.encode(after)[:5]


def test_long_files_are_cut_to_the_model_positions(tmp_path):
    import json

    from diffucode.daemon.engine.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path / "short")
    cfg = json.loads((path / "config.json").read_text())
    cfg["max_position_embeddings"] = 64
    (path / "config.json").write_text(json.dumps(cfg))
    t = Tasks(load_checkpoint(path, device="cpu"))
    ans = t.infill("x = 1\n" * 200, "y = 2\n" * 200, Options(max_new_tokens=16))
    assert ans.steps_run == 16
    with pytest.raises(InputError, match="sequence of 70 tokens exceeds the model's 64 positions"):
        t.infill("", "", Options(max_new_tokens=70))
