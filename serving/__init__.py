"""The model server: the embedded OpenAI-compatible server (`protocol.py`, `serving.py`,
`app.py`; the engine in `engine.py`, `adapters.py`, `batch.py`), the vLLM launcher
(`vllm_launcher.py`), hot publish and rollback of the registry's versions (`publish.py`,
`discovery.py`) and the `rolecast serve|adapters` commands (`cli.py`). The registry, the
manifest and the LoRA rule it applies are `formats`'."""
