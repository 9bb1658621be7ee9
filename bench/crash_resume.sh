#!/bin/sh
# Crash-resume at 10 random kill points per flow (make test runs 3): every flow's tables after kills and a
# rerun equal an uninterrupted run's. Tiny models; about 15 minutes on a 2-core CPU.
cd "$(dirname "$0")/.." && SELFEXPLAIN_CRASH_KILLS=10 exec .venv/bin/python -m pytest -q tests/flows/test_crash_resume.py "$@"
