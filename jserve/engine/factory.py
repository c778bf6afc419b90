"""EngineArgs (the user-facing knobs shared by LLM and launch) -> a ready Engine.

This is where defaults are decided: dtype, attention backend, KV pool size from free device memory,
max_model_len capped by that pool, and the chunked-prefill token budget.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import jax

from jserve import compilation_cache
from jserve.checkpoint import abstract_model, load_params, resolve_dtype
from jserve.config import CacheConfig, ModelConfig, ParallelConfig
from jserve.engine.batch import Buckets
from jserve.engine.data_parallel import DataParallelEngine
from jserve.engine.engine import Engine
from jserve.engine.kv_cache import KVCacheManager, default_num_pages
from jserve.engine.runner import ModelRunner
from jserve.engine.scheduler import Scheduler, SchedulerConfig
from jserve.limits import DEFAULT_MAX_LOGPROBS, RequestLimits
from jserve.models.llama import kv_cache_bytes_per_page
from jserve.ops import resolve_attention_backend
from jserve.parallel.mesh import make_mesh, stage_mesh
from jserve.parallel.sharding import param_shardings

CPU_KV_BUDGET_BYTES = 1 << 30  # CPU devices report no memory stats: give the KV cache 1 GiB
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048


@dataclass(frozen=True, kw_only=True)
class EngineArgs:
    model: str
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None
    page_size: int = 16
    num_pages: int | None = None
    kv_cache_memory_fraction: float = 0.5
    enable_prefix_caching: bool = True
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    attention_backend: str = "auto"
    speculative_model: str | None = None
    num_speculative_tokens: int = 0
    max_n: int | None = None  # samples per request (n); default max_num_seqs
    max_logprobs: int = DEFAULT_MAX_LOGPROBS
    compilation_cache_dir: str | None = compilation_cache.AUTO  # "auto": a per-user directory; None: off
    seed: int = 0

    def __post_init__(self) -> None:
        if self.quantization is not None:
            if self.quantization not in ("int8", "int4", "fp8"):
                raise ValueError(f"quantization must be None, 'int8', 'int4' or 'fp8', got {self.quantization!r}")
            raise ValueError(f"quantization={self.quantization!r} is not supported yet")
        if self.kv_cache_dtype not in ("auto", "int8"):
            raise ValueError(f"kv_cache_dtype must be 'auto' or 'int8', got {self.kv_cache_dtype!r}")
        if self.kv_cache_dtype == "int8":
            raise ValueError("kv_cache_dtype='int8' is not supported yet")
        if self.speculative_model is not None:
            raise ValueError("speculative_model is not supported yet")
        if self.num_speculative_tokens:
            raise ValueError("num_speculative_tokens is not supported yet")
        ParallelConfig(
            tensor_parallel_size=self.tensor_parallel_size,
            pipeline_parallel_size=self.pipeline_parallel_size,
            data_parallel_size=self.data_parallel_size,
        )  # validates the sizes
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if isinstance(self.max_num_seqs, bool) or not isinstance(self.max_num_seqs, int) or self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be an integer >= 1, got {self.max_num_seqs!r}")
        if self.max_n is not None and (
            isinstance(self.max_n, bool) or not isinstance(self.max_n, int) or not 1 <= self.max_n <= self.max_num_seqs
        ):
            raise ValueError(f"max_n must be an integer in [1, max_num_seqs={self.max_num_seqs}], got {self.max_n!r}")
        _ = self.limits  # validates max_logprobs
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")

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


def _free_device_bytes(device: jax.Device) -> int:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
        return CPU_KV_BUDGET_BYTES
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def build_engine(args: EngineArgs, devices: list[jax.Device] | None = None) -> Engine | DataParallelEngine:
    """One Engine per data-parallel replica, each on its own (pp, tp) slice of the device mesh."""
    path = Path(args.model)
    if not path.is_dir():
        raise ValueError(f"model: {os.fspath(path)!r} is not a directory")
    compilation_cache.enable(args.compilation_cache_dir)
    model_config = ModelConfig.from_pretrained(path)
    parallel = args.parallel
    parallel.check_model(model_config)
    devices = list(jax.devices() if devices is None else devices)[: parallel.world_size]
    if len(devices) < parallel.world_size:
        raise ValueError(
            f"data_parallel_size x pipeline_parallel_size x tensor_parallel_size = "
            f"{parallel.world_size} needs that many devices; {len(devices)} are available"
        )
    mesh = make_mesh(parallel, devices)
    tokenizer = _load_tokenizer(path)
    engines = [
        _build_replica(
            args,
            path,
            model_config,
            tokenizer,
            [stage_mesh(mesh, r, s) for s in range(parallel.pipeline_parallel_size)],
        )
        for r in range(parallel.data_parallel_size)
    ]
    return engines[0] if len(engines) == 1 else DataParallelEngine(engines)


def _build_replica(args: EngineArgs, path: Path, model_config: ModelConfig, tokenizer, meshes: list) -> Engine:
    dtype = resolve_dtype(args.dtype, model_config, meshes[0].devices.flat[0].platform)
    backend = resolve_attention_backend(
        args.attention_backend,
        head_dim=model_config.head_dim,
        page_size=args.page_size,
        dtype=dtype,
        platform=meshes[0].devices.flat[0].platform,
    )
    cache_config = CacheConfig(
        page_size=args.page_size,
        num_pages=args.num_pages,
        memory_fraction=args.kv_cache_memory_fraction,
        enable_prefix_caching=args.enable_prefix_caching,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    shardings = None
    if len(meshes) == 1:  # load each param straight onto its shards (pipeline stages are placed by the runner)
        _, abstract_state = abstract_model(model_config, dtype)
        shardings = param_shardings(abstract_state, model_config, meshes[0])
    graphdef, state = load_params(path, model_config, dtype, shardings)
    bytes_per_page = kv_cache_bytes_per_page(model_config, cache_config.page_size, dtype)
    max_model_len = args.max_model_len or model_config.max_position_embeddings
    pages_per_seq = cache_config.pages_for(max_model_len)
    if cache_config.num_pages is not None:
        num_pages = cache_config.num_pages
    else:
        tp = meshes[0].devices.size
        local = [d for m in meshes for d in m.devices.flat if d.process_index == jax.process_index()]
        free = min(_free_device_bytes(d) for d in local)  # multi-host: only local devices report memory
        # a device holds its stage's layers, and 1/tp of each page when kv heads are split
        kv_split = tp if model_config.num_kv_heads % tp == 0 else 1
        per_device_page = max(1, bytes_per_page // (len(meshes) * kv_split))
        num_pages = default_num_pages(free, per_device_page, cache_config.memory_fraction)
        num_pages = min(num_pages, args.max_num_seqs * pages_per_seq + 1)  # more could never be used
    if args.max_model_len is None:  # cap the default by what one sequence can hold
        max_model_len = min(max_model_len, (num_pages - 1) * cache_config.page_size)
    elif cache_config.pages_for(max_model_len) > num_pages - 1:
        raise ValueError(
            f"max_model_len {max_model_len} needs {cache_config.pages_for(max_model_len)} pages of "
            f"{cache_config.page_size} tokens but the KV cache has {num_pages - 1}; raise num_pages or lower it"
        )
    if max_model_len < 2:
        raise ValueError("num_pages: the KV cache is too small to hold a single sequence")

    max_num_batched_tokens = args.max_num_batched_tokens or max(
        min(DEFAULT_MAX_NUM_BATCHED_TOKENS, max_model_len), args.max_num_seqs
    )
    scheduler_config = SchedulerConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
    )
    buckets = Buckets.from_limits(
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        max_pages_per_seq=cache_config.pages_for(max_model_len),
    )
    kv_cache = KVCacheManager(num_pages, cache_config.page_size, cache_config.enable_prefix_caching)
    runner = ModelRunner(
        model_config,
        graphdef,
        state,
        num_pages=num_pages,
        page_size=cache_config.page_size,
        kv_dtype=dtype,
        buckets=buckets,
        backend=backend,
        stage_meshes=meshes,
    )
    eos = list(tokenizer.eos_token_ids) if tokenizer is not None else list(model_config.eos_token_ids)
    return Engine(
        runner=runner,
        scheduler=Scheduler(scheduler_config, kv_cache),
        kv_cache=kv_cache,
        tokenizer=tokenizer,
        eos_token_ids=eos,
        vocab_size=model_config.vocab_size,
        max_model_len=max_model_len,
        limits=args.limits,
        seed=args.seed,
    )


def _load_tokenizer(path: Path):
    if (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file():
        from jserve.tokenizer import Tokenizer

        return Tokenizer.from_pretrained(path)
    return None
