"""The pieces of tools/sweep.py: protocols, planning, runner, report and plots."""
