"""Fast decoding: the dual KV cache against full forwards, parallel reveal, the callback contract,
the far-context store across requests, batching, and `diffucode bench --quick`."""

import asyncio
import json
import subprocess
import sys

import pytest
import torch

from diffucode.daemon.engine.batching import BatchItem, batch_key, run_batch
from diffucode.daemon.errors import Cancelled, InputError
from diffucode.daemon.engine.fast import Drop, FastConfig, denoise_fast
from diffucode.daemon.engine.kvcache import DualKVCache
from diffucode.daemon.engine.network import padding_inputs
from diffucode.daemon.engine.options import Options
from diffucode.daemon.rpc.protocol import InfillParams, Sampling
from diffucode.daemon.engine.sampler import FINISH, SamplerConfig
from diffucode.daemon.engine.tasks import Tasks

NEVER = 1.5  # a threshold no probability passes: one token per step


def canvas(mask, n=20, before=(5, 17, 99, 42, 7, 250, 31, 8, 9, 10), after=(11, 12, 13, 14)):
    return torch.tensor([list(before) + [mask] * n + list(after)])


@torch.inference_mode()
def test_cached_step_gives_the_full_forwards_logits(tiny_ckpt):
    net = tiny_ckpt.network
    # two left-padded rows, windows at different places (one at position 0: no left neighbour)
    N, T = 30, 9
    x = torch.randint(0, 300, (2, N))
    present = torch.tensor([[1] * 30, [0] * 6 + [1] * 24])
    mask2d, pos = padding_inputs(present)
    full = net(x, position_ids=pos, attention_mask=mask2d).logits  # (B, N, V)
    cache = DualKVCache(net)
    cache.reserve(2, N)
    everything = torch.arange(1, N).expand(2, N - 1)
    refreshed = cache.refresh(x, pos, present.bool(), everything)
    torch.testing.assert_close(refreshed, full[:, 1:], rtol=0, atol=1e-5)
    lo = torch.tensor([0, 14])
    predict = torch.tensor([list(range(T - 1)), list(range(1, T))])  # row 0: its position 0, the dummy row
    stepped = cache.step(x, lo, T, pos, present.bool(), predict)
    want = full.gather(1, (lo[:, None] + predict)[..., None].expand(-1, -1, full.shape[-1]))
    torch.testing.assert_close(stepped, want, rtol=0, atol=1e-5)


def test_threshold_that_never_passes_reveals_one_token_per_step(tiny_ckpt):
    x = canvas(tiny_ckpt.mask_id)
    for block in (20, 8):
        counts = []
        res = denoise_fast(tiny_ckpt.network, x, tiny_ckpt.mask_id, SamplerConfig(steps=20),
                           fast=FastConfig(threshold=NEVER, block_size=block),
                           callback=lambda st: counts.append(int(st.revealed.sum())))
        assert counts == [1] * 20 and res.steps_run == res.forward_passes == 20
        assert not (res.x == tiny_ckpt.mask_id).any() and (res.x[:, :10] == x[:, :10]).all()
        assert not torch.isnan(res.logprob[0, 10:30]).any() and torch.isnan(res.logprob[0, :10]).all()


def test_parallel_decoding_reveals_at_least_one_per_step_and_fills_every_mask(tiny_ckpt):
    mask = tiny_ckpt.mask_id
    x = torch.tensor([[3, 4, mask, 5, mask, mask, 6, 7, mask, mask, mask, mask, 8, mask, 9]])
    for threshold, most_steps in ((1e-9, 2), (0.02, 8)):  # everything passes: one step per block
        counts = []
        res = denoise_fast(tiny_ckpt.network, x, mask, SamplerConfig(steps=8),
                           fast=FastConfig(threshold=threshold, block_size=6),
                           callback=lambda st: counts.append(int(st.revealed.sum())))
        assert min(counts) >= 1 and sum(counts) == 8 and len(counts) <= most_steps
        fixed = x != mask
        assert (res.x[fixed] == x[fixed]).all() and not (res.x == mask).any()
    # a budget of 2 steps for 8 masks: at least ceil(left / steps left) per step
    res = denoise_fast(tiny_ckpt.network, x, mask, SamplerConfig(steps=2), fast=FastConfig(threshold=NEVER, block_size=32))
    assert res.steps_run == 2 and not (res.x == mask).any()


