"""EngineArgs: every engine setting, defined once.

``LLM(**kwargs)`` takes exactly these fields as keyword arguments, ``python -m jserve.launch`` derives one flag
per field (``--max-num-seqs`` for ``max_num_seqs``; help text and default from here), and the factory builds the
engine from them. A field's ``metadata`` carries its help text, its choices and its flag group. No jax import,
so ``launch --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import typing
from dataclasses import dataclass, field

from jserve.bundled import BUNDLED_MODEL
from jserve.config import ParallelConfig
from jserve.limits import DEFAULT_MAX_LOGPROBS, RequestLimits
from jserve.lora.request import ALL_TARGETS as LORA_TARGETS
from jserve.quant.config import DEFAULT_GROUP_SIZE, KV_CACHE_DTYPES, WEIGHT_METHODS, WeightQuant, weight_quant_from_args
from jserve.speculative.config import SpeculativeConfig, speculative_config_from_args

ENGINE_GROUP = "engine"
SPEC_GROUP = "speculative decoding"
STRUCTURED_GROUP = "structured outputs"
LORA_GROUP = "LoRA adapters"
LIMITS_GROUP = "admission limits (requests over them get INVALID_ARGUMENT / HTTP 400)"


MIN_TOKEN_BUCKET_ENV = "JSERVE_MIN_TOKEN_BUCKET"
ALL, BACKGROUND = "all", "background"  # precompile's values besides True (= "all") and False


def _env_int(name: str) -> int | None:
    """An integer setting's default from the environment (None when unset)."""
    value = os.environ.get(name)
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${name} must be an integer, got {value!r}") from None


def setting(default, help: str, *, choices: tuple | None = None, group: str = ENGINE_GROUP, none: str | None = None):
    """A field with its flag's help text. ``none``: the flag value that means None (e.g. 'none')."""
    return field(default=default, metadata={"help": help, "choices": choices, "group": group, "none": none})


