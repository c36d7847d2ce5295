"""Adapters to other tools: ``lmms_eval`` (the lmms-eval model ``avl``)."""
