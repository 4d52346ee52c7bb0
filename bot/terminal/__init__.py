"""The terminal front end: `rolecast chat` (`chat.py`, its prompt and Ctrl-C in `keyboard.py`)
and `rolecast retrain` with its progress bar (`retrain.py`), sharing the error line and settings
loading of `console.py`. It drives the
chat core (`bot.core`) and the retrain loop (`bot.retrain`); nothing below it imports it."""
