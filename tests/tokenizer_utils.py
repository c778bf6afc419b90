"""Helpers that build small Llama-style tokenizers from the bundled corpus, for tests and scripts.

Nothing here touches the network: the sentencepiece model is trained on `tests/data/corpus.txt` in well
under a second, and the optional `tokenizer.json` is converted locally by `transformers`.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from pathlib import Path

import sentencepiece as spm

CORPUS_PATH: Path = Path(__file__).resolve().parent / "data" / "corpus.txt"

# ChatML-like, with the BOS token first and EOS closing every turn, as Llama-style checkpoints do.
DEFAULT_CHAT_TEMPLATE: str = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Conversation roles must be system, user or assistant, got ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

_SPECIAL_TOKENS = {0: "<unk>", 1: "<s>", 2: "</s>"}


def train_sentencepiece(out_dir: Path, vocab_size: int = 512) -> Path:
    """Train a Llama-like BPE sentencepiece model on the corpus and return the path of `tokenizer.model`.

    Byte fallback makes every string encodable (rare characters become `<0xNN>` pieces, which is what the
    detokenizer tests need). Training reads lines from memory and writes to memory, so the model bytes depend
    on nothing but the corpus and the options: no file path or prefix is recorded in the trainer spec.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [line for line in CORPUS_PATH.read_text(encoding="utf-8").splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=0.98,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_surface=" \u2047 ",
        num_threads=1,
        minloglevel=2,
    )
    path = out_dir / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def write_hf_tokenizer_files(
    model_dir: Path,
    sp_model_path: Path,
    *,
    fast: bool = False,
    chat_template: str | None = DEFAULT_CHAT_TEMPLATE,
    extra_config: dict | None = None,
) -> None:
    """Write the tokenizer files a Llama-style HF checkpoint carries into `model_dir`.

    Always `tokenizer.model` and `tokenizer_config.json`; with `fast=True` also `tokenizer.json`, converted
    from the sentencepiece model by `transformers` (offline), so both jserve backends can be tested on one
    directory.
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sp_model_path, model_dir / "tokenizer.model")
    config: dict = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "added_tokens_decoder": {
            str(token_id): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for token_id, content in _SPECIAL_TOKENS.items()
        },
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    config.update(extra_config or {})
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    if fast:
        _write_tokenizer_json(model_dir)


def _write_tokenizer_json(model_dir: Path) -> None:
    """Convert `model_dir/tokenizer.model` to `model_dir/tokenizer.json` with transformers' converter."""
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    with tempfile.TemporaryDirectory() as tmp:
        hf_tokenizer.save_pretrained(tmp)
        shutil.copyfile(Path(tmp) / "tokenizer.json", model_dir / "tokenizer.json")
