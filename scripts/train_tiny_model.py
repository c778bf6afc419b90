"""Train the bundled models from scratch on the Python standard library: a target and a small draft.

    python scripts/train_tiny_model.py --out /tmp/trained          # the bundled run (~50 min on 2 CPU cores)
    python scripts/train_tiny_model.py --corpus DIR --preset smoke  # seconds; what the tests run

Corpus: every ``*.py`` under the interpreter's stdlib (without site-packages), sorted; the files whose relative
path's SHA-1 ends in "0" are held out (``jserve.stdlib_corpus``) and never trained on. A sentencepiece BPE
tokenizer (byte fallback, BOS/EOS) is trained on the training split, then two Llama models:

- the target, with a LayerSkip-style early-exit loss: the final norm and LM head are also applied to the output
  of layer ``early_exit_layer`` (half the depth) and that loss joins the main one with a small weight, so the
  first half of the model can draft for the whole (self-speculative decoding);
- the draft (one layer, narrower), same tokenizer, same data, for draft-model speculative decoding.

Framework: torch + transformers' ``LlamaForCausalLM``. On this 2-core x86 CPU torch's fp32 GEMMs measured
faster than XLA's (263-321 vs 171-288 GFLOP/s, docs/benchmarks.md), a training step needs no compile, and the
output is a standard Hugging Face checkpoint by construction.

Output: ``OUT/target`` and ``OUT/draft``, each a Hugging Face directory (config.json, model.safetensors in
bfloat16, tokenizer.model, tokenizer_config.json, generation_config.json, training_log.json). Deterministic
given ``--seed`` (up to float reordering across machines).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from jserve.perplexity import BigramModel, file_windows  # noqa: E402
from jserve.stdlib_corpus import corpus_files, iter_chunks, read_source, stdlib_root  # noqa: E402

EARLY_EXIT_WEIGHT = 0.25


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int


@dataclass(frozen=True)
class RunShape:
    """What one training run does: the tokenizer, both models, and how long each trains."""

    vocab_size: int
    seq_len: int
    batch_size: int
    target: ModelShape
    draft: ModelShape
    target_steps: int
    draft_steps: int
    peak_lr: float
    warmup_steps: int


PRESETS = {
    # ~4.2M parameters (8.4 MB in bf16) and ~1.2M (2.4 MB); ~7.4M and ~3.7M training tokens (about 0.8 and 0.4
    # of an epoch). 256-token windows: on 2 cores, more tokens seen beat longer context (run 1 trained on 512-token
    # windows, 4.6M tokens, and reached 0.66x the bigram perplexity).
    "bundled": RunShape(
        vocab_size=4096,
        seq_len=256,
        batch_size=32,
        target=ModelShape(4, 256, 768, 8, 4),
        draft=ModelShape(1, 192, 512, 6, 2),
        target_steps=900,
        draft_steps=450,
        peak_lr=4e-3,
        warmup_steps=40,
    ),
    "smoke": RunShape(
        vocab_size=512,
        seq_len=64,
        batch_size=4,
        target=ModelShape(2, 64, 128, 4, 2),
        draft=ModelShape(1, 32, 64, 2, 1),
        target_steps=3,
        draft_steps=2,
        peak_lr=1e-3,
        warmup_steps=1,
    ),
}


def train_tokenizer(files: list[Path], vocab_size: int) -> bytes:
    """A sentencepiece BPE model with byte fallback; whitespace kept verbatim (indentation is syntax)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter_chunks(files),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=0.9995,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        max_sentence_length=4096,
        input_sentence_size=1_000_000,
        shuffle_input_sentence=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=2,
        minloglevel=2,
    )
    return model.getvalue()


def tokenize_files(sp, files: list[Path]) -> list[np.ndarray]:
    """Each file as ``[BOS] + ids + [EOS]``."""
    return [np.asarray([1, *sp.encode(read_source(p)), 2], dtype=np.int32) for p in files]


def hf_config(shape: ModelShape, run: RunShape, early_exit_layer: int | None):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=run.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        # trained on seq_len windows; RoPE runs past them (quality drops there), and the engine's tests and
        # users need room beyond 512 tokens
        max_position_embeddings=max(run.seq_len, 2048),
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="sdpa",
    )
    if early_exit_layer is not None:
        config.early_exit_layer = early_exit_layer  # read by jserve as speculative_exit_layer's default
    return config


