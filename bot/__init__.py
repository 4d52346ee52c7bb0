"""The Discord service and the chat core it drives; an HTTP client of the model server.

Its folders are its rooms: `core/` (the chat core: no Discord, no front end, no retrain loop),
`discord/` (the Discord front end), `terminal/` (the terminal front end) and `retrain/` (the
retrain loop). Beside them: the settings (`settings.py`, extending the shared directories of
`formats.paths`), the typed errors (`errors.py`) and the commands it adds to `rolecast`
(`cli.py`). The import contracts in pyproject.toml keep the rooms apart.
"""
