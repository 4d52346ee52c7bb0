"""The training side: dataset checks and cleaning (`data.py`), LoRA SFT (`trainer.py`, with
`adapter.py`, `memory.py`, `loop.py`, `checkpoints.py`, `progress.py`), evaluation
(`evaluate.py`, `metrics.py`, persona consistency in `consistency.py`), adapter soups (`soup.py`) and the `rolecast data|train|eval|compare|soup`
commands (`cli.py`). The formats it reads and writes are `formats`'."""