def test_an_end_token_fills_the_masks_after_it_at_once(tiny_ckpt):
    from diffucode.daemon.engine.fast import _end_fill

    M, E, F = 99, 0, 7  # mask, end, some token
    x = torch.tensor([[5, M, E, M, M, 6], [5, M, M, M, M, 6], [5, F, M, E, M, 6]])
    _end_fill(x, torch.tensor([1, 1, 1]), 4, torch.tensor([E]), M)
    assert x.tolist() == [[5, M, E, E, E, 6], [5, M, M, M, M, 6], [5, F, M, E, E, 6]]
    # in decoding: every token counts as an end token here, so each reveal closes the span after it
    mask = tiny_ckpt.mask_id
    fast = FastConfig(threshold=NEVER, block_size=8)
    plain = denoise_fast(tiny_ckpt.network, canvas(mask), mask, SamplerConfig(steps=20), fast=fast)
    every = tuple(range(tiny_ckpt.config.vocab_size))
    cut = denoise_fast(tiny_ckpt.network, canvas(mask), mask, SamplerConfig(steps=20),
                       fast=FastConfig(threshold=NEVER, block_size=8, end_ids=every))
    assert plain.forward_passes == 20 and cut.forward_passes < 20
    assert not (cut.x == mask).any()
    span, lp = cut.x[0, 10:30].tolist(), cut.logprob[0, 10:30].tolist()
    by_model = [i for i, v in enumerate(lp) if v == v]  # the filled positions have no log-probability
    assert len(by_model) == cut.forward_passes  # one reveal per pass; the rest filled for free
    for i in set(range(20)) - set(by_model):  # each filled position copies an end token before it
        assert any(j < i and span[j] == span[i] for j in by_model)


def test_an_end_token_waits_until_no_mask_is_left_before_it():
    from diffucode.daemon.engine.fast import _reveal

    V, E, M = 10, 0, 9  # vocabulary, end token, mask
    where = torch.tensor([[1, 2, 3, 4]])  # the block's masked positions, in order
    valid = torch.ones(1, 4, dtype=torch.bool)
    logits = torch.full((1, 4, V), -10.0)
    logits[0, 0, 3] = logits[0, 0, 4] = 0.0  # position 1: a coin toss between tokens 3 and 4
    logits[0, 1:, E] = 10.0  # positions 2 to 4: certainly the end token
    ends = torch.tensor([E])

    def reveal(k_min, ends, alg_temp=0.0):
        x, lp = torch.tensor([[5, M, M, M, M, 6]]), torch.full((1, 6), float("nan"))
        _reveal(x, logits, where, valid, torch.tensor([k_min]), SamplerConfig(steps=4, alg_temp=alg_temp), 0.9,
                torch.Generator().manual_seed(0), lp, ends)
        return x[0].tolist()

    assert reveal(1, None) == [5, M, E, E, E, 6]  # without the rule the end tokens pass the threshold
    assert reveal(1, ends) == [5, 3, M, M, M, 6]  # with it, the answer's start comes first
    assert reveal(3, ends) == [5, 3, E, E, M, 6]  # a minimum of 3: waiting end tokens, leftmost first
    assert reveal(4, ends) == [5, 3, E, E, E, 6]  # the block's last step still reveals everything
    assert reveal(3, ends, alg_temp=0.5) == [5, 3, E, E, M, 6]  # sampled order: the same guarantee
    # in a batch, each row by its own first mask: row 1 also ends at once (an empty answer)
    x, lp = torch.tensor([[5, M, M, M, M, 6]] * 2), torch.full((2, 6), float("nan"))
    both = torch.cat((logits, logits.clone()))
    both[1, 0, E] = 5.0
    _reveal(x, both, where.expand(2, 4), valid.expand(2, 4), torch.tensor([1, 1]), SamplerConfig(steps=4), 0.9,
            None, lp, ends)
    assert x.tolist() == [[5, 3, M, M, M, 6], [5, E, M, M, M, 6]]


def test_greedy_is_deterministic_and_bad_options_are_named(tiny_ckpt):
    x = canvas(tiny_ckpt.mask_id)
    a = denoise_fast(tiny_ckpt.network, x, tiny_ckpt.mask_id, SamplerConfig(steps=20), fast=FastConfig(block_size=8))
    b = denoise_fast(tiny_ckpt.network, x, tiny_ckpt.mask_id, SamplerConfig(steps=20), fast=FastConfig(block_size=8))
    assert a.x.tolist() == b.x.tolist()
    with pytest.raises(InputError, match="block_size"):
        denoise_fast(tiny_ckpt.network, x, tiny_ckpt.mask_id, SamplerConfig(steps=4), fast=FastConfig(block_size=0))


def test_callback_cancels_and_finish_fills_every_block_in_one_step(tiny_ckpt):
    mask, x = tiny_ckpt.mask_id, canvas(tiny_ckpt.mask_id, n=24)
    fast = FastConfig(threshold=NEVER, block_size=8)
    seen = []

    def cancel_at_two(step):
        seen.append(step.index)
        if step.index == 2:
            raise Cancelled("cancelled by the test")

    with pytest.raises(Cancelled):
        denoise_fast(tiny_ckpt.network, x, mask, SamplerConfig(steps=24), fast=fast, callback=cancel_at_two)
    assert seen == [0, 1, 2]
    left = []

    def deadline(step):
        left.append(step.masks_left)
        return FINISH if step.index == 1 else None

    res = denoise_fast(tiny_ckpt.network, x, mask, SamplerConfig(steps=24), fast=fast, callback=deadline)
    assert res.steps_run == 3 and left == [23, 22, 0] and not (res.x == mask).any()