def lr_at(step: int, run: RunShape, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < run.warmup_steps:
        return run.peak_lr * (step + 1) / run.warmup_steps
    progress = (step - run.warmup_steps) / max(1, total - run.warmup_steps)
    return run.peak_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def training_windows(streams: list[np.ndarray], seq_len: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The training split as one token stream, and the starts of its ``seq_len + 1`` windows in a seeded
    random order."""
    stream = np.concatenate(streams)
    count = (len(stream) - 1) // seq_len
    starts = np.arange(count) * seq_len
    np.random.default_rng(seed).shuffle(starts)
    return starts, stream


def train_model(config, run: RunShape, steps: int, streams, seed: int, early_exit_layer: int | None, log):
    """AdamW over shuffled windows; returns the model and its loss curve (every 10 steps)."""
    import torch
    import torch.nn.functional as F
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).to(torch.float32).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=run.peak_lr,
        betas=(0.9, 0.95),
    )
    starts, stream = training_windows(streams, run.seq_len, seed)
    needed = steps * run.batch_size
    if needed > len(starts):  # more than one epoch: repeat the permutation
        starts = np.tile(starts, needed // len(starts) + 1)
    curve = []
    began = time.time()
    for step in range(steps):
        batch_starts = starts[step * run.batch_size : (step + 1) * run.batch_size]
        batch = torch.from_numpy(np.stack([stream[s : s + run.seq_len + 1] for s in batch_starts]).astype(np.int64))
        inputs, labels = batch[:, :-1], batch[:, 1:]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, run, steps)
        out = model(input_ids=inputs, output_hidden_states=early_exit_layer is not None)
        loss = F.cross_entropy(out.logits.reshape(-1, config.vocab_size), labels.reshape(-1))
        total = loss
        early = None
        if early_exit_layer is not None:
            # half the batch is enough signal for the exit head and saves a quarter of the LM-head work
            half = max(1, run.batch_size // 2)
            hidden = model.model.norm(out.hidden_states[early_exit_layer][:half])
            early = F.cross_entropy(model.lm_head(hidden).reshape(-1, config.vocab_size), labels[:half].reshape(-1))
            total = loss + EARLY_EXIT_WEIGHT * early
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 10 == 0 or step == steps - 1:
            point = {"step": step, "loss": round(loss.item(), 4), "seconds": round(time.time() - began, 1)}
            if early is not None:
                point["early_exit_loss"] = round(early.item(), 4)
            curve.append(point)
            log(f"  step {step:4d}/{steps}  " + "  ".join(f"{k} {v}" for k, v in point.items() if k != "step"))
    return model.eval(), curve, time.time() - began


def heldout_perplexity(model, streams, seq_len: int, early_exit_layer: int | None) -> dict[str, float]:
    """Per-token perplexity on the held-out windows (``jserve.perplexity.file_windows``), and of the early exit."""
    import torch
    import torch.nn.functional as F

    nll = {"full": 0.0, "early_exit": 0.0}
    count = 0
    with torch.no_grad():
        for stream in streams:
            for window in file_windows(stream.tolist(), seq_len):
                ids = torch.tensor([window])
                out = model(input_ids=ids, output_hidden_states=early_exit_layer is not None)
                nll["full"] += float(F.cross_entropy(out.logits[0, :-1].double(), ids[0, 1:], reduction="sum"))
                if early_exit_layer is not None:
                    hidden = model.model.norm(out.hidden_states[early_exit_layer])
                    logits = model.lm_head(hidden)[0, :-1].double()
                    nll["early_exit"] += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
                count += len(window) - 1
    result = {"heldout_perplexity": math.exp(nll["full"] / count), "heldout_tokens_scored": count}
    if early_exit_layer is not None:
        result["early_exit_heldout_perplexity"] = math.exp(nll["early_exit"] / count)
    return result


def save_checkpoint(model, out_dir: Path, sp_model: bytes, log_entry: dict) -> None:
    """A Hugging Face directory with bf16 weights, the tokenizer, and the run's log."""
    import torch
    import transformers

    from tests.tokenizer_utils import DEFAULT_CHAT_TEMPLATE, write_hf_tokenizer_files

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    model = model.to(torch.bfloat16)
    model.generation_config = transformers.GenerationConfig(bos_token_id=1, eos_token_id=2)
    model.save_pretrained(out_dir, safe_serialization=True)
    with tempfile.TemporaryDirectory() as tmp:
        sp_path = Path(tmp) / "tokenizer.model"
        sp_path.write_bytes(sp_model)
        # the tokenizer adds no dummy-prefix space (code starts at column 0); tell transformers' tokenizer so
        write_hf_tokenizer_files(
            out_dir, sp_path, chat_template=DEFAULT_CHAT_TEMPLATE, extra_config={"add_prefix_space": False}
        )
    (out_dir / "training_log.json").write_text(json.dumps(log_entry, indent=2) + "\n")
    for path in out_dir.iterdir():
        path.chmod(0o644)


def copy_task_stream(sp, files: list[Path], seq_len: int) -> np.ndarray:
    """The copy task as one token stream: each training-split function, then a request to repeat it under a new
    name and the repeated function (``jserve.stdlib_corpus.repeat_prompt``), kept when the whole sample fits in
    one training window (the copy must see its original)."""
    from jserve.stdlib_corpus import function_sources, repeat_prompt

    samples = []
    for name, source in function_sources(min_lines=4, max_lines=24, files=files):
        prompt = repeat_prompt(name, source)
        renamed = source.replace(f"def {name}(", f"def {name}_v2(", 1)
        ids = [1, *sp.encode(prompt + "\n".join(renamed.splitlines()[1:]) + "\n"), 2]
        if len(ids) <= seq_len:
            samples.append(np.asarray(ids, np.int32))
    return np.concatenate(samples)


def finetune_copy(args) -> None:
    """Continues a bundled model on a mix of its corpus and the copy task (half of each batch): the target learns
    to repeat text from its context, which prompt-lookup speculation and input-grounded work rely on; the draft
    follows the target's new habits (its one layer cannot copy, but it keeps predicting the target)."""
    import sentencepiece as spm
    import torch
    import torch.nn.functional as F
    import transformers

    torch.set_num_threads(args.threads)
    began = time.time()
    log = lambda message: print(f"[{time.time() - began:7.1f}s] {message}", flush=True)
    source = args.finetune_copy
    previous = json.loads((source / "training_log.json").read_text())
    run = PRESETS[previous["preset"]]
    sp_model = (source / "tokenizer.model").read_bytes()
    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    root = args.corpus or stdlib_root()
    train_files, heldout_files = corpus_files(root, split="train"), corpus_files(root, split="heldout")
    train_streams, heldout_streams = tokenize_files(sp, train_files), tokenize_files(sp, heldout_files)
    copy_stream = copy_task_stream(sp, train_files, run.seq_len)
    log(f"copy task: {len(copy_stream)} tokens")
    model = transformers.LlamaForCausalLM.from_pretrained(source, torch_dtype=torch.float32).train()
    exit_layer = previous["early_exit_layer"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.finetune_lr, betas=(0.9, 0.95), weight_decay=0.1)
    starts, stream = training_windows(train_streams, run.seq_len, args.seed + 1)
    copy_starts, _ = training_windows([copy_stream], run.seq_len, args.seed + 2)
    half = run.batch_size // 2
    curve = []
    for step in range(args.finetune_steps):
        lr = args.finetune_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.finetune_steps)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = [stream[s : s + run.seq_len + 1] for s in starts[step * half : (step + 1) * half]]
        picks = copy_starts[(np.arange(half) + step * half) % len(copy_starts)]
        rows += [copy_stream[s : s + run.seq_len + 1] for s in picks]
        batch = torch.from_numpy(np.stack(rows).astype(np.int64))
        inputs, labels = batch[:, :-1], batch[:, 1:]
        out = model(input_ids=inputs, output_hidden_states=exit_layer is not None)
        loss = F.cross_entropy(out.logits.reshape(-1, run.vocab_size), labels.reshape(-1))
        total, early = loss, loss.new_zeros(())
        if exit_layer is not None:
            hidden = model.model.norm(out.hidden_states[exit_layer])
            early = F.cross_entropy(model.lm_head(hidden).reshape(-1, run.vocab_size), labels.reshape(-1))
            total = loss + EARLY_EXIT_WEIGHT * early
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 10 == 0 or step == args.finetune_steps - 1:
            point = {"step": step, "loss": round(loss.item(), 4), "early_exit_loss": round(early.item(), 4)}
            point["seconds"] = round(time.time() - began, 1)
            curve.append(point)
            log(f"  finetune step {step}/{args.finetune_steps} loss {point['loss']} early {point['early_exit_loss']}")
    model.eval()
    evaluation = heldout_perplexity(model, heldout_streams, run.seq_len, exit_layer)
    log(f"held-out perplexity {evaluation}")
    entry = {
        **previous,
        **evaluation,
        "copy_finetune": {
            "steps": args.finetune_steps,
            "peak_lr": args.finetune_lr,
            "batch": f"{half} corpus windows + {half} copy-task windows of {run.seq_len} tokens",
            "copy_task_tokens": int(len(copy_stream)),
            "train_seconds": round(time.time() - began, 1),
            "before": {
                k: previous[k] for k in ("heldout_perplexity", "early_exit_heldout_perplexity") if k in previous
            },
            "loss_curve": curve,
        },
    }
    save_checkpoint(model, args.out, sp_model, entry)
    log(f"done: {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="writes OUT/target and OUT/draft")
    parser.add_argument("--corpus", type=Path, default=None, help="directory of *.py files (default: the stdlib)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="bundled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--finetune-copy", type=Path, default=None, help="continue this target on the copy-task mix; writes OUT"
    )
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    args = parser.parse_args()
    if args.finetune_copy is not None:
        finetune_copy(args)
        return

    import sentencepiece as spm
    import torch

    torch.set_num_threads(args.threads)
    run = PRESETS[args.preset]
    began = time.time()
    log = lambda message: print(f"[{time.time() - began:7.1f}s] {message}", flush=True)
    root = args.corpus or stdlib_root()
    train_files, heldout_files = corpus_files(root, split="train"), corpus_files(root, split="heldout")
    if not train_files or not heldout_files:
        raise SystemExit(
            f"corpus: {root} needs files in both splits (train {len(train_files)}, held out {len(heldout_files)})"
        )
    log(f"corpus {root}: {len(train_files)} training files, {len(heldout_files)} held out")

    sp_model = train_tokenizer(train_files, run.vocab_size)
    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    train_streams, heldout_streams = tokenize_files(sp, train_files), tokenize_files(sp, heldout_files)
    corpus_stats = {
        "python_version": platform.python_version(),
        "corpus_root": str(root),
        "train_files": len(train_files),
        "train_bytes": sum(p.stat().st_size for p in train_files),
        "train_tokens": int(sum(len(s) for s in train_streams)),
        "heldout_files": len(heldout_files),
        "heldout_bytes": sum(p.stat().st_size for p in heldout_files),
        "heldout_tokens": int(sum(len(s) for s in heldout_streams)),
    }
    log(f"tokenizer trained; {corpus_stats['train_tokens']} training, {corpus_stats['heldout_tokens']} held-out tokens")
    heldout_windows = [w for s in heldout_streams for w in file_windows(s.tolist(), run.seq_len)]
    bigram = BigramModel(train_streams, run.vocab_size).perplexity(heldout_windows).value
    log(f"bigram baseline held-out perplexity {bigram:.2f}")

    for name, shape, steps, exit_layer in (
        ("target", run.target, run.target_steps, run.target.num_layers // 2),
        ("draft", run.draft, run.draft_steps, None),
    ):
        log(f"training {name}: {shape}")
        config = hf_config(shape, run, exit_layer)
        model, curve, seconds = train_model(config, run, steps, train_streams, args.seed, exit_layer, log)
        evaluation = heldout_perplexity(model, heldout_streams, run.seq_len, exit_layer)
        log(f"{name} held-out perplexity {evaluation}")
        entry = {
            "model": name,
            "framework": f"torch {torch.__version__} + transformers LlamaForCausalLM, fp32 training, bf16 weights",
            "preset": args.preset,
            "seed": args.seed,
            "threads": args.threads,
            "run": asdict(run),
            "shape": asdict(shape),
            "parameters": sum(p.numel() for p in model.parameters()),
            "early_exit_layer": exit_layer,
            "early_exit_weight": EARLY_EXIT_WEIGHT if exit_layer is not None else None,
            "steps": steps,
            "tokens_seen": steps * run.batch_size * run.seq_len,
            "train_seconds": round(seconds, 1),
            "wall_seconds_since_start": round(time.time() - began, 1),
            **corpus_stats,
            "bigram_heldout_perplexity": bigram,
            **evaluation,
            "loss_curve": curve,
        }
        save_checkpoint(model, args.out / name, sp_model, entry)
    log(f"done: {args.out}")


if __name__ == "__main__":
    main()
