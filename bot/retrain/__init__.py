"""The retrain loop: a persona's approved dialogues become a new adapter that is trained in its
own process, gated against the live version and published without a failed request.

- `jobs.py`: the jobs in SQLite and their states;
- `runner.py`: the state machine (`RetrainService`);
- `dataset.py`: the export step: the persona's dialogues (approved, or a file), the held-out
  split, and the other personas' dialogues replayed into the training file;
- `training.py`: the training run in its own process, followed through its JSON lines and known
  by pid and start time;
- `gate.py`: the gate (evaluation against what users get now, persona consistency included) and
  publishing;
- `progress.py`: a run's progress, and how the front ends show a job in one line;
- `children.py`, `workdir.py`: the commands it runs and where their files go.

The loop drives the other packages only through their command lines and files (`rolecast data`,
`rolecast train --json`, `rolecast eval`, `rolecast adapters`) and the shared formats, so nothing
here imports torch; the front ends (`bot.discord`, `bot.terminal`) drive it, it imports neither.
"""
