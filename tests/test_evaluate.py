"""Evaluator: lm-eval tokenization, batched == unbatched scoring, acc/acc_norm, perplexities, outputs, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import make_model
from eval_fixtures import write_task_data
from minitron.eval import harness as E
from minitron.eval import tasks as T


@pytest.fixture(scope="module")
def model():
    return make_model("llama", max_position_embeddings=1024)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_task_data(tmp_path_factory.mktemp("evaldata"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("models") / "tiny-llama"
    make_model("llama", max_position_embeddings=1024).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _hand_ll(model, ctx: list[int], cont: list[int]) -> float:
    """Unbatched reference: one forward over ctx+cont, sum of the continuation log-probs."""
    ids = torch.tensor([ctx + cont])  # [1, L]
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)  # [L, V]
    return sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


def test_encode_pair_moves_trailing_space_and_splits_whole(tokenizer):
    ctx, cont = E.encode_pair(tokenizer, "The model prunes ", "heads")
    whole = tokenizer.encode("The model prunes heads")
    assert ctx == tokenizer.encode("The model prunes")
    assert ctx + cont == whole and len(cont) >= 1
    # lm-eval's rule: continuation = whole[len(enc(context)):], even when a token merges across the boundary
    ctx2, cont2 = E.encode_pair(tokenizer, "the mod", "el")
    whole2 = tokenizer.encode("the model")
    assert ctx2 == tokenizer.encode("the mod") and cont2 == whole2[len(ctx2):]
    assert ctx2 + cont2 != whole2  # this pair does merge across the boundary


def test_batched_equals_unbatched_and_hand_computation(model, tokenizer):
    texts = [("The teacher distills", " knowledge into a student"), ("Python code", " runs"),
             ("Small fast models keep most of their accuracy with fewer layers", " and channels"),
             ("A", " norm"), ("The student keeps", " most of its accuracy with fewer parameters")]
    pairs = [E.encode_pair(tokenizer, c, x) for c, x in texts]
    one = E.score_requests(model, pairs, batch_size=1)
    many = E.score_requests(model, pairs, batch_size=4)
    for (a, ga), (b, gb), (ctx, cont) in zip(one, many, pairs, strict=True):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
        assert a == pytest.approx(_hand_ll(model, ctx, cont), abs=1e-4)
    assert len({round(a, 3) for a, _ in one}) == len(one)  # the scores really differ per request


def test_pairs_with_the_same_input_share_one_forward(model, tokenizer):
    ctx, other = tokenizer.encode("The model prunes heads"), tokenizer.encode("A student")
    # model inputs: ctx, other + [9], ctx, ctx (the last pair scores 2 tokens from the same row)
    pairs = [(ctx, [5]), (other, [9, 10]), (ctx, [6]), (ctx[:-1], ctx[-1:] + [7])]
    calls = []
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        scores = E.score_requests(model, pairs, batch_size=1)
    finally:
        hook.remove()
    assert len(calls) == 2
    for (ll, _), (c, x) in zip(scores, pairs, strict=True):
        assert ll == pytest.approx(_hand_ll(model, c, x), abs=1e-4)


def test_models_without_logits_to_keep_score_the_same(model, tokenizer):
    class NoKeep(torch.nn.Module):  # a model class whose forward has no logits_to_keep argument
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)

    pairs = [E.encode_pair(tokenizer, "The teacher distills", " knowledge"), E.encode_pair(tokenizer, "Code", " runs fast")]
    for (a, ga), (b, gb) in zip(E.score_requests(model, pairs, 2), E.score_requests(NoKeep(model), pairs, 2), strict=True):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb


def test_bfloat16_scores_close_to_float32(tokenizer):
    m32 = make_model("llama")
    m16 = make_model("llama").to(torch.bfloat16)
    pairs = [E.encode_pair(tokenizer, "The teacher distills", " knowledge into a student"),
             E.encode_pair(tokenizer, "Python code", " runs")]
    for (a, _), (b, _) in zip(E.score_requests(m32, pairs, 2), E.score_requests(m16, pairs, 2), strict=True):
        assert math.isfinite(b) and abs(a - b) < 0.05 * abs(a) + 0.1


def test_greedy_flag_is_true_for_the_argmax_continuation(model, tokenizer):
    ctx = tokenizer.encode("The model prunes heads and")
    with torch.no_grad():
        nxt = model(input_ids=torch.tensor([ctx])).logits[0, -1].argmax().item()
    other = (nxt + 1) % model.config.vocab_size
    (ll_g, g), (ll_o, o) = E.score_requests(model, [(ctx, [nxt]), (ctx, [other])])
    assert g and not o and ll_g > ll_o


def test_long_inputs_keep_the_last_max_length_plus_one_tokens(tokenizer):
    small = make_model("llama", max_position_embeddings=16)
    ctx, cont = list(range(5, 40)), [7, 8, 9]
    (ll, _), = E.score_requests(small, [(ctx, cont)])
    kept = (ctx + cont)[-17:]
    assert ll == pytest.approx(_hand_ll(small, kept[:-3], kept[-3:]), abs=1e-4)


def test_acc_norm_divides_by_character_length(monkeypatch, tokenizer):
    task = T.Task("fake", [T.Item([("q", " a"), ("q", " bbbbbbbbbb")], ["a", "bbbbbbbbbb"], gold=1)])
    monkeypatch.setattr(E, "score_requests", lambda *a, **k: [(-2.0, False), (-10.0, False)])
    r = E.score_task(None, tokenizer, task, progress=False)
    assert r["items"]["pred"] == [0] and r["acc"] == 0.0  # -2 > -10
    assert r["items"]["pred_norm"] == [1] and r["acc_norm"] == 1.0  # -2/1 < -10/10


def test_score_task_metrics_and_stderr(model, tokenizer, data):
    task = T.load_task("arc_easy", data)
    r = E.score_task(model, tokenizer, task, batch_size=3, progress=False)
    lls = r["items"]["ll"]
    for item, ll in zip(task.items, lls, strict=True):
        assert ll[0] == pytest.approx(_hand_ll(model, *E.encode_pair(tokenizer, *item.requests[0])), abs=1e-4)
    correct = [float(max(range(len(x)), key=x.__getitem__) == it.gold) for x, it in zip(lls, task.items, strict=True)]
    assert r["acc"] == sum(correct) / len(correct)
    mean = sum(correct) / 2
    assert r["acc_stderr"] == pytest.approx(math.sqrt(sum((c - mean) ** 2 for c in correct) / 1 / 2))


def test_lambada_perplexity_is_per_item(monkeypatch, tokenizer, data):
    task = T.load_task("lambada", data)
    monkeypatch.setattr(E, "score_requests", lambda *a, **k: [(-1.0, True), (-3.0, False)])
    r = E.score_task(None, tokenizer, task, progress=False)
    assert r["acc"] == 0.5
    assert r["perplexity"] == pytest.approx(math.exp(2.0))  # exp(-mean of item sums), not per token


def test_windowed_perplexity_matches_hand_computation(model):
    ids = torch.randint(0, 384, (3 * 20 + 7,), generator=torch.Generator().manual_seed(0))
    r = E.windowed_perplexity(model, ids, window=20, batch_size=2)
    assert r["windows"] == 3 and r["tokens"] == 3 * 19 and r["window"] == 20  # partial window dropped
    nll = []
    with torch.no_grad():
        for w in range(3):
            x = ids[w * 20:(w + 1) * 20]
            logp = model(input_ids=x[None]).logits[0].log_softmax(-1)  # [20, V]
            nll += [-logp[t, x[t + 1]].item() for t in range(19)]
    assert r["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    assert E.windowed_perplexity(model, ids, window=20, limit=1)["windows"] == 1


def test_wikitext_rows_are_joined_like_hf(tokenizer, tmp_path):
    raw = tmp_path / "wiki.test.raw"
    raw.write_text(" \n = Title = \n \n Body text . \n")
    ids = E.wikitext_ids(tokenizer, path=raw)
    # HF rows: "", " = Title = \n", "", " Body text . \n"  joined with "\n\n"
    assert tokenizer.decode(ids.tolist()) == "\n\n = Title = \n\n\n\n\n Body text . \n"


def test_evaluate_writes_json_markdown_plot_and_cli(model_dir, data, tmp_path, corpus_dir, tokenizer):
    shallow = tmp_path / "shallow"
    make_model("llama", layers=1, max_position_embeddings=1024).save_pretrained(shallow)
    tokenizer.save_pretrained(shallow)
    res = E.evaluate([str(model_dir), str(shallow)], ["piqa", "hellaswag", "lambada", "wikitext2",
                                                        f"loss:{corpus_dir}", "speed"],
                     batch_size=4, device="cpu", out_dir=tmp_path / "out", data_root=data, window=32,
                     seq_len=32, prompt_len=8, decode_tokens=4, speed_batch=2, progress=False)
    e = res["models"][str(model_dir)]
    assert set(e["tasks"]) == {"piqa", "hellaswag", "lambada", "wikitext2", f"loss:{corpus_dir}", "speed"}
    assert e["tasks"]["wikitext2"]["window"] == 32 and e["tasks"]["wikitext2"]["perplexity"] > 1
    # papers' average: acc_norm for hellaswag, acc for piqa and lambada
    want = (e["tasks"]["piqa"]["acc"] + e["tasks"]["hellaswag"]["acc_norm"] + e["tasks"]["lambada"]["acc"]) / 3
    assert e["average"] == pytest.approx(want)
    sp = e["tasks"]["speed"]
    assert set(sp["prefill_tok_s"]) == {1, 2} and all(v > 0 for v in sp["decode_tok_s"].values())
    assert sp["memory_kind"].startswith("cpu_peak_rss") and sp["peak_memory_mib"] > 0
    assert sp["ratio_to_first"]["decode_tok_s"][2] == pytest.approx(1.0)  # the first model vs itself
    sp2 = res["models"][str(shallow)]["tasks"]["speed"]
    assert sp2["ratio_to_first"]["prefill_tok_s"][1] == pytest.approx(sp2["prefill_tok_s"][1] / sp["prefill_tok_s"][1])
    saved = json.loads((tmp_path / "out/results.json").read_text())
    assert saved["models"][str(model_dir)]["tasks"]["piqa"]["acc"] == e["tasks"]["piqa"]["acc"]
    md = (tmp_path / "out/results.md").read_text()
    assert "hellaswag (acc_norm)" in md and "(1.00x)" in md and "(w32)" in md and str(shallow) in md
    assert (tmp_path / "out/results.png").stat().st_size > 1000

    from minitron.cli import main
    assert main(["eval", "--model", str(model_dir), "--tasks", "copa,boolq", "--data-dir", str(data),
                 "--device", "cpu", "--out", str(tmp_path / "cli")]) == 0
    assert "copa" in json.loads((tmp_path / "cli/results.json").read_text())["models"][str(model_dir)]["tasks"]


def test_cli_errors_are_clear(model_dir, data, tmp_path, capsys):
    from minitron.cli import main
    assert main(["eval", "--model", str(model_dir), "--tasks", "piqa,nope", "--data-dir", str(data)]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["eval", "--model", str(model_dir), "--tasks", "mmlu", "--data-dir", str(tmp_path)]) == 2
    assert "mmlu/test.jsonl" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "missing"), "--tasks", "piqa", "--data-dir", str(data),
                 "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------- the same numbers as lm-eval (slow)
@pytest.mark.slow
def test_same_predictions_and_accuracies_as_lm_eval(tokenizer, tmp_path):
    """lm-eval's own task YAMLs (dataset_path: json on the same files) vs ours: >= 200 items per task."""
    import os
    import sys
    from pathlib import Path

    pytest.importorskip("lm_eval")
    root = os.environ.get("MINITRON_DATA_DIR")
    if not root or not Path(root, "piqa").is_dir():
        pytest.skip("set MINITRON_DATA_DIR to a folder laid out like shared/data (the real task files)")
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import lm_eval_parity as P

    limit = int(os.environ.get("MINITRON_PARITY_LIMIT", "200"))
    tasks = sorted(P.LM_EVAL_YAML)
    model = make_model("llama", max_position_embeddings=4096)
    ours = P.run_ours(model, tokenizer, tasks, root, limit, 8)
    theirs = P.run_lm_eval(model, tokenizer, tasks, root, limit, 8, tmp_path / "lm_eval_tasks")
    for row in P.compare(ours, theirs):
        assert row["n"] == row["lm_eval_n"] == min(limit, len(T.load_task(row["task"], root).items)), row
        assert row["pred_mismatch"] == 0, row
        assert row["max_ll_diff"] < 1e-3, row
        assert row["ours_acc"] == pytest.approx(row["lm_eval_acc"], abs=1e-12), row
        if row["task"] == "lambada":
            assert row["ours_ppl"] == pytest.approx(row["lm_eval_ppl"], rel=1e-5), row
        elif row["lm_eval_acc_norm"] is not None:  # lm-eval reports acc_norm only where its YAML lists it
            assert row["ours_acc_norm"] == pytest.approx(row["lm_eval_acc_norm"], abs=1e-12), row


