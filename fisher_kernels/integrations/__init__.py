"""Entry points besides the API: the Trainer / TRL callback, the command line and its plots."""
