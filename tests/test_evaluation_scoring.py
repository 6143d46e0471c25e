import math

import pytest
import torch
from _eval_stubs import BigramLM, StubTokenizer
from neuraldb.evaluation.scoring import encode_pair, score_continuations


@pytest.fixture
def lm():
    tok = StubTokenizer()
    model = BigramLM()
    is_, new, york, boston = (tok.id(p) for p in (" is", " New", " York", " Boston"))
    model.set_next(is_, {new: 0.5, boston: 0.3})
    model.set_next(new, {york: 0.9})
    return model, tok


def test_encode_pair_moves_trailing_space_and_splits_at_boundary():
    tok = StubTokenizer(bos=True)
    ctx, cont = encode_pair(tok, "Paris is in ", "France")
    assert ctx == [1, tok.id("Paris"), tok.id(" is"), tok.id(" in")]
    assert cont == [tok.id(" France")]


def test_summed_and_mean_logprob_of_multi_token_target(lm):
    model, tok = lm
    (s,) = score_continuations(model, tok, ["Bob is"], [" New York"], show_progress=False)
    assert s.n_tokens == 2
    assert s.sum_logprob == pytest.approx(math.log(0.5) + math.log(0.9), abs=1e-5)
    assert s.mean_logprob == pytest.approx((math.log(0.5) + math.log(0.9)) / 2, abs=1e-5)
    assert s.token_correct == [True, True] and s.is_greedy


def test_padding_and_batching_do_not_change_scores(lm):
    model, tok = lm
    ctxs = ["Bob is", "A much longer prompt where Bob is", "x"]
    conts = [" New York", " Boston", " New York"]
    batched = score_continuations(model, tok, ctxs, conts, batch_size=8, show_progress=False)
    single = [
        score_continuations(model, tok, [c], [t], batch_size=1, show_progress=False)[0] for c, t in zip(ctxs, conts)
    ]
    for a, b in zip(batched, single):
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-6)
        assert a.argmax_ids == b.argmax_ids
    assert batched[1].sum_logprob == pytest.approx(math.log(0.3), abs=1e-5)
    # one forward for the whole batch, logits kept only for the last max(len(target)) + 1 positions
    model.calls.clear()
    score_continuations(model, tok, ctxs, conts, batch_size=8, show_progress=False)
    assert len(model.calls) == 1


def test_greedy_flag_is_false_when_any_token_is_not_top1(lm):
    model, tok = lm
    (s,) = score_continuations(model, tok, ["Bob is"], [" Boston"], show_progress=False)
    assert s.token_correct == [False] and not s.is_greedy and s.token_accuracy == 0.0


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def test_shared_context_scoring_matches_unshared_on_a_real_architecture():
    from neuraldb.evaluation.scoring import score_grouped_token_ids, score_token_ids

    model = _tiny_llama()
    groups = [([5, 6, 7], [[8], [9, 10, 11]]), ([3], [[4, 4], [12]]), ([1, 2, 3, 4, 5, 6, 7, 8, 9], [[20, 21]])]
    grouped = score_grouped_token_ids(model, groups, batch_size=3, show_progress=False)
    flat = score_token_ids(model, [(c, t) for c, ts in groups for t in ts], batch_size=2, show_progress=False)
    got = [s for g in grouped for s in g]
    assert len(got) == len(flat) == 5
    for a, b in zip(got, flat):
        assert a.token_ids == b.token_ids
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4)
        assert a.argmax_ids == b.argmax_ids
    # and both equal one sequence scored alone, with no padding at all
    (alone,) = score_token_ids(model, [([5, 6, 7], [9, 10, 11])], batch_size=1, show_progress=False)
    assert got[1].token_logprobs == pytest.approx(alone.token_logprobs, abs=1e-4)


def test_the_vocabulary_head_gets_contiguous_rows():
    # A strided (batch, kept positions, hidden) slice sends bf16 CPU matmuls down a ~100x slower path: Gemma's
    # 262k-token head took 135 s per ZsRE batch that way instead of 0.8 s.
    from neuraldb.evaluation.scoring import score_token_ids

    model = _tiny_llama()
    seen = []
    model.lm_head.register_forward_pre_hook(lambda mod, args: seen.append(args[0].is_contiguous()))
    pairs = [([5, 6, 7, 8, 9], [10, 11]), ([3, 4], [12, 13, 14])]
    got = score_token_ids(model, pairs, batch_size=2, show_progress=False)
    assert seen == [True]
    # the kept positions are the right ones: the same scores as each pair alone, unpadded
    for pair, score in zip(pairs, got):
        (alone,) = score_token_ids(model, [pair], batch_size=1, show_progress=False)
        assert score.token_logprobs == pytest.approx(alone.token_logprobs, abs=1e-4)
        assert score.argmax_ids == alone.argmax_ids


def test_shared_context_scoring_falls_back_without_a_cache(lm):
    from neuraldb.evaluation.scoring import score_grouped

    model, tok = lm
    (res,) = score_grouped(model, tok, ["Bob is"], [[" New York", " Boston"]], show_progress=False)
    assert res[0].sum_logprob == pytest.approx(math.log(0.45), abs=1e-5)
    assert res[1].sum_logprob == pytest.approx(math.log(0.3), abs=1e-5)
