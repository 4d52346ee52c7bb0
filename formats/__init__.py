"""What bot/, serving/ and finetune/ agree on: file formats and where the files live.

The three packages meet only through files and HTTP; every file one of them writes and another
reads is defined here, once:

- `paths`: the home, cache and adapter-registry directories (one environment variable each);
- `registry`: the adapter registry's layout, versions and current pointer;
- `manifest`: an adapter's `rolecast.json`, a typed and versioned schema;
- `lora`: which PEFT adapters a model server (vLLM first) can serve;
- `sharegpt`: dialogue rows (ShareGPT and OpenAI JSONL) and LLaMA-Factory's `dataset_info.json`;
- `basemodel`: the default base model's identity, its one converted checkpoint and the adapter
  that ships for it (its files are in `shipped/`).

Only the standard library, pydantic, pydantic-settings, platformdirs and filelock are imported
here (the import contracts in pyproject.toml check it); the one exception is documented in
`basemodel.convert`.
"""
