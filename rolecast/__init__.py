"""Rolecast: role-play personas on Discord, served as LoRA adapters on one base model."""

__version__ = "0.1.0"
