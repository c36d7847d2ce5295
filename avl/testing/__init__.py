"""Tiny checkpoint, tokenizer and dataset builders for tests, smoke runs and `avl demo` (no downloads).

Not public API: the modules change with the tests that need them.

- `llama_tokenizer`: a tiny Llama-2-style tokenizer (LLaVA-1.5's layout);
- `qwen2_tokenizer`: a tiny Qwen2-style tokenizer (LLaVA-OneVision's special tokens);
- `llava_checkpoint`: a tiny random LLaVA-1.5 checkpoint in the hub's layout (the demo's model);
- `eval_data`: tiny datasets of the evaluation tasks in their hub layouts.
"""
