"""jserve.tokenizer against sentencepiece, tokenizers and transformers on the same checkpoint files.

Both backends are exercised on one tokenizer: `tokenizer.model` alone (sentencepiece backend) and with the
`tokenizer.json` transformers converts from it (tokenizers backend).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jserve.bundled import BUNDLED_DRAFT_MODEL, BUNDLED_MODEL
from jserve.tokenizer import Tokenizer
from tests.tokenizer_utils import CORPUS_PATH, DEFAULT_CHAT_TEMPLATE, write_hf_tokenizer_files

BACKENDS = ["sentencepiece", "tokenizer.json"]
# plus a GPT-2-style byte-level BPE tokenizer.json (as Llama 3 and Qwen use) for the detokenizer tests
ALL_BACKENDS = [*BACKENDS, "byte-level"]
BYTE_IDS = range(3, 3 + 256)  # <0x00>..<0xFF> follow <unk>, <s>, </s> in a byte-fallback sentencepiece model
SPECIAL_IDS = (0, 1, 2)

SAMPLES = [
    "Hello world",
    "The kettle clicked off just as the rain started.",
    "Café, naïve, Zürich: crème brûlée costs €6.",
    "Привет, мир! Καλημέρα! 你好，世界。今日は雨です。",
    "Emoji 😀👍🏽 and flags 🇯🇵, a family 👨‍👩‍👧.",
    "def f(x):\n    return x**2  # 3.14159\n\n\tdone",
    "spaces  in   between and trailing ",
    "<s>special</s> strings<unk> inside",
    "",
]
MESSAGES = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is the capital of Japan? 日本"},
    {"role": "assistant", "content": "Tokyo (東京)."},
    {"role": "user", "content": "Merci, café ☕?"},
]

settings.register_profile("tokenizer", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def checkpoints(sp_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One directory per backend, holding the same tokenizer."""
    slow = tmp_path_factory.mktemp("tok-slow")
    fast = tmp_path_factory.mktemp("tok-fast")
    write_hf_tokenizer_files(slow, sp_model)
    write_hf_tokenizer_files(fast, sp_model, fast=True)
    (fast / "tokenizer.model").unlink()  # make sure the tokenizer.json backend alone is under test
    return {"sentencepiece": slow, "tokenizer.json": fast}


