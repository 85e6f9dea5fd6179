"""Checkpoints in and out: Hugging Face and DeepSeek formats, held equal to transformers.

    hf_config.py   config.json in every spelling -> ModelConfig fields (no torch: flyer.config uses it)
    tensorfile.py  streaming safetensors reader/writer: one tensor at a time, into its parameter
    hf_names.py    tensor names and rope layouts, per family
    hf_tokenizer.py  the tokenizer, its EOS and special tokens
    hf.py          DeepSeek's FP8 blocks and the other stored formats, ``load_hf``
    load.py        ``load_pretrained(PATH)``: a flyer run, step directory or HF directory; ``--init``;
                   ``settings_dir``: the HF tokenizer / generation settings a checkpoint has or carries
    export.py      ``flyer export``: a directory transformers loads (bf16, fp32, fp8, int4, nvfp4; shards)

The main modules, each importing only those listed above it (others hold one family or format); this file
imports nothing, so ``flyer.config``
loads without torch.
"""
