"""ds_study: reproduce and profile cross-model KV-cache sharing (DroidSpeak)."""

__version__ = "0.1.0"
