"""``hirm eval``: render prompt suites without and with each defence, score them, and report (docs/eval.md)."""
