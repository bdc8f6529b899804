"""Kernel schedules of lookupc (importable as ``lookupc.schedules``), one file each."""
