"""Compare: the parity engine (metrics, tolerances applied, verdicts, :mod:`.parity`) and the
check of one artifact, run in a worker and compared with the golden outputs (:mod:`.check`)."""
