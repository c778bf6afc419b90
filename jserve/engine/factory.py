"""EngineArgs (jserve/engine_args.py: the settings LLM and launch share) -> a ready Engine.

This is where defaults are decided: dtype, attention backend, KV pool size from free device memory,
max_model_len capped by that pool, and the chunked-prefill token budget.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from jserve import compilation_cache
from jserve.attention import select_backend
from jserve.checkpoint import is_orbax_checkpoint, load_params, resolve_dtype
from jserve.config import CacheConfig, ModelConfig
from jserve.engine.data_parallel import DataParallelEngine
from jserve.engine.engine import Engine
from jserve.engine.kv_cache import KVCacheManager, default_num_pages
from jserve.engine.runner import ModelRunner
from jserve.engine.scheduler import RECOMPUTE, SWAP, Scheduler, SchedulerConfig
from jserve.engine.shapes import StepShapes
from jserve.engine_args import BACKGROUND, EngineArgs
from jserve.executable_cache import ExecutableCache
from jserve.kv_offload.host_tier import HostKVTier, page_bytes
from jserve.kv_offload.offloader import KVOffloader
from jserve.kv_offload.policy import decide, measure_copy_costs
from jserve.lora.peft_adapter import load_peft_adapter
from jserve.lora.slots import AdapterSlots
from jserve.lora.targets import LoRASpec
from jserve.models.llama import kv_cache_bytes_per_page
from jserve.parallel.mesh import make_mesh, stage_mesh
from jserve.parallel.sharding import param_shardings
from jserve.quant.config import kv_storage_dtype
from jserve.quant.kv import is_quantized_kv
from jserve.speculative.config import DRAFT, EARLY_EXIT, SpeculativeConfig
from jserve.structured.compiler import GrammarCompiler
from jserve.structured.matcher import bitmask_words

logger = logging.getLogger(__name__)

CPU_KV_BUDGET_BYTES = 1 << 30  # CPU devices report no memory stats: give the KV cache 1 GiB
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048


def default_min_token_bucket(platform: str) -> int:
    """1 on CPU: XLA:CPU's matmuls cost what their padded rows cost, and a batch-1 decode step padded to 8 tokens
    took 1.9x (bundled model) to 1.5x (159M Llama) the time of a one-token step (docs/benchmarks.md). 8 on GPU and
    TPU, where a matmul of 1 row costs what one of 8 does and every extra bucket is one more program to compile."""
    return 1 if platform == "cpu" else 8


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
    model_config = _with_weight_quant(ModelConfig.from_pretrained(path), args, path)
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
    grammar = _grammar_compiler(args, model_config, tokenizer)
    engines = [
        _build_replica(
            args,
            path,
            model_config,
            tokenizer,
            [stage_mesh(mesh, r, s) for s in range(parallel.pipeline_parallel_size)],
            grammar,
        )
        for r in range(parallel.data_parallel_size)
    ]
    executables = ExecutableCache.in_use()
    for replica in engines:
        replica.runner.executables = executables
    if args.precompile:
        runners = [e.runner for e in engines]
        background = args.precompile == BACKGROUND and _can_build_in_background(runners)
        compile_programs(runners, progress=args.progress, first_only=background)
        for replica in engines:  # (before background builds: they would skew the timings)
            _decide_host_tier(replica)
        if background:
            for runner in runners:
                runner.build_in_background()
    else:
        for replica in engines:
            replica.runner.compile_on_first_use = True
    engine = engines[0] if len(engines) == 1 else DataParallelEngine(engines)
    engine.mark_ready()
    return engine


def _with_weight_quant(cfg: ModelConfig, args: EngineArgs, path: Path) -> ModelConfig:
    """quantization= quantizes a dense checkpoint on load; a compressed-tensors checkpoint is already quantized."""
    quant = args.weight_quant
    if quant is None:
        return cfg
    if cfg.weight_quant is not None:
        raise ValueError(
            f"quantization={args.quantization!r}: the checkpoint is already quantized ({cfg.weight_quant.describe()}, "
            "compressed-tensors); leave quantization unset"
        )
    if is_orbax_checkpoint(path):
        raise ValueError("quantization: quantize-on-load reads Hugging Face checkpoints, not Orbax ones")
    return dataclasses.replace(cfg, weight_quant=quant)


def compile_programs(runners: list[ModelRunner], *, progress: bool = True, first_only: bool = False) -> None:
    """Builds every step program of every replica (loaded from the executable cache, or compiled), behind a
    progress bar, then runs each once: after this no request within the engine's limits can compile anything.
    ``first_only``: only each runner's ``first_buckets`` (the rest are built in the background after ready)."""
    firsts = [r.first_buckets() if first_only else None for r in runners]
    total = sum(r.num_program_tasks(f) for r, f in zip(runners, firsts, strict=True))
    with tqdm(total=total, desc="jserve: compiling", unit="program", disable=not progress, file=sys.stderr) as bar:
        for runner, first in zip(runners, firsts, strict=True):
            runner.compile_programs(bar.update, buckets=first, warm=True)
    cache = runners[0].executables  # one per engine, shared by its replicas
    loaded = cache.loaded if cache is not None else 0
    if cache is not None and progress:
        print(f"jserve: {loaded} of {total} programs loaded from the executable cache", file=sys.stderr)
    for runner, first in zip(runners, firsts, strict=True):
        runner.warm_up(first)
        if runner.spec is not None and runner.spec.adaptive:
            runner.measure_step_costs()  # what adaptive speculation weighs


