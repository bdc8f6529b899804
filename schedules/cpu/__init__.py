"""CPU schedules (``llvm`` targets): ``naive`` (unscheduled), ``hand`` (the ``cpu``
schedule), ``tuned`` (MetaSchedule over the hand schedule's knobs) and ``backward``."""
