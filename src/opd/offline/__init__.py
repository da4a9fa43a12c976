"""The offline baseline: teacher generates -> store -> student imitates."""

from opd.offline.data import OfflineData, generate_offline_data

__all__ = ["OfflineData", "generate_offline_data"]
