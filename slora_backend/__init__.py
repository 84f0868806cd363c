"""slora-triton engine: many LoRA adapters on one Llama-family base over a unified page pool.

In-process API:

    from slora_backend import Engine, EngineConfig, SamplingParams
    engine = Engine(EngineConfig(model_dir="models/SmolLM2-135M-Instruct", adapter_dir="demo_adapters"))
    for out in engine.generate(prompt="Hi", adapter="uppercase", params=SamplingParams(max_tokens=32)):
        print(out.text, end="")
"""

from .config import EngineConfig
from .request import FinishReason, RequestError, RequestOutput, SamplingParams


def __getattr__(name):
    # The engine imports torch and transformers; keep `import slora_backend` light for tools
    # (setup checks, the Triton model's argument parsing) that only need the data types.
    if name == "Engine":
        from .engine import Engine

        return Engine
    raise AttributeError(name)


__all__ = ["Engine", "EngineConfig", "FinishReason", "RequestError", "RequestOutput", "SamplingParams"]
