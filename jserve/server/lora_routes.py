"""vLLM's adapter endpoints on the OpenAI app (``--enable-lora``): ``POST /v1/load_lora_adapter`` and
``POST /v1/unload_lora_adapter``, and the adapters' entries in ``/v1/models``."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict

from jserve.lora.registry import AdapterNotFoundError, AdapterRegistry
from jserve.server.openai_protocol import error_body


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_int_id: int | None = None  # vLLM's body carries it; names are what identify adapters here


def add_lora_routes(app: FastAPI, adapters: AdapterRegistry) -> None:
    """Registers the two endpoints; a bad adapter is 400 with the reason, an unknown name 404."""

    async def load_lora_adapter(body: LoadLoRAAdapterRequest):
        try:
            await asyncio.to_thread(adapters.load, body.lora_name, body.lora_path)
        except ValueError as e:
            return JSONResponse(error_body(str(e), "invalid_request_error", 400, "lora_path"), 400)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest):
        try:
            await asyncio.to_thread(adapters.unload, body.lora_name)
        except AdapterNotFoundError as e:
            return JSONResponse(error_body(str(e.args[0]), "not_found_error", 404, "lora_name"), 404)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    app.post("/v1/load_lora_adapter")(load_lora_adapter)
    app.post("/v1/unload_lora_adapter")(unload_lora_adapter)


def adapter_models(adapters: AdapterRegistry | None, max_model_len: int) -> list[dict]:
    """``/v1/models`` entries of the loaded adapters (vLLM's shape: ``parent`` is the base model)."""
    if adapters is None:
        return []
    return [
        {
            "id": lora.lora_name,
            "object": "model",
            "created": 0,
            "owned_by": "jserve",
            "root": lora.lora_path,
            "parent": adapters.base_model_name,
            "max_model_len": max_model_len,
        }
        for lora in adapters.loaded()
    ]
