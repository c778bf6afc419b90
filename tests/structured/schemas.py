"""Schemas the structured-outputs tests share."""

HEAVY_SCHEMA = {  # ~2 s of one core for llguidance to compile (just under its size limits)
    "type": "object",
    "properties": {
        f"k{i}": {
            "anyOf": [
                {"type": "integer", "minimum": i, "maximum": i * 1000 + 7},
                {"type": "string", "pattern": f"(ab|cd){{{i % 5},{i % 5 + 3}}}z{i}"},
            ]
        }
        for i in range(4000)
    },
}
