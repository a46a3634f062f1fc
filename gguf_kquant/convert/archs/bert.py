"""BertModel (embeddings) -> ``bert``: WordPiece vocabulary, pooler and MLM heads dropped."""

from __future__ import annotations

import gguf

from ..base import Converter, register
from ..vocab import set_vocab_bert


@register
class BertConverter(Converter):
    hf_architectures = ("BertModel", "BertForMaskedLM")
    untested_architectures = ("BertForMaskedLM",)
    arch = gguf.MODEL_ARCH.BERT
    required_hparams = ("hidden_size", "vocab_size", "max_position_embeddings", "intermediate_size")

    def check_shapes(self):
        h = self.hparams
        for name, t in self.ckpt.items():
            if name.endswith("word_embeddings.weight"):
                self.expect_shape(t, (h["vocab_size"], h["hidden_size"]))
            elif name.endswith("position_embeddings.weight"):
                self.expect_shape(t, (h["max_position_embeddings"], h["hidden_size"]))
            elif name.endswith("intermediate.dense.weight"):
                self.expect_shape(t, (h["intermediate_size"], h["hidden_size"]))

    def set_parameters(self, w):
        super().set_parameters(w)
        w.add_causal_attention(False)
        if (pooling := self.pooling_type()) is not None:
            w.add_pooling_type(pooling)

    def set_vocab(self, w):
        set_vocab_bert(self, w)

    def filter_name(self, name):
        if name.startswith("bert."):
            name = name[5:]
        if name.endswith(".gamma"):
            name = name[:-6] + ".weight"
        if name.endswith(".beta"):
            name = name[:-5] + ".bias"
        if name in ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"):
            return None
        if name.startswith(("cls.predictions", "cls.seq_relationship")):
            return None
        return super().filter_name(name)
