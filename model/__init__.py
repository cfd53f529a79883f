"""CXR-LLaVA v2, re-implemented natively on top of transformers' LLaMA.

The package reads top to bottom like the architecture (see ``docs/model.md``):

``config``      the published ``config.json``, parsed and validated
``preprocess``  8-bit grayscale image -> LANCZOS shortest edge -> centre crop -> normalise (no torch)
``vision``      the grayscale open_clip ViT (``vision_tower.*``)
``modeling``    vision tower -> linear projector -> ``LlamaModel`` -> untied ``lm_head``
``loader``      directory or hub id -> checked, sharded safetensors -> model on a device
``tokenizer``   the checkpoint's SentencePiece tokenizer, behaving like the reference's slow tokenizer
``chat``        the LLaMA-2 chat template and the ``<image>`` splice (double BOS, sentinel -200)
``prompts``     the report / differential / recommendation prompts and their variants
``quantize``    optional int8 / int4 weight-only LLaMA layers (torchao), for 16-24 GB GPUs
``devices``     which GPUs a process may hand out (``CUDA_VISIBLE_DEVICES``, nvidia-smi; no torch)
``generate``    the reference's sampling rules, per row and on the device
``decoder``     the LLaMA decoder over a static, slot-addressed KV cache (flash prefill, CUDA graphs)
``scheduler``   continuous batching of multi-turn conversations over the slots
``labeler``     report text -> present / absent / uncertain / not mentioned per finding
``pipeline``    ``ReportEngine``: images in, report + differential + recommendation + findings out
``serving``     ``ReportServer``: thread-safe ``submit`` -> future, for the inference worker
``evaluate``    per-finding F1 of generated reports, as in the paper
``tiny``        a tiny checkpoint in exactly the published format, for tests and benchmarks

Importing ``model`` (or ``model.preprocess``, ``model.config``) does not import torch; the node
process relies on that.
"""