def test_far_context_reuse_gives_the_same_results(tiny_dir):
    from diffucode.daemon.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tiny_dir, device="cpu")
    doc = "".join(f"def f{i}(a, b):\n    return a + {i} * b\n\n" for i in range(12))
    cut = doc.index("    return a + 9")
    early = doc.index("f6")  # an edit inside the far context: only the chunks before it are reused
    edits = [(doc[:cut], doc[cut:]), (doc[:cut], doc[cut:]), (doc[:cut] + "    x = 1\n", doc[cut:]),
             (doc[:early] + "g" + doc[early + 1:cut], doc[cut:])]
    opts = Options(max_new_tokens=12, decoding="fast", threshold=NEVER, block_size=8, prefix_cache=True)
    reused = Tasks(ckpt)
    for before, after in edits:
        got = reused.infill(before, after, opts, group="file:///doc.py")
        fresh = Tasks(ckpt).infill(before, after, opts, group="file:///doc.py")
        assert (got.text, got.tokens, got.steps_run) == (fresh.text, fresh.tokens, fresh.steps_run)
    counts = reused._kv_caches[1].counts
    assert counts["context_reused"] >= 2 * 128 + 64 and counts["context"] == 2


def test_far_context_is_reused_while_typing_in_a_file_longer_than_the_budget(tiny_dir):
    from diffucode.daemon.engine.checkpoint import load_checkpoint
    from diffucode.daemon.engine.tasks import Limits

    ckpt = load_checkpoint(tiny_dir, device="cpu")
    doc = "".join(f"def f{i}(a, b):\n    return a + {i} * b\n\n" for i in range(40))
    opts = Options(max_new_tokens=8, decoding="fast", threshold=NEVER, block_size=8, prefix_cache=True)
    tasks = Tasks(ckpt, limits=Limits(max_context_tokens=200))
    for typed in ("d", "de", "def", "def g"):  # the cursor moves on; the kept window's start stays put
        got = tasks.infill(doc + typed, "\n\nx = 1\n", opts, group="file:///long.py")
        fresh = Tasks(ckpt, limits=Limits(max_context_tokens=200)).infill(doc + typed, "\n\nx = 1\n", opts,
                                                                         group="file:///long.py")
        assert (got.text, got.tokens) == (fresh.text, fresh.tokens)
    counts = tasks._kv_caches[1].counts
    assert counts["context"] == 1 and counts["context_reused"] >= 3 * 128, counts  # encoded once, reused 3 times


@pytest.mark.parametrize("decoding", ["fast", "exact"])
def test_batch_gives_each_request_what_it_gets_alone(tasks, decoding):
    fast = Options(max_new_tokens=10, decoding=decoding, threshold=0.05, block_size=4)
    docs = [("def add(a, b):\n    return ", "\n"), ("x = ", ""), ("class Stack:\n    def pop(self):\n        ", "\n\n")]
    alone = [tasks.infill(b, a, fast) for b, a in docs]
    outcomes = {}
    run_batch(tasks, [BatchItem("infill", b, a, fast) for b, a in docs], outcomes.__setitem__)
    assert [(o.text, o.tokens) for _, o in sorted(outcomes.items())] == [(a.text, a.tokens) for a in alone]
    # the middle request is cancelled at its third step: it leaves then, the others go on unchanged
    steps, settled_at = [], {}

    def cancel_at_two(step):
        steps.append(step.index)
        if step.index == 2:
            raise Cancelled("cancelled by the test")

    def settle(i, outcome):
        settled_at[i] = len(steps)
        outcomes[i] = outcome

    items = [BatchItem("infill", b, a, fast, callback=cb) for (b, a), cb in zip(docs, (None, cancel_at_two, None))]
    run_batch(tasks, items, settle)
    assert isinstance(outcomes[1], Cancelled) and steps == [0, 1, 2] and settled_at[1] == 3
    assert [outcomes[i].text for i in (0, 2)] == [alone[0].text, alone[2].text]


