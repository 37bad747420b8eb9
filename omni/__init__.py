"""Omni: omnichannel marketing-automation orchestration on Prefect."""

__version__ = "0.1.0"
