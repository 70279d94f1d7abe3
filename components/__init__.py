"""Research variants (see docs/architecture.md, "How to add a research variant"); mmllm never imports them."""
