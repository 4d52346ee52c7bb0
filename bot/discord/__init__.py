"""The Discord front end: the bot (`bot.py`: `RolecastBot`, `run_bot`, the offline
`command_tree`), one cog per feature (`cogs/`), persona identity through webhooks
(`webhooks.py`) and the admin checks made at run time (`permissions.py`). It drives the chat
core (`bot.core`) and the retrain loop (`bot.retrain`); nothing below it imports it."""
