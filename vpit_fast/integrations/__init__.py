"""Drop-in use of vpit_fast's fused ops by other libraries' models and trainers.

Each submodule imports its library only when it is imported itself, so ``import vpit_fast`` never
pulls in transformers:

    vpit_fast.integrations.transformers -- fused linear cross-entropy for Hugging Face causal LMs
        (`apply_fused_cross_entropy`, `revert_fused_cross_entropy`)
"""