@pytest.fixture(scope="module")
def byte_level_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer.json trained on the corpus with ChatML-style special tokens, no BOS."""
    from tokenizers import ByteLevelBPETokenizer

    path = tmp_path_factory.mktemp("tok-byte-level")
    bpe = ByteLevelBPETokenizer()
    lines = CORPUS_PATH.read_text(encoding="utf-8").splitlines()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(lines, vocab_size=600, min_frequency=2, special_tokens=special, show_progress=False)
    bpe.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "bos_token": None}))
    return path


@pytest.fixture(scope="module")
def tokenizers(checkpoints: dict[str, Path], byte_level_checkpoint: Path) -> dict[str, Tokenizer]:
    paths = {**checkpoints, "byte-level": byte_level_checkpoint}
    return {name: Tokenizer.from_pretrained(path) for name, path in paths.items()}


@pytest.fixture(scope="module")
def hf_tokenizers(checkpoints: dict[str, Path]) -> dict:
    transformers = pytest.importorskip("transformers")
    return {
        name: transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        for name, path in checkpoints.items()
    }


def _copy_checkpoint(src: Path, dst: Path, **config_updates) -> Path:
    """A copy of a checkpoint dir with tokenizer_config.json entries replaced (None removes the key)."""
    shutil.copytree(src, dst)
    config_path = dst / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    for key, value in config_updates.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    config_path.write_text(json.dumps(config))
    return dst


def _stream(tokenizer: Tokenizer, ids: list[int], chunks: list[int], skip: bool, prompt=()) -> list[str]:
    """Feed `ids` to a fresh detokenizer in chunks of the given sizes (cycled); return all deltas + flush."""
    detok = tokenizer.detokenizer(prompt, skip_special_tokens=skip)
    deltas, position, step = [], 0, 0
    while position < len(ids):
        size = chunks[step % len(chunks)]
        deltas.append(detok.add(ids[position : position + size]))
        position, step = position + size, step + 1
    deltas.append(detok.flush())
    assert detok.token_ids == ids
    assert detok.text == "".join(deltas)
    return deltas


# -- loading -------------------------------------------------------------------------------------------------


def test_backend_choice(tokenizers: dict[str, Tokenizer]) -> None:
    assert type(tokenizers["sentencepiece"]._backend).__name__ == "_SentencePieceBackend"
    assert type(tokenizers["tokenizer.json"]._backend).__name__ == "_HFTokenizersBackend"


@pytest.mark.parametrize("backend", BACKENDS)
def test_special_ids_from_config(tokenizers: dict[str, Tokenizer], backend: str) -> None:
    tok = tokenizers[backend]
    assert (tok.bos_token_id, tok.eos_token_ids, tok.eos_token_id, tok.pad_token_id) == (1, [2], 2, None)
    assert tok.vocab_size == 512
    assert tok.all_special_ids == {0, 1, 2}
    assert tok.token_to_id("</s>") == 2 and tok.token_to_id("no-such-token") is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_eos_ids_merge_generation_config_and_config(checkpoints: dict[str, Path], tmp_path: Path, backend: str) -> None:
    path = _copy_checkpoint(checkpoints[backend], tmp_path / "ckpt", eos_token={"content": "</s>"})
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 40, 41]}))
    (path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 42}))
    tok = Tokenizer.from_pretrained(path)
    assert tok.eos_token_ids == [2, 40, 41, 42] and tok.eos_token_id == 2
    assert {40, 41, 42} <= tok.all_special_ids
    ids = tok.encode("Hello", add_special_tokens=False)
    assert tok.decode([*ids, 40, 42]) == "Hello"


def test_ids_from_special_tokens_map_and_config_json(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    # tokenizer.json only knows the token strings; with no names in tokenizer_config.json the ids come from
    # special_tokens_map.json, and config.json fills in what is still missing
    path = _copy_checkpoint(
        checkpoints["tokenizer.json"], tmp_path / "ckpt", bos_token=None, eos_token=None, unk_token=None
    )
    (path / "special_tokens_map.json").write_text(json.dumps({"bos_token": {"content": "<s>"}}))
    (path / "config.json").write_text(json.dumps({"eos_token_id": 2, "pad_token_id": 0}))
    tok = Tokenizer.from_pretrained(path)
    assert (tok.bos_token_id, tok.eos_token_ids, tok.pad_token_id) == (1, [2], 0)


def test_bare_sentencepiece_model_uses_its_own_ids(sp_model: Path, tmp_path: Path) -> None:
    shutil.copyfile(sp_model, tmp_path / "tokenizer.model")
    tok = Tokenizer.from_pretrained(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_ids) == (1, [2])
    assert tok.encode("hi")[0] == 1  # Llama-style default: BOS


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_bos_and_eos_flags(checkpoints: dict[str, Path], tmp_path: Path, backend: str) -> None:
    path = _copy_checkpoint(checkpoints[backend], tmp_path / "ckpt", add_bos_token=False, add_eos_token=True)
    tok = Tokenizer.from_pretrained(path)
    ids = tok.encode("Hello")
    assert ids[0] != 1 and ids[-1] == 2
    assert tok.encode("Hello", add_special_tokens=False) == ids[:-1]


def test_tokenizer_json_post_processor_decides_without_flags(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    path = _copy_checkpoint(checkpoints["tokenizer.json"], tmp_path / "ckpt", add_bos_token=None, add_eos_token=None)
    assert Tokenizer.from_pretrained(path).encode("Hello")[0] == 1  # the converted post-processor adds <s>


def test_missing_tokenizer_files(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no tokenizer.json or tokenizer.model") as info:
        Tokenizer.from_pretrained(tmp_path)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(ValueError, match="not a directory"):
        Tokenizer.from_pretrained(tmp_path / "missing")


# -- encode / decode -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trip(tokenizers: dict[str, Tokenizer], backend: str) -> None:
    tok = tokenizers[backend]
    for text in [*SAMPLES, CORPUS_PATH.read_text(encoding="utf-8")]:
        ids = tok.encode(text)
        assert ids[0] == 1
        assert all(0 <= i < tok.vocab_size for i in ids)
        expected = text.replace("<s>", "").replace("</s>", "").replace("<unk>", "")  # skipped on decode
        assert tok.decode(ids) == expected
    assert tok.decode(tok.encode("Hello"), skip_special_tokens=False) == "<s> Hello"


def test_byte_level_tokenizer_json(tokenizers: dict[str, Tokenizer]) -> None:
    tok = tokenizers["byte-level"]
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert (tok.bos_token_id, tok.eos_token_ids) == (None, [im_end])
    for text in [*SAMPLES, CORPUS_PATH.read_text(encoding="utf-8")]:
        assert tok.decode(tok.encode(text)) == text  # no BOS to skip; every byte round-trips
    chatml = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    ids = tok.apply_chat_template(MESSAGES[:2], chat_template=chatml, tokenize=True)
    assert ids[0] == im_start and ids.count(im_start) == 3 and ids.count(im_end) == 2
    assert tok.decode(ids, skip_special_tokens=False) == tok.apply_chat_template(MESSAGES[:2], chat_template=chatml)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ids_match_transformers(tokenizers: dict[str, Tokenizer], hf_tokenizers: dict, backend: str) -> None:
    tok, hf = tokenizers[backend], hf_tokenizers[backend]
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids == hf.encode(text), text
        assert tok.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False), text
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text


def test_sentencepiece_backend_matches_sentencepiece(tokenizers: dict[str, Tokenizer], sp_model: Path) -> None:
    """On plain text (no special-token strings) the sentencepiece backend is sentencepiece itself, including
    its dummy-prefix space before text that starts with a space (where tokenizer.json conversions differ)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = tokenizers["sentencepiece"]
    for line in CORPUS_PATH.read_text(encoding="utf-8").splitlines():
        assert tok.encode(line) == [1, *sp.encode(line)], line
        assert tok.decode(tok.encode(line)) == sp.decode(sp.encode(line)) == line


