"""The trained bundled model, its training script, the held-out rule and the perplexity evaluator."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jserve import LLM, SamplingParams
from jserve.api import BUNDLED_DRAFT_MODEL, BUNDLED_MODEL
from jserve.perplexity import BigramModel, Perplexity, file_windows, llm_perplexity, reference_perplexity
from jserve.stdlib_corpus import corpus_files, is_held_out, read_source, stdlib_root

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", max_model_len=256, max_num_seqs=8, max_num_batched_tokens=256, precompile=False)


def test_held_out_rule_is_applied_as_written():
    root = stdlib_root()
    train, heldout, every = (corpus_files(split=s) for s in ("train", "heldout", "all"))
    assert not set(train) & set(heldout)
    assert sorted(set(train) | set(heldout)) == every == sorted(every)
    for path in heldout:
        relative = path.relative_to(root).as_posix()
        assert hashlib.sha1(relative.encode()).hexdigest()[-1] == "0" and is_held_out(relative)
    assert all(not is_held_out(p.relative_to(root).as_posix()) for p in train)
    assert all("site-packages" not in p.relative_to(root).parts for p in every)
    assert 0.03 < len(heldout) / len(every) < 0.1  # ~1/16


def test_bundled_model_loads_offline_and_greedy_completion_is_deterministic(llm):
    params = SamplingParams(temperature=0.0, max_tokens=24)
    first = llm.generate("def fibonacci(n):\n", params, use_tqdm=False)[0].outputs[0]
    again = llm.generate(["import os\n", "def fibonacci(n):\n"], params, use_tqdm=False)[1].outputs[0]
    assert first.token_ids == again.token_ids and first.text == again.text
    assert first.text.strip() and "\ufffd" not in first.text  # real text, no broken byte-fallback pieces
    config = json.loads((BUNDLED_MODEL / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["early_exit_layer"] == 2
    draft = json.loads((BUNDLED_DRAFT_MODEL / "config.json").read_text())
    assert draft["vocab_size"] == config["vocab_size"] and draft["num_hidden_layers"] == 1
    assert (BUNDLED_MODEL / "tokenizer.model").read_bytes() == (BUNDLED_DRAFT_MODEL / "tokenizer.model").read_bytes()


def _heldout_windows(llm, num_files: int, window: int) -> list[list[int]]:
    tokenizer = llm.tokenizer
    windows = []
    for path in corpus_files(split="heldout")[:num_files]:
        ids = [tokenizer.bos_token_id, *tokenizer.encode(read_source(path), add_special_tokens=False)]
        windows += file_windows(ids, window)[:2]
    return windows


def test_jserve_perplexity_equals_transformers_on_held_out_files(llm):
    windows = _heldout_windows(llm, num_files=3, window=200)
    ours = llm_perplexity(llm, windows, progress=False)
    reference = reference_perplexity(str(BUNDLED_MODEL), windows)
    assert ours.num_tokens == reference.num_tokens == sum(len(w) - 1 for w in windows)
    assert abs(ours.value / reference.value - 1) < 0.005, (ours.value, reference.value)
    assert ours.value < 250  # trained: a random model scores about the vocabulary size (4096) here


def test_bigram_baseline_scores_the_same_tokens():
    model = BigramModel([[1, 5, 6, 5, 6, 2], [1, 5, 6, 2]], vocab_size=8)
    seen = model.perplexity([[1, 5, 6, 2]])
    unseen = model.perplexity([[1, 7, 3, 2]])
    assert seen.num_tokens == unseen.num_tokens == 3
    assert seen.value < unseen.value
    # P(6 | 5): 3 of 3 successors were 6, one successor type: (3 + 1 * P_uni(6)) / (3 + 1)
    p_uni_6 = (3 + 1) / (10 + 8)
    assert model.log_probs([5], [6])[0] == pytest.approx(__import__("math").log((3 + p_uni_6) / 4))
    assert Perplexity(0.0, 0).value != Perplexity(0.0, 0).value  # NaN when nothing was scored


def test_train_script_output_loads_with_jserve_and_transformers(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    names = [p for p in sorted(stdlib_root().glob("*.py"))][:60]
    for path in names:
        shutil.copyfile(path, corpus / path.name)
    assert any(is_held_out(p.name) for p in names) and not all(is_held_out(p.name) for p in names)
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "scripts/train_tiny_model.py",
            "--corpus",
            str(corpus),
            "--preset",
            "smoke",
            "--out",
            str(out),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    log = json.loads((out / "target" / "training_log.json").read_text())
    assert log["steps"] == 3 and log["heldout_files"] == sum(is_held_out(p.name) for p in names)
    assert log["python_version"] and log["loss_curve"] and log["heldout_perplexity"] > 1
    assert log["early_exit_layer"] == 1 and "early_exit_heldout_perplexity" in log
    import transformers

    for name in ("target", "draft"):
        model = transformers.AutoModelForCausalLM.from_pretrained(out / name, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(out / name, local_files_only=True)
        assert tokenizer.decode(tokenizer.encode("def f(x):\n    return x\n"), skip_special_tokens=True) == (
            "def f(x):\n    return x\n"
        )
        assert model.config.vocab_size == 512
    small = LLM(out / "target", max_model_len=64, max_num_seqs=2, max_num_batched_tokens=64, precompile=False)
    (output,) = small.generate(["def f"], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
    assert len(output.outputs[0].token_ids) == 4
