"""Realtime execution: subscriptions, dependency waves, the scheduler and publishing."""
