"""fastmae's benchmarks, installed as ``fastmae.bench`` (the checkout's ``bench/`` folder).

- ``fastmae bench`` (``cli.py``): runs the suites below and renders their results;
- ``test_bench_model.py``: the training step, fast against reference, eager and compiled, fp32
  and bf16, with the matmul ceiling, and its peak memory (``memory.py``, a fresh process each);
- ``test_bench_finetune.py``: the fine-tuning step of the classifier (``fastmae.vit``) and its
  feature extraction, against timm's ViT of the same architecture, with the step's peak memory
  (``memory.py --model finetune``); the step is in ``finetune_step.py``;
- ``test_bench_ops.py``: the fused ops against their eager and compiled references, with the
  copy bandwidth;
- ``test_bench_video.py``: the VideoMAE pre-training step (``video_step.py``), fast against the
  official reference computation, eager and compiled, with its peak memory (``memory.py --model video``);
- ``test_bench_maskalign.py``: the MaskAlign step (``maskalign_step.py``: frozen teacher, student
  forward and backward, AdamW), fast against reference, with its peak memory (``memory.py --model maskalign``);
- ``gpu.py``: the same on one CUDA device (``fastmae bench --device cuda``);
- ``report.py``: pytest-benchmark JSON (and ``gpu.py``'s JSON) to ``report.md`` and PNG plots;
- ``environment.py``: what a result was measured on (machine, versions, allocator, backend);
- ``model_step.py``: the training step, its configurations and providers, shared by the above;
- diagnostics for kernel authors: ``step_profile.py``, ``triton_aot.py``.

Nothing here is imported by ``import fastmae``.
"""