# -- incremental detokenization ------------------------------------------------------------------------------

token_ids = st.lists(
    st.one_of(
        st.integers(0, 2**16),  # taken modulo the vocabulary size
        st.sampled_from(BYTE_IDS),  # bytes that may or may not form valid UTF-8
        st.sampled_from([0xE4 + 3, 0xBD + 3, 0xA0 + 3, 0xF0 + 3, 0x9F + 3, 0x98 + 3, 0x80 + 3]),  # 你 😀 pieces
        st.sampled_from(SPECIAL_IDS),
    ),
    max_size=40,
)
chunk_sizes = st.lists(st.integers(1, 4), min_size=1, max_size=5)
texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581\ufffd"), max_size=40)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@settings(settings.get_profile("tokenizer"))
@given(ids=token_ids, chunks=chunk_sizes, skip=st.booleans())
def test_detokenizer_adds_up_to_decode(
    tokenizers: dict[str, Tokenizer], backend: str, ids: list[int], chunks: list[int], skip: bool
) -> None:
    tok = tokenizers[backend]
    ids = [i % tok.vocab_size for i in ids]
    deltas = _stream(tok, ids, chunks, skip)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@settings(settings.get_profile("tokenizer"))
@given(text=texts, chunks=chunk_sizes)
def test_detokenizer_never_splits_a_character(
    tokenizers: dict[str, Tokenizer], backend: str, text: str, chunks: list[int]
) -> None:
    """Valid text split into byte-fallback tokens streams out without a single U+FFFD."""
    tok = tokenizers[backend]
    ids = tok.encode(text, add_special_tokens=False)
    deltas = _stream(tok, ids, chunks, skip=True)
    assert not any("\ufffd" in delta for delta in deltas), deltas
    assert "".join(deltas) == tok.decode(ids)


@pytest.mark.parametrize("backend", BACKENDS)
def test_detokenizer_holds_back_only_what_may_change(tokenizers: dict[str, Tokenizer], backend: str) -> None:
    tok = tokenizers[backend]
    hello_world = tok.encode("Hello world", add_special_tokens=False)
    hello = tok.encode("Hello", add_special_tokens=False)
    assert hello_world[: len(hello)] == hello
    world = hello_world[len(hello) :]
    emoji = [0xF0 + 3, 0x9F + 3, 0x98 + 3, 0x80 + 3]  # 😀 as four byte tokens

    detok = tok.detokenizer()
    assert "".join(detok.add([i]) for i in hello) == "Hello"
    assert [detok.add([i]) for i in emoji[:3]] == ["", "", ""]  # a partial character is held back
    completed = detok.add(emoji[3:])
    # sentencepiece decodes byte pieces per character; tokenizers' ByteFallback decodes a run of byte tokens
    # all-or-nothing, so the run is held until a non-byte token ends it
    assert completed == ("😀" if backend == "sentencepiece" else "")
    assert completed + detok.add(world) + detok.flush() == "😀 world"
    assert detok.text == tok.decode(hello + emoji + world) == "Hello😀 world"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_detokenizer_with_prompt_keeps_leading_space(tokenizers: dict[str, Tokenizer], backend: str) -> None:
    tok = tokenizers[backend]
    ids = tok.encode("Tell me about the weather in Zürich 日本 today")
    for split in range(1, len(ids)):
        prompt, generated = ids[:split], ids[split:]
        full, head = tok.decode(ids), tok.decode(prompt)
        if not full.startswith(head) or head.endswith("\ufffd"):
            continue  # the split falls inside a character
        deltas = _stream(tok, generated, [1], skip=True, prompt=prompt)
        assert "".join(deltas) == full[len(head) :], split


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_detokenizer_window_stays_small(tokenizers: dict[str, Tokenizer], backend: str) -> None:
    """Each add() decodes a bounded window, not the whole generation (byte-fallback runs aside)."""
    tok = tokenizers[backend]
    text = CORPUS_PATH.read_text(encoding="utf-8")
    ids = tok.encode(text, add_special_tokens=False)
    detok = tok.detokenizer()
    largest_window = 0
    for token_id in ids:
        detok.add([token_id])
        largest_window = max(largest_window, len(detok._window))
    detok.flush()
    assert detok.text == text
    assert largest_window < 64 < len(ids) // 100