def _can_build_in_background(runners: list[ModelRunner]) -> bool:
    """Background builds need one process (every process must schedule the same steps, with the same programs)
    and no speculative decoding (its policy weighs the costs of every program, measured before ready)."""
    reason = None
    if jax.process_count() > 1:
        reason = f"it runs across {jax.process_count()} processes"
    elif runners[0].spec is not None:
        reason = "speculative decoding is on"
    if reason is not None:
        logger.warning("precompile='background': building every program before ready, as %s", reason)
    return reason is None


def _grammar_compiler(args: EngineArgs, cfg: ModelConfig, tokenizer) -> GrammarCompiler | None:
    """Structured outputs' compiler, one for every replica (grammars are compiled over the tokenizer)."""
    if tokenizer is None:
        return None
    eos = list(tokenizer.eos_token_ids) or list(cfg.eos_token_ids)
    return GrammarCompiler(tokenizer, cfg.vocab_size, eos, timeout=args.structured_output_timeout)


def _build_replica(
    args: EngineArgs, path: Path, model_config: ModelConfig, tokenizer, meshes: list, grammar: GrammarCompiler | None
) -> Engine:
    """One replica: its weights on its meshes, a KV pool sized from free memory, its step shapes, its runner."""
    platform = meshes[0].devices.flat[0].platform
    dtype = resolve_dtype(args.dtype, model_config, platform)
    cache_config = CacheConfig(
        page_size=args.page_size,
        num_pages=args.num_pages,
        memory_fraction=args.kv_cache_memory_fraction,
        enable_prefix_caching=args.enable_prefix_caching,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    graphdef, state = _load_weights(path, model_config, dtype, meshes)
    kv_dtype = kv_storage_dtype(cache_config.kv_cache_dtype, dtype, platform)
    lora = _lora_spec(args, model_config)
    num_pages, scheduler_config = _size_replica(args, model_config, cache_config, kv_dtype, meshes, lora, dtype)
    eos = list(tokenizer.eos_token_ids) if tokenizer is not None else list(model_config.eos_token_ids)
    spec = _speculative_config(args, model_config)
    shapes = _step_shapes(args, scheduler_config, cache_config.page_size, model_config, platform, spec, grammar, eos)
    shapes = dataclasses.replace(shapes, lora=lora is not None)
    backend = select_backend(
        args.attention_backend,
        shapes,
        head_dim=model_config.head_dim,
        sliding_windows=model_config.sliding_windows,
        dtype=dtype,
        platform=platform,
        quantized_kv=is_quantized_kv(kv_dtype),
    )
    runner = ModelRunner(
        model_config,
        graphdef,
        state,
        num_pages=num_pages,
        page_size=cache_config.page_size,
        kv_dtype=kv_dtype,
        shapes=shapes,
        backend=backend,
        max_logprobs=args.limits.max_logprobs,
        stage_meshes=meshes,
        spec=spec,
        draft=_load_draft(spec, model_config, dtype, meshes) if spec is not None else None,
        defer_sampling=args.async_scheduling and grammar is not None and spec is None,
        scan_layers=args.scan_layers,
        lora=lora,
        kv_offload=args.kv_offloading_size is not None,
    )
    parts = _ReplicaParts(model_config, dtype, cache_config, scheduler_config, eos, spec, lora, grammar)
    return _assemble_engine(args, runner, num_pages, tokenizer, parts)


def _size_replica(
    args: EngineArgs,
    model_config: ModelConfig,
    cache_config: CacheConfig,
    kv_dtype,
    meshes: list,
    lora: LoRASpec | None,
    dtype: np.dtype,
) -> tuple[int, SchedulerConfig]:
    """The KV pool's pages (what free memory holds after the adapter slots) and the scheduler's limits."""
    layers_per_stage = -(-model_config.num_layers // len(meshes))
    reserved = lora.nbytes(model_config, layers_per_stage, np.dtype(dtype).itemsize) if lora is not None else 0
    num_pages, max_model_len = _size_kv_pool(args, model_config, cache_config, kv_dtype, meshes, reserved)
    max_num_batched_tokens = args.max_num_batched_tokens or max(
        min(DEFAULT_MAX_NUM_BATCHED_TOKENS, max_model_len), args.max_num_seqs
    )
    scheduler_config = SchedulerConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
    )
    return num_pages, scheduler_config


@dataclasses.dataclass(frozen=True)
class _ReplicaParts:
    """What ``_build_replica`` decided that the engine around its runner needs too."""

    model_config: ModelConfig
    dtype: np.dtype  # the compute dtype (resolved)
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    eos: list[int]
    spec: SpeculativeConfig | None
    lora: LoRASpec | None
    grammar: GrammarCompiler | None


def _assemble_engine(args: EngineArgs, runner: ModelRunner, num_pages: int, tokenizer, parts: _ReplicaParts) -> Engine:
    """The page allocator (and host tier), the scheduler (and adapter slots) and the engine around a runner."""
    cache_config, spec, lora = parts.cache_config, parts.spec, parts.lora
    kv_cache = KVCacheManager(num_pages, cache_config.page_size, cache_config.enable_prefix_caching)
    kv_cache.host = _host_tier(args, runner)
    kv_cache.draft_kv = spec is not None and spec.method == DRAFT
    swap = kv_cache.host is not None and args.preemption_mode != RECOMPUTE
    scheduler = Scheduler(
        dataclasses.replace(parts.scheduler_config, preemption_mode=SWAP if swap else RECOMPUTE), kv_cache
    )
    if lora is not None:
        load = functools.partial(load_peft_adapter, cfg=parts.model_config, spec=lora, dtype=parts.dtype)
        scheduler.adapters = AdapterSlots(lora.max_loras, args.max_cpu_loras or lora.max_loras, load)
    engine = Engine(
        runner=runner,
        scheduler=scheduler,
        kv_cache=kv_cache,
        tokenizer=tokenizer,
        eos_token_ids=parts.eos,
        vocab_size=parts.model_config.vocab_size,
        max_model_len=parts.scheduler_config.max_model_len,
        limits=args.limits,
        seed=args.seed,
        async_scheduling=args.async_scheduling,
        speculative=spec,
        grammar=parts.grammar,
    )
    if kv_cache.host is not None:
        engine.offloader = KVOffloader(kv_cache.host, runner.page_mover, runner.program_for)
    return engine


def _decide_host_tier(engine: Engine) -> None:
    """Keeps the host tier on only where copying a page back beats recomputing it (measured: policy.py)."""
    if engine.offloader is not None:
        engine.offloader.costs = measure_copy_costs(engine.runner)
        engine.kv_cache.host_active = decide(engine.offloader.costs)


def _host_tier(args: EngineArgs, runner: ModelRunner) -> HostKVTier | None:
    """The replica's host tier: its share of ``kv_offloading_size`` in pages laid out like the runner's."""
    if args.kv_offloading_size is None:
        return None
    if jax.process_count() > 1:
        raise ValueError("kv_offloading_size: the host tier is not served across hosts yet (one process only)")
    layouts = runner.page_mover.layouts()
    one_page = page_bytes(layouts)
    size = int(args.kv_offloading_size * 2**30) // args.parallel.data_parallel_size
    if size < one_page:
        raise ValueError(
            f"kv_offloading_size: {args.kv_offloading_size} GiB per {args.parallel.data_parallel_size} replica(s) "
            f"holds no page of {one_page} bytes"
        )
    return HostKVTier(size // one_page, layouts)


def _lora_spec(args: EngineArgs, cfg: ModelConfig) -> LoRASpec | None:
    """The adapter slots (None without ``enable_lora``)."""
    if not args.enable_lora:
        return None
    if jax.process_count() > 1:
        raise ValueError("enable_lora: adapters are not served across hosts yet (one process only)")
    return LoRASpec.for_model(cfg, args.max_loras, args.max_lora_rank, args.lora_targets)


def _load_weights(path: Path, cfg: ModelConfig, dtype, meshes: list):
    """(graphdef, state): each param loaded straight onto its shards with one stage; pipeline stages are placed
    by the runner."""
    shardings = functools.partial(param_shardings, cfg=cfg, mesh=meshes[0]) if len(meshes) == 1 else None
    return load_params(path, cfg, dtype, shardings)  # (the loader hands param_shardings the abstract state)


def _size_kv_pool(
    args: EngineArgs, cfg: ModelConfig, cache: CacheConfig, kv_dtype, meshes: list, reserved: int = 0
) -> tuple[int, int]:
    """(num_pages, max_model_len): pages from free device memory unless set (never more than max_num_seqs full
    sequences could use), and the default max_model_len capped by what one sequence can hold. ``reserved``:
    bytes per device allocated after this (adapter slots)."""
    max_model_len = args.max_model_len or cfg.max_position_embeddings
    if cache.num_pages is not None:
        num_pages = cache.num_pages
    else:
        tp = meshes[0].devices.size
        local = [d for m in meshes for d in m.devices.flat if d.process_index == jax.process_index()]
        free = min(_free_device_bytes(d) for d in local) - reserved  # multi-host: only local devices report
        # a device holds its stage's layers, and 1/tp of each page when kv heads are split
        kv_split = tp if cfg.num_kv_heads % tp == 0 else 1
        bytes_per_page = kv_cache_bytes_per_page(cfg, cache.page_size, kv_dtype)
        per_device_page = max(1, bytes_per_page // (len(meshes) * kv_split))
        num_pages = default_num_pages(free, per_device_page, cache.memory_fraction)
        num_pages = min(num_pages, args.max_num_seqs * cache.pages_for(max_model_len) + 1)  # more could never be used
    if args.max_model_len is None:
        max_model_len = min(max_model_len, (num_pages - 1) * cache.page_size)
    elif cache.pages_for(max_model_len) > num_pages - 1:
        raise ValueError(
            f"max_model_len {max_model_len} needs {cache.pages_for(max_model_len)} pages of "
            f"{cache.page_size} tokens but the KV cache has {num_pages - 1}; raise num_pages or lower it"
        )
    if max_model_len < 2:
        raise ValueError("num_pages: the KV cache is too small to hold a single sequence")
    return num_pages, max_model_len


def _step_shapes(
    args: EngineArgs,
    sched: SchedulerConfig,
    page_size: int,
    cfg: ModelConfig,
    platform: str,
    spec: SpeculativeConfig | None,
    grammar: GrammarCompiler | None,
    eos: list[int],
) -> StepShapes:
    """The static shapes of the replica's step programs."""
    return StepShapes.from_limits(
        max_num_batched_tokens=sched.max_num_batched_tokens,
        max_num_seqs=sched.max_num_seqs,
        max_model_len=sched.max_model_len,
        page_size=page_size,
        banned_len=args.limits.max_stop_token_ids + len(eos),
        min_tokens=args.min_token_bucket or default_min_token_bucket(platform),
        spec_rows=spec.max_batch_size if spec is not None else 0,
        num_spec_tokens=spec.num_tokens if spec is not None else 0,
        spec_chain=spec is not None,
        spec_lookup=spec is not None and not spec.samples_drafts,
        bitmask_words=bitmask_words(cfg.vocab_size) if grammar is not None else 0,
    )


def _speculative_config(args: EngineArgs, cfg: ModelConfig) -> SpeculativeConfig | None:
    """EngineArgs' speculative settings checked against the model (early exit's layer, a draft's vocabulary)."""
    spec = args.speculative
    if spec is None:
        return None
    if args.pipeline_parallel_size > 1:
        raise ValueError("speculative_model: speculative decoding runs with pipeline_parallel_size 1")
    if spec.method == EARLY_EXIT:
        layer = spec.exit_layer if spec.exit_layer is not None else cfg.early_exit_layer
        if layer is None:
            raise ValueError(
                "speculative_exit_layer: the model's config.json has no early_exit_layer; name the draft's layer count"
            )
        if not 1 <= layer < cfg.num_layers:
            raise ValueError(f"speculative_exit_layer must be in [1, {cfg.num_layers - 1}], got {layer}")
        spec = dataclasses.replace(spec, exit_layer=layer)
    if spec.adaptive and jax.process_count() > 1:
        # every process must schedule the same steps, and the policy decides by this process's timings
        logger.warning(
            "speculative_adaptive: off across %d processes (drafts whenever a request can)", jax.process_count()
        )
        spec = dataclasses.replace(spec, adaptive=False)
    return spec


def _load_draft(spec: SpeculativeConfig, cfg: ModelConfig, dtype, meshes: list):
    """The draft checkpoint (draft-model speculation): its config, graphdef and params, or None."""
    if spec.method != DRAFT:
        return None
    draft_cfg = ModelConfig.from_pretrained(spec.draft_model)
    if draft_cfg.vocab_size != cfg.vocab_size:
        raise ValueError(
            f"speculative_model: the draft's vocab_size {draft_cfg.vocab_size} is not the model's {cfg.vocab_size}"
        )
    if draft_cfg.head_dim != cfg.head_dim or set(draft_cfg.sliding_windows) != set(cfg.sliding_windows):
        raise ValueError(
            "speculative_model: the draft must share the model's head_dim and sliding windows (it runs on the same "
            f"attention backend); got head_dim {draft_cfg.head_dim} vs {cfg.head_dim}"
        )
    shardings = functools.partial(param_shardings, cfg=draft_cfg, mesh=meshes[0])
    graphdef, state = load_params(spec.draft_model, draft_cfg, dtype, shardings)
    return draft_cfg, graphdef, state


def _load_tokenizer(path: Path):
    if (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file():
        from jserve.tokenizer import Tokenizer

        return Tokenizer.from_pretrained(path)
    return None
