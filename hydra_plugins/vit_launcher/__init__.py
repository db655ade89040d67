"""Hydra finds launchers only in the ``hydra_plugins`` namespace: the project's (``vit/launcher.py``) is registered here."""

from vit.launcher import ChainLauncher as _ChainLauncher


class ChainLauncher(_ChainLauncher):
    """``hydra/launcher=chains`` (the default): see ``vit.launcher``."""