# -- chat templates ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    tokenizers: dict[str, Tokenizer], hf_tokenizers: dict, backend: str, add_generation_prompt: bool
) -> None:
    tok, hf = tokenizers[backend], hf_tokenizers[backend]
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt)
    expected = hf.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert text == expected
    assert text.startswith("<s><|system|>\n") and text.endswith("<|assistant|>\n") == add_generation_prompt
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt, tokenize=True)
    hf_ids = hf.apply_chat_template(
        MESSAGES, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    assert ids == list(hf_ids)
    assert ids[0] == 1 and ids[1] != 1  # the template's own BOS, no second one


TOOL_TEMPLATE = (  # a hermes-style template: tools in the system turn, tool calls and results as messages
    "{% if tools %}<tools>{% for t in tools %}{{ t['function']['name'] }}:{{ t['function'] | tojson }}\n"
    "{% endfor %}</tools>\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{% if m['content'] %}{{ m['content'] }}{% endif %}"
    "{% if m['tool_calls'] is defined %}{% for c in m['tool_calls'] %}<tool_call>{{ c['function'] | tojson }}"
    "</tool_call>{% endfor %}{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chat_template_receives_tools_like_transformers(
    tokenizers: dict[str, Tokenizer], hf_tokenizers: dict, backend: str
) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    messages = [
        {"role": "user", "content": "Weather in Zürich?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Z"}}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    tok, hf = tokenizers[backend], hf_tokenizers[backend]
    text = tok.apply_chat_template(messages, chat_template=TOOL_TEMPLATE, tools=tools)
    expected = hf.apply_chat_template(
        messages, chat_template=TOOL_TEMPLATE, tools=tools, tokenize=False, add_generation_prompt=True
    )
    assert text == expected and text.startswith("<tools>get_weather:") and "<tool_call>" in text
    assert "<tools>" not in tok.apply_chat_template(messages, chat_template=TOOL_TEMPLATE)


def test_chat_template_selection(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    named = [
        {"name": "default", "template": DEFAULT_CHAT_TEMPLATE},
        {"name": "plain", "template": "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"},
    ]
    tok = Tokenizer.from_pretrained(_copy_checkpoint(checkpoints["sentencepiece"], tmp_path / "c", chat_template=named))
    assert tok.apply_chat_template(MESSAGES[:2]).startswith("<s><|system|>")
    assert tok.apply_chat_template(MESSAGES[:2], chat_template="plain") == "You answer briefly.\n" + (
        "What is the capital of Japan? 日本\n"
    )
    inline = "{{ bos_token }}{{ messages[-1]['content'] }}{% if add_generation_prompt %}>{% endif %}"
    assert tok.apply_chat_template(MESSAGES, chat_template=inline) == "<s>Merci, café ☕?>"


def test_chat_template_errors(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    tok = Tokenizer.from_pretrained(checkpoints["sentencepiece"])
    with pytest.raises(ValueError, match="Conversation roles"):
        tok.apply_chat_template([{"role": "robot", "content": "beep"}])
    bare = Tokenizer.from_pretrained(_copy_checkpoint(checkpoints["sentencepiece"], tmp_path / "c", chat_template=None))
    assert bare.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template(MESSAGES)


# -- the bundled default model -------------------------------------------------------------------------------


def test_bundled_tiny_model_tokenizer() -> None:
    transformers = pytest.importorskip("transformers")
    tok = Tokenizer.from_pretrained(BUNDLED_MODEL)
    hf = transformers.AutoTokenizer.from_pretrained(BUNDLED_MODEL, local_files_only=True)
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_ids) == (4096, 1, [2])
    for text in SAMPLES:
        assert tok.encode(text) == hf.encode(text), text
    expected = hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert tok.apply_chat_template(MESSAGES) == expected
    config = json.loads((BUNDLED_MODEL / "config.json").read_text())
    assert config["vocab_size"] == 4096 and config["tie_word_embeddings"] is True
    assert sum(f.stat().st_size for f in BUNDLED_MODEL.iterdir()) < 10 * 1024 * 1024
    assert sum(f.stat().st_size for f in BUNDLED_DRAFT_MODEL.iterdir()) < 3 * 1024 * 1024
