"""jopd data layer: the JSONL row contract, dataset builders, chat rendering and grain pipelines.

Never imports `models` or torch, so it can be used (and tested) without either.
"""
