"""Model surgery: put the op into an existing model and take it out, one module per
family. :mod:`.layers`: ``replace_linear``, ``fuse_activations``, ``restore_linear``;
:mod:`.mlps`: ``fuse_mlps``; :mod:`.lm_head`: ``fuse_lm_head_loss``,
``restore_lm_head_loss``. The ``transformers`` pieces sit beside the family that uses
them (:mod:`.conv1d`, :mod:`.causal_lm`) and are imported only when transformers is;
:mod:`.common` holds what the families share and imports none of them."""

from .layers import fuse_activations, replace_linear, restore_linear
from .lm_head import fuse_lm_head_loss, restore_lm_head_loss
from .mlps import fuse_mlps

__all__ = [
    "fuse_activations",
    "fuse_lm_head_loss",
    "fuse_mlps",
    "replace_linear",
    "restore_linear",
    "restore_lm_head_loss",
]
