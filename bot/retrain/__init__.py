"""The retrain loop: a persona's approved dialogues become a new adapter that is trained in its
own process, gated against the live version and published without a failed request.

The bot drives the other packages only through their command lines and files (`rolecast data`,
`rolecast train`, `rolecast eval`, `rolecast adapters`), so nothing here imports torch.
"""