@dataclass(frozen=True, kw_only=True)
class EngineArgs:
    model: str = setting(str(BUNDLED_MODEL), "checkpoint directory (default: the bundled tiny model)")
    dtype: str = setting(
        "auto", "weights and activations ('auto': the checkpoint's)", choices=("auto", "bfloat16", "float32", "float16")
    )
    tensor_parallel_size: int = setting(1, "devices per model replica that split each layer's heads")
    pipeline_parallel_size: int = setting(1, "pipeline stages (contiguous layer ranges on their own devices)")
    data_parallel_size: int = setting(1, "independent replicas, each with its own KV pool")
    max_model_len: int | None = setting(None, "tokens per sequence (default: the model's, capped by the KV pool)")
    max_num_seqs: int = setting(64, "sequences in the running batch")
    max_num_batched_tokens: int | None = setting(
        None, "tokens per step, the largest token bucket (default: min(2048, max_model_len))"
    )
    min_token_bucket: int | None = setting(
        _env_int(MIN_TOKEN_BUCKET_ENV),
        "smallest token bucket, a power of two (default: 1 on CPU, where a one-token decode step costs half of one "
        f"padded to 8; 8 on GPU / TPU; ${MIN_TOKEN_BUCKET_ENV} sets the default)",
    )
    page_size: int = setting(16, "tokens per KV page")
    num_pages: int | None = setting(None, "KV pages (default: kv_cache_memory_fraction of free device memory)")
    kv_cache_memory_fraction: float = setting(0.5, "share of free device memory for the KV pool")
    enable_prefix_caching: bool = setting(True, "reuse the KV pages of cached prompt prefixes")
    kv_offloading_size: float | None = setting(
        None,
        "GiB of host memory for a second prefix-cache tier: pages evicted from the device are copied there and "
        "copied back when a prompt needs them again (split among data-parallel replicas; default: off)",
    )
    preemption_mode: str | None = setting(
        None,
        "a preempted request's pages: 'swap' keeps them in the host tier, 'recompute' drops them (default: swap "
        "with a host tier)",
        choices=("recompute", "swap"),
    )
    quantization: str | None = setting(
        None,
        "quantize every linear layer on load: int8 (per channel), int4 (groups), fp8 (e4m3, per channel); "
        "compressed-tensors checkpoints are read quantized without it",
        choices=WEIGHT_METHODS,
    )
    quantization_group_size: int | None = setting(
        None, f"int4 input-dim elements per scale (default {DEFAULT_GROUP_SIZE})"
    )
    kv_cache_dtype: str = setting(
        "auto",
        "KV cache dtype ('auto': the model's; int8 / fp8 with per-token-and-head scales)",
        choices=KV_CACHE_DTYPES,
    )
    attention_backend: str = setting(
        "auto", "attention kernels ('auto': Pallas where they fit, else XLA)", choices=("auto", "pallas", "xla")
    )
    speculative_model: str | None = setting(
        None,
        "speculative decoding: 'ngram' (prompt lookup), 'early_exit' (the model's first layers draft), or a draft "
        "checkpoint directory with the same vocabulary",
        group=SPEC_GROUP,
    )
    num_speculative_tokens: int = setting(0, "k: tokens drafted per speculative step", group=SPEC_GROUP)
    prompt_lookup_min: int = setting(1, "ngram: shortest suffix matched against the sequence", group=SPEC_GROUP)
    prompt_lookup_max: int = setting(4, "ngram: longest suffix matched (tried first)", group=SPEC_GROUP)
    speculative_exit_layer: int | None = setting(
        None, "early_exit: draft with the first m layers (default: the config's early_exit_layer)", group=SPEC_GROUP
    )
    speculative_max_batch_size: int = setting(
        4,
        "speculate only in steps that sample at most this many sequences (larger batches decode plainly)",
        group=SPEC_GROUP,
    )
    speculative_adaptive: bool = setting(
        True,
        "draft only where the measured step costs and each request's acceptance say it pays (never slower than "
        "plain decoding); --no-speculative-adaptive drafts k tokens for every request in every step it can",
        group=SPEC_GROUP,
    )
    structured_output_timeout: float = setting(
        10.0,
        "structured outputs: seconds a request waits for its grammar to compile before it fails (HTTP 400 / "
        "INVALID_ARGUMENT); compiling runs off the engine thread",
        group=STRUCTURED_GROUP,
    )
    max_n: int | None = setting(None, "samples per request, n (default: max_num_seqs)", group=LIMITS_GROUP)
    max_logprobs: int = setting(
        DEFAULT_MAX_LOGPROBS, "logprobs / prompt_logprobs per token (the logprob outputs' width)", group=LIMITS_GROUP
    )
    compilation_cache_dir: str | None = setting(
        "auto",
        "jax persistent compilation cache ('auto': $JSERVE_COMPILATION_CACHE_DIR or ~/.cache/jserve/xla; 'none': off)",
        none="none",
    )
    async_scheduling: bool = setting(
        True, "schedule and dispatch step N+1 before step N's tokens reach the host (one pipeline stage)"
    )
    seed: int = setting(0, "engine seed (requests without a seed get distinct seeds derived from it)")
    precompile: bool | str = setting(
        True,
        "'all' (True): build every step program before ready; 'background': ready once the smallest decode "
        "program and one prefill program are built, the rest built in a background thread and used once built; "
        "--no-precompile (False) compiles each on first use instead, which stalls that step (for development "
        "and tests; serving then compiles, and stats() counts it). default: 'all' for LLM(), 'background' for "
        "python -m jserve.launch",
        choices=(ALL, BACKGROUND),
    )
    scan_layers: bool = setting(
        False,
        "run the layers in a loop over stacked params: a step program traces and compiles one period of layers "
        "whatever the depth (a deep model starts in a fraction of the time)",
    )
    enable_lora: bool = setting(
        False, "serve PEFT LoRA adapters (per request: lora_request / the model name)", group=LORA_GROUP
    )
    max_loras: int = setting(1, "adapters resident on the device at once (adapter slots)", group=LORA_GROUP)
    max_lora_rank: int = setting(16, "largest adapter rank served (smaller ranks are zero-padded)", group=LORA_GROUP)
    max_cpu_loras: int | None = setting(
        None, "adapters kept loaded in host memory (default: max_loras)", group=LORA_GROUP
    )
    lora_target_modules: str | None = setting(
        None,
        "comma-separated projections that take adapters, of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,"
        "down_proj (default: all of them; fewer cost less per step, adapters adapting others are refused)",
        group=LORA_GROUP,
    )
    progress: bool = setting(True, "show the compile progress bar")

    def __post_init__(self) -> None:
        _ = self.weight_quant  # validates quantization and its group size
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        _ = self.speculative  # validates the speculative fields
        _ = self.parallel  # validates the sizes
        if not self.structured_output_timeout > 0:
            raise ValueError(f"structured_output_timeout must be > 0, got {self.structured_output_timeout}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if isinstance(self.max_num_seqs, bool) or not isinstance(self.max_num_seqs, int) or self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be an integer >= 1, got {self.max_num_seqs!r}")
        bucket = self.min_token_bucket
        if bucket is not None and (
            isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 1 or bucket & (bucket - 1)
        ):
            raise ValueError(f"min_token_bucket must be a power of two >= 1, got {bucket!r}")
        if self.max_n is not None and (
            isinstance(self.max_n, bool) or not isinstance(self.max_n, int) or not 1 <= self.max_n <= self.max_num_seqs
        ):
            raise ValueError(f"max_n must be an integer in [1, max_num_seqs={self.max_num_seqs}], got {self.max_n!r}")
        _ = self.limits  # validates max_logprobs
        if self.precompile not in (True, False, ALL, BACKGROUND):
            raise ValueError(f"precompile must be True, False, {ALL!r} or {BACKGROUND!r}, got {self.precompile!r}")
        if self.precompile == ALL:
            object.__setattr__(self, "precompile", True)
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        self._check_lora()
        self._check_offloading()

    def _check_offloading(self) -> None:
        size = self.kv_offloading_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, (int, float)) or not size > 0):
            raise ValueError(f"kv_offloading_size must be a number of GiB > 0, got {size!r}")
        if size is not None and not self.enable_prefix_caching:
            raise ValueError("kv_offloading_size: the host tier extends the prefix cache (enable_prefix_caching)")
        if self.preemption_mode not in (None, "recompute", "swap"):
            raise ValueError(f"preemption_mode must be 'recompute' or 'swap', got {self.preemption_mode!r}")
        if self.preemption_mode == "swap" and size is None:
            raise ValueError("preemption_mode 'swap' needs a host tier to swap to (kv_offloading_size)")

    def _check_lora(self) -> None:
        for name in ("max_loras", "max_lora_rank", "max_cpu_loras"):
            value = getattr(self, name)
            if value is None and name == "max_cpu_loras":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        _ = self.lora_targets

    @property
    def lora_targets(self) -> tuple[str, ...] | None:
        """The projections adapters may adapt (None: all)."""
        if self.lora_target_modules is None:
            return None
        raw = self.lora_target_modules
        parts = raw if isinstance(raw, (list, tuple)) else str(raw).split(",")
        targets = tuple(str(t).strip() for t in parts if str(t).strip())
        unknown = sorted(set(targets) - set(LORA_TARGETS))
        if unknown or not targets:
            raise ValueError(f"lora_target_modules must name some of {list(LORA_TARGETS)}, got {raw!r}")
        return targets

    @property
    def weight_quant(self) -> WeightQuant | None:
        """Quantize-on-load scheme (None: the checkpoint's own, or dense)."""
        return weight_quant_from_args(self.quantization, self.quantization_group_size)

    @property
    def speculative(self) -> SpeculativeConfig | None:
        """Speculative decoding (None: off)."""
        return speculative_config_from_args(
            self.speculative_model,
            self.num_speculative_tokens,
            exit_layer=self.speculative_exit_layer,
            prompt_lookup_min=self.prompt_lookup_min,
            prompt_lookup_max=self.prompt_lookup_max,
            max_batch_size=self.speculative_max_batch_size,
            adaptive=self.speculative_adaptive,
        )

    @property
    def parallel(self) -> ParallelConfig:
        return ParallelConfig(
            tensor_parallel_size=self.tensor_parallel_size,
            pipeline_parallel_size=self.pipeline_parallel_size,
            data_parallel_size=self.data_parallel_size,
        )

    @property
    def limits(self) -> RequestLimits:
        return RequestLimits(max_n=self.max_n or self.max_num_seqs, max_logprobs=self.max_logprobs)

    def replace(self, **changes) -> EngineArgs:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_kwargs(cls, **kwargs) -> EngineArgs:
        """``LLM``'s keyword arguments: an unknown name is a ValueError listing the valid ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"unknown engine argument(s) {unknown}; valid: {sorted(names)}")
        return cls(**{k: (None if v is None else _plain(v)) for k, v in kwargs.items()})


def _plain(value):
    """Path-like values (model, compilation_cache_dir) become strings."""
    return str(value) if hasattr(value, "__fspath__") else value


def _field_type(f: dataclasses.Field) -> type:
    hint = typing.get_type_hints(EngineArgs)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per EngineArgs field, in the field's group, with its help text and default shown."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(EngineArgs):
        meta = f.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        flag = "--" + f.name.replace("_", "-")
        kind = _field_type(f)
        help_text = meta["help"] if "default:" in meta["help"] else f"{meta['help']} (default: {f.default})"
        if kind is bool and meta["choices"]:  # a word, or --no-flag for False (precompile)
            group.add_argument(flag, choices=meta["choices"], default=f.default, help=help_text)
            group.add_argument("--no-" + flag[2:], dest=f.name, action="store_false", help=argparse.SUPPRESS)
            continue
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=meta["help"])
            continue
        convert = kind
        if meta["none"] is not None:
            word = meta["none"]
            convert = lambda text, kind=kind, word=word: None if text == word else kind(text)  # noqa: E731
        group.add_argument(flag, type=convert, default=f.default, choices=meta["choices"], help=help_text)


def engine_args_from_flags(ns: argparse.Namespace) -> EngineArgs:
    return EngineArgs(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(EngineArgs)})


def llm_signature(first: inspect.Parameter) -> inspect.Signature:
    """``LLM.__init__``'s signature, derived from the fields (for help(), IDEs and docs)."""
    params = [first]
    for f in dataclasses.fields(EngineArgs):
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD if f.name == "model" else inspect.Parameter.KEYWORD_ONLY
        params.append(inspect.Parameter(f.name, kind, default=f.default, annotation=f.type))
    return inspect.Signature(params)