def test_drop_every_row_stops_and_keys_separate_what_cannot_share(tasks, tiny_ckpt):
    def cancel(step):
        raise Cancelled("by the test")

    outcomes = {}
    item = BatchItem("infill", "x = ", "", Options(max_new_tokens=6, decoding="fast"), callback=cancel)
    run_batch(tasks, [item, item], outcomes.__setitem__)
    assert len(outcomes) == 2 and all(isinstance(o, Cancelled) for o in outcomes.values())
    greedy = Options(decoding="fast")
    assert batch_key(tasks, "infill", greedy) not in (None, batch_key(tasks, "complete", greedy))
    for other in (Options(decoding="fast", temperature=0.5), Options(decoding="fast", prefix_cache=True)):
        assert batch_key(tasks, "infill", other) is None
    exact = batch_key(tasks, "infill", Options(decoding="exact"))
    assert exact is not None and exact != batch_key(tasks, "infill", greedy)  # exact batches with exact only
    assert batch_key(tasks, "refine", greedy) is None
    assert batch_key(tasks, "infill", greedy, lengths=[8, 16]) is None  # two canvases: alone
    assert batch_key(tasks, "infill", greedy, budget=(100, None)) != batch_key(tasks, "infill", greedy)
    x = torch.tensor([[5, tiny_ckpt.mask_id, 6], [tiny_ckpt.mask_id, tiny_ckpt.mask_id, 7]])
    with pytest.raises(InputError, match="same length"):
        denoise_fast(tiny_ckpt.network, x, tiny_ckpt.mask_id, SamplerConfig(steps=2))
    seen = []
    res = denoise_fast(tiny_ckpt.network, torch.cat([x[:1], x[:1]]), tiny_ckpt.mask_id, SamplerConfig(steps=1),
                       callback=lambda st: seen.append(st.index) or Drop([0]))
    assert seen == [0] and (res.x != tiny_ckpt.mask_id).all()


def test_scheduler_batches_pending_requests(tasks):
    from diffucode.daemon.serve.scheduler import Scheduler, options_of

    fast = Sampling(max_new_tokens=8, decoding="fast", threshold=NEVER, block_size=4)
    befores = ["def add(a, b):\n    return ", "x = ", "y = [", "import "]
    alone = [tasks.infill(b, "", options_of(fast)).text for b in befores]

    async def main():
        sched = Scheduler(lambda: tasks, max_queue=8)
        blocker = sched.submit("infill", InfillParams(before="z = ", sampling=Sampling(max_new_tokens=200)))
        jobs = [sched.submit("infill", InfillParams(before=b, sampling=fast)) for b in befores]
        jobs[1].cancel("by the test")
        await blocker.future
        results = []
        for job in jobs:
            try:
                results.append((await job.future).text)
            except Exception as e:
                results.append(e.code.name)
        sched.stop()
        return results, sched.counters["batched"]

    results, batched = asyncio.run(main())
    assert results == [alone[0], "CANCELLED", alone[2], alone[3]] and batched == 3


def test_cli_and_tasks_choose_the_decoding(tiny_dir, tasks, tmp_path, capsys):
    from diffucode.cli import main

    path = tmp_path / "add.py"
    path.write_text('def add(a, b):\n    """Add."""\n    return \n')
    assert main(["infill", "--model", str(tiny_dir), str(path), "--line", "3", "--column", "12", "--json",
                 "--decoding", "fast", "--threshold", "0.5", "--block-size", "8", "--max-new-tokens", "12"]) == 0
    out = json.loads(capsys.readouterr().out)
    fast = Options(max_new_tokens=12, decoding="fast", threshold=0.5, block_size=8)
    assert out["middle"] == tasks.infill('def add(a, b):\n    """Add."""\n    return ', "\n", fast).text
    with pytest.raises(InputError, match="decoding 'quick' is unknown"):
        tasks.infill("x = ", "", Options(decoding="quick"))


def test_bench_quick_prints_json():
    proc = subprocess.run([sys.executable, "-m", "diffucode", "bench", "--quick"], capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["benchmark"] == "decoding" and len(report["workloads"]) == 4
    fast = [v for k, v in report["workloads"].items() if k.endswith("/ fast")]
    assert all(r["passes_per_token"] <= 0.25 for r in fast)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
@torch.inference_mode()
def test_cuda_graph_step_matches_eager(tiny_dir):
    from diffucode.daemon.engine.checkpoint import load_checkpoint

    net = load_checkpoint(tiny_dir, device="cuda", dtype="float32").network
    x = torch.randint(0, 300, (1, 70), device="cuda")
    pos = torch.arange(70, device="cuda")[None]
    predict = torch.arange(1, 33, device="cuda")[None]
    out = []
    for graphs in (False, True):
        cache = DualKVCache(net, cuda_graphs=graphs)
        cache.reserve(1, 70)
        cache.refresh(x, pos, None, predict + 20)
        for _ in range(2):  # the second call replays the captured graph
            out.append(cache.step(x, torch.tensor([20], device="cuda"), 33, pos, None, predict))
    torch.testing.assert_close(out[1], out[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(out[3], out[0], rtol=0, atol=1e-4)
