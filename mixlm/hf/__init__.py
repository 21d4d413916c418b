"""mixlm checkpoints ⇄ Hugging Face transformers folders, one module per job:

    mixlm.hf.export        export_hf: a param source -> safetensors + config.json + tokenizer + card, atomically
    mixlm.hf.verify        verify_export: Flax vs transformers logits on the same random tokens
    mixlm.hf.import_hf     import_hf: a transformers folder -> a mixlm checkpoint + model config
    mixlm.hf.safetensors_files   HFTensor, the shard plan and a streaming safetensors writer
    mixlm.data.tokenizer     the tokenizer files of a folder, copied and checked against the vocabulary
    mixlm.hf.provenance    mixlm_export.json and the model card rendered from it
    mixlm.hf.folders       folders that appear only when complete (staging + rename)

Param sources (what export reads: `open_checkpoint`, `MemoryReader`) live in mixlm.checkpoint; what a
family exports to and reads from (architecture, config.json, tensor names) lives in the family's module,
reached through mixlm.model_families. This package file imports nothing; export's error is mixlm.errors.ExportError.
"""