# ---------------------------------------------------------------- speed: interleaved rounds, best kept
def _speed_setup(monkeypatch, scripted: dict[str, list[float]] | None = None) -> tuple[list, list]:
    """Wrap E.load_model to tag each model with its name and E.measure_speed to record (name, round)
    and return scripted tok/s (prefill = v, decode = v / 10 at every batch size) -> (loads, calls)."""
    loads, calls = [], []
    real_load = E.load_model

    def load(name, *a, **k):
        model, tok = real_load(name, *a, **k)
        model._eval_name = name
        loads.append(name)
        return model, tok

    def fake_speed(model, prompt_len=128, decode_tokens=32, batch_sizes=(1, 8), seed=0):
        name = model._eval_name
        calls.append(name)
        v = scripted[name][calls.count(name) - 1] if scripted else 100.0
        return {"prompt_len": prompt_len, "decode_tokens": decode_tokens,
                "prefill_tok_s": {b: v * b for b in batch_sizes}, "decode_tok_s": {b: v / 10 for b in batch_sizes}}

    monkeypatch.setattr(E, "load_model", load)
    monkeypatch.setattr(E, "measure_speed", fake_speed)
    return loads, calls


@pytest.fixture(scope="module")
def shallow_dir(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("models") / "shallow"
    make_model("llama", layers=1, max_position_embeddings=1024).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_speed_rounds_are_interleaved_and_tasks_still_run_one_model_at_a_time(monkeypatch, model_dir, shallow_dir,
                                                                               data):
    a, b = str(model_dir), str(shallow_dir)
    loads, calls = _speed_setup(monkeypatch)
    res = E.evaluate([a, b], ["speed"], device="cpu", speed_rounds=3, speed_batch=2, progress=False)
    assert calls == [a, b, a, b, a, b]  # A1 B1 A2 B2 A3 B3
    assert loads == [a, b]  # speed alone: each model loaded once, for the speed phase only
    loads.clear()
    calls.clear()
    res = E.evaluate([a, b], ["speed", "copa"], device="cpu", data_root=data, speed_rounds=2, speed_batch=2,
                     progress=False)
    assert loads == [a, b, a, b] and calls == [a, b, a, b]  # copa model by model, then speed together
    assert list(res["models"][a]["tasks"]) == ["speed", "copa"] and res["config"]["speed_rounds"] == 2
    sp = res["models"][b]["tasks"]["speed"]
    assert sp["rounds"] == 2 and sp["memory_kind"].startswith("cpu_peak_rss") and sp["peak_memory_mib"] > 0
    assert set(res["models"][a]["wall_s"]) == {"speed", "copa"}
    with pytest.raises(ValueError, match="speed_rounds"):
        E.evaluate([a], ["speed"], device="cpu", speed_rounds=0)


def test_speed_keeps_the_best_round_and_ratios_use_the_best(monkeypatch, model_dir, shallow_dir, tmp_path):
    a, b = str(model_dir), str(shallow_dir)
    # a busy machine: each model has slow rounds; the best of A is round 2, of B round 3
    _speed_setup(monkeypatch, {a: [50.0, 100.0, 80.0], b: [60.0, 120.0, 150.0]})
    res = E.evaluate([a, b], ["speed"], device="cpu", out_dir=tmp_path / "out", speed_rounds=3, speed_batch=4,
                     progress=False)
    sa, sb = res["models"][a]["tasks"]["speed"], res["models"][b]["tasks"]["speed"]
    assert sa["prefill_tok_s"] == {1: 100.0, 4: 400.0} and sa["decode_tok_s"] == {1: 10.0, 4: 10.0}
    assert sb["prefill_tok_s"] == {1: 150.0, 4: 600.0} and sb["decode_tok_s"][4] == pytest.approx(15.0)
    assert sb["all_rounds"]["prefill_tok_s"][1] == [60.0, 120.0, 150.0]
    assert sb["ratio_to_first"]["prefill_tok_s"] == {1: pytest.approx(1.5), 4: pytest.approx(1.5)}
    assert sb["ratio_to_first"]["decode_tok_s"][1] == pytest.approx(1.5)
    assert sa["ratio_to_first"]["decode_tok_s"][4] == pytest.approx(1.0)
    md = (tmp_path / "out/results.md").read_text()
    assert "best of 3 interleaved rounds" in md and "150 (1.50x)" in md and "| 600 (1.50x)" in md
    saved = json.loads((tmp_path / "out/results.json").read_text())
    assert saved["models"][b]["tasks"]["speed"]["rounds"] == 3


def test_cli_passes_speed_rounds(monkeypatch, model_dir, tmp_path):
    from minitron.cli import main

    _, calls = _speed_setup(monkeypatch)
    assert main(["eval", "--model", str(model_dir), "--tasks", "speed", "--device", "cpu", "--speed-rounds", "2",
                 "--out", str(tmp_path / "o")]) == 0
    assert len(calls) == 2 and "best of 2 interleaved rounds" in (tmp_path / "o/results.md").read_text()


def test_prefill_computes_the_last_positions_logits_only():
    """A generation's prefill needs the next token's logits only (transformers' generate passes logits_to_keep=1):
    measure_speed times that forward, not one that also projects every prompt position onto the vocabulary."""
    from minitron.arch.adapters import prefill_kwargs

    model = make_model("llama")
    shapes = []
    model.register_forward_hook(lambda m, args, kwargs, out: shapes.append(
        (kwargs["input_ids"].shape[1], kwargs.get("logits_to_keep"), out.logits.shape[1])), with_kwargs=True)
    E.measure_speed(model, prompt_len=8, decode_tokens=2, batch_sizes=(1,))
    assert {s for s in shapes if s[0] == 8} == {(8, 1, 1)}  # warm-up and timed prefill: one position's logits
    assert prefill_kwargs(torch.nn.Linear(2, 2)) == {}


def test_prefill_keeps_the_fastest_of_its_repeats(monkeypatch):
    """One short prefill call is at the mercy of a shared machine: measure_speed times PREFILL_REPEATS of them per
    batch size and keeps the fastest (a fake clock: 3 s, 1 s, 2 s -> 1 s), while decode is timed once over its steps."""
    import types

    ticks = iter([0.0, 3.0, 10.0, 11.0, 20.0, 22.0, 30.0, 40.0])
    monkeypatch.setattr(E, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    model = make_model("llama")
    calls = []
    model.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs["input_ids"].shape[1]),
                                with_kwargs=True)
    r = E.measure_speed(model, prompt_len=8, decode_tokens=2, batch_sizes=(1,))
    assert calls.count(8) == 1 + E.PREFILL_REPEATS  # the warm-up, then the timed repeats
    assert E.PREFILL_REPEATS == 3
    assert r["prefill_tok_s"][1] == 8 / 1.0 and r["decode_tok_s"][1] == 2 / 10.0
