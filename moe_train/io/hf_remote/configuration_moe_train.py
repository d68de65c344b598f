"""The configuration of a moe_train export whose router transformers does not have (AutoConfig, trust_remote_code).

Shipped inside an exported Hugging Face folder beside modeling_moe_train.py; it imports transformers only, never
moe_train (the user of an export does not have it). config.json keeps the family's own fields (which moe_train's
from_hf reads back), plus:
    moe_train_family   the family the weights are laid out as (mixtral, qwen2_moe, qwen3_moe, deepseek_v2 / v3)
    moe_train          the MoEConfig: router kind, null experts, Ada-K actions, top-p, score conventions
    moe_train_model    the decoder, resolved (head dims, the MoE layers, RoPE's inverse frequencies, MLA's scale)
"""

from transformers import PretrainedConfig


class MoeTrainConfig(PretrainedConfig):
    model_type = "moe_train"

    def __init__(self, moe_train_family=None, moe_train=None, moe_train_model=None, tie_word_embeddings=False,
                 **kwargs):
        self.moe_train_family = moe_train_family
        self.moe_train = moe_train or {}
        self.moe_train_model = moe_train_model or {}
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
