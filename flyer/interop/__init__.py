"""Checkpoints in and out: Hugging Face and DeepSeek formats, held equal to transformers.

    hf_config.py   config.json in every spelling -> ModelConfig fields (no torch: flyer.config uses it)
    tensorfile.py  streaming safetensors reader/writer: one tensor at a time, into its parameter
    hf.py          tensor names, rope layouts, DeepSeek's FP8 blocks, tokenizer + EOS, ``load_hf``
    load.py        ``load_pretrained(PATH)``: a flyer run, step directory or HF directory; ``--init``;
                   ``settings_dir``: the HF tokenizer / generation settings a checkpoint has or carries
    export.py      ``flyer export``: a directory transformers loads (bf16, fp32, FP8 blocks, shards)

Each module imports only those listed above it; this file imports nothing, so ``flyer.config``
loads without torch.
"""
