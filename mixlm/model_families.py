"""The registry of model families: `model.family` names -> the object (usually a module) that is the family.

    register_family("llama-moe", "mypkg.llama_moe")   # a module path (imported on first use), module or object
    family = get_family(cfg.family)                  # e.g. the module mixlm.models.llama
    family_names()                                   # ('llama', 'gpt2', ...), in registration order

Everything outside a family's own module (build_model, abstract_params, parameter counts, export, import,
the model card, lm-eval on our Flax model) reaches the family through `get_family`. A family provides:

    Model                                   the nnx.Module: Model(cfg, *, rngs, vocab_multiple_of, attention_impl)
                                            -> model(tokens_BxL, positions_BxL=, segment_ids_BxL=, layout=)
                                               -> logits_BxLxV (layout: mixlm.sharding.Layout or None)
                                            optional: model.hidden(...same...) -> final-normed [B, L, D] and
                                            model.output_kernel() -> [D, V_pad]: the training loss then runs in
                                            chunks (mixlm.models.forward.loss_sums), never the whole logits
    EMBEDDING_PARAM                         top-level param of the token embedding ([V_pad, D])
    EMBEDDING_PARAMS                        top-level params counted out of "non-embedding" parameters
    hf_architecture(cfg) -> str             the transformers class it exports to, e.g. "LlamaForCausalLM"
    unexportable_reason(cfg) -> str         '' when cfg maps exactly onto that class, else why not
    hf_config(cfg, **extra)                 the transformers config object of an export (extra: token ids, ...)
    hf_name_map(cfg)                        (our param path, HF tensor name, kind) for every param
    HF_MODEL_TYPES                          {config.json model_type it reads: what that is, for messages}
    model_config_from_hf(hf, *, where, name) -> ModelConfig; ExportError naming what it cannot represent
    model_card_rows(cfg) -> dict[str, str]  the model card's family-specific architecture rows

Built-in families are registered by module path, so importing this module (mixlm.config does, to check
`model.family`) imports nothing heavy: loading a config reads files and nothing else.
"""

from __future__ import annotations

import importlib

_BUILT_IN = {"llama": "mixlm.models.llama", "gpt2": "mixlm.models.gpt2"}
_families: dict[str, object] = dict(_BUILT_IN)


def register_family(name: str, family: object, *, replace: bool = False) -> None:
    """Makes `name` a valid model.family. `family`: a module path string (imported on first use), a module
    or any object with the attributes listed in this module's docstring."""
    if not name or not isinstance(name, str):
        raise ValueError(f"a model family needs a non-empty name, got {name!r}")
    if name in _families and not replace:
        raise ValueError(f"model family {name!r} is already registered ({_families[name]!r}); pass replace=True")
    _families[name] = family


def unregister_family(name: str) -> None:
    """Removes a registered family (built-ins included; tests register theirs and remove them after)."""
    if name not in _families:
        raise KeyError(f"model family {name!r} is not registered; registered: {', '.join(family_names())}")
    del _families[name]


def family_names() -> tuple[str, ...]:
    """The registered family names, in registration order (built-ins first)."""
    return tuple(_families)


def get_family(name: str):
    """The family registered as `name` (a module path is imported here, once)."""
    if name not in _families:
        raise KeyError(f"model family {name!r} is not registered; registered: {', '.join(family_names())}")
    family = _families[name]
    if isinstance(family, str):
        family = importlib.import_module(family)
        _families[name] = family
    return family
